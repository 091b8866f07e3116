"""Finding and opening images, with one clear error per bad file (long jobs skip and report them): the size
limits checked before decoding, and the rules that make the model see what a viewer shows. Videos (as frames)
are read in `dymu.videos`."""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The video readers live in dymu.videos; they are importable from here too, as they were. Loaded on first use:
# dymu.videos imports this module.
_VIDEO_NAMES = ("VIDEO_SUFFIXES", "DEFAULT_FRAMES", "MAX_FRAMES", "FRAME_MAX_SIDE", "is_video_path", "even_indices",
                "check_num_frames", "video_frame_count", "load_video")


def __getattr__(name: str):
    if name in _VIDEO_NAMES:
        from . import videos

        return getattr(videos, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sample_images() -> list[Path]:
    """The few real images dymu ships for the demo and the bench (assets/images, see SOURCES.md there)."""
    from importlib import resources

    folder = Path(str(resources.files("dymu") / "assets" / "images"))
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageError(ValueError):
    """An image that is missing, cannot be decoded or is over the limits; the message names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


# ---------------------------------------------------------------------------------------------
# Limits. A PNG header of 69 bytes can declare 100000 x 100000 pixels (40 GB decoded), and a 1 x 20000
# strip makes the processor allocate a 336 x 6.7M canvas: such files are refused before decoding.

MAX_PIXELS_ENV = "DYMU_MAX_IMAGE_PIXELS"
MAX_ASPECT_RATIO = 100  # longer side / shorter side; wider panoramas are refused
# Images whose shorter side is at least twice this are shrunk by an integer factor (JPEG: while
# decoding, with Image.draft; others: Image.reduce, a box filter) so that their shorter side stays
# >= REDUCE_TO_SIDE: far more than any processor keeps (224..448 px), and at most one full-size image
# is ever held in memory.
REDUCE_TO_SIDE = 2048


def max_pixels() -> int:
    """The pixel limit: $DYMU_MAX_IMAGE_PIXELS, else the level at which Pillow refuses a file as a
    decompression bomb (2 x PIL.Image.MAX_IMAGE_PIXELS = 178,956,970 pixels by default, about
    13,377 x 13,377); dymu checks it itself, before decoding, with a one-line message."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"${MAX_PIXELS_ENV} must be a whole number of pixels, not {text!r}") from None
        if value <= 0:
            raise ValueError(f"${MAX_PIXELS_ENV} must be positive, not {value}")
        return value
    return 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_size(size: tuple[int, int], name: str | Path, limit: int | None = None) -> None:
    """Refuse an image by its declared size (read from the header, before any decoding)."""
    width, height = size
    limit = max_pixels() if limit is None else limit
    if width <= 0 or height <= 0:
        raise ImageError(name, f"has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageError(name, f"{width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
                               f"(set ${MAX_PIXELS_ENV} to raise it)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(name, f"{width}x{height} has an aspect ratio of {ratio:.0f}:1, over the limit of "
                               f"{MAX_ASPECT_RATIO}:1")


def _open_header(path: Path) -> Image.Image:
    """Image.open (reads the header only) with Pillow's own decompression-bomb check off, so that
    dymu's check (`check_size`) gives the one-line message with the size and the limit; Pillow's
    error has no file name and its warning is several lines. Pillow's limit is a global: it is lifted
    for the header parse only, under a lock."""
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_PILLOW_LIMIT_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Opening: every entry point (CLI commands, dymu.calibrate / dymu.generate, analyze, demo, bench)
# goes through open_image (files) or as_viewed (PIL images), so the model sees what a viewer shows.


def open_image(path: str | Path, *, limit: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB, as an image viewer shows it (rules: `as_viewed`).

    Refused with an `ImageError` naming the file: missing, a folder, not a regular file (FIFO,
    device), empty, not an image, truncated or corrupt, over the pixel limit (`max_pixels`) or the
    aspect-ratio limit (`MAX_ASPECT_RATIO`). The limits are checked on the header, before decoding.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image")
    if not path.is_file():
        raise ImageError(path, "is not a regular file (a FIFO, socket or device?)")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file")
    limit = max_pixels() if limit is None else limit
    try:
        with _open_header(path) as im:
            check_size(im.size, path, limit)
            factor = _reduce_factor(im.size)
            if factor > 1 and im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale directly
                im.draft(None, (im.width // factor, im.height // factor))
            im.load()
            viewed = as_viewed(im, path, limit)
            # Closing `im` (leaving the with) voids its pixels: never return the opened object itself.
            return viewed.copy() if viewed is im else viewed
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL reports truncation and bad data this way
        raise ImageError(path, f"cannot be decoded ({first_line(err)})") from None
    except MemoryError:
        raise ImageError(path, "not enough memory to decode it") from None


def first_line(err: BaseException) -> str:
    """An error's first line (its type when it has no message): the reason in a one-line refusal."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reduce_factor(size: tuple[int, int]) -> int:
    return max(1, min(size) // REDUCE_TO_SIDE)


# EXIF orientation tag (0x0112) -> the transpose that shows the image upright (EXIF 2.3 spec).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_viewed(im: Image.Image, name: str | Path = "<image>", limit: int | None = None) -> Image.Image:
    """An RGB image as a viewer shows ``im`` (a decoded PIL image; ``name`` is used in errors).

    Rules, in order: the size limits (`check_size`); the first frame only (GIF, TIFF, WebP
    animations); 16-bit greyscale (`I;16*`, and `I` as PNG's 16-bit greyscale) rescaled to 8 bits
    (v / 257), not clipped; images with a shorter side >= 2·REDUCE_TO_SIDE shrunk by an integer
    factor; palette (with or without transparency), CMYK, 1-bit and greyscale converted to RGB;
    transparent areas composited onto white; the EXIF orientation applied (rotate/flip upright).
    """
    check_size(im.size, name, limit)
    try:
        orientation = im.getexif().get(0x0112)  # read before any conversion drops the metadata
    except Exception:  # unreadable EXIF: shown as stored, as viewers do
        orientation = None
    if im.mode in _SIXTEEN_BIT:
        im = _eight_bit(im)
    factor = _reduce_factor(im.size)
    if factor > 1:
        if im.mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
            im = to_rgb(im)
        im = im.reduce(factor)
    im = to_rgb(im)
    if orientation in _ORIENTATION:
        im = im.transpose(_ORIENTATION[orientation])
        im.info = {}  # the tag is applied: drop it (and any XMP copy), so viewing again is a no-op
    return im


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit greyscale by rescaling (65535 -> 255), as viewers display it."""
    values = np.asarray(im).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def load_image(item, limit: int | None = None) -> Image.Image:
    """A path (opened with `open_image`) or a PIL image (`as_viewed`) as an RGB image."""
    if isinstance(item, Image.Image):
        return as_viewed(item, "<image>", limit)
    return open_image(item, limit=limit)


def open_images(items, limit: int | None = None) -> tuple[list[tuple[object, Image.Image]], list[dict]]:
    """Open paths (PIL images go through `as_viewed`); bad files are skipped, never fatal.

    Returns ([(item, RGB image)] for the good ones, [{"path", "reason"}] for the skipped ones).
    Images are opened one after another, so only one is ever at full size in memory.
    """
    opened, skipped = [], []
    for k, item in enumerate(items):
        try:
            opened.append((item, load_image(item, limit)))
        except ImageError as err:
            path = f"<image {k}>" if isinstance(item, Image.Image) else err.path
            skipped.append({"path": path, "reason": err.reason})
    return opened, skipped


def pixel_values_of(processor, opened: list[tuple[object, Image.Image]], skipped: list[dict], to_pixels=None):
    """Run the image processor on opened images: (items kept, pixel_values or None, skipped + rejected).

    The whole batch at once; if the processor raises, image by image, so that one odd image is
    skipped and listed (with the processor's reason) instead of ending a folder run. ``to_pixels``
    turns a processor output into what the tower sees (default: its ``pixel_values``; AnyRes VLMs:
    every image's crops, `dymu.api.encoder_pixels`).
    """
    to_pixels = to_pixels or (lambda out: out["pixel_values"])
    images = [image for _, image in opened]
    if not images:
        return [], None, skipped
    try:
        return [item for item, _ in opened], to_pixels(processor(images=images, return_tensors="pt")), skipped
    except Exception:
        pass
    import torch

    items, kept, skipped = [], [], list(skipped)
    for item, image in opened:
        try:
            kept.append(to_pixels(processor(images=[image], return_tensors="pt")))
            items.append(item)
        except Exception as err:
            name = item if not isinstance(item, Image.Image) else "<image>"
            skipped.append({"path": str(name), "reason": f"cannot be preprocessed ({first_line(err)})"})
    return items, (torch.cat(kept) if kept else None), skipped


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparent areas composited onto white (a plain convert would turn them black)."""
    if im.mode == "RGB":
        return im  # no copy: a 13000x13000 RGB image is 676 MB
    if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def find_images(source: str | Path, image_root: str | Path | None = None) -> list[Path]:
    """The images named by one ``source``: a folder (searched recursively, sorted), an image file,
    a glob (``**`` recurses) or a JSON list.

    The JSON form is a list of ``{"image": relative_path}`` (or plain strings), relative to
    ``image_root`` (default: the JSON file's folder). Files are not opened here (bad ones are
    reported when opened).
    """
    text = str(source)
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not source.exists() and any(c in text for c in "*?["):
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise FileNotFoundError(f"{text}: no image files match this pattern")
        return found
    if not source.exists():
        what = "file" if source.suffix.lower() in IMAGE_SUFFIXES else "folder, file or JSON list"
        raise FileNotFoundError(f"{source}: no such {what}")
    if source.suffix.lower() != ".json":
        return [source]  # one image file (opening it checks that it is a regular file: skipped and listed if not)
    if not source.is_file():  # a FIFO would block the read below forever
        raise ValueError(f"{source}: not a regular file (a FIFO, socket or device?)")
    try:
        entries = json.loads(source.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a JSON list of {{'image': path}} entries")
    root = Path(image_root) if image_root is not None else source.parent
    paths = []
    for k, entry in enumerate(entries):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(rel, str):
            raise ValueError(f"{source}: entry {k} has no 'image' path")
        paths.append(root / rel)
    return paths


def resolve_images(sources, image_root: str | Path | None = None) -> list[Path]:
    """Every image named by ``sources`` (one or a list of files, folders, globs, JSON lists; see
    `find_images`), in the order given. The one resolver behind every command's ``--images``."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    paths = [p for source in sources for p in find_images(source, image_root)]
    if not paths:
        raise ValueError(f"{', '.join(map(str, sources))}: no images found")
    return paths


def print_skipped(skipped: list[dict], where: str | None = None, file=None) -> None:
    """List the files a folder command skipped, one line each: ``PATH: reason``."""
    if not skipped:
        return
    file = file or sys.stdout
    listed = f" (listed in {where})" if where else ""
    print(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''}{listed}:", file=file)
    for s in skipped:
        print(f"  {s['path']}: {s['reason']}", file=file)
