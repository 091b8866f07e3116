"""Merge targets: presets, schedules of r over the layers or rounds, and how a result compares with its target."""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from ...thresholds import Thresholds
from ...towers.encoder import layers_to_run

SCHEDULES = ("constant", "linear", "reverse-linear")

# Fraction of patches kept by the paper's CLIP ViT-L/14-336 variants read at layer -2
# (576 - 23·r with r = 21 / 16 / 8). Other encoders get the same fractions.
PRESETS = {"low": 93 / 576, "mid": 208 / 576, "high": 392 / 576}


def schedule_r(total_removed: float, run_layers: int, num_layers: int, schedule: str = "constant") -> list[float]:
    """Split ``total_removed`` tokens per image over the first ``run_layers`` layers.

    constant: the same r everywhere; linear: r falls linearly (more merging early, the last run
    layer gets 1/run_layers of the first); reverse-linear: the mirror image. Layers that are not
    computed get r = 0. r may be fractional: calibration merges round(B·r) edges per batch.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        weights = [1.0] * run_layers
    elif schedule == "linear":
        weights = [float(run_layers - i) for i in range(run_layers)]
    else:
        weights = [float(i + 1) for i in range(run_layers)]
    total = sum(weights)
    return [total_removed * w / total for w in weights] + [0.0] * (num_layers - run_layers)


def capped_layers(per_layer_r: Sequence[float], tokens_kept_mean: Sequence[float], patches: int) -> list[int]:
    """The layers that removed clearly fewer tokens than asked: at most half a layer's tokens can merge in it
    (bipartite matching), so an r above that is cut to the cap."""
    before = [float(patches), *tokens_kept_mean[:-1]]
    return [i for i, (r, b, a) in enumerate(zip(per_layer_r, before, tokens_kept_mean)) if r > 0 and (b - a) + 0.5 < r]


def target_report(th: Thresholds, tolerance: float = 0.10) -> tuple[str, str | None]:
    """(one line: target vs what inference will keep per image, a warning when they differ by more than
    ``tolerance`` or None). Without a per-image measurement: the calibration's batch-level figure."""
    target, batch_level = th.target_tokens, th.reached_tokens
    per_image = th.per_image_tokens
    reached = per_image["mean"] if per_image else batch_level
    if per_image:
        what = per_image.get("counts", "visual tokens per image")  # files written before the key existed
        unit = what.rsplit(" per ", 1)[-1]  # what one count is of: an image, or a crop / tile of one
        counted = f"{per_image['images']}" if unit == "image" else f"{per_image['images']} {unit}s"
        line = (f"per image, as inference runs them, {reached:.1f} {what} on average (min {per_image['min']}, "
                f"max {per_image['max']}, over {counted} of {per_image['measured_on']}"
                + (f"; batch-level {batch_level:.1f})" if batch_level is not None else ")"))
        if target is not None:
            line = f"target {target:.1f}; {line}"
    elif reached is not None:
        line = (f"target {target:.1f}, reached " if target is not None else "") + f"{reached:.1f} visual tokens on average"
    else:
        line = "nothing measured"
    if target is None or reached is None:
        return line, None
    if abs(reached - target) <= tolerance * max(target, 1.0):
        return line, None
    layers = ("layers " if len(th.capped_layers) > 1 else "layer ") + ", ".join(map(str, th.capped_layers))
    why = (f"{layers} hit the per-layer cap (at most half of a layer's tokens "
           "can merge in it), so their share of the merges was cut" if th.capped_layers else
           "no layer hit the per-layer cap (thresholds found on whole batches keep more or fewer tokens per image "
           "when the images differ a lot, and a batch-level threshold of 0 stops merging)")
    return line, (f"the thresholds keep {reached:.1f} visual tokens per image, not the target {target:.1f} "
                  f"({(reached - target) / max(target, 1.0):+.0%}): {why}. Try a less aggressive target, "
                  "--schedule constant or linear (more merging in early layers, where there are more tokens), "
                  "or a larger --batch-size.")


def resolve_r(
    tower: nn.Module,
    feature_layer: int,
    *,
    preset: str | None = None,
    target_tokens: float | None = None,
    r: float | Sequence[float] | None = None,
    schedule: str = "constant",
) -> list[float]:
    """Per-layer r from exactly one of a preset, a target token count or explicit r values."""
    given = [name for name, v in (("preset", preset), ("target_tokens", target_tokens), ("r", r)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of preset, target_tokens or r, not {' and '.join(given)}")
    num_layers = len(tower.encoder.layers)
    run = layers_to_run(num_layers, feature_layer)
    patches = (tower.config.image_size // tower.config.patch_size) ** 2
    if r is not None:
        values = [float(r)] if isinstance(r, (int, float)) else [float(v) for v in r]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"r must be finite numbers >= 0 (merges per image and layer), not {r!r}")
        if len(values) == 1:
            if schedule == "constant":
                return [values[0]] * run + [0.0] * (num_layers - run)
            return schedule_r(values[0] * run, run, num_layers, schedule)  # r = the average per layer
        if schedule != "constant":
            raise ValueError(f"r has {len(values)} values (one per layer), so schedule {schedule!r} has nothing to "
                             "spread: give one r (the average merges per layer) with a schedule, or drop the schedule")
        if len(values) != run:
            raise ValueError(
                f"r has {len(values)} values; give 1 or one per layer that runs: {run} (layers 0-{run - 1}: "
                f"feature layer {feature_layer} is the output of layer {run - 1}, later layers never run)")
        return values + [0.0] * (num_layers - run)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        target_tokens = round(patches * PRESETS[preset])
    if target_tokens is None:
        target_tokens = round(patches * PRESETS["mid"])
    if not 0 < target_tokens <= patches:
        raise ValueError(f"target_tokens must be between 1 and the {patches} patches per image, not {target_tokens}")
    return schedule_r(patches - target_tokens, run, num_layers, schedule)


def round_fractions(steps: int, *, preset: str | None = None, r=None, schedule: str = "constant") -> list[float]:
    """Per block (or round) fraction of each segment's units to merge away: from a preset (the
    paper's CLIP kept fractions, applied to the units of every image) or explicit fractions
    (Qwen VLs, and the post rounds of LLaVA-NeXT / OneVision)."""
    if preset is not None and r is not None:
        raise ValueError("give one of preset or r, not both")
    if r is not None:
        values = [float(r)] * steps if isinstance(r, (int, float)) else [float(v) for v in r]
        if len(values) != steps or not all(0 <= v < 1 for v in values):
            raise ValueError(f"r for merge rounds is a fraction of each image's units in [0, 1): one value or {steps}")
        return values
    preset = preset or "mid"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return schedule_r(1.0 - PRESETS[preset], steps, steps, schedule)


