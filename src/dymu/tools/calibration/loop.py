"""The calibration loop every calibration shares: batches, per-batch records, checkpoints (resume, a
second run on the same checkpoint refused), torch.distributed, and the warnings (too few images,
small batches)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ... import merge as M
from ...files import atomic_write_text, exclusive_lock
from ...thresholds import Thresholds
from ...token_order import DEFAULT_ORDER
from .schedules import capped_layers


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
    """Average the per-batch τ, weighted by the images of each batch (correctly rounded float64 sums),
    and the token statistics."""
    used = [rec for rec in records if rec.images > 0]
    images_seen = sum(rec.images for rec in used)
    if images_seen == 0:
        skipped = [s["path"] for rec in records for s in rec.skipped]
        raise ValueError(f"no readable images: all {len(skipped)} were skipped")
    thresholds = []
    for layer, r_layer in enumerate(per_layer_r):
        # each batch's τ weighted by its images, so a short last batch counts for what it holds
        weighted = [(rec.images * rec.tau[layer], rec.images) for rec in used if not math.isnan(rec.tau[layer])]
        weight = sum(w for _, w in weighted)
        thresholds.append(math.fsum(v for v, _ in weighted) / weight if weighted and r_layer > 0 and layer < run
                          else math.inf)
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


def batch_top_edges(fractions, units: int, tau: list):
    """The edge chooser of batch-level Eq. 4: at step i the best round(fractions[i] · units) edges of the
    whole batch merge (units: the batch's images, or units entering a tower block / merge round), and
    τ_i, the score of the first edge not merged, goes to ``tau[i]``."""

    def choose(step: int, matches: M.Matches) -> torch.Tensor:
        chosen, threshold = M.top_edges_of_batch(matches, round(fractions[step] * units))
        tau[step] = float(threshold)
        return chosen

    return choose
