"""`dymu analyze`: tokens vs JPEG complexity, min/median/max grid, merge maps (tiny random CLIP tower)."""

import csv
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import dymu
from dymu.images import to_rgb
from conftest import IMAGES, build_tiny_tower
from dymu.tools import analyze as A
from dymu.cli import main
from dymu.thresholds import Thresholds

FOLDER_A = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "synthetic_noise.png",
            "skimage_chessboard.png", "darknet_eagle.jpg", "sam_model_diagram_wide.png"]
FOLDER_B = ["synthetic_flat_color.png", "skimage_coffee.png", "skimage_gravel_texture_gray.png",
            "pytesseract_text_paragraph.png", "clip_diagram_transparent.png"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random CLIP tower saved to disk and thresholds calibrated on the test images."""
    folder = tmp_path_factory.mktemp("analyze_tower")
    tower = build_tiny_tower("clip", folder / "tower")
    images = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))
    thresholds = dymu.calibrate(tower, images, target_tokens=60, batch_size=8, progress=False)
    thresholds.save(folder / "thresholds.json")
    return folder / "tower", folder / "thresholds.json"


@pytest.fixture
def two_folders(tmp_path):
    a, b = tmp_path / "photos", tmp_path / "misc"
    (b / "sub").mkdir(parents=True)
    a.mkdir()
    for name in FOLDER_A:
        shutil.copy(IMAGES / name, a / name)
    for name in FOLDER_B[:-1]:
        shutil.copy(IMAGES / name, b / name)
    shutil.copy(IMAGES / FOLDER_B[-1], b / "sub" / FOLDER_B[-1])  # found recursively
    shutil.copy(IMAGES / "skimage_coffee.png", a / "skimage_coffee.png")  # same name in both folders
    (b / "empty.jpg").write_bytes(b"")
    (b / "notes.png").write_text("not a picture\n")
    data = (IMAGES / "darknet_eagle.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return a, b


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_command_writes_csv_scatter_grid_and_merge_maps(calibrated, two_folders, tmp_path, capsys):
    tower, thresholds = calibrated
    a, b = two_folders
    out = tmp_path / "out"
    code = main(["analyze", "--model", str(tower), "--thresholds", str(thresholds), "--images", str(a),
                 "--images", str(b), "--out", str(out), "--quiet", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert code == 0

    # tokens.csv: one row per readable image, the stated columns, sane numbers.
    rows = read_rows(out / "tokens.csv")
    assert list(rows[0]) == list(A.CSV_COLUMNS)
    assert len(rows) == len(FOLDER_A) + 1 + len(FOLDER_B)
    names = {label: sorted(Path(r["path"]).name for r in rows if r["folder"] == label) for label in ("photos", "misc")}
    assert names == {"photos": sorted(FOLDER_A + ["skimage_coffee.png"]), "misc": sorted(FOLDER_B)}
    for row in rows:
        with Image.open(row["path"]) as im:
            assert (int(row["width"]), int(row["height"])) == im.size
            expected = A.jpeg_bytes(to_rgb(im))  # transparency composited on white, as the model sees it
        assert int(row["jpeg_bytes_q75"]) == expected
        assert float(row["complexity_jpeg_q75"]) == pytest.approx(expected / (im.width * im.height), rel=1e-5)
        assert int(row["full_tokens"]) == 196  # 14x14 patches, class token not counted
        assert 1 <= int(row["tokens"]) < 196
        assert (out / "merge_maps" / row["merge_map"]).is_file()
    by_name = {Path(r["path"]).name: int(r["tokens"]) for r in rows}
    assert by_name["synthetic_blank_white.png"] < by_name["skimage_chelsea_cat.png"] < by_name["synthetic_noise.png"]
    assert len({r["merge_map"] for r in rows}) == len(rows)  # the two skimage_coffee.png do not collide

    # Bad files are skipped and listed, on stdout and in skipped.csv.
    assert "skipped 3 unreadable files" in printed
    for name in ("empty.jpg", "notes.png", "truncated.jpg"):
        assert name in printed
    skipped = sorted(Path(s["path"]).name for s in read_rows(out / "skipped.csv"))
    assert skipped == ["empty.jpg", "notes.png", "truncated.jpg"]

    # Spearman on stdout matches the CSV.
    rho = A.spearman([float(r["complexity_jpeg_q75"]) for r in rows], [int(r["tokens"]) for r in rows])
    assert f"rho = {rho:+.2f} over {len(rows)} images" in printed
    assert "photos: rho" in printed and "misc: rho" in printed

    # The pictures open and have sensible sizes.
    with Image.open(out / "complexity_vs_tokens.png") as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 400
    with Image.open(out / "min_median_max.png") as im:  # 2 folders x 3 images
        assert im.format == "PNG" and im.width >= 600 and im.height >= 500
    maps = sorted((out / "merge_maps").iterdir())
    assert len(maps) == len(rows)
    for path in maps:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 2 * 300 and 300 < im.height < im.width


def test_token_count_follows_complexity_on_a_synthetic_series(calibrated, tmp_path):
    """blank -> a few shapes -> many shapes -> noise: complexity and tokens both rise."""
    tower_dir, thresholds = calibrated
    folder = tmp_path / "series"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    size, per = 224, 4
    for k in range(per):
        Image.new("RGB", (size, size), colour()).save(folder / f"0_blank_{k}.png")
    for stage, shapes in ((1, 3), (2, 80)):
        for k in range(per):
            im = Image.new("RGB", (size, size), colour())
            draw = ImageDraw.Draw(im)
            for _ in range(shapes):
                x, y = rng.integers(0, size, 2)
                r = rng.integers(size // 20, size // (4 if stage == 1 else 10))
                box = (int(x - r), int(y - r), int(x + r), int(y + r))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
            im.save(folder / f"{stage}_shapes_{k}.png")
    for k in range(per):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"3_noise_{k}.png")

    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tower_dir).eval()
    analysis = A.measure(model, Thresholds.load(thresholds), folder)
    assert len(analysis.rows) == 4 * per and not analysis.skipped
    stage = [int(Path(r["path"]).name[0]) for r in analysis.rows]
    complexity = [r["complexity_jpeg_q75"] for r in analysis.rows]
    tokens = [r["tokens"] for r in analysis.rows]
    assert A.spearman(stage, complexity) > 0.8  # the measure itself orders the series
    assert analysis.spearman > 0.8, list(zip(stage, complexity, tokens))
    means = [np.mean([t for s, t in zip(stage, tokens) if s == k]) for k in range(4)]
    assert means == sorted(means) and means[0] < means[3], means
    assert not hasattr(model, "_dymu_state")  # the model is left unpatched


def test_merge_map_of_two_regions_is_two_flat_colours_and_a_border():
    grid = (4, 6)
    groups = torch.tensor([[7, 7, 7, 3, 3, 3]] * 4).flatten()  # left half token 7, right half token 3
    cell = 10
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (grid[0] * cell, grid[1] * cell, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = np.asarray(A.merge_map(image, groups, grid, cell=cell, border=(255, 0, 255)))
    assert out.shape == pixels.shape
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    left_mean = tuple(np.rint(pixels[:, : 3 * cell].reshape(-1, 3).mean(0)).astype(int))
    right_mean = tuple(np.rint(pixels[:, 3 * cell :].reshape(-1, 3).mean(0)).astype(int))
    assert colours == {left_mean, right_mean, (255, 0, 255)}
    border = np.all(out == (255, 0, 255), axis=-1)
    assert border[:, 3 * cell - 1].all() and border.sum() == grid[0] * cell  # one line, between the tokens
    assert tuple(out[0, 0]) == left_mean and tuple(out[-1, -1]) == right_mean

    # Patches of one token never get a border between them; a single token has no border at all.
    single = np.asarray(A.merge_map(image, torch.zeros(24, dtype=torch.long), grid, cell=cell))
    assert len({tuple(c) for c in single.reshape(-1, 3)}) == 1
    # Every patch its own token: borders on every cell boundary, size follows the default cell.
    each = A.merge_map(image.resize((30, 20)), torch.arange(24), grid)
    assert each.size == (6 * 8, 4 * 8)
    with pytest.raises(ValueError, match="24 patches"):
        A.merge_map(image, torch.arange(10), grid)


def test_jpeg_complexity_and_spearman():
    blank = Image.new("RGB", (200, 100), (40, 90, 200))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=75)
    assert A.jpeg_complexity(noise) == buffer.tell() / (200 * 100)
    assert A.jpeg_complexity(blank) < 0.05 < A.jpeg_complexity(noise)

    assert A.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert A.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take the average rank: x ranks (1.5, 1.5, 3, 4) against y ranks (1, 2, 3, 4).
    rx, ry = np.array([1.5, 1.5, 3, 4]), np.array([1, 2, 3, 4.0])
    assert A.spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert np.isnan(A.spearman([1, 1, 1], [1, 2, 3])) and np.isnan(A.spearman([1], [2]))


def test_model_view_undoes_the_processor():
    from conftest import processor_for

    processor = processor_for("clip")
    image = Image.new("RGB", (150, 112), (200, 30, 90))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    view = np.asarray(A.model_view(pixels, processor))
    assert view.shape == (112, 112, 3)
    assert np.abs(view.astype(int) - (200, 30, 90)).max() <= 1


def test_api_restores_an_already_patched_model(calibrated, tmp_path):
    from transformers import CLIPVisionModel

    tower_dir, thresholds = calibrated
    folder = tmp_path / "few"
    folder.mkdir()
    for name in FOLDER_A[:3]:
        shutil.copy(IMAGES / name, folder / name)
    model = CLIPVisionModel.from_pretrained(tower_dir).eval()
    dymu.apply(model, r=5)
    seen = []
    analysis = A.measure(model, thresholds, folder, each=lambda row, px, groups, grid: seen.append((row, groups, grid)))
    assert model._dymu_state.r == [5] * 4  # back to plain ToMe r=5
    assert [row["tokens"] for row, _, _ in seen] == [r["tokens"] for r in analysis.rows]
    for row, groups, grid in seen:  # the group map covers the grid and names exactly the kept tokens
        assert grid == (14, 14) and groups.shape == (196,)
        assert len(torch.unique(groups)) == row["tokens"]

    written = A.analyze(model, thresholds, [folder], tmp_path / "out", merge_maps=1)
    assert sum(1 for r in written.rows if r["merge_map"]) == 1
    assert len(list((tmp_path / "out" / "merge_maps").iterdir())) == 1


def test_missing_matplotlib_names_the_extra(calibrated, tmp_path, monkeypatch, capsys):
    tower, thresholds = calibrated
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    code = main(["analyze", "--model", str(tower), "--thresholds", str(thresholds), "--images", str(IMAGES),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "pip install 'matplotlib>=3.9'" in err
