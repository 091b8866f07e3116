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

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from .. import merge as M
from ..api import default_feature_layer, encoder_pixels, vision_tower_of
from ..files import atomic_write_text, check_output_file, exclusive_lock
from ..images import open_images, pixel_values_of
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

    @classmethod
    def unread(cls, index: int, steps: int, kept_steps: int, skipped: list[dict]) -> "BatchRecord":
        """A batch none of whose images could be read: no τ, no tokens, only what was skipped."""
        return cls(index, [math.nan] * steps, 0, [0] * kept_steps, [0] * kept_steps, skipped)


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


def image_identity(item) -> str:
    """How the checkpoint names an image: a path as given, an in-memory image by a hash of its
    content (mode, size, pixels), so a checkpoint made on other PIL images is never resumed."""
    if not isinstance(item, Image.Image):
        return str(item)
    digest = hashlib.sha256(f"{item.mode} {item.size}".encode())
    digest.update(item.tobytes())
    return f"<image sha256:{digest.hexdigest()[:32]}>"


def _settings_key(identity: dict, r: list[float], feature_layer: int, batch_size: int, images: Sequence,
                  order: str) -> str:
    names = [image_identity(i) for i in images]
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
        start_over = "delete it to start over (its progress is then lost)"
        try:
            data = json.loads(self.path.read_text())
            if data.get("settings") != self.settings:
                raise ValueError(
                    f"calibration checkpoint {self.path} was written by a calibration with other settings "
                    f"(model, images, r, batch size or feature layer); {start_over}."
                )
            if data.get("digest") != _digest(data["settings"], data["records"]):
                raise ValueError(f"calibration checkpoint {self.path} does not match its digest (changed by hand "
                                 f"after dymu wrote it, or written by another dymu version); {start_over}.")
            records = [BatchRecord(**rec) for rec in data["records"]]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
            raise ValueError(f"calibration checkpoint {self.path} is corrupt or not a dymu checkpoint "
                             f"({type(err).__name__}); {start_over}.") from None
        for k, rec in enumerate(records):
            problem = _record_problem(rec)
            if problem:
                raise ValueError(f"calibration checkpoint {self.path}: record {k} {problem}; {start_over}.")
        return records

    def save(self, records: list[BatchRecord]) -> None:
        if self.path is None:
            return
        # json writes floats with repr(), which round-trips float64 exactly; nan as NaN.
        rows = [r.__dict__ for r in records]
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "records": rows,
                                                 "digest": _digest(self.settings, rows)}))

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _digest(settings, records) -> str:
    """sha256 of a checkpoint's content: a hand-edited record would silently change the thresholds."""
    blob = json.dumps([settings, records], sort_keys=True, allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _record_problem(rec: BatchRecord) -> str | None:
    """What is wrong with one record's fields (a checkpoint from another dymu, say), or None."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not whole(rec.index) or not whole(rec.images):
        return "has an index or image count that is not a whole number >= 0"
    for name in ("tau", "kept_sum", "kept_sqsum"):
        values = getattr(rec, name)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            return f"field {name!r} must be a list of numbers, not {values!r:.60}"
    if len(rec.kept_sum) != len(rec.kept_sqsum) or len(rec.kept_sum) > len(rec.tau):
        return f"has {len(rec.tau)} thresholds but {len(rec.kept_sum)} / {len(rec.kept_sqsum)} token sums"
    if not isinstance(rec.skipped, list):
        return "field 'skipped' must be a list"
    return None


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


class CalibrationWarning(UserWarning):
    """Calibration ran, but its result may not be what was asked for (target missed, too few images)."""


def warn_caller(message: str) -> None:
    """A CalibrationWarning attributed to the first caller outside dymu and torch's no_grad wrapper
    (the line of the user's that called `dymu.calibrate`), however deep inside it was raised."""
    import sys
    import warnings

    package = str(Path(__file__).resolve().parents[1])
    level, frame = 2, sys._getframe(1)  # stacklevel 1 is this function, 2 its caller
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename.endswith("_contextlib.py")):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, CalibrationWarning, stacklevel=level)


MIN_IMAGES, MIN_BATCH = 16, 8


def few_images_warning(readable: int, listed: int) -> str | None:
    """After the run, when it could read fewer than MIN_IMAGES images (skipped files not counted)."""
    if readable >= MIN_IMAGES:
        return None
    skipped = f" readable of the {listed} listed" if readable != listed else ""
    return (f"calibrating on only {readable}{skipped} images: thresholds from fewer than {MIN_IMAGES} are noisy "
            "(use a few hundred images like the ones the model will see)")


