"""Measuring for `dymu analyze`: run the DToMe encoder over folders, JPEG complexity, Spearman ρ.

No matplotlib here: `measure` returns rows only; `figures.py` draws them."""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ...families.qwen_processors import unpatchify  # noqa: F401  (part of this module's API)

JPEG_QUALITY = 75

CSV_COLUMNS = (
    "folder",
    "path",
    "width",
    "height",
    "jpeg_bytes_q75",
    "complexity_jpeg_q75",
    "tokens",
    "full_tokens",
    "merge_map",
)
# Added after "tokens" when a token budget or focus regions are used.
WITHOUT_COLUMN = "tokens_without_budget_or_focus"
# The three counts every dymu tool shows per image (`dymu generate`'s report, `dymu encode --json`, the
# lmms-eval samples), added after "full_tokens" where the model defines them: tokens the vision tower kept
# (summed over an image's crops), distinct rows the LLM runs (VTU groups), the image's placeholders in the
# stock prompt. A bare CLIP/SigLIP tower has none of them (its `tokens` are the encoder's).
COUNT_COLUMNS = ("encoder_tokens", "llm_rows", "stock_positions")


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> int:
    """Size in bytes of ``image`` (converted to RGB) saved as a baseline JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_complexity(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    """Image complexity C(I): JPEG bytes at ``quality`` (default 75) per pixel, H·W of ``image``."""
    return jpeg_bytes(image, quality) / (image.width * image.height)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the average of their ranks."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties, then Pearson); nan when undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of the same length, not {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.fsum((a - mx) ** 2 for a in rx)
    vy = math.fsum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)


def merge_map(
    image: Image.Image,
    group_of_patch,
    grid: tuple[int, int],
    *,
    cell: int | None = None,
    border: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """The merge map of one image: every token's patches filled with their mean colour.

    ``image``: the image as the model sees it (any size: it is resized to the patch grid).
    ``group_of_patch``: (rows·cols,) token index of every original patch, row-major (as returned
    by `dymu.encode` with the class token dropped). ``grid``: (rows, cols) of the patch grid.
    Each patch becomes a ``cell``×``cell`` square (default: the image's own patch size, at least
    8 px); a one-pixel ``border`` line separates neighbouring patches of different tokens.
    """
    rows, cols = grid
    groups = np.asarray(torch.as_tensor(group_of_patch).cpu(), dtype=np.int64).reshape(-1)
    if groups.size != rows * cols:
        raise ValueError(
            f"group_of_patch has {groups.size} entries but the grid {rows}x{cols} has {rows * cols} patches"
        )
    if cell is None:
        cell = max(8, math.ceil(max(image.width / cols, image.height / rows)))
    size = (cols * cell, rows * cell)
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    _, token = np.unique(groups, return_inverse=True)  # 0..k-1 per patch
    labels = np.repeat(np.repeat(token.reshape(rows, cols), cell, axis=0), cell, axis=1)  # (H, W)
    flat = labels.reshape(-1)
    counts = np.bincount(flat)
    means = np.stack([np.bincount(flat, weights=pixels[:, c]) for c in range(3)], axis=1) / counts[:, None]
    out = np.rint(means[labels]).clip(0, 255).astype(np.uint8)  # (H, W, 3)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    out[edge] = border
    return Image.fromarray(out)


def model_view(pixel_values: torch.Tensor, processor=None) -> Image.Image:
    """Undo the processor's normalisation: (3, H, W) pixel values -> the RGB image the model sees."""
    x = pixel_values.detach().cpu().float().numpy()
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) pixel values, not {tuple(x.shape)}")
    if getattr(processor, "do_normalize", True):
        mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
        std = getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)
        x = x * np.asarray(std, dtype=np.float32).reshape(3, 1, 1) + np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    if getattr(processor, "do_rescale", True):
        x = x * 255.0  # the processor divided by 255 (rescale_factor); values now 0..255
    array = np.rint(x).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(array)


