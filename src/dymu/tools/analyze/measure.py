"""Measuring for `dymu analyze`: `measure` runs a model over folders of images (runs.py: how each kind of
model runs) and sets the tokens it keeps against JPEG complexity (complexity.py: C(I), Spearman ρ).

No matplotlib here: `measure` returns rows only; `figures.py` draws them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .complexity import JPEG_QUALITY, jpeg_bytes, jpeg_complexity, spearman  # noqa: F401  (imported from here too)
from .runs import WITHOUT_COLUMN, focus_for, refuse_cost_control, run_for  # noqa: F401  (imported from here too)
from .views import merge_map, model_view, processed_pixels, region_view  # noqa: F401  (imported from here too)

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
# The three counts every dymu tool shows per image (`dymu generate`'s report, `dymu encode --json`, the
# lmms-eval samples), added after "full_tokens" where the model defines them: tokens the vision tower kept
# (summed over an image's crops), distinct rows the LLM runs (VTU groups), the image's placeholders in the
# stock prompt. A bare CLIP/SigLIP tower has none of them (its `tokens` are the encoder's).
COUNT_COLUMNS = ("encoder_tokens", "llm_rows", "stock_positions")


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
    run = run_for(model, thresholds, processor, max_tokens, min_tokens, focus, fill, each)
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
