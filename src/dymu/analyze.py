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

Python API (for notebooks): `analyze` (everything above), `measure` (rows only, no pictures, no
matplotlib), the pure helpers `jpeg_complexity`, `spearman`, `merge_map`, `model_view`, and
`merge_map_figure` (the merge-map PNG as a PIL image).
The pictures need matplotlib: ``pip install 'dymu[viz]'``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

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


# ---------------------------------------------------------------------------------------------
# Measuring: run the encoder over folders of images.


@dataclass
class Analysis:
    """What `measure` / `analyze` found. ``rows`` are the tokens.csv rows (dicts, CSV_COLUMNS)."""

    rows: list[dict]
    skipped: list[dict]  # {"folder", "path", "reason"}
    full_tokens: int
    folders: dict[str, str] = field(default_factory=dict)  # label -> source folder / JSON
    files: list[Path] = field(default_factory=list)  # written by `analyze`

    @property
    def spearman(self) -> float:
        """Spearman rank correlation of complexity and tokens over all images."""
        return spearman([r["complexity_jpeg_q75"] for r in self.rows], [r["tokens"] for r in self.rows])

    def spearman_by_folder(self) -> dict[str, float]:
        out = {}
        for label in self.folders:
            rows = [r for r in self.rows if r["folder"] == label]
            out[label] = spearman([r["complexity_jpeg_q75"] for r in rows], [r["tokens"] for r in rows])
        return out


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