def processed_pixels(processor, image: Image.Image) -> torch.Tensor:
    """(3, H, W) pixel values of one image as ``processor`` prepares it for the model (Qwen: unpatchified;
    AnyRes: the base crop)."""
    out = processor(images=[image], return_tensors="pt")
    if "image_grid_thw" in out:
        return unpatchify(out["pixel_values"], out["image_grid_thw"][0], processor.patch_size, processor.merge_size)
    pixels = out["pixel_values"][0]
    return pixels[0] if pixels.ndim == 4 else pixels  # AnyRes: the base crop (the whole image at the crop size)


# ---------------------------------------------------------------------------------------------
# Measuring: run the encoder over folders of images.


@dataclass
class Analysis:
    """What `measure` / `analyze` found. ``rows`` are the tokens.csv rows (dicts, CSV_COLUMNS)."""

    rows: list[dict]
    skipped: list[dict]  # {"folder", "path", "reason"}
    # Stock tokens per image; None when they differ between images (Qwen VLs keep every image's native
    # resolution: see each row's full_tokens).
    full_tokens: int | None
    folders: dict[str, str] = field(default_factory=dict)  # label -> source folder / JSON
    files: list[Path] = field(default_factory=list)  # written by `analyze`

    @property
    def spearman(self) -> float:
        """Spearman rank correlation of complexity and tokens over all images."""
        return self._spearman(self.rows, False)

    @property
    def spearman_kept_fraction(self) -> float:
        """Spearman ρ of complexity and the kept fraction tokens / full_tokens over all images: the
        measure to read when images have different stock token counts (the same as `spearman` when not)."""
        return self._spearman(self.rows, True)

    def spearman_by_folder(self, kept_fraction: bool = False) -> dict[str, float]:
        return {label: self._spearman([r for r in self.rows if r["folder"] == label], kept_fraction)
                for label in self.folders}

    @staticmethod
    def _spearman(rows: list[dict], kept_fraction: bool) -> float:
        return spearman([r["complexity_jpeg_q75"] for r in rows],
                        [fraction_kept(r) if kept_fraction else r["tokens"] for r in rows])


def fraction_kept(row: dict) -> float:
    """Tokens kept over the stock tokens of that image."""
    return row["tokens"] / row["full_tokens"]


def _folder_labels(folders: Sequence) -> dict[str, str]:
    """A short unique label per folder: its name, with #2, #3... on repeats."""
    labels: dict[str, str] = {}
    for folder in folders:
        path = Path(folder)
        base = path.name if path.is_dir() or path.suffix.lower() != ".json" else path.stem
        base = base or str(path)
        label, k = base, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        labels[label] = str(folder)
    return labels


