"""How `dymu analyze` runs each kind of model over a batch of images (`measure` drives the runs): a CLIP /
SigLIP tower (or a VLM holding one) with DToMe patched in for the run, a family whose tower merges units
(its `analyze_units`), or a family whose processor cuts images into crops (its `analyze_crops`, the model
patched by `dymu.apply` for the run). A run fills every row's ``tokens`` / ``full_tokens`` (and the counts
the family defines) and hands ``each`` what the image's merge map is drawn from."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...families import vlm_family_of
from .views import region_view

# Added after "tokens" when a token budget or focus regions are used.
WITHOUT_COLUMN = "tokens_without_budget_or_focus"


def run_kind(model) -> str:
    """How `measure` runs ``model``: "units" (its family's tower merges units), "crops" (its family's
    processor cuts an image into crops), else "tower" (the CLIP / SigLIP tower it is or holds)."""
    family = vlm_family_of(model)
    if family is not None and family.calibration == "units":
        return "units"
    if family is not None and family.crops_images:
        return "crops"
    return "tower"


def run_for(model, thresholds, processor, max_tokens, min_tokens, focus, fill, each) -> _Run:
    """The run of ``model`` (see `run_kind`) with the thresholds, cost control and ``each`` of `measure`."""
    kind = run_kind(model)
    if kind == "units":
        return _units_run(model, thresholds, processor, max_tokens, min_tokens, focus, each)
    if kind == "crops":
        return _crops_run(model, thresholds, processor, max_tokens, min_tokens, focus, each)
    return _tower_run(model, thresholds, processor, max_tokens, min_tokens, focus, fill, each)


@dataclass
class _Run:
    """How `measure` runs one kind of model over a batch of images."""

    prepare: Callable  # (PIL image, path) -> (processed image, extra): may raise (the image is skipped)
    check: Callable  # (processed image) -> None: raises (fatal) when the processor is not one analyze can use
    flush: Callable  # (pending [(row, processed image, extra)]) -> None: fills tokens / full_tokens, calls `each`
    patched: contextlib.AbstractContextManager  # the model patched while measuring
    one_size: bool  # a batch must hold images of one size


def _tower_run(model, thresholds, processor, max_tokens, min_tokens, focus, fill, each) -> _Run:
    """CLIP/SigLIP towers and the VLMs holding one: DToMe patched in for the run, batches of one image size."""
    from ...api import vision_tower_of
    from ...families.tower_vlm import settings_budget
    from ...settings import Settings
    from ...focus import DEFAULT_FILL, apply_focus, focus_mask
    from ...towers.encoder import budget_set, dtome_patched, encode_with_tower

    tower, family = vision_tower_of(model)
    values, feature_layer, order = _resolve_thresholds(thresholds, tower, model)
    processor = processor or family.default_processor(tower.config)
    if isinstance(thresholds, (str, Path)):
        from ...thresholds import Thresholds

        thresholds = Thresholds.load(thresholds)
    budget = settings_budget(Settings(thresholds=thresholds, max_tokens=max_tokens, min_tokens=min_tokens))
    constrained = budget is not None or focus is not None
    fill = DEFAULT_FILL if fill is None else fill
    patch = tower.config.patch_size
    device = next(tower.parameters()).device
    stock_positions = getattr(getattr(model, "config", None), "image_seq_length", None)  # LLaVA-1.5

    def prepare(image, path):
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        extra = None
        if constrained:
            where = focus_for(focus, Path(path))
            mask = None if where is None else focus_mask(image.size, where)
            region = None if mask is None else region_view(mask, processor, image.size)
            extra = (pixels, region)
            if mask is not None:
                pixels = processor(images=[apply_focus(image, mask, fill)], return_tensors="pt")["pixel_values"]
        return pixels, extra

    def check(pixels):
        if pixels.ndim != 4:
            raise ValueError(
                f"the image processor makes pixel values of shape {tuple(pixels.shape)}; analyze needs one "
                "view per image (batch, 3, H, W). Pass the vision tower's plain processor."
            )

    def flush(pending):
        pixels = torch.cat([p for _, p, _ in pending]).to(device)
        if constrained:
            plain = torch.cat([extra[0] for _, _, extra in pending]).to(device)
            with budget_set(tower, None):
                before = encode_with_tower(tower, family, plain, feature_layer, drop_class_token=True)
        with budget_set(tower, budget):
            encoded = encode_with_tower(tower, family, pixels, feature_layer, drop_class_token=True)
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        full_tokens = encoded.group_of_patch.shape[1]
        if grid[0] * grid[1] != full_tokens:  # not a plain patch grid: fall back to a square
            side = math.isqrt(full_tokens)
            grid = (side, full_tokens // side)
        counts = encoded.num_tokens.tolist()
        for k, (row, pixel_values, extra) in enumerate(pending):
            row["tokens"], row["full_tokens"] = int(counts[k]), int(full_tokens)
            if stock_positions is not None:  # LLaVA-1.5: one LLM row per kept token
                row.update(encoder_tokens=row["tokens"], llm_rows=row["tokens"], stock_positions=stock_positions)
            if constrained:
                row[WITHOUT_COLUMN] = int(before.num_tokens[k])
            if each is None:
                continue
            if constrained:
                each(row, pixel_values[0], encoded.group_of_patch[k].cpu(), grid,
                     before=(extra[0][0], before.group_of_patch[k].cpu()), region=extra[1])
            else:
                each(row, pixel_values[0], encoded.group_of_patch[k].cpu(), grid)

    patched = dtome_patched(tower, family, thresholds=values, order=order, budget=budget, feature_layer=feature_layer)
    return _Run(prepare, check, flush, patched, one_size=True)


def _units_run(model, thresholds, processor, max_tokens, min_tokens, focus, each) -> _Run:
    """A family whose tower merges units: the family's `analyze_units` prepares every image and
    encodes a batch with the thresholds; tokens = LLM tokens (units), full_tokens = the image's stock units."""
    from ...thresholds import Thresholds

    family = vlm_family_of(model)
    refuse_cost_control(model, max_tokens, min_tokens, focus)
    if processor is None:
        raise ValueError(f"analyzing a {type(model).__name__} needs its image processor (processor=...)")
    processor = getattr(processor, "image_processor", processor)
    if isinstance(thresholds, (str, Path)):
        thresholds = Thresholds.load(thresholds)
    prepare, encode = family.analyze_units(model, processor, thresholds)

    def flush(pending):
        for (row, _, _), (fields, view, group, grid) in zip(pending, encode(pending)):
            row.update(fields)
            if each is not None:
                each(row, view, group.cpu(), grid)

    return _Run(prepare, lambda pixels: None, flush, contextlib.nullcontext(), one_size=False)


