"""Opening images as a viewer shows them, within limits (dymu.images), on the files of tests/data/bad_inputs."""

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import IMAGES, REPO
import dymu.images
from dymu.images import ImageError, open_image, open_images

BAD = REPO / "tests" / "data" / "bad_inputs"


def test_16bit_png_is_rescaled_not_clipped():
    # The file holds 257 x an 8-bit image; a viewer shows that 8-bit image (a clip shows white).
    wide = np.asarray(Image.open(BAD / "gray16.png")).astype(np.int64)
    assert wide.max() > 255 and (wide % 257 == 0).all()
    expected = Image.fromarray((wide // 257).astype(np.uint8), mode="L").convert("RGB")
    assert np.array_equal(np.asarray(open_image(BAD / "gray16.png")), np.asarray(expected))
    # ...and the same for an in-memory 16-bit image (the API path).
    with Image.open(BAD / "gray16.png") as im:
        assert np.array_equal(np.asarray(dymu.images.as_viewed(im)), np.asarray(expected))


@pytest.mark.parametrize("name", ["exif_rotated.png", "exif_rotated.jpg"])
def test_exif_orientation_is_applied(name):
    # Stored rotated + an orientation tag; a viewer shows it upright (Pillow's exif_transpose is the oracle).
    with Image.open(BAD / name) as im:
        stored = im.size
        upright = ImageOps.exif_transpose(im).convert("RGB")
    assert upright.size == stored[::-1]
    ours = open_image(BAD / name)
    assert ours.size == upright.size and np.array_equal(np.asarray(ours), np.asarray(upright))


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert open_image(tmp_path / "anim.gif").getpixel((0, 0)) == (255, 0, 0)


def test_the_69_byte_bomb_header_is_refused_before_decoding():
    # Refused on the declared size, with the pixel count and the limit, not decoded.
    assert (BAD / "bomb_100000x100000.png").stat().st_size == 69
    with pytest.raises(ImageError, match=r"100000x100000 = 10,000,000,000 pixels is over the limit"):
        open_image(BAD / "bomb_100000x100000.png")


def test_the_thin_strip_is_refused_by_its_aspect_ratio():
    with pytest.raises(ImageError, match=r"1x20000 has an aspect ratio of 20000:1, over the limit of 100:1"):
        open_image(BAD / "thin_1x20000.png")
    with pytest.raises(ImageError, match="aspect ratio"):
        dymu.images.as_viewed(Image.new("L", (1, 20000)))  # in memory too (dymu.generate / dymu.calibrate)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "small.png")
    monkeypatch.setenv("DYMU_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(ImageError, match=r"60,000 pixels is over the limit of 50,000 \(set \$DYMU_MAX_IMAGE_PIXELS"):
        open_image(tmp_path / "small.png")
    monkeypatch.setenv("DYMU_MAX_IMAGE_PIXELS", "60000")
    assert open_image(tmp_path / "small.png").size == (300, 200)


def png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b""))


def test_no_decompression_bomb_warning_only_one_clear_error(tmp_path):
    # 10000 x 10000 is over Pillow's warning level (89 M pixels): Pillow would print a multi-line
    # DecompressionBombWarning without the file name. dymu reports one ImageError naming the file.
    path = tmp_path / "header_only.png"
    path.write_bytes(png_header(10000, 10000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="cannot be decoded") as err:
            open_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_huge_images_are_reduced_and_keep_their_look(tmp_path):
    # A 6000 x 4200 image is shrunk by an integer factor (short side >= 2048) while opening.
    small = Image.open(IMAGES / "skimage_chelsea_cat.png").convert("RGB").resize((600, 420))
    big = small.resize((6000, 4200), Image.NEAREST)  # every pixel a 10x10 block
    big.save(tmp_path / "big.png")
    big.save(tmp_path / "big.jpg", quality=95)
    for name in ("big.png", "big.jpg"):
        opened = open_image(tmp_path / name)
        assert opened.size == (3000, 2100)  # factor 2: short side 4200 // 2048
        back = np.asarray(opened.resize((600, 420), Image.BOX)).astype(int)
        assert np.abs(back - np.asarray(small).astype(int)).mean() < 3


def test_non_regular_files_are_refused(tmp_path):
    # A FIFO (or a device) would block or never end.
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        open_image(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        open_image("/dev/zero")


def test_folder_runs_skip_and_list_every_bad_file():
    paths = sorted(p for p in BAD.iterdir() if p.suffix != ".py")
    opened, skipped = open_images(paths)
    assert sorted(p.name for p, _ in opened) == ["exif_rotated.jpg", "exif_rotated.png", "gray16.png"]
    reasons = {os.path.basename(s["path"]): s["reason"] for s in skipped}
    assert reasons == {
        "bomb_100000x100000.png": reasons["bomb_100000x100000.png"],
        "empty.jpg": "empty file",
        "fake.png": "not an image file (unrecognised format)",
        "thin_1x20000.png": reasons["thin_1x20000.png"],
        "truncated.jpg": reasons["truncated.jpg"],
    }
    assert "over the limit" in reasons["bomb_100000x100000.png"]
    assert "aspect ratio" in reasons["thin_1x20000.png"]
    assert reasons["truncated.jpg"].startswith("cannot be decoded")
    assert all("\n" not in r for r in reasons.values())


def test_viewing_twice_changes_nothing():
    once = open_image(BAD / "exif_rotated.jpg")
    assert np.array_equal(np.asarray(dymu.images.as_viewed(once)), np.asarray(once))


def test_a_folder_of_huge_images_holds_one_at_full_size(tmp_path):
    # Scaled down from four 13000 x 13000 PNGs (see the README for that measurement): calibrating on
    # four 4200 x 4200 PNGs at batch size 4 may add at most ~2 decoded images (Pillow: 4 bytes per RGB pixel,
    # 71 MB each) to the peak memory of the same run on small images; holding the batch decoded adds 4+.
    import subprocess
    import sys

    from conftest import build_tiny_tower

    build_tiny_tower("clip", tmp_path / "tower")
    small, huge = tmp_path / "small", tmp_path / "huge"
    small.mkdir()
    huge.mkdir()
    cat = Image.open(IMAGES / "skimage_chelsea_cat.png").convert("RGB").resize((600, 600))
    cat.save(small / "a.png")
    cat.resize((4200, 4200), Image.NEAREST).save(huge / "a.png", compress_level=1)
    for name in ("b.png", "c.png", "d.png"):
        os.link(small / "a.png", small / name)
        os.link(huge / "a.png", huge / name)
    script = f"""
import resource
from dymu.cli import main
def run(folder, out):
    assert main(["calibrate", "--model", {str(tmp_path / "tower")!r}, "--images", folder, "--batch-size", "4",
                 "--r", "5", "--quiet", "--out", out]) == 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = run({str(small)!r}, {str(tmp_path / "s.json")!r})
peak = run({str(huge)!r}, {str(tmp_path / "h.json")!r})
print(base, peak)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    base, peak = map(int, done.stdout.split()[-2:])
    one_image = 4200 * 4200 * 4
    print(f"extra peak {(peak - base) / 2**20:.0f} MiB, one image {one_image / 2**20:.0f} MiB")
    assert peak - base < 2.5 * one_image, f"peak {peak / 2**20:.0f} MiB vs {base / 2**20:.0f} MiB on small images"


# --- videos ------------------------------------------------------------------------------------


def write_mp4(path, count: int, size=(64, 48)):
    """An mp4 of ``count`` flat frames whose grey level is 8 x the frame index (PyAV)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(count):
            frame = np.full((size[1], size[0], 3), 8 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_load_video_takes_evenly_spaced_frames_of_a_file_and_of_a_folder(tmp_path):
    from dymu.images import even_indices, load_video

    write_mp4(tmp_path / "clip.mp4", 30)
    frames = load_video(tmp_path / "clip.mp4", 8)
    assert even_indices(30, 8) == [0, 3, 7, 11, 15, 18, 22, 26]
    assert len(frames) == 8 and {f.size for f in frames} == {(64, 48)} and {f.mode for f in frames} == {"RGB"}
    grey = [np.asarray(f)[..., 0].mean() for f in frames]  # the codec is lossy: within a few levels
    assert all(abs(g - 8 * i) < 4 for g, i in zip(grey, even_indices(30, 8)))
    write_mp4(tmp_path / "short.mp4", 3)
    assert len(load_video(tmp_path / "short.mp4", 8)) == 3  # fewer frames than asked: all of them
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 10), (i, i, i)).save(folder / f"{i:03d}.png")
    assert [f.getpixel((0, 0))[0] for f in load_video(folder, 3)] == [0, 1, 3]


def test_bad_videos_fail_with_one_line_naming_the_file(tmp_path):
    from dymu.images import load_video

    (tmp_path / "text.mp4").write_text("not a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (20, 10)).save(mixed / "a.png")
    Image.new("RGB", (10, 20)).save(mixed / "b.png")
    for source, message in ((tmp_path / "missing.mp4", "no such file"),
                            (tmp_path / "text.mp4", "cannot be decoded as a video"),
                            (empty, "no frame images in this folder"),
                            (mixed, r"the frames differ in size \(10x20, 20x10\)")):
        with pytest.raises(ValueError, match=message) as err:
            load_video(source, 4)
        assert str(err.value).startswith(str(source)) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="must be a whole number from 1 to 256, not 0"):
        load_video(tmp_path / "text.mp4", 0)
