"""Videos as a few evenly spaced RGB frames: a video file (decoded with PyAV) or a folder of frame images,
with the image limits of `dymu.images` applied to every frame and a frame-count limit per video."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from .images import IMAGE_SUFFIXES, check_size, find_images, first_line, open_image

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpeg", ".mpg", ".flv", ".wmv", ".ts"}
DEFAULT_FRAMES = 8
# At most this many frames per video: each costs a full image's worth of memory and encoder work,
# and a typo (--frames 100000) would otherwise decode a whole film at full size.
MAX_FRAMES = 256
# Decoded frames are shrunk to at most this side before they are kept (aspect kept): more than the video
# processors of the supported families use (384 px to about 768 px at their video pixel limits), and
# 256 frames of a 4K video stay within ~1 GB. None keeps the full size.
FRAME_MAX_SIDE = 1024


def is_video_path(item) -> bool:
    """A path (str / PathLike) that names a video: a video file suffix, or a folder (of frames)."""
    if not isinstance(item, (str, os.PathLike)):
        return False
    path = Path(item)
    return path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir()


def even_indices(total: int, count: int) -> list[int]:
    """``min(count, total)`` indices spread evenly over ``range(total)``, first frame included."""
    count = min(count, total)
    step = total / count if count else 0
    return [int(i * step) for i in range(count)]


def check_num_frames(num_frames, where) -> int:
    """``num_frames`` as a whole number in [1, MAX_FRAMES], or a one-line error naming ``where``."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
        raise ValueError(f"{where}: the number of frames must be a whole number from 1 to {MAX_FRAMES}, "
                         f"not {num_frames!r}")
    return num_frames


def video_frame_count(source, num_frames: int) -> int:
    """How many frames `load_video(source, num_frames)` returns, without decoding pixels where the
    container declares its length: min(num_frames, frames in the video)."""
    path = Path(source)
    if path.is_dir():
        return min(num_frames, len(find_images(path)))
    try:
        import av

        with av.open(str(path)) as container:
            declared = int(container.streams.video[0].frames) if container.streams.video else 0
    except Exception:  # noqa: BLE001 - unreadable: load_video says why, with the file's name
        return num_frames
    return min(num_frames, declared) if declared else len(load_video(path, num_frames))


def _shrunk(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    return image


def load_video(source, num_frames: int = DEFAULT_FRAMES, max_side: int | None = FRAME_MAX_SIDE) -> list[Image.Image]:
    """``num_frames`` evenly spaced frames (RGB PIL images, all of one size) of a video: a video file
    (decoded with PyAV, dymu's video extra: ``pip install 'av>=12,<16'``) or a folder of frame images (sorted by name).

    A file is decoded once, keeping only the chosen frames (a long video never sits in memory whole),
    each shrunk to at most ``max_side`` pixels a side (`FRAME_MAX_SIDE`; None: full size) as it is
    decoded; the frame size is checked against the image limits (`max_pixels`) before decoding.
    ``num_frames`` is at most `MAX_FRAMES`. Errors are one line naming the file: missing, not
    decodable, no video stream, no frames; a frame folder lists the files it skipped.
    """
    check_num_frames(num_frames, source)
    path = Path(source)
    if path.is_dir():
        paths = sorted(find_images(path), key=lambda p: p.name)
        skipped = sorted(p.name for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES)
        if skipped:
            warnings.warn(f"{path}: skipped {len(skipped)} file(s) that are not images: {', '.join(skipped[:5])}"
                          + (", ..." if len(skipped) > 5 else ""), stacklevel=2)
        if not paths:
            raise ValueError(f"{path}: no frame images in this folder")
        frames = [_shrunk(open_image(paths[i]), max_side) for i in even_indices(len(paths), num_frames)]
    else:
        frames = _decode_video(path, num_frames, max_side)
    sizes = sorted({f"{f.width}x{f.height}" for f in frames})
    if len(sizes) > 1:
        raise ValueError(f"{path}: the frames differ in size ({', '.join(sizes)})")
    return frames


def _decode_video(path: Path, num_frames: int, max_side: int | None) -> list[Image.Image]:
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (a FIFO, socket or device?)")
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: reading video files needs PyAV, dymu's video extra (pip install 'av>=12,<16'); or pass the frames "
                         "as a list of PIL images (or a folder of frame images)") from None

    def decode(total: int | None) -> tuple[list[Image.Image], int, int]:
        """(the chosen frames of ``total`` frames, frames decoded, ``total``). ``total`` None: the
        container's declared count; 0 (unknown): decode all to count them, choosing none."""
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            check_size((width, height), path)
            scale = min(1.0, max_side / max(width, height)) if max_side and width and height else 1.0
            size = dict(width=max(1, round(width * scale)), height=max(1, round(height * scale)))
            total = int(stream.frames) if total is None else total
            wanted = set(even_indices(total, num_frames)) if total else set()
            last = max(wanted) if wanted else -1
            chosen, seen = [], 0
            for index, frame in enumerate(container.decode(stream)):
                seen = index + 1
                if index in wanted:
                    # shrunk while still in the decoder's format: no full-size RGB copy is ever kept
                    chosen.append((frame.reformat(**size) if scale < 1 else frame).to_image().convert("RGB"))
                if total and index >= last:
                    break
        return chosen, seen, total

    try:
        frames, seen, declared = decode(None)  # trust the container's frame count when it has one
        if not declared or len(frames) < min(num_frames, declared):  # none, or overstated: count, then choose
            frames, _, _ = decode(seen)
    except av.error.FFmpegError as err:  # (some are ValueErrors too)
        raise ValueError(f"{path}: cannot be decoded as a video ({first_line(err)})") from None
    except ValueError:  # ours (no video stream) or the frame size check: already one line naming the file
        raise
    except Exception as err:  # noqa: BLE001 - any other decoder error is one clear line too
        raise ValueError(f"{path}: cannot be decoded as a video ({first_line(err)})") from None
    if not frames:
        raise ValueError(f"{path}: has no video frames")
    return frames
