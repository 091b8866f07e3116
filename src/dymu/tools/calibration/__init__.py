"""Threshold finding (paper Eq. 4): batch-level merging, schedules, float64 averaging, resume, torchrun.

At each layer the A→B edges of the whole batch are ranked together and the best B·r_i merged, so
simple images give up more tokens than complex ones; τ_i is the score of the first edge not merged
(clamped at 0). Later layers see the batch-merged tokens, laid out in the merge order that the
thresholds are then used with (token_order.py; recorded in the file). τ_i is then averaged over
batches. The ranking leaves out the edges an image could not take at inference (past its per-image
cap, merge.top_edges_of_batch), so that the thresholds reproduce the calibration's merges.

Exactness: every batch's τ vector is kept (it is tiny) and the mean is `math.fsum` over them, the
correctly rounded sum, which does not depend on the order batches were added in. So a resumed run,
or a run split across processes, gives bit-for-bit the thresholds of one uninterrupted process
(the paper's reference code averages in bf16, and its thresholds drift from 0.88 to 0.13 over a run).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ...api import default_feature_layer, encoder_pixels, vision_tower_of
from ...files import check_output_file
from ...images import open_images, pixel_values_of
from ...thresholds import Thresholds, encoder_identity
from ...token_order import DEFAULT_ORDER, check_order
from ...towers.encoder import choosing_edges, dtome_patched, encode_with_tower, layers_to_run
from .loop import (  # noqa: F401  (the public names of dymu.tools.calibration)
    BatchRecord,
    CalibrationWarning,
    Checkpoint,
    _batches,
    _distributed,
    _settings_key,
    batch_top_edges,
    few_images_warning,
    image_identity,
    run_batches,
    setup_warnings,
    summarize,
    warn_caller,
)
from .rounds import calibrate_post, calibrate_units
from .schedules import (  # noqa: F401
    PRESETS,
    SCHEDULES,
    capped_layers,
    resolve_r,
    round_fractions,
    schedule_r,
    target_report,
)


# Images the thresholds are applied to, per image, after calibration (the default of check_images).
PER_IMAGE_CHECK = 512


def _record_batch(tower, family, pixel_values, r, run, feature_layer, index, skipped) -> BatchRecord:
    bsz = pixel_values.shape[0]
    tau = [math.nan] * len(r)
    with choosing_edges(tower, batch_top_edges(r, bsz, tau)):  # r: merges per image, so B·r per layer
        encoded = encode_with_tower(tower, family, pixel_values, feature_layer, drop_class_token=False)
    kept = encoded.kept_per_layer - (1 if family.has_class_token else 0)  # visual tokens only
    return BatchRecord(
        index=index,
        tau=[t if r[i] > 0 and i < run else math.nan for i, t in enumerate(tau)],
        images=bsz,
        kept_sum=kept.sum(0).tolist(),
        kept_sqsum=(kept * kept).sum(0).tolist(),
        skipped=skipped,
    )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images: Iterable,
    *,
    preset: str | None = None,
    target_tokens: float | None = None,
    r: float | Sequence[float] | None = None,
    schedule: str = "constant",
    batch_size: int = 32,
    max_images: int | None = None,
    feature_layer: int | None = None,
    processor=None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 5,
    progress: bool = True,
    model_ref: str | None = None,
    order: str = DEFAULT_ORDER,
    out: str | Path | None = None,
    warn=None,
    merge_point: str | None = None,
    rounds: int | None = None,
    packed: bool | None = None,
    check_images: int = PER_IMAGE_CHECK,
) -> Thresholds:
    """Find per-layer thresholds for the vision tower of ``model`` (a VLM or a CLIP/SigLIP model).

    ``merge_point`` (Qwen VLs, LLaVA-NeXT, LLaVA-OneVision; default "vit") and ``rounds`` (post rounds):
    families whose tower merges units go to `calibrate_units` ("vit" or "post"); "post" or "both" otherwise
    to `calibrate_post` ("both" first calibrates the tower as here).

    ``images``: paths or PIL images. The merge target is one of ``preset`` (low/mid/high),
    ``target_tokens`` (average visual tokens kept at the feature layer) or ``r`` (merges per image
    and layer: one value or one per layer); default: preset mid. Unreadable images are skipped and
    listed in the result. With ``checkpoint``, progress is saved every ``checkpoint_every`` batches
    (and on Ctrl-C) and a rerun resumes from it; a second calibration on the same checkpoint while
    this one runs is refused. With ``out``, the thresholds file is checked before the first batch and
    written before the checkpoint is removed, so no moment loses the work. Under torch.distributed,
    batches are split across ranks (rank 0 writes ``out``). ``order``: where tokens go after a merge
    ("interleaved", "ab" or "ab-score"), recorded in the result; use the thresholds in the same order
    (`dymu.apply` does) to keep the token counts they were made for.
    For LLaVA-NeXT / OneVision (give their AnyRes image processor) a batch of B images is the
    batch of all their crops, and token counts and ``images_seen`` are per crop.

    The result records the target (visual tokens at the feature layer), what was reached, and the
    layers whose r hit the per-layer cap. ``warn(message)`` is called for too few images, a batch
    under 8, and a target missed by more than 10% (default: `warnings.warn` with CalibrationWarning).
    ``packed``: run each batch as packed rows after the first merge (default: the encoder's
    DEFAULT_PACKED) or padded (False); the thresholds are the same.
    ``check_images``: after calibration, the thresholds are applied per image, as inference runs them,
    to ``check_images`` calibration images (all, or an even spread of them), and records what they keep
    (``per_image_tokens``: encoder tokens per image or crop for a tower calibration, LLM rows per image
    for units and post rounds); 0 skips that pass (it costs about one inference-speed tower pass over
    those images).
    """
    check_order(order)
    if isinstance(check_images, bool) or not isinstance(check_images, int) or check_images < 0:
        raise ValueError(f"check_images must be a whole number >= 0 (0: no per-image check), not {check_images!r}")
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be a whole number >= 1 (or None for all), not {max_images!r}")
    if out is not None:
        check_output_file(out, "thresholds file")
    warn = warn or warn_caller
    images = list(images)[:max_images] if max_images is not None else list(images)
    if not images:
        raise ValueError("no images to calibrate on")

    from ...families import vlm_family_of

    vlm = vlm_family_of(model)
    merge_points = vlm.merge_points if vlm is not None and vlm.supports("merge_point") else ("vit",)
    if merge_point is not None and merge_point not in merge_points:
        if vlm is not None and not vlm.supports("merge_point"):
            vlm.refuse_unsupported("merge_point", model)
        raise ValueError(f"merge_point must be one of {', '.join(merge_points)} for {type(model).__name__}, "
                         f"got {merge_point!r}")
    if rounds is not None and merge_point not in ("post", "both"):
        raise ValueError("rounds are for merge_point 'post' or 'both'")
    if vlm is not None and vlm.calibration == "units":
        unsupported = [name for name, v in (("target_tokens", target_tokens), ("feature_layer", feature_layer),
                                            ("packed", packed)) if v is not None]
        if unsupported:
            raise ValueError(f"calibration of a {vlm.title} does not take {', '.join(unsupported)} (use preset or r, "
                             "fractions of each image's units; its tower packs images natively)")
        if order != DEFAULT_ORDER:
            raise ValueError(f"a {vlm.title} merges whole units in its own layout: order does not apply")
        result = calibrate_units(model, images, preset=preset, r=r, schedule=schedule, batch_size=batch_size,
                                 processor=processor, progress=progress, model_ref=model_ref,
                                 checkpoint=checkpoint, checkpoint_every=checkpoint_every, out=out, warn=warn,
                                 merge_point=merge_point or "vit", rounds=rounds or vlm.post_rounds)
    elif merge_point in ("post", "both"):
        result = calibrate_post(model, images, merge_point=merge_point, rounds=rounds or vlm.post_rounds,
                                preset=preset, target_tokens=target_tokens, r=r, schedule=schedule,
                                batch_size=batch_size, feature_layer=feature_layer, processor=processor,
                                checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
                                model_ref=model_ref, order=order, out=out, warn=warn, packed=packed,
                                check_images=check_images)
        if merge_point == "both":  # the tower part checked its own target (encoder tokens per tower input)
            return result
    else:
        result = _calibrate_tower(model, images, preset, target_tokens, r, schedule, batch_size, feature_layer,
                                  processor, checkpoint, checkpoint_every, progress, model_ref, order, out, warn,
                                  packed)
    if _distributed()[0] == 0 and check_images:
        # What inference will deliver: the thresholds applied per image (the calibration's own merging
        # is batch-level), on at most check_images calibration images spread evenly over the list (its
        # first ones could be one folder's).
        checked = [images[i * len(images) // check_images] for i in range(check_images)] \
            if len(images) > check_images else images
        if vlm is None or vlm.calibration == "tower" and merge_point not in ("post", "both"):
            counts, what = _kept_per_tower_input(model, result, checked, processor, batch_size)
        else:
            counts, what = _llm_rows_per_image(model, vlm, result, checked, processor, batch_size), "LLM rows per image"
        if counts:
            result.per_image_tokens = {"mean": math.fsum(counts) / len(counts), "min": min(counts),
                                       "max": max(counts), "images": len(counts), "counts": what,
                                       "measured_on": "an even spread of the calibration images" if len(images) > len(checked)
                                       else "the calibration images"}
            if out is not None:
                result.save(out)
        _, missed = target_report(result)
        if missed:
            warn(missed)
    return result


def _calibrate_tower(model, images, preset, target_tokens, r, schedule, batch_size, feature_layer, processor,
                     checkpoint, checkpoint_every, progress, model_ref, order, out, warn, packed) -> Thresholds:
    """Eq. 4 on a CLIP / SigLIP tower: every batch merges the batch's top r_i edges per layer."""
    tower, family = vision_tower_of(model)
    default_layer, _ = default_feature_layer(model, family)
    feature_layer = default_layer if feature_layer is None else feature_layer
    per_layer_r = resolve_r(tower, feature_layer, preset=preset, target_tokens=target_tokens, r=r, schedule=schedule)
    run = layers_to_run(len(tower.encoder.layers), feature_layer)
    processor = processor or family.default_processor(tower.config)
    # a VLM's vision sub-config has no name: record the model's (config._name_or_path)
    identity = encoder_identity(tower, family, model_ref or getattr(getattr(model, "config", None), "_name_or_path", ""))
    device = next(tower.parameters()).device

    def record(index: int, batch: list) -> BatchRecord:
        # Images are decoded one at a time and shrunk when huge (dymu.images), so a batch holds at
        # most one full-size image at any moment.
        opened, skipped = open_images(batch)
        # AnyRes VLMs: every crop of every image, as the tower sees them at inference.
        _, pixels, skipped = pixel_values_of(processor, opened, skipped, lambda out: encoder_pixels(model, out)[0])
        if pixels is None:
            return BatchRecord.unread(index, len(per_layer_r), run, skipped)
        return _record_batch(tower, family, pixels.to(device), per_layer_r, run, feature_layer, index, skipped)

    explicit = r is not None and not isinstance(r, (int, float)) and len(list(r)) > 1
    with dtome_patched(tower, family, thresholds=math.inf, order=order, packed=packed):
        return run_batches(
            images, batch_size, record,
            lambda records: summarize(records, per_layer_r, identity, feature_layer,
                                      "explicit" if explicit else schedule, run, order=order),
            key=_settings_key(identity, per_layer_r, feature_layer, batch_size, images, order),
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress, out=out, warn=warn)


