"""The model-free side of `dymu analyze`: an image's JPEG complexity (bytes per pixel at quality 75) and the
Spearman rank correlation it is set against the tokens kept with."""

from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image

JPEG_QUALITY = 75


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