def setup_warnings(num_images: int, batch_size: int) -> list[str]:
    """What to warn about before calibrating: a batch too small to rank edges across (the image count
    is checked after the run, when the unreadable files are known: `few_images_warning`)."""
    out = []
    batch = min(batch_size, num_images)
    if batch < MIN_BATCH:
        out.append(f"batches of {batch} images: thresholds depend on the batch (edges are ranked across the whole "
                   f"batch, paper Eq. 4), and batches under {MIN_BATCH} make them follow single images; "
                   f"use --batch-size {MIN_BATCH} or more (and at least as many images)")
    return out


def capped_layers(per_layer_r: Sequence[float], tokens_kept_mean: Sequence[float], patches: int) -> list[int]:
    """The layers that removed clearly fewer tokens than asked: at most half a layer's tokens can merge in it
    (bipartite matching), so an r above that is cut to the cap."""
    before = [float(patches), *tokens_kept_mean[:-1]]
    return [i for i, (r, b, a) in enumerate(zip(per_layer_r, before, tokens_kept_mean)) if r > 0 and (b - a) + 0.5 < r]


def target_report(th: Thresholds, tolerance: float = 0.10) -> tuple[str, str | None]:
    """(one line: target vs reached, a warning when they differ by more than ``tolerance`` or None)."""
    target, reached = th.target_tokens, th.reached_tokens
    if target is None or reached is None:
        return f"{reached if reached is not None else float('nan'):.1f} visual tokens on average", None
    line = f"target {target:.1f}, reached {reached:.1f} visual tokens on average"
    if abs(reached - target) <= tolerance * max(target, 1.0):
        return line, None
    layers = ("layers " if len(th.capped_layers) > 1 else "layer ") + ", ".join(map(str, th.capped_layers))
    why = (f"{layers} hit the per-layer cap (at most half of a layer's tokens "
           "can merge in it), so their share of the merges was cut" if th.capped_layers else
           "no layer hit the per-layer cap (a batch-level threshold of 0 stops merging: the images were too "
           "different or the batch too small)")
    return line, (f"calibration reached {reached:.1f} visual tokens, not the target {target:.1f} "
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
    """
    check_order(order)
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

    from ..families import vlm_family_of

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
        return calibrate_units(model, images, preset=preset, r=r, schedule=schedule, batch_size=batch_size,
                               processor=processor, progress=progress, model_ref=model_ref,
                               checkpoint=checkpoint, checkpoint_every=checkpoint_every, out=out, warn=warn,
                               merge_point=merge_point or "vit", rounds=rounds or vlm.post_rounds)
    if merge_point in ("post", "both"):
        return calibrate_post(model, images, merge_point=merge_point, rounds=rounds or vlm.post_rounds,
                              preset=preset, target_tokens=target_tokens, r=r, schedule=schedule,
                              batch_size=batch_size, feature_layer=feature_layer, processor=processor,
                              checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
                              model_ref=model_ref, order=order, out=out, warn=warn, packed=packed)
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
        result = run_batches(
            images, batch_size, record,
            lambda records: summarize(records, per_layer_r, identity, feature_layer,
                                      "explicit" if explicit else schedule, run, order=order),
            key=_settings_key(identity, per_layer_r, feature_layer, batch_size, images, order),
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress, out=out, warn=warn)
    if _distributed()[0] == 0:
        _, missed = target_report(result)
        if missed:
            warn(missed)
    return result


def run_batches(images: Sequence, batch_size: int, record: Callable[[int, list], BatchRecord],
                finish: Callable[[list[BatchRecord]], Thresholds], *, key: str, checkpoint, checkpoint_every: int,
                progress: bool, out, warn) -> Thresholds:
    """The calibration loop every tower shares: ``record(index, batch)`` for every batch of ``images``
    this rank owns (under torch.distributed, batch i goes to rank i % world), resuming from and saving
    to ``checkpoint`` (every ``checkpoint_every`` batches and on Ctrl-C; ``key`` names the settings a
    checkpoint belongs to), then ``finish(all records in batch order)``. The result is written to
    ``out`` (rank 0) before the checkpoint is removed, so no moment loses the work; one calibration
    at a time per checkpoint / output (a lock)."""
    import sys

    from tqdm.auto import tqdm

    rank, world = _distributed()
    if rank == 0:
        for message in setup_warnings(len(images), batch_size):
            warn(message)
    batches = _batches(images, batch_size)
    ckpt = Checkpoint(
        None if checkpoint is None else (Path(checkpoint) if world == 1 else Path(f"{checkpoint}.rank{rank}-of-{world}")),
        key,
    )
    guarded = ckpt.path if ckpt.path is not None else (Path(out) if out is not None else None)
    lock = (exclusive_lock(guarded.with_name(guarded.name + ".lock"), f"calibration output {guarded}")
            if guarded is not None else contextlib.nullcontext())
    with lock:
        records = ckpt.load()
        done = {rec.index for rec in records}
        mine = [i for i in range(len(batches)) if i % world == rank and i not in done]
        # The bar counts the images of every rank: rank 0 learns each rank's batches once, up front.
        done_batches, per_step = len(done), [len(batches[i]) for i in mine]
        if world > 1:
            everyone: list = [None] * world
            torch.distributed.all_gather_object(everyone, (len(done), per_step))
            done_batches = sum(d for d, _ in everyone)
            steps = max(len(s) for _, s in everyone)
            per_step = [sum(s[k] for _, s in everyone if k < len(s)) for k in range(steps)]
        show = progress and rank == 0
        if show and done_batches:
            print(f"resuming from {checkpoint}: {done_batches} of {len(batches)} batches done", file=sys.stderr,
                  flush=True)
        bar = tqdm(total=sum(per_step), unit="img", desc="calibrating", disable=not show)
        try:
            for count, index in enumerate(mine, 1):
                records.append(record(index, batches[index]))
                bar.update(per_step[count - 1])
                if count % checkpoint_every == 0:
                    ckpt.save(records)
        except KeyboardInterrupt:
            ckpt.save(records)  # every finished batch survives Ctrl-C
            bar.close()
            raise
        ckpt.save(records)

        records = sorted(_gather_records(records), key=lambda rec: rec.index)
        bar.update(bar.total - bar.n)  # every rank is done here (the gather waits for all)
        bar.close()
        few = few_images_warning(sum(rec.images for rec in records), len(images))
        if few and rank == 0:
            warn(few)
        result = finish(records)
        if out is not None and rank == 0:
            result.save(out)  # the result is on disk before its checkpoint goes
        if world > 1:
            torch.distributed.barrier()
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
    patches = identity.get("patches_per_image")
    return Thresholds(
        target_tokens=None if patches is None else patches - math.fsum(per_layer_r),
        reached_tokens=mean[-1] if mean else patches,
        capped_layers=[] if patches is None else capped_layers(per_layer_r, mean, patches),
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


# ---------------------------------------------------------------------------------------------
# Families whose tower merges whole units (calibration "units"): the same Eq. 4 on unit edges
# (towers/qwen_vit.py).


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


@torch.no_grad()
def calibrate_units(model: nn.Module, images: Sequence, *, preset: str | None = None, r=None,
                    schedule: str = "constant", batch_size: int = 8, processor=None, merge_point: str = "vit",
                    rounds: int | None = None,
                   progress: bool = True, model_ref: str | None = None, checkpoint: str | Path | None = None,
                   checkpoint_every: int = 5, out: str | Path | None = None, warn=None) -> Thresholds:
    """Eq. 4 for a VLM whose tower merges units (a Qwen VL): at every block ("vit") or round ("post") the unit edges of all segments
    (images) of the batch are ranked together and the best round(r_i · units of the batch) merged;
    τ_i = score of the first edge not merged, averaged (exactly) over batches. ``processor``: the
    model's processor or its image processor (images keep their native resolution). ``images``,
    checkpoints, torch.distributed and ``out`` as `calibrate` gives them (the same loop, `run_batches`)."""
    from ..families import vlm_family_of
    from ..towers.qwen_vit import MERGE_POINTS, encode_qwen, qwen_identity

    if merge_point not in MERGE_POINTS:
        raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {merge_point!r}")
    vlm = vlm_family_of(model)
    if vlm is None or vlm.calibration != "units":
        raise ValueError(f"{type(model).__name__} does not merge units in its tower: use dymu.calibrate")
    if processor is None:
        raise ValueError(f"calibrating a {vlm.title} needs its processor (processor=...)")
    image_processor = getattr(processor, "image_processor", processor)
    visual = vlm.vision_tower(model)
    rounds = vlm.post_rounds if rounds is None else rounds
    steps = len(visual.blocks) if merge_point == "vit" else int(rounds)
    fractions = round_fractions(steps, preset=preset, r=r, schedule=schedule)
    device = next(visual.parameters()).device
    identity = qwen_identity(visual, merge_point, steps, model_ref)
    warn = warn or warn_caller

    def record(index: int, batch: list) -> BatchRecord:
        opened, skipped = open_images(batch)
        loaded = [image for _, image in opened]
        if not loaded:
            return BatchRecord.unread(index, steps, steps, skipped)
        inputs = image_processor(images=loaded, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        units = int(grid.prod(-1).sum()) // visual.spatial_merge_size**2
        tau = [math.nan] * steps

        def batch_top_edges(step: int, matches: M.Matches) -> torch.Tensor:
            chosen, threshold = M.top_edges_of_batch(matches, round(fractions[step] * units))
            tau[step] = float(threshold)
            return chosen

        encoded = encode_qwen(visual, inputs["pixel_values"].to(device), grid.to(device), [math.inf] * steps,
                              merge_point, edge_chooser=batch_top_edges)
        kept = encoded.kept_per_step
        return BatchRecord(index=index, tau=[t if f > 0 else math.nan for t, f in zip(tau, fractions)],
                           images=len(loaded), kept_sum=kept.sum(0).tolist(), kept_sqsum=(kept * kept).sum(0).tolist(),
                           skipped=skipped)

    return run_batches(images, batch_size, record,
                       lambda records: summarize(records, fractions, identity, -1, schedule if r is None else "explicit",
                                                 steps),
                       key=_settings_key(identity, fractions, -1, batch_size, images, merge_point),
                       checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress, out=out, warn=warn)


# ---------------------------------------------------------------------------------------------
# merge_point "post" / "both" (LLaVA-NeXT / OneVision): Eq. 4 on the packed LLM-level tokens.


@torch.no_grad()
def calibrate_post(model: nn.Module, images: Sequence, *, merge_point: str, rounds: int | None = None,
                   preset: str | None = None, target_tokens=None, r=None, schedule: str = "constant",
                   batch_size: int = 32, feature_layer=None, processor=None, checkpoint=None, checkpoint_every: int = 5,
                   progress: bool = True, model_ref: str | None = None, order: str = DEFAULT_ORDER, out=None,
                   warn=None, packed=None) -> Thresholds:
    """The post rounds (``merge_point`` "post" or "both", e.g. LLaVA-NeXT / OneVision): every batch of B
    images runs the model's own image path (stock tower for "post", the tower calibrated first for
    "both"; stock packing), and at every round the edges of all images of the batch are ranked
    together and the best round(r_i · units) merged, units = the packed units entering the rounds (one
    per VTU group, newlines apart) of the batch; τ_i = the score of the first edge not merged, averaged
    exactly over batches. ``preset`` (both parts of "both") / ``r`` (the rounds only): fractions of those
    units (`round_fractions`); ``target_tokens`` and ``feature_layer``: the tower part of "both" only."""
    from ..api import apply, remove
    from ..families import vlm_family_of

    vlm = vlm_family_of(model)
    if vlm is None or vlm.post_rounds is None or "post" not in vlm.merge_points:
        raise ValueError(f"{type(model).__name__} has no merge rounds after the stock steps")
    if vlm.mode_of(model) != "full" or hasattr(model, "_dymu_mode"):
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
                        warn=warn, packed=packed)
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
            def batch_top_edges(step: int, matches: M.Matches) -> torch.Tensor:
                chosen, threshold = M.top_edges_of_batch(matches, round(fractions[step] * units))
                tau[step] = float(threshold)
                return chosen
            return batch_top_edges

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


@torch.no_grad()
def clip_fraction(model: nn.Module, thresholds: Thresholds, images: Sequence, max_tokens: int, *,
                  processor=None, batch_size: int = 32) -> tuple[int, int]:
    """(images over budget, images read): how many of ``images`` keep more than ``max_tokens`` tokens
    at the feature layer with ``thresholds`` alone (per image, as at inference), i.e. how many a
    budget of ``max_tokens`` would clip. Unreadable images are not counted."""
    tower, family = vision_tower_of(model)
    processor = processor or family.default_processor(tower.config)
    device = next(tower.parameters()).device
    over = total = 0
    with dtome_patched(tower, family, thresholds=thresholds.thresholds, order=thresholds.order):
        for batch in _batches(list(images), batch_size):
            opened, _ = open_images(batch)
            if not opened:
                continue
            pixels = processor(images=[image for _, image in opened], return_tensors="pt")["pixel_values"]
            counts = encode_with_tower(tower, family, pixels.to(device), thresholds.feature_layer,
                                       drop_class_token=True).num_tokens
            over += int((counts > max_tokens).sum())
            total += len(counts)
    return over, total
