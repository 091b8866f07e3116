"""Finding and opening images, with one clear error per bad file (long jobs skip and report them)."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

def sample_images() -> list[Path]:
    """The few real images dymu ships for the demo and the bench (assets/images, see SOURCES.md there)."""
    from importlib import resources

    folder = Path(str(resources.files("dymu") / "assets" / "images"))
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageError(ValueError):
    """An image that is missing or cannot be decoded; the message names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (a truncated file fails here, not later)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation and bad data this way
        raise ImageError(path, f"cannot be decoded ({err})") from None


def open_images(items) -> tuple[list[tuple[object, Image.Image]], list[dict]]:
    """Open paths (PIL images pass through as RGB); bad files are skipped, never fatal.

    Returns ([(item, RGB image)] for the good ones, [{"path", "reason"}] for the skipped ones).
    """
    opened, skipped = [], []
    for item in items:
        try:
            opened.append((item, to_rgb(item) if isinstance(item, Image.Image) else open_image(item)))
        except ImageError as err:
            skipped.append({"path": err.path, "reason": err.reason})
    return opened, skipped


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparent areas composited onto white (a plain convert would turn them black)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
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
        return [source]  # one image file
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
