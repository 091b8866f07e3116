"""Calibration of the merges that are not a CLIP / SigLIP tower's DToMe: towers that merge whole LLM-token
units (calibration "units", e.g. the Qwen VLs, `towers/qwen_vit.py`), and the merge rounds after a
family's stock steps (merge_point "post" / "both", e.g. LLaVA-NeXT / OneVision). The same Eq. 4: at every
block or round the edges of the whole batch are ranked together and the best round(r_i · units) merged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ...api import default_feature_layer, vision_tower_of
from ...images import open_images
from ...thresholds import Thresholds, encoder_identity
from ...token_order import DEFAULT_ORDER
from .loop import (
    BatchRecord,
    _settings_key,
    batch_top_edges,
    run_batches,
    summarize,
    warn_caller,
)
from .schedules import round_fractions


@torch.no_grad()
def calibrate_units(model: nn.Module, images: Sequence, *, preset: str | None = None, r=None,
                    schedule: str = "constant", batch_size: int = 8, processor=None, merge_point: str = "vit",
                    rounds: int | None = None,
                   progress: bool = True, model_ref: str | None = None, checkpoint: str | Path | None = None,
                   checkpoint_every: int = 5, out: str | Path | None = None, warn=None) -> Thresholds:
    """Eq. 4 for a VLM whose tower merges units (Qwen VLs, Gemma 3): at every block ("vit") or round ("post") the unit
    edges of all segments
    (images) of the batch are ranked together and the best round(r_i · units of the batch) merged;
    τ_i = score of the first edge not merged, averaged (exactly) over batches. ``processor``: the
    model's processor or its image processor (images keep their native resolution). ``images``,
    checkpoints, torch.distributed and ``out`` as `calibrate` gives them (the same loop, `run_batches`)."""
    from ...families import vlm_family_of

    vlm = vlm_family_of(model)
    if vlm is None or vlm.calibration != "units":
        raise ValueError(f"{type(model).__name__} does not merge units in its tower: use dymu.calibrate")
    if merge_point not in vlm.merge_points:
        raise ValueError(f"merge_point must be one of {', '.join(vlm.merge_points)}, got {merge_point!r}")
    if processor is None:
        raise ValueError(f"calibrating a {vlm.title} needs its processor (processor=...)")
    image_processor = getattr(processor, "image_processor", processor)
    rounds = vlm.post_rounds if rounds is None else rounds
    steps, identity = vlm.unit_calibration(model, merge_point, rounds, model_ref)
    fractions = round_fractions(steps, preset=preset, r=r, schedule=schedule)
    warn = warn or warn_caller

    def record(index: int, batch: list) -> BatchRecord:
        opened, skipped = open_images(batch)
        loaded = [image for _, image in opened]
        if not loaded:
            return BatchRecord.unread(index, steps, steps, skipped)
        tau = [math.nan] * steps
        kept = vlm.unit_calibration_batch(model, image_processor, loaded, merge_point, steps,
                                          lambda units: batch_top_edges(fractions, units, tau))
        return BatchRecord(index=index, tau=[t if f > 0 else math.nan for t, f in zip(tau, fractions)],
                           images=len(loaded), kept_sum=kept.sum(0).tolist(), kept_sqsum=(kept * kept).sum(0).tolist(),
                           skipped=skipped)

    return run_batches(images, batch_size, record,
                       lambda records: summarize(records, fractions, identity, -1, schedule if r is None else "explicit",
                                                 steps),
                       key=_settings_key(identity, fractions, -1, batch_size, images, merge_point),
                       checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress, out=out, warn=warn)


@torch.no_grad()
def calibrate_post(model: nn.Module, images: Sequence, *, merge_point: str, rounds: int | None = None,
                   preset: str | None = None, target_tokens=None, r=None, schedule: str = "constant",
                   batch_size: int = 32, feature_layer=None, processor=None, checkpoint=None, checkpoint_every: int = 5,
                   progress: bool = True, model_ref: str | None = None, order: str = DEFAULT_ORDER, out=None,
                   warn=None, packed=None, check_images: int = 0) -> Thresholds:
    """The post rounds (``merge_point`` "post" or "both", e.g. LLaVA-NeXT / OneVision): every batch of B
    images runs the model's own image path (stock tower for "post", the tower calibrated first for
    "both"; stock packing), and at every round the edges of all images of the batch are ranked
    together and the best round(r_i · units) merged, units = the packed units entering the rounds (one
    per VTU group, newlines apart) of the batch; τ_i = the score of the first edge not merged, averaged
    exactly over batches. ``preset`` (both parts of "both") / ``r`` (the rounds only): fractions of those
    units (`round_fractions`); ``target_tokens`` and ``feature_layer``: the tower part of "both" only;
    ``check_images``: the per-image check of that tower part (`calibrate`)."""
    from ...api import apply, remove, settings_of
    from ...families import vlm_family_of
    from . import calibrate

    vlm = vlm_family_of(model)
    if vlm is None or vlm.post_rounds is None or "post" not in vlm.merge_points:
        raise ValueError(f"{type(model).__name__} has no merge rounds after the stock steps")
    if settings_of(model) is not None:
        raise ValueError("calibrate the post rounds on the stock model: dymu.remove(model) first")
    if processor is None:
        raise ValueError(f"calibrating {vlm.title} post rounds needs the image processor (processor=...)")
    rounds = vlm.post_rounds if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a whole number >= 1, not {rounds!r}")
    if merge_point == "post" and (target_tokens is not None or feature_layer is not None):
        raise ValueError("target_tokens and feature_layer are for the tower: merge_point 'post' runs the stock tower")
    tower, family = vision_tower_of(model)
    if merge_point == "both":  # the tower first, as merge_point "vit" (its own checkpoint)
        vit = calibrate(model, images, preset=preset, target_tokens=target_tokens, schedule=schedule, batch_size=batch_size, feature_layer=feature_layer, processor=processor,
                        checkpoint=None if checkpoint is None else f"{checkpoint}.vit",
                        checkpoint_every=checkpoint_every, progress=progress, model_ref=model_ref, order=order,
                        warn=warn, packed=packed, check_images=check_images)
    else:
        layer, _ = default_feature_layer(model, family)
        vit = Thresholds(thresholds=[math.inf] * len(tower.encoder.layers), feature_layer=layer,
                         encoder=encoder_identity(tower, family, model_ref or getattr(model.config, "_name_or_path", "")),
                         schedule="none (stock tower)", order=order)
    fractions = round_fractions(rounds, preset=preset, r=r, schedule=schedule)
    image_processor = getattr(processor, "image_processor", processor)
    apply(model, (vit.thresholds, [math.inf] * rounds) if merge_point == "both" else [math.inf] * rounds,
          merge_point=merge_point, order=vit.order)
    device = next(tower.parameters()).device

    def record(index: int, batch: list) -> BatchRecord:
        opened, skipped = open_images(batch)
        loaded = [image for _, image in opened]
        if not loaded:
            return BatchRecord.unread(index, rounds, rounds, skipped)
        processed = image_processor(images=loaded, return_tensors="pt")
        tau = [math.nan] * rounds

        def chooser(units: int):  # the units entering the rounds, of the whole batch
            return batch_top_edges(fractions, units, tau)

        rows = vlm.post_round_rows(model, processed, chooser, device)  # (images, rounds) LLM rows
        return BatchRecord(index=index, tau=[t if f > 0 else math.nan for t, f in zip(tau, fractions)],
                           images=len(loaded), kept_sum=rows.sum(0).tolist(), kept_sqsum=(rows * rows).sum(0).tolist(),
                           skipped=skipped)

    def finish(records: list[BatchRecord]) -> Thresholds:
        post = summarize(records, fractions, {"patches_per_image": None}, -1, schedule, rounds)
        vit.encoder = {**vit.encoder, "merge_point": merge_point}
        vit.post_thresholds, vit.post_r, vit.post_rows_kept_mean = post.thresholds, fractions, post.tokens_kept_mean
        if merge_point == "post":  # the tower part saw nothing: the file counts the images of the rounds
            vit.images_seen, vit.skipped = post.images_seen, post.skipped
        return vit

    try:
        return run_batches(images, batch_size, record, finish,
                           key=_settings_key(vit.encoder, fractions, -1, batch_size, images,
                                             f"{merge_point} {vit.thresholds}"),
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress, out=out,
                           warn=warn or warn_caller)
    finally:
        remove(model)


