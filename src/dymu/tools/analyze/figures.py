"""Pictures for `dymu analyze` (matplotlib, imported lazily: the viz extra, `pip install 'matplotlib>=3.9'`)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable

from PIL import Image

from .complexity import JPEG_QUALITY
from .measure import Analysis, fraction_kept
from .views import merge_map

MAX_LABELLED_POINTS = 60  # scatter points get their file names up to this many images
# A token is a group of patches matched by similarity, not by place: it can span separate regions.
MERGE_MAP_NOTE = "one token may cover patches that are not adjacent: a map can show more regions than tokens"

# ---------------------------------------------------------------------------------------------
# Pictures (matplotlib, imported lazily).


def _matplotlib():
    """matplotlib's object API (no pyplot: a notebook's backend is left alone)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the analyze pictures need matplotlib, dymu's optional viz extra: pip install 'matplotlib>=3.9'"
        ) from None
    return Figure


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]


def _fmt_rho(rho: float) -> str:
    return "n/a" if math.isnan(rho) else f"{rho:+.2f}"


def plot_complexity_vs_tokens(analysis: Analysis, path: str | Path) -> Path:
    """Scatter of JPEG complexity against tokens kept, one colour per folder, Spearman ρ shown.

    When images have different stock token counts (Qwen VLs: native resolution), a second panel
    shows the kept fraction (tokens / that image's stock tokens), with its own ρ."""
    Figure = _matplotlib()
    varies = analysis.full_tokens is None
    fig = Figure(figsize=(13, 5.2) if varies else (7.5, 5.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2 if varies else 1, squeeze=False)[0]
    _scatter(axes[0], analysis, False, "visual tokens kept (of each image's own stock count)" if varies
             else f"visual tokens kept (of {analysis.full_tokens})")
    if varies:
        _scatter(axes[1], analysis, True, "kept fraction: tokens / that image's stock tokens")
    path = Path(path)
    fig.savefig(path)
    return path


def _scatter(ax, analysis: Analysis, kept_fraction: bool, ylabel: str) -> None:
    by_folder = analysis.spearman_by_folder(kept_fraction)
    for colour, label in zip(_colours(len(analysis.folders)), analysis.folders):
        rows = [r for r in analysis.rows if r["folder"] == label]
        if not rows:
            continue
        ax.scatter(
            [r["complexity_jpeg_q75"] for r in rows],
            [fraction_kept(r) if kept_fraction else r["tokens"] for r in rows],
            s=28, alpha=0.8, color=colour, edgecolors="none",
            label=f"{label} (n={len(rows)}, ρ={_fmt_rho(by_folder[label])})",
        )
        if len(analysis.rows) <= MAX_LABELLED_POINTS:  # beyond that the names hide the points
            for r in rows:
                ax.annotate(Path(r["path"]).stem[:18], (r["complexity_jpeg_q75"], fraction_kept(r) if kept_fraction
                                                         else r["tokens"]),
                            xytext=(3, 2), textcoords="offset points", fontsize=6, color=colour, alpha=0.9)
    values = [r["complexity_jpeg_q75"] for r in analysis.rows]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # blank images sit near 0.01 bytes/pixel, noise above 1
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"JPEG complexity: bytes per pixel at quality {JPEG_QUALITY}")
    ax.set_ylabel(ylabel)
    rho = analysis.spearman_kept_fraction if kept_fraction else analysis.spearman
    what = "Kept fraction" if kept_fraction else "Tokens kept"
    ax.set_title(f"{what} vs complexity: Spearman ρ = {_fmt_rho(rho)} over {len(analysis.rows)} images")
    ax.grid(alpha=0.3)
    if analysis.rows:
        ax.legend(loc="best", fontsize=8)


def _min_median_max(rows: list[dict]) -> list[tuple[str, dict]]:
    # By kept fraction: the same order as by tokens when every image has the same stock count, and
    # the meaningful one when not (Qwen VLs: a small image has few tokens whatever it shows).
    ordered = sorted(rows, key=lambda r: (fraction_kept(r), r["path"]))
    # With an even count the median lies between two images: show the one nearest to it (the lower on a tie).
    middle = statistics.median(fraction_kept(r) for r in ordered)
    nearest = min(ordered, key=lambda r: abs(fraction_kept(r) - middle))
    which = "median" if len(ordered) % 2 else "nearest the median"
    return [("fewest", ordered[0]), (which, nearest), ("most", ordered[-1])]


