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
(the reference code averages in bf16 and drifts from 0.88 to 0.13: DESIGN.md §4.1).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from .. import merge as M
from ..api import vision_tower_of, default_feature_layer
from ..images import open_images
from ..towers.encoder import dtome_patched, encode_with_tower, layers_to_run
from ..thresholds import Thresholds, encoder_identity
from ..token_order import DEFAULT_ORDER, check_order

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


@dataclass
class BatchRecord:
    """What one calibration batch contributes; kept whole so that averaging is exact."""

    index: int
    tau: list[float]  # per layer, nan where the layer does not merge
    images: int
    kept_sum: list[int]  # per computed layer: sum over images of visual tokens kept
    kept_sqsum: list[int]
    skipped: list[dict]


def _record_batch(tower, family, pixel_values, r, run, feature_layer, index, skipped) -> BatchRecord:
    state = tower._dymu_state
    bsz = pixel_values.shape[0]
    tau = [math.nan] * len(r)

    def batch_top_edges(layer_index: int, matches: M.Matches) -> torch.Tensor:
        chosen, threshold = M.top_edges_of_batch(matches, round(bsz * r[layer_index]))
        tau[layer_index] = float(threshold)
        return chosen

    state.edge_chooser = batch_top_edges
    try:
        encoded = encode_with_tower(tower, family, pixel_values, feature_layer, drop_class_token=False)
    finally:
        state.edge_chooser = None
    kept = encoded.kept_per_layer - (1 if family.has_class_token else 0)  # visual tokens only
    return BatchRecord(
        index=index,
        tau=[t if r[i] > 0 and i < run else math.nan for i, t in enumerate(tau)],
        images=bsz,
        kept_sum=kept.sum(0).tolist(),
        kept_sqsum=(kept * kept).sum(0).tolist(),
        skipped=skipped,
    )