def region_view(mask, processor, size: tuple[int, int]) -> np.ndarray:
    """The focus region as the model sees it: (H', W') bool, the mask run through the processor's
    resize and crop (as a white-on-black image), so it lines up with `model_view` exactly."""
    picture = Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)).convert("RGB")
    if picture.size != size:
        raise ValueError(f"focus mask is {picture.width}x{picture.height} but the image is {size[0]}x{size[1]}")
    pixels = processor(images=[picture], return_tensors="pt")["pixel_values"][0]
    return np.asarray(model_view(pixels, processor).convert("L")) > 127


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


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    thresholds,
    folders: str | Path | Sequence[str | Path],
    *,
    processor=None,
    batch_size: int = 16,
    max_images: int | None = None,
    image_root: str | Path | None = None,
    each: Callable[[dict, torch.Tensor, torch.Tensor, tuple[int, int]], None] | None = None,
    progress: bool = False,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    focus=None,
    fill=None,
) -> Analysis:
    """Tokens kept and JPEG complexity for every image of ``folders``; no pictures.

    ``model``: a CLIP/SigLIP vision model or a VLM containing one, or a Qwen VL (its processor
    needed; tokens are LLM tokens, i.e. merged 2x2 units, and ``full_tokens`` the image's stock unit
    count at its native resolution). ``thresholds``: a `Thresholds` object or file (its feature
    layer, or for a Qwen VL its merge point, is used), or per-layer values. ``folders``: one or more
    folders (searched recursively) or JSON lists of images (see `dymu.images.find_images`);
    ``max_images`` caps each. ``processor``: the model's image processor (default: the tower
    family's stock one). Unreadable images are skipped and listed in ``Analysis.skipped``.
    ``each(row, pixel_values, group_of_patch, grid)`` is called for every image measured
    (pixel_values (3, H, W) as the model sees them; a Qwen VL's grid is its units, (h/2, w/2) of
    ``image_grid_thw``). The model is left as it was (patched or not) afterwards. Images of a batch
    are encoded together (a Qwen VL packs images of any sizes); results do not depend on ``batch_size``.

    Cost control: ``max_tokens`` / ``min_tokens`` (default: the thresholds file's) bound the tokens
    per image; ``focus`` flattens every image outside a region (`dymu.focus`) to ``fill``: one
    focus for all images (boxes, a mask image or its path), a folder of masks named like the images,
    or a function path -> focus. Then every row also has ``tokens_without_budget_or_focus``, and
    ``each`` also gets ``before=(pixel_values, group_of_patch)`` of the plain run and ``region``
    (the focus mask as the model sees it, or None). Not for Qwen VLs (refused).
    """
    from tqdm.auto import tqdm

    from ...images import ImageError, find_images, open_image

    if isinstance(folders, (str, Path)):
        folders = [folders]
    labels = _folder_labels(folders)
    from .anyres import anyres_run, is_anyres

    if _merges_units(model):
        run = _units_run(model, thresholds, processor, max_tokens, min_tokens, focus, each)
    elif is_anyres(model):
        run = anyres_run(model, thresholds, processor, max_tokens, min_tokens, focus, each)
    else:
        run = _tower_run(model, thresholds, processor, max_tokens, min_tokens, focus, fill, each)
    todo = []
    for label, folder in labels.items():
        found = find_images(folder, image_root)
        todo += [(label, path) for path in (found[:max_images] if max_images else found)]

    rows: list[dict] = []
    skipped: list[dict] = []
    pending: list[tuple[dict, torch.Tensor, tuple | None]] = []  # (row, processed image, extra)

    def flush():
        if pending:
            run.flush(pending)
            rows.extend(row for row, _, _ in pending)
            pending.clear()

    with run.patched:
        for label, path in tqdm(todo, unit="img", desc="analyzing", disable=not progress):
            try:
                image = open_image(path)
            except ImageError as err:
                skipped.append({"folder": label, "path": err.path, "reason": err.reason})
                continue
            try:
                pixels, extra = run.prepare(image, path)
            except Exception as err:  # a processor can reject odd sizes, a mask not fit: skip, do not die
                reason = str(err) if "focus" in str(err) else f"cannot be preprocessed ({err})"
                skipped.append({"folder": label, "path": str(path), "reason": reason})
                continue
            run.check(pixels)
            nbytes = jpeg_bytes(image)
            row = {
                "folder": label,
                "path": str(path),
                "width": image.width,
                "height": image.height,
                "jpeg_bytes_q75": nbytes,
                "complexity_jpeg_q75": nbytes / (image.width * image.height),
                "tokens": None,
                "full_tokens": None,
                "merge_map": "",
            }
            if pending and run.one_size and pending[0][1].shape != pixels.shape:
                flush()
            pending.append((row, pixels, extra))
            if len(pending) >= batch_size:
                flush()
        flush()
    full = {r["full_tokens"] for r in rows}
    return Analysis(rows=rows, skipped=skipped, full_tokens=full.pop() if len(full) == 1 else (None if full else 0),
                    folders=labels)


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


def _merges_units(model) -> bool:
    """A VLM whose native-resolution tower merges whole LLM-token units (a Qwen VL)."""
    from ...families import vlm_family_of

    family = vlm_family_of(model)
    return family is not None and family.calibration == "units"


def refuse_cost_control(model, max_tokens, min_tokens, focus) -> None:
    """Token budgets and focus regions analyze does not apply: one-line error, before any folder is made.
    A tower that merges units (Qwen VLs) is measured with its thresholds alone; a family that refuses
    either says why."""
    from ...families import vlm_family_of

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


def _units_run(model, thresholds, processor, max_tokens, min_tokens, focus, each) -> _Run:
    """A tower that merges units (Qwen VLs, Gemma 3): the family's `analyze_units` prepares every image and
    encodes a batch with the thresholds; tokens = LLM tokens (units), full_tokens = the image's stock units."""
    from ...families import vlm_family_of
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
