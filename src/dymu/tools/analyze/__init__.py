"""`dymu analyze`: does the token count follow image complexity? Pictures to check it on your images.

For every image of one or more folders, the vision tower is run with DToMe and the given
thresholds, and the number of visual tokens kept at the feature layer is set against a simple,
model-free measure of how complex the image is (paper Fig. 3):

    complexity C(I) = bytes of the RGB image re-encoded as JPEG at quality 75 / (H · W)

i.e. JPEG bytes per pixel of the image as stored (full resolution, before the processor resizes it).
A blank image compresses to almost nothing (~0.02 bytes/pixel); uniform noise is the worst case
(~0.6 byte/pixel at quality 75). Caveat: JPEG's fixed headers (~600 bytes) dominate very small
images, so an image under ~100×100 px reads as more complex than it is. Written to OUT:

- ``tokens.csv``: one row per image: folder, path, width, height, jpeg_bytes_q75,
  complexity_jpeg_q75 (bytes per pixel), tokens (visual tokens kept), full_tokens (patches per
  image, what the stock encoder keeps), merge_map (file name under merge_maps/, empty if not drawn);
- ``complexity_vs_tokens.png``: C(I) against tokens, one colour per folder, with the Spearman rank
  correlation (all images, and per folder in the legend);
- ``min_median_max.png``: per folder, the images with the fewest, the median and the most tokens
  (paper Fig. 7), shown as the model sees them (resized and cropped by the processor);
- ``merge_maps/NAME.png``: the image as the model sees it, next to its merge map: the patches of
  every kept token filled with their mean colour, borders between different tokens (ToMe's
  visualisation);
- ``skipped.csv``: images that could not be read (they are skipped, never fatal).

Qwen VLs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; the thresholds file's merge point, "vit" or "post"): every
image keeps its native resolution, so ``full_tokens`` is that image's own stock unit count (t·h·w/4
of its ``image_grid_thw``) and ``tokens`` the LLM tokens kept. As counts follow image size, the kept
fraction tokens / full_tokens is ranked too (`Analysis.spearman_kept_fraction`, a second scatter
panel, min/median/max by it); merge maps are on the unit grid (h/2, w/2; a cell = one 2x2 unit =
one LLM token) over the processor's pixels un-patchified (`unpatchify`). No cost control.

Cost control (README, "Cost control"): with a token budget (``max_tokens`` / ``min_tokens``) or a
focus region (``focus``: boxes, a mask, or a folder of masks named like the images), tokens.csv
gains ``tokens_without_budget_or_focus`` and every merge map shows the image (focus outlined), its
merge map without, and its merge map with the budget/focus.

Python API (for notebooks): `analyze` (everything above), `measure` (rows only, no pictures, no
matplotlib), the pure helpers `jpeg_complexity`, `spearman`, `merge_map`, `model_view`, and
`merge_map_figure` (the merge-map PNG as a PIL image).
The pictures need matplotlib, dymu's viz extra: ``pip install 'matplotlib>=3.9'``.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .figures import (
    _fmt_rho,
    before_after_figure,
    _matplotlib,
    _merge_map_name,
    merge_map_figure,
    plot_complexity_vs_tokens,
    plot_min_median_max,
    save_merge_map,
)
from ...families import unpatchify  # part of this package's API: a Qwen VL processor's patches -> pixels
from .complexity import JPEG_QUALITY, jpeg_bytes, jpeg_complexity, spearman
from .measure import (
    COUNT_COLUMNS,
    CSV_COLUMNS,
    Analysis,
    _folder_labels,
    fraction_kept,
    measure,
)
from .runs import WITHOUT_COLUMN, refuse_cost_control, run_kind
from .views import merge_map, model_view, processed_pixels

__all__ = ["analyze", "measure", "Analysis", "jpeg_bytes", "jpeg_complexity", "spearman", "merge_map",
           "model_view", "unpatchify", "merge_map_figure", "write_csv"]


def write_csv(rows: Iterable[dict], path: str | Path, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            row = dict(row)
            if isinstance(row.get("complexity_jpeg_q75"), float):
                row["complexity_jpeg_q75"] = f"{row['complexity_jpeg_q75']:.6g}"
            writer.writerow(row)
    return path


def analyze(
    model: torch.nn.Module,
    thresholds,
    folders: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    processor=None,
    batch_size: int = 16,
    max_images: int | None = None,
    merge_maps: int | None = None,
    image_root: str | Path | None = None,
    progress: bool = False,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    focus=None,
    fill=None,
) -> Analysis:
    """Measure every image of ``folders`` (see `measure`) and write the CSV and pictures to ``out_dir``.

    ``max_tokens``, ``min_tokens``, ``focus``, ``fill``: cost control, see `measure`.

    ``merge_maps``: draw merge maps for at most this many images per folder (default: all; 0:
    none). Returns the `Analysis` (rows, skipped, Spearman ρ, files written).
    """
    _matplotlib()  # fail before the slow part when matplotlib is missing
    refuse_cost_control(model, max_tokens, min_tokens, focus)  # before any folder is made
    out = Path(out_dir)
    from ...files import check_not_an_input, exclusive_lock

    check_not_an_input(out, [*([folders] if isinstance(folders, (str, Path)) else folders)], "output folder",
                       out_is_folder=True)
    out.mkdir(parents=True, exist_ok=True)
    # One run at a time per folder (a second one is refused at once), and no merge map of an earlier
    # run left beside this run's: merge_maps/ is analyze's own folder.
    with exclusive_lock(out / ".dymu-analyze.lock", f"analyze output folder {out}"):
        maps_dir = out / "merge_maps"
        maps_dir.mkdir(exist_ok=True)
        for stale in maps_dir.glob("*.png"):
            stale.unlink()
        return _analyze(model, thresholds, folders, out, maps_dir, processor, batch_size, max_images, merge_maps,
                        image_root, progress, max_tokens, min_tokens, focus, fill)


def _analyze(model, thresholds, folders, out, maps_dir, processor, batch_size, max_images, merge_maps, image_root,
             progress, max_tokens, min_tokens, focus, fill):
    if isinstance(folders, (str, Path)):
        folders = [folders]
    sources = _folder_labels(folders)
    processor = processor or _default_processor(model)
    pixels_processor = getattr(processor, "image_processor", processor)  # a full VLM processor's image part
    cells = "units (one LLM token each)" if run_kind(model) == "units" else "patches"  # a unit per LLM token
    used: set[str] = set()
    drawn: dict[str, int] = {}
    files: list[Path] = []

    def draw(row, pixel_values, group_of_patch, grid, before=None, region=None):
        if merge_maps is not None and drawn.get(row["folder"], 0) >= merge_maps:
            return
        drawn[row["folder"]] = drawn.get(row["folder"], 0) + 1
        name = _merge_map_name(row, sources[row["folder"]], used)
        title = f"{Path(row['path']).name}: {row['tokens']} of {row['full_tokens']} tokens"
        if before is None:
            files.append(save_merge_map(model_view(pixel_values, pixels_processor), group_of_patch, grid,
                                        maps_dir / name, title, cells))
        else:
            picture = before_after_figure(model_view(before[0], pixels_processor), before[1], row[WITHOUT_COLUMN],
                                          model_view(pixel_values, pixels_processor), group_of_patch, row["tokens"],
                                          grid, title, region)
            picture.save(maps_dir / name, compress_level=3)
            files.append(maps_dir / name)
        row["merge_map"] = name

    analysis = measure(model, thresholds, folders, processor=processor, batch_size=batch_size,
                       max_images=max_images, image_root=image_root, each=draw, progress=progress,
                       max_tokens=max_tokens, min_tokens=min_tokens, focus=focus, fill=fill)

    def view(row):
        from ...images import open_image

        return model_view(processed_pixels(model, pixels_processor, open_image(row["path"])), pixels_processor)

    columns = list(CSV_COLUMNS)
    if analysis.rows and WITHOUT_COLUMN in analysis.rows[0]:
        columns.insert(columns.index("tokens") + 1, WITHOUT_COLUMN)
    if analysis.rows:
        at = columns.index("full_tokens") + 1
        columns[at:at] = [c for c in COUNT_COLUMNS if c in analysis.rows[0]]
    written = [write_csv(analysis.rows, out / "tokens.csv", columns),
               write_csv(analysis.skipped, out / "skipped.csv", ("folder", "path", "reason"))]
    if analysis.rows:
        written.append(plot_complexity_vs_tokens(analysis, out / "complexity_vs_tokens.png"))
        written.append(plot_min_median_max(analysis, out / "min_median_max.png", view))
    analysis.files = written + files
    return analysis


def _default_processor(model):
    from ...api import vision_tower_of

    if run_kind(model) != "tower":
        return None  # no stock default: `measure` asks for the model's own
    tower, family = vision_tower_of(model)
    return family.default_processor(tower.config)


# ---------------------------------------------------------------------------------------------
# Command line.


def cmd_analyze(args) -> int:
    from ..console import loading
    from ...images import print_skipped
    from ...loading import load_vision_model, resolve_device_dtype
    from ...thresholds import Thresholds

    from ...files import check_not_an_input

    _matplotlib()
    check_not_an_input(args.out, [*args.images, args.thresholds], "--out-dir", out_is_folder=True)  # never reads its own charts
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    thresholds = Thresholds.from_ref(args.thresholds)
    loading(args.model)
    model, processor = load_vision_model(args.model, device, dtype)
    if run_kind(model) == "crops" and processor is None:  # the model's own image path
        raise ValueError(f"{args.model} has no image processor (preprocessor_config.json): analyze of a "
                         f"{type(model).__name__} needs it")
    out = Path(args.out)
    analysis = analyze(
        model,
        thresholds,
        args.images,
        out,
        processor=processor,
        batch_size=args.batch_size,
        max_images=args.max_images,
        merge_maps=args.merge_maps,
        image_root=args.image_root,
        progress=not args.quiet,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        focus=_cli_focus(args),
        fill=args.fill,
    )
    rows = analysis.rows
    if not rows:
        raise ValueError(f"no readable images in {', '.join(args.images)} ({len(analysis.skipped)} skipped)")
    tokens = [r["tokens"] for r in rows]
    varies = analysis.full_tokens is None  # Qwen VLs: every image at its native resolution
    of = (f"of each image's stock tokens ({_spread([r['full_tokens'] for r in rows], mean_fmt=None)}, "
          "native resolution)" if varies else f"of {analysis.full_tokens}")
    print(f"analyzed {len(rows)} images in {len(analysis.folders)} folder(s): visual tokens kept "
          f"{_spread(tokens)} {of}")
    if varies:
        kept = _spread([fraction_kept(r) for r in rows], "{:.0%}", "{:.0%}")
        print(f"kept fraction (tokens / that image's stock tokens): {kept}")
    if "llm_rows" in rows[0]:  # the counts every dymu tool shows, one name each
        print("per image: " + "; ".join(f"{name} {_spread([r[name] for r in rows])}" for name in COUNT_COLUMNS))
    if rows and WITHOUT_COLUMN in rows[0]:
        without = [r[WITHOUT_COLUMN] for r in rows]
        print(f"without the budget/focus: mean {sum(without) / len(without):.1f} tokens; with: "
              f"{sum(tokens) / len(tokens):.1f}")
    fraction = (f"; of JPEG complexity and kept fraction: rho = {_fmt_rho(analysis.spearman_kept_fraction)}"
                if varies else "")
    print(f"Spearman rank correlation of JPEG complexity (quality {JPEG_QUALITY}) and tokens: "
          f"rho = {_fmt_rho(analysis.spearman)} over {len(rows)} images{fraction}")
    if len(analysis.folders) > 1:
        by_fraction = analysis.spearman_by_folder(kept_fraction=True)
        for label, rho in analysis.spearman_by_folder().items():
            n = sum(r["folder"] == label for r in rows)
            print(f"  {label}: rho = {_fmt_rho(rho)} over {n} images"
                  + (f"; kept fraction: rho = {_fmt_rho(by_fraction[label])}" if varies else ""))
    maps = sum(1 for r in rows if r["merge_map"])
    print(f"wrote {out / 'tokens.csv'}, complexity_vs_tokens.png, min_median_max.png and {maps} merge maps "
          f"in {out / 'merge_maps'}")
    print_skipped(analysis.skipped, where=str(out / "skipped.csv"))
    return 0


def _spread(values, fmt: str = "{}", mean_fmt: str | None = "{:.1f}") -> str:
    """'min A / median B / max C (mean D)' of ``values`` (no mean when ``mean_fmt`` is None)."""
    ordered = sorted(values)
    text = " / ".join(f"{which} {fmt.format(v)}" for which, v in
                      (("min", ordered[0]), ("median", statistics.median(ordered)), ("max", ordered[-1])))
    return text if mean_fmt is None else text + f" (mean {mean_fmt.format(sum(ordered) / len(ordered))})"


def _cli_focus(args):
    """--focus boxes (their union) or --focus-mask (a mask for every image, or a folder of masks)."""
    if args.focus and args.focus_mask:
        raise ValueError("give --focus boxes or --focus-mask, not both")
    return args.focus or args.focus_mask
