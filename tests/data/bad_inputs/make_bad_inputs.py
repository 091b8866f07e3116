"""Regenerate the hostile image files of this folder (all tiny; run from anywhere):

    python tests/data/bad_inputs/make_bad_inputs.py

Sources are test images of tests/data/images (see SOURCES.md there). What each file is, and what
dymu must do with it (tests/test_bad_inputs.py checks every command):

| file | what | expected |
| --- | --- | --- |
| gray16.png | 16-bit greyscale PNG (mode I;16), values = 257 x an 8-bit image | tokens of that 8-bit image |
| exif_rotated.png | pixels stored rotated, EXIF orientation 6 (PNG eXIf chunk) | tokens of the upright image |
| exif_rotated.jpg | the same as a JPEG, orientation 8 | tokens of the upright image |
| bomb_100000x100000.png | 69-byte PNG whose header declares 100000 x 100000 pixels | skipped: over the pixel limit |
| thin_1x20000.png | valid 1 x 20000 PNG | skipped: over the aspect-ratio limit |
| empty.jpg | zero bytes | skipped: empty file |
| truncated.jpg | first third of a JPEG | skipped: cannot be decoded |
| fake.png | text with an image extension | skipped: not an image file |
"""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGES = HERE.parent / "images"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def main() -> None:
    coins = Image.open(IMAGES / "skimage_coins_gray.png").convert("L").resize((192, 152), Image.BICUBIC)
    wide = np.asarray(coins).astype(np.uint16) * 257  # 255 -> 65535: the full 16-bit range
    Image.fromarray(wide).save(HERE / "gray16.png")  # Pillow writes mode I;16 as a 16-bit PNG

    upright = Image.open(IMAGES / "pytesseract_text_paragraph.png").convert("RGB").resize((320, 240))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright.transpose(Image.Transpose.ROTATE_90).save(HERE / "exif_rotated.png", exif=exif)
    cat = Image.open(IMAGES / "skimage_chelsea_cat.png").convert("RGB")
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to view"
    cat.transpose(Image.Transpose.ROTATE_270).save(HERE / "exif_rotated.jpg", quality=80, exif=exif)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 8-bit RGB
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4)) \
        + png_chunk(b"IEND", b"")
    (HERE / "bomb_100000x100000.png").write_bytes(bomb)

    Image.new("L", (1, 20000), 255).save(HERE / "thin_1x20000.png", optimize=True)
    (HERE / "empty.jpg").write_bytes(b"")
    data = (IMAGES / "pytesseract_tiny_word.jpg").read_bytes()
    (HERE / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (HERE / "fake.png").write_text("this is text, not a picture\n")


if __name__ == "__main__":
    main()