def plot_min_median_max(analysis: Analysis, path: str | Path, view: Callable[[dict], Image.Image]) -> Path:
    """Per folder, the images with the fewest / median / most tokens (paper Fig. 7).

    ``view(row)`` returns the picture to show for a row (analyze passes the model's view).
    """
    Figure = _matplotlib()
    varies = analysis.full_tokens is None
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
            tokens = (f"{row['tokens']}/{row['full_tokens']} tokens ({fraction_kept(row):.0%})" if varies
                      else f"{row['tokens']} tokens")
            ax.set_title(f"{which}: {tokens}\n{name}", fontsize=9)
            if j == 0:
                mean = sum(r["tokens"] for r in rows) / len(rows)
                kept = f", {sum(map(fraction_kept, rows)) / len(rows):.0%} kept" if varies else ""
                ax.set_ylabel(f"{label}\n{len(rows)} images, mean {mean:.0f} tokens{kept}", fontsize=9)
    if not labels:
        axes[0][0].text(0.5, 0.5, "no images", ha="center", va="center")
    what = ("Lowest / median / highest kept fraction (tokens / the image's stock tokens)" if varies
            else f"Fewest / median / most tokens (of {analysis.full_tokens})")
    fig.suptitle(f"{what} per folder, as the model sees the images", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _panels(title: str, panels: list[tuple[Image.Image, str]], note: str | None = None) -> Image.Image:
    """Same-size pictures side by side, each framed with a caption, ``title`` above and ``note`` (one
    small line) below (Pillow only)."""
    from PIL import ImageDraw

    w, h = panels[0][0].size
    gap, top, caption = 12, 34, 20
    footer = 18 if note else 0
    width = len(panels) * (w + gap) + gap
    height = top + caption + h + gap + footer
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def centred(x: float, y: float, text: str, font, fill) -> None:
        left, upper, right, lower = draw.textbbox((0, 0), text, font=font)
        draw.text((x - (right - left) / 2 - left, y - (lower - upper) / 2 - upper), text, fill=fill, font=font)

    small = _font(13)
    for k, (picture, text) in enumerate(panels):
        x = gap + k * (w + gap)
        canvas.paste(picture, (x, top + caption))
        # a frame, so that white images still show their edges
        draw.rectangle((x - 1, top + caption - 1, x + w, top + caption + h), outline=(150, 150, 150))
        centred(x + w / 2, top + caption / 2, text, small, (60, 60, 60))
    centred(width / 2, top / 2 + 2, title, _font(18), "black")
    if note:
        centred(width / 2, height - footer / 2 - 2, note, _font(11), (90, 90, 90))
    return canvas


def _outline(picture: Image.Image, region, colour=(255, 0, 0)) -> Image.Image:
    """``picture`` with the border of ``region`` ((H', W') bool, any size) drawn over it, 2 px wide."""
    import numpy as np

    inside = np.asarray(Image.fromarray(np.asarray(region, dtype=np.uint8) * 255).resize(picture.size, Image.NEAREST)) > 0
    edge = np.zeros_like(inside)
    edge[:, 1:] |= inside[:, 1:] != inside[:, :-1]
    edge[1:, :] |= inside[1:, :] != inside[:-1, :]
    edge[:, :-1] |= edge[:, 1:]  # thicken
    edge[:-1, :] |= edge[1:, :]
    out = np.array(picture.convert("RGB"))
    out[edge] = colour
    return Image.fromarray(out)


def merge_map_figure(
    view: Image.Image,
    group_of_patch,
    grid: tuple[int, int],
    title: str,
    *,
    panel: int = 384,
    cells: str = "patches",
) -> Image.Image:
    """The model's view of an image next to its merge map, ``title`` above (Pillow only, fast).
    ``cells``: what one grid cell is, for the caption (a Qwen VL's are 2x2-patch units)."""
    rows, cols = grid
    cell = max(1, math.ceil(panel / max(rows, cols)))
    picture = merge_map(view, group_of_patch, grid, cell=cell)
    left = view.convert("RGB").resize(picture.size, Image.BICUBIC)
    return _panels(title, [(left, "as the model sees it"), (picture, f"merge map ({rows}x{cols} {cells})")],
                   MERGE_MAP_NOTE)


def before_after_figure(
    view: Image.Image,
    groups_before,
    tokens_before: int,
    view_after: Image.Image,
    groups_after,
    tokens_after: int,
    grid: tuple[int, int],
    title: str,
    region=None,
    *,
    panel: int = 320,
) -> Image.Image:
    """Cost control at a glance: the image, its merge map without and with the budget/focus.

    ``region``: the focus region as the model sees it ((H, W) bool) or None; it is outlined in red
    on the image and on the "after" merge map.
    """
    rows, cols = grid
    cell = max(1, math.ceil(panel / max(rows, cols)))
    before = merge_map(view, groups_before, grid, cell=cell)
    after = merge_map(view_after, groups_after, grid, cell=cell)
    left = view.convert("RGB").resize(before.size, Image.BICUBIC)
    if region is not None:
        left, after = _outline(left, region), _outline(after, region)
    return _panels(title, [(left, "as the model sees it" + (", focus outlined" if region is not None else "")),
                           (before, f"merge map: {tokens_before} tokens"),
                           (after, f"with {'focus' if region is not None else 'budget'}: {tokens_after} tokens")],
                   MERGE_MAP_NOTE)


def save_merge_map(
    view: Image.Image,
    group_of_patch,
    grid: tuple[int, int],
    path: str | Path,
    title: str,
    cells: str = "patches",
) -> Path:
    """Write `merge_map_figure` to ``path`` (PNG)."""
    path = Path(path)
    merge_map_figure(view, group_of_patch, grid, title, cells=cells).save(path, compress_level=3)
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