def _batches(images: Sequence, batch_size: int) -> list[list]:
    return [list(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def _settings_key(identity: dict, r: list[float], feature_layer: int, batch_size: int, images: Sequence,
                  order: str) -> str:
    names = [str(i) if not isinstance(i, Image.Image) else f"<image {k}>" for k, i in enumerate(images)]
    blob = json.dumps([identity, r, feature_layer, batch_size, order, names])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpoint:
    """Per-batch records saved atomically every few batches, so a killed run resumes exactly."""

    def __init__(self, path: str | Path | None, settings: str):
        self.path = Path(path) if path else None
        self.settings = settings

    def load(self) -> list[BatchRecord]:
        if self.path is None or not self.path.exists():
            return []
        data = json.loads(self.path.read_text())
        if data.get("settings") != self.settings:
            raise ValueError(
                f"checkpoint {self.path} was written by a calibration with other settings "
                "(model, images, r, batch size or feature layer); delete it to start over."
            )
        return [BatchRecord(**rec) for rec in data["records"]]

    def save(self, records: list[BatchRecord]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        # json writes floats with repr(), which round-trips float64 exactly; nan as NaN.
        tmp.write_text(json.dumps({"settings": self.settings, "records": [r.__dict__ for r in records]}))
        tmp.replace(self.path)

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_records(records: list[BatchRecord]) -> list[BatchRecord]:
    rank, world = _distributed()
    if world == 1:
        return records
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, records)
    return [rec for part in everyone for rec in part]


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
        if len(values) == 1:
            return [values[0]] * run + [0.0] * (num_layers - run)
        if len(values) != num_layers:
            raise ValueError(f"r has {len(values)} values; give 1 or one per layer ({num_layers})")
        return values
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        target_tokens = round(patches * PRESETS[preset])
    if target_tokens is None:
        target_tokens = round(patches * PRESETS["mid"])
    if not 0 < target_tokens <= patches:
        raise ValueError(f"target_tokens must be between 1 and the {patches} patches per image, not {target_tokens}")
    return schedule_r(patches - target_tokens, run, num_layers, schedule)


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
    packed: bool | None = None,
) -> Thresholds:
    """Find per-layer thresholds for the vision tower of ``model`` (a VLM or a CLIP/SigLIP model).

    ``images``: paths or PIL images. The merge target is one of ``preset`` (low/mid/high),
    ``target_tokens`` (average visual tokens kept at the feature layer) or ``r`` (merges per image
    and layer: one value or one per layer); default: preset mid. Unreadable images are skipped and
    listed in the result. With ``checkpoint``, progress is saved every ``checkpoint_every`` batches
    and a rerun resumes from it. Under torch.distributed, batches are split across ranks. ``order``:
    where tokens go after a merge ("interleaved", "ab" or "ab-score"), recorded in the result; use
    the thresholds in the same order (`dymu.apply` does) to keep the token counts they were made for.
    ``packed``: run each batch as packed rows after the first merge (default: the encoder's
    DEFAULT_PACKED) or padded (False); the thresholds are the same.
    """
    from tqdm.auto import tqdm

    check_order(order)
    tower, family = vision_tower_of(model)
    default_layer, _ = default_feature_layer(model, family)
    feature_layer = default_layer if feature_layer is None else feature_layer
    per_layer_r = resolve_r(tower, feature_layer, preset=preset, target_tokens=target_tokens, r=r, schedule=schedule)
    run = layers_to_run(len(tower.encoder.layers), feature_layer)
    images = list(images)[:max_images] if max_images else list(images)
    if not images:
        raise ValueError("no images to calibrate on")
    processor = processor or family.default_processor(tower.config)
    identity = encoder_identity(tower, family, model_ref)
    device = next(tower.parameters()).device

    rank, world = _distributed()
    batches = _batches(images, batch_size)
    ckpt = Checkpoint(
        None if checkpoint is None else (Path(checkpoint) if world == 1 else Path(f"{checkpoint}.rank{rank}-of-{world}")),
        _settings_key(identity, per_layer_r, feature_layer, batch_size, images, order),
    )
    records = ckpt.load()
    done = {rec.index for rec in records}
    mine = [i for i in range(len(batches)) if i % world == rank and i not in done]

    with dtome_patched(tower, family, thresholds=math.inf, order=order, packed=packed):
        bar = tqdm(total=sum(len(batches[i]) for i in mine), unit="img", desc="calibrating",
                   disable=not progress or rank != 0)
        for count, index in enumerate(mine, 1):
            opened, skipped = open_images(batches[index])
            loaded = [image for _, image in opened]
            if loaded:
                pixels = processor(images=loaded, return_tensors="pt")["pixel_values"].to(device)
                rec = _record_batch(tower, family, pixels, per_layer_r, run, feature_layer, index, skipped)
            else:
                rec = BatchRecord(index, [math.nan] * len(per_layer_r), 0, [0] * run, [0] * run, skipped)
            records.append(rec)
            bar.update(len(batches[index]))
            if count % checkpoint_every == 0:
                ckpt.save(records)
        bar.close()
        ckpt.save(records)

    records = sorted(_gather_records(records), key=lambda rec: rec.index)
    result = summarize(records, per_layer_r, identity, feature_layer, schedule if r is None else "explicit", run,
                       order=order)
    ckpt.remove()
    return result


def summarize(records, per_layer_r, identity, feature_layer, schedule, run, order: str = DEFAULT_ORDER) -> Thresholds:
    """Average the per-batch τ (correctly rounded float64 sums) and the token statistics."""
    used = [rec for rec in records if rec.images > 0]
    images_seen = sum(rec.images for rec in used)
    if images_seen == 0:
        skipped = [s["path"] for rec in records for s in rec.skipped]
        raise ValueError(f"no readable images: all {len(skipped)} were skipped")
    thresholds = []
    for layer, r_layer in enumerate(per_layer_r):
        values = [rec.tau[layer] for rec in used if not math.isnan(rec.tau[layer])]
        thresholds.append(math.fsum(values) / len(values) if values and r_layer > 0 and layer < run else math.inf)
    mean = [math.fsum(rec.kept_sum[i] for rec in used) / images_seen for i in range(run)]
    sq = [math.fsum(rec.kept_sqsum[i] for rec in used) / images_seen for i in range(run)]
    std = [math.sqrt(max(0.0, s - m * m)) for m, s in zip(mean, sq)]
    return Thresholds(
        thresholds=thresholds,
        encoder=identity,
        feature_layer=feature_layer,
        schedule=schedule,
        r=per_layer_r,
        tokens_kept_mean=mean,
        tokens_kept_std=std,
        images_seen=images_seen,
        skipped=[s for rec in records for s in rec.skipped],
        order=order,
    )