def _resolve_thresholds(thresholds, tower, model):
    """Threshold values for the tower and the feature layer they were calibrated for."""
    from .api import _threshold_values, default_feature_layer
    from .patch.encoder import family_of
    from .thresholds import Thresholds

    if isinstance(thresholds, (str, Path)):
        thresholds = Thresholds.load(thresholds)
    feature_layer = getattr(thresholds, "feature_layer", None)
    if feature_layer is None:
        feature_layer = default_feature_layer(model, family_of(tower))[0]
    return _threshold_values(thresholds, tower), feature_layer


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
) -> Analysis:
    """Tokens kept and JPEG complexity for every image of ``folders``; no pictures.

    ``model``: a CLIP/SigLIP vision model or a VLM containing one. ``thresholds``: a `Thresholds`
    object or file (its feature layer is used), or per-layer values. ``folders``: one or more
    folders (searched recursively) or JSON lists of images (see `dymu.images.find_images`);
    ``max_images`` caps each. ``processor``: the model's image processor (default: the tower
    family's stock one). Unreadable images are skipped and listed in ``Analysis.skipped``.
    ``each(row, pixel_values, group_of_patch, grid)`` is called for every image measured. The
    model is left as it was (patched or not) afterwards.
    """
    from tqdm.auto import tqdm

    from .api import vision_tower_of
    from .images import ImageError, find_images, open_image
    from .patch.encoder import dtome_patched, encode_with_tower

    if isinstance(folders, (str, Path)):
        folders = [folders]
    labels = _folder_labels(folders)
    tower, family = vision_tower_of(model)
    values, feature_layer = _resolve_thresholds(thresholds, tower, model)
    processor = processor or family.default_processor(tower.config)
    patch = tower.config.patch_size
    device = next(tower.parameters()).device

    todo = []
    for label, folder in labels.items():
        found = find_images(folder, image_root)
        todo += [(label, path) for path in (found[:max_images] if max_images else found)]

    rows: list[dict] = []
    skipped: list[dict] = []
    full_tokens = 0
    pending: list[tuple[dict, torch.Tensor]] = []

    def flush():
        nonlocal full_tokens
        if not pending:
            return
        pixels = torch.cat([p for _, p in pending]).to(device)
        encoded = encode_with_tower(tower, family, pixels, feature_layer, drop_class_token=True)
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        full_tokens = encoded.group_of_patch.shape[1]
        if grid[0] * grid[1] != full_tokens:  # not a plain patch grid: fall back to a square
            side = math.isqrt(full_tokens)
            grid = (side, full_tokens // side)
        counts = encoded.num_tokens.tolist()
        for k, (row, pixel_values) in enumerate(pending):
            row["tokens"], row["full_tokens"] = int(counts[k]), int(full_tokens)
            rows.append(row)
            if each is not None:
                each(row, pixel_values[0], encoded.group_of_patch[k].cpu(), grid)
        pending.clear()

    with dtome_patched(tower, family, thresholds=values):
        for label, path in tqdm(todo, unit="img", desc="analyzing", disable=not progress):
            try:
                image = open_image(path)
            except ImageError as err:
                skipped.append({"folder": label, "path": err.path, "reason": err.reason})
                continue
            try:
                pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            except Exception as err:  # a processor can reject odd sizes; skip, do not die
                skipped.append({"folder": label, "path": str(path), "reason": f"cannot be preprocessed ({err})"})
                continue
            if pixels.ndim != 4:
                raise ValueError(
                    f"the image processor makes pixel values of shape {tuple(pixels.shape)}; analyze needs one "
                    "view per image (batch, 3, H, W). Pass the vision tower's plain processor."
                )
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
            if pending and pending[0][1].shape != pixels.shape:
                flush()
            pending.append((row, pixels))
            if len(pending) >= batch_size:
                flush()
        flush()
    return Analysis(rows=rows, skipped=skipped, full_tokens=full_tokens, folders=labels)


# ---------------------------------------------------------------------------------------------
# Pictures (matplotlib, imported lazily).


def _matplotlib():
    """matplotlib's object API (no pyplot: a notebook's backend is left alone)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the analyze pictures need matplotlib, which is an optional extra: pip install 'dymu[viz]'"
        ) from None
    return Figure


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]


def _fmt_rho(rho: float) -> str:
    return "n/a" if math.isnan(rho) else f"{rho:+.2f}"


def plot_complexity_vs_tokens(analysis: Analysis, path: str | Path) -> Path:
    """Scatter of JPEG complexity against tokens kept, one colour per folder, Spearman ρ shown."""
    Figure = _matplotlib()
    fig = Figure(figsize=(7.5, 5.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    by_folder = analysis.spearman_by_folder()
    for colour, label in zip(_colours(len(analysis.folders)), analysis.folders):
        rows = [r for r in analysis.rows if r["folder"] == label]
        if not rows:
            continue
        ax.scatter(
            [r["complexity_jpeg_q75"] for r in rows],
            [r["tokens"] for r in rows],
            s=28, alpha=0.8, color=colour, edgecolors="none",
            label=f"{label} (n={len(rows)}, ρ={_fmt_rho(by_folder[label])})",
        )
    values = [r["complexity_jpeg_q75"] for r in analysis.rows]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # blank images sit near 0.01 bytes/pixel, noise above 1
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"JPEG complexity: bytes per pixel at quality {JPEG_QUALITY}")
    ax.set_ylabel(f"visual tokens kept (of {analysis.full_tokens})")
    ax.set_title(f"Spearman ρ = {_fmt_rho(analysis.spearman)} over {len(analysis.rows)} images")
    ax.grid(alpha=0.3)
    if analysis.rows:
        ax.legend(loc="best", fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path


def _min_median_max(rows: list[dict]) -> list[tuple[str, dict]]:
    ordered = sorted(rows, key=lambda r: (r["tokens"], r["path"]))
    return [("fewest", ordered[0]), ("median", ordered[(len(ordered) - 1) // 2]), ("most", ordered[-1])]


def plot_min_median_max(analysis: Analysis, path: str | Path, view: Callable[[dict], Image.Image]) -> Path:
    """Per folder, the images with the fewest / median / most tokens (paper Fig. 7).

    ``view(row)`` returns the picture to show for a row (analyze passes the model's view).
    """
    Figure = _matplotlib()
    labels = [label for label in analysis.folders if any(r["folder"] == label for r in analysis.rows)]
    fig = Figure(figsize=(9, 3.3 * max(1, len(labels)) + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(max(1, len(labels)), 3, squeeze=False)
    for i, label in enumerate(labels):
        rows = [r for r in analysis.rows if r["folder"] == label]
        for j, (which, row) in enumerate(_min_median_max(rows)):
            ax = axes[i][j]
            ax.imshow(view(row))
            ax.set_xticks([])
            ax.set_yticks([])
            name = Path(row["path"]).name
            name = name if len(name) <= 34 else name[:31] + "..."
            ax.set_title(f"{which}: {row['tokens']} tokens\n{name}", fontsize=9)
            if j == 0:
                mean = sum(r["tokens"] for r in rows) / len(rows)
                ax.set_ylabel(f"{label}\n{len(rows)} images, mean {mean:.0f} tokens", fontsize=9)
    if not labels:
        axes[0][0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(f"Fewest / median / most tokens per folder (of {analysis.full_tokens}), as the model sees the images",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def merge_map_figure(
    view: Image.Image,
    group_of_patch,
    grid: tuple[int, int],
    title: str,
    *,
    panel: int = 384,
) -> Image.Image:
    """The model's view of an image next to its merge map, ``title`` above (Pillow only, fast)."""
    from PIL import ImageDraw

    rows, cols = grid
    cell = max(1, math.ceil(panel / max(rows, cols)))
    picture = merge_map(view, group_of_patch, grid, cell=cell)
    left = view.convert("RGB").resize(picture.size, Image.BICUBIC)
    gap, top, caption = 12, 34, 20
    width = 2 * picture.width + 3 * gap
    height = top + caption + picture.height + gap
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(left, (gap, top + caption))
    canvas.paste(picture, (2 * gap + picture.width, top + caption))
    draw = ImageDraw.Draw(canvas)
    for x in (gap, 2 * gap + picture.width):  # a frame, so that white images still show their edges
        draw.rectangle((x - 1, top + caption - 1, x + picture.width, top + caption + picture.height),
                       outline=(150, 150, 150))

    def centred(x: float, y: float, text: str, font, fill) -> None:
        left, upper, right, lower = draw.textbbox((0, 0), text, font=font)
        draw.text((x - (right - left) / 2 - left, y - (lower - upper) / 2 - upper), text, fill=fill, font=font)

    centred(width / 2, top / 2 + 2, title, _font(18), "black")
    small = _font(13)
    centred(gap + picture.width / 2, top + caption / 2, "as the model sees it", small, (60, 60, 60))
    centred(2 * gap + 1.5 * picture.width, top + caption / 2, f"merge map ({rows}x{cols} patches)", small,
            (60, 60, 60))
    return canvas


def save_merge_map(
    view: Image.Image,
    group_of_patch,
    grid: tuple[int, int],
    path: str | Path,
    title: str,
) -> Path:
    """Write `merge_map_figure` to ``path`` (PNG)."""
    path = Path(path)
    merge_map_figure(view, group_of_patch, grid, title).save(path, compress_level=3)
    return path


def _merge_map_name(row: dict, source: str, used: set[str]) -> str:
    path = Path(row["path"])
    candidates = [path.stem]
    try:
        rel = path.relative_to(source).with_suffix("")
        candidates.append(f"{row['folder']}__" + "__".join(rel.parts))
    except ValueError:
        candidates.append(f"{row['folder']}__{path.stem}")
    for name in candidates:
        if name not in used:
            break
    else:
        base, k = candidates[-1], 2
        while f"{base}_{k}" in used:
            k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name + ".png"


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
) -> Analysis:
    """Measure every image of ``folders`` (see `measure`) and write the CSV and pictures to ``out_dir``.

    ``merge_maps``: draw merge maps for at most this many images per folder (default: all; 0:
    none). Returns the `Analysis` (rows, skipped, Spearman ρ, files written).
    """
    _matplotlib()  # fail before the slow part when matplotlib is missing
    out = Path(out_dir)
    maps_dir = out / "merge_maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(folders, (str, Path)):
        folders = [folders]
    sources = _folder_labels(folders)
    processor = processor or _default_processor(model)
    used: set[str] = set()
    drawn: dict[str, int] = {}
    files: list[Path] = []

    def draw(row, pixel_values, group_of_patch, grid):
        if merge_maps is not None and drawn.get(row["folder"], 0) >= merge_maps:
            return
        drawn[row["folder"]] = drawn.get(row["folder"], 0) + 1
        name = _merge_map_name(row, sources[row["folder"]], used)
        title = f"{Path(row['path']).name}: {row['tokens']} of {row['full_tokens']} tokens"
        files.append(save_merge_map(model_view(pixel_values, processor), group_of_patch, grid, maps_dir / name, title))
        row["merge_map"] = name

    analysis = measure(model, thresholds, folders, processor=processor, batch_size=batch_size,
                       max_images=max_images, image_root=image_root, each=draw, progress=progress)

    def view(row):
        from .images import open_image

        pixels = processor(images=[open_image(row["path"])], return_tensors="pt")["pixel_values"][0]
        return model_view(pixels, processor)

    written = [write_csv(analysis.rows, out / "tokens.csv"),
               write_csv(analysis.skipped, out / "skipped.csv", ("folder", "path", "reason"))]
    if analysis.rows:
        written.append(plot_complexity_vs_tokens(analysis, out / "complexity_vs_tokens.png"))
        written.append(plot_min_median_max(analysis, out / "min_median_max.png", view))
    analysis.files = written + files
    return analysis


def _default_processor(model):
    from .api import vision_tower_of

    tower, family = vision_tower_of(model)
    return family.default_processor(tower.config)


# ---------------------------------------------------------------------------------------------
# Command line.


def cmd_analyze(args) -> int:
    from .loading import load_vision_model, resolve_device_dtype
    from .thresholds import Thresholds

    _matplotlib()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    thresholds = Thresholds.load(args.thresholds)
    model, processor = load_vision_model(args.model, device, dtype)
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
    )
    rows = analysis.rows
    if not rows:
        raise ValueError(f"no readable images in {', '.join(args.images)} ({len(analysis.skipped)} skipped)")
    tokens = sorted(r["tokens"] for r in rows)
    print(f"analyzed {len(rows)} images in {len(analysis.folders)} folder(s): visual tokens kept "
          f"min {tokens[0]} / median {tokens[(len(tokens) - 1) // 2]} / max {tokens[-1]} "
          f"(mean {sum(tokens) / len(tokens):.1f}) of {analysis.full_tokens}")
    print(f"Spearman rank correlation of JPEG complexity (quality {JPEG_QUALITY}) and tokens: "
          f"rho = {_fmt_rho(analysis.spearman)} over {len(rows)} images")
    if len(analysis.folders) > 1:
        for label, rho in analysis.spearman_by_folder().items():
            n = sum(r["folder"] == label for r in rows)
            print(f"  {label}: rho = {_fmt_rho(rho)} over {n} images")
    maps = sum(1 for r in rows if r["merge_map"])
    print(f"wrote {out / 'tokens.csv'}, complexity_vs_tokens.png, min_median_max.png and {maps} merge maps "
          f"in {out / 'merge_maps'}")
    if analysis.skipped:
        print(f"skipped {len(analysis.skipped)} unreadable files (listed in {out / 'skipped.csv'}):")
        for s in analysis.skipped:
            print(f"  {s['path']}: {s['reason']}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="tokens kept vs image complexity, min/median/max grids and merge maps for folders of images",
        description="Run the DToMe encoder over folders of images and write OUT/tokens.csv, "
        f"OUT/complexity_vs_tokens.png (JPEG quality-{JPEG_QUALITY} bytes per pixel vs tokens, Spearman rho), "
        "OUT/min_median_max.png and OUT/merge_maps/NAME.png. Needs matplotlib: pip install 'dymu[viz]'.",
    )
    p.add_argument("--model", required=True, help="VLM or CLIP/SigLIP vision model: hub id or local folder")
    p.add_argument("--thresholds", required=True, help="thresholds JSON from `dymu calibrate`")
    p.add_argument("--images", required=True, action="append",
                   help="folder (searched recursively) or JSON list of {'image': path}; repeat for several "
                        "folders, each gets its own colour")
    p.add_argument("--image-root", help="folder the JSON lists' paths are relative to (default: each JSON's folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-images", type=int, help="at most this many images per folder")
    p.add_argument("--merge-maps", type=int, metavar="N", help="merge maps for at most N images per folder "
                                                               "(default: all; 0: none)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)
