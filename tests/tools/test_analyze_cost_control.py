"""`dymu analyze` with a token budget and focus masks: tokens with and without, before/after merge maps."""

import csv

import pytest
from PIL import Image

from conftest import MIXED_IMAGES, image_path
from dymu.cli import main
from dymu.tools.analyze import measure

pytest.importorskip("matplotlib")


@pytest.fixture
def folder_with_masks(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in MIXED_IMAGES[:4]:
        source = image_path(name)
        (images / name).write_bytes(source.read_bytes())
        w, h = Image.open(source).size
        mask = Image.new("L", (w, h))
        mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        mask.save(masks / (source.stem + ".png"))
    return images, masks


def test_analyze_with_focus_masks_and_budget(tower_dir, tower, folder_with_masks, tmp_path, capsys):
    images, masks = folder_with_masks
    thresholds = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(tower_dir), "--images", str(images), "--target-tokens", "60",
                 "--quiet", "--out", str(thresholds)]) == 0
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(tower_dir), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--focus-mask", str(masks), "--max-tokens", "40", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "without the budget/focus: mean" in printed
    rows = list(csv.DictReader((out / "tokens.csv").open()))
    assert len(rows) == 4
    for row in rows:
        assert int(row["tokens"]) <= 40
        assert int(row["tokens"]) <= int(row["tokens_without_budget_or_focus"])
        picture = Image.open(out / "merge_maps" / row["merge_map"])
        assert picture.width > 2.4 * picture.height  # three panels (two would be about 2x): image, map without, with focus
    assert any(int(r["tokens"]) < int(r["tokens_without_budget_or_focus"]) for r in rows)

    # the Python path gives the same numbers
    analysis = measure(tower, thresholds, images, focus=masks, max_tokens=40)
    assert [r["tokens"] for r in analysis.rows] == [int(r["tokens"]) for r in rows]

    assert main(["analyze", "--model", str(tower_dir), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--focus-mask", str(tmp_path), "--quiet"]) == 1  # no masks there: all skipped
    assert "no readable images" in capsys.readouterr().err
    assert "no mask named" in (out / "skipped.csv").read_text()