def _kept_per_tower_input(model, thresholds: Thresholds, images: Sequence, processor, batch_size: int):
    """(counts, what they count): tokens kept at the feature layer per tower input (image, or AnyRes
    crop) with ``thresholds`` alone, as at inference (merging is per image: the batch does not change a
    count)."""
    tower, family = vision_tower_of(model)
    processor = processor or family.default_processor(tower.config)
    crops = getattr(_family_of(model), "crops_images", False)
    return _kept_per_image(model, tower, family, thresholds, images, processor, batch_size), \
        "encoder tokens per crop" if crops else "encoder tokens per image"


def _llm_rows_per_image(model, vlm, thresholds: Thresholds, images: Sequence, processor, batch_size: int):
    """LLM rows per image with ``thresholds`` applied as `dymu.apply` does (mode dymu), through the
    family's `encode_records`; the model is left as it was."""
    from ...api import applied
    from ...settings import Settings

    counts: list[int] = []
    with applied(model, Settings(thresholds=thresholds)), torch.no_grad():
        for batch in _batches(list(images), batch_size):
            opened, skipped = open_images(batch)
            records, _ = vlm.encode_records(model, processor, opened, skipped)
            counts += [record["llm_rows"] for record in records]
    return counts


def _family_of(model):
    from ...families import vlm_family_of

    return vlm_family_of(model)