def _crops_run(model, thresholds, processor, max_tokens, min_tokens, focus, each) -> _Run:
    """A family whose processor cuts images into crops: the model patched with ``thresholds`` and the token
    budget for the run (or as the caller patched it), its family's `analyze_crops` prepares every image and
    runs a batch through the model's own image path; with a budget, the batch runs again without it (the
    LLM rows it saved: ``tokens_without_budget_or_focus``)."""
    from ...api import settings_of
    from ...thresholds import Thresholds

    family = vlm_family_of(model)
    if focus is not None:
        raise ValueError(f"focus regions (--focus / --focus-mask) in analyze are for models that see one view per "
                         f"image, not {family.title} (its processor cuts every image into crops)")
    if processor is None:
        raise ValueError(f"analyzing a {type(model).__name__} needs its image processor (processor=...)")
    processor = getattr(processor, "image_processor", processor)
    if isinstance(thresholds, (str, Path)):
        thresholds = Thresholds.load(thresholds)
    budget = {k: v for k, v in (("max_tokens", max_tokens), ("min_tokens", min_tokens)) if v is not None}
    constrained = bool(budget) or any(getattr(thresholds, k, None) is not None for k in ("max_tokens", "min_tokens"))
    if thresholds is None and settings_of(model) is None:
        raise ValueError(f"analyzing a stock {type(model).__name__} needs thresholds")
    prepare, check, encode = family.analyze_crops(model, processor)

    def flush(pending):
        measured = encode(pending)
        without = encode(pending, budget=False) if constrained else None
        for k, ((row, _, _), (fields, view, group, grid)) in enumerate(zip(pending, measured)):
            row.update(fields)
            if without is not None:
                row[WITHOUT_COLUMN] = without[k][0]["llm_rows"]
            if each is not None:
                each(row, view, group, grid)

    return _Run(prepare, check, flush, _patched(model, thresholds, budget), one_size=False)


@contextlib.contextmanager
def _patched(model, thresholds, budget_args: dict):
    """The model patched with ``thresholds`` for the block (then stock again); an already patched model is
    used as it is when no thresholds are given (and refused with thresholds: its patch cannot be restored)."""
    from ...api import apply, remove, settings_of

    if settings_of(model) is not None:
        if thresholds is not None:
            raise ValueError(f"this {type(model).__name__} is already patched by dymu.apply: pass the stock model "
                             "with thresholds, or the patched model with thresholds=None")
        yield
        return
    apply(model, thresholds, **budget_args)
    try:
        yield
    finally:
        remove(model)


def refuse_cost_control(model, max_tokens, min_tokens, focus) -> None:
    """Token budgets and focus regions analyze does not apply: one-line error, before any folder is made.
    A tower that merges units (Qwen VLs) is measured with its thresholds alone; a family that refuses
    either says why."""
    family = vlm_family_of(model)
    if family is None or (max_tokens is None and min_tokens is None and focus is None):
        return
    if family.calibration == "units":
        raise ValueError(f"dymu analyze measures a {family.title} with its thresholds alone: token budgets and focus "
                         "regions are applied by dymu generate / dymu encode / dymu.apply")
    if max_tokens is not None or min_tokens is not None:
        family.refuse_unsupported("budget", model)
    if focus is not None:
        family.refuse_unsupported("focus", model)


def focus_for(focus, path: Path):
    """The focus of one image: ``focus`` itself, or for a folder of masks the mask named like the image."""
    if focus is None:
        return None
    if callable(focus):
        return focus(path)
    if isinstance(focus, (str, Path)) and Path(focus).is_dir():
        from ...images import IMAGE_SUFFIXES

        found = [p for p in sorted(Path(focus).iterdir()) if p.stem == path.stem and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise ValueError(f"focus mask folder {focus} has no mask named {path.stem}.* for {path}")
        return found[0]
    return focus


def _resolve_thresholds(thresholds, tower, model):
    """Threshold values for the tower, the feature layer and the merge order they were calibrated for."""
    from ...families.tower_vlm import default_feature_layer, threshold_values
    from ...towers.encoder import family_of
    from ...thresholds import Thresholds

    if isinstance(thresholds, (str, Path)):
        thresholds = Thresholds.load(thresholds)
    feature_layer = getattr(thresholds, "feature_layer", None)
    if feature_layer is None:
        feature_layer = default_feature_layer(model, family_of(tower))[0]
    return threshold_values(thresholds, tower), feature_layer, getattr(thresholds, "order", None)
