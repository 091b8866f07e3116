"""LLaVA-NeXT / OneVision merge points: which thresholds `dymu.apply` was given go to the tower and which
to the post rounds on the packed LLM-level tokens (see `dymu.families.llava_next`, "Merge points")."""

from __future__ import annotations

import torch

from ..towers.encoder import _threshold_floats  # None = +inf, NaN refused: the rule of every threshold

MERGE_POINTS = ("vit", "post", "both")
POST_ROUNDS = 5  # default post rounds: each removes at most half a segment's units, so 5 can leave 1/32


def resolve_merge_point(thresholds, merge_point: str | None, mode: str):
    """(tower thresholds or None, post thresholds or None, merge point) from what `dymu.apply` was given.

    ``merge_point`` default: the one a `Thresholds` file was calibrated at (files without one: "vit").
    Plain values: one per tower layer ("vit"), one per post round ("post"), or the pair (tower, rounds)
    ("both"). A file must have been calibrated at the merge point asked for (its post rounds were
    calibrated on the tokens that merge point makes)."""
    recorded = (getattr(thresholds, "encoder", None) or {}).get("merge_point")
    merge_point = merge_point or recorded or "vit"
    if merge_point not in MERGE_POINTS:
        raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {merge_point!r}")
    if merge_point == "vit":
        if recorded not in (None, "vit"):
            raise ValueError(f"these thresholds were calibrated with merge_point={recorded!r}, not 'vit'")
        return thresholds, None, merge_point
    if mode != "dymu":
        raise ValueError(f"merge_point={merge_point!r} needs mode 'dymu' (thresholded post rounds), not {mode!r}")
    if thresholds is None:
        raise ValueError(f"merge_point={merge_point!r} needs thresholds (dymu calibrate --merge-point {merge_point})")
    if hasattr(thresholds, "post_thresholds"):
        if recorded != merge_point:
            raise ValueError(f"these thresholds were calibrated with merge_point={recorded or 'vit'!r}, not "
                             f"{merge_point!r}: make them with dymu calibrate --merge-point {merge_point}")
        tower, post = thresholds, thresholds.post_thresholds
    elif merge_point == "both":
        if not (isinstance(thresholds, (tuple, list)) and len(thresholds) == 2
                and all(isinstance(t, (list, tuple, torch.Tensor)) for t in thresholds)):
            raise ValueError("merge_point='both' takes a Thresholds file, or the pair (tower thresholds, post "
                             "thresholds)")
        tower, post = thresholds
    else:
        tower, post = None, thresholds
    post = _threshold_floats([post] if isinstance(post, (int, float)) else
                             post.tolist() if isinstance(post, torch.Tensor) else list(post))
    if not post:
        raise ValueError(f"merge_point={merge_point!r} needs at least one post threshold (one per round)")
    return (tower if merge_point == "both" else None), post, merge_point