def _kept_per_image(model, tower, family, thresholds: Thresholds, images: Sequence, processor, batch_size: int):
    """Tokens kept at the feature layer per tower input (image, or AnyRes crop) with ``thresholds``
    alone, as at inference (merging is per image: the batch does not change a count)."""
    device = next(tower.parameters()).device
    counts: list[int] = []
    with dtome_patched(tower, family, thresholds=thresholds.thresholds, order=thresholds.order):
        for batch in _batches(list(images), batch_size):
            opened, skipped = open_images(batch)
            _, pixels, _ = pixel_values_of(processor, opened, skipped, lambda out: encoder_pixels(model, out)[0])
            if pixels is None:
                continue
            counts += encode_with_tower(tower, family, pixels.to(device), thresholds.feature_layer,
                                        drop_class_token=True).num_tokens.tolist()
    return counts


@torch.no_grad()
def clip_fraction(model: nn.Module, thresholds: Thresholds, images: Sequence, max_tokens: int, *,
                  processor=None, batch_size: int = 32) -> tuple[int, int]:
    """(images over budget, images read): how many of ``images`` keep more than ``max_tokens`` tokens
    at the feature layer with ``thresholds`` alone (per image, as at inference), i.e. how many a
    budget of ``max_tokens`` would clip. Unreadable images are not counted."""
    tower, family = vision_tower_of(model)
    processor = processor or family.default_processor(tower.config)
    counts = _kept_per_image(model, tower, family, thresholds, images, processor, batch_size)
    return sum(n > max_tokens for n in counts), len(counts)
