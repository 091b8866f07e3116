"""Every command over tests/data/bad_inputs: each file gives the tokens of its clean RGB equivalent, or is
skipped and listed with a one-line reason (folder commands) / refused in one line naming it (generate).
No command aborts a folder run."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import IMAGES, REPO, error_lines
from dymu.cli import main
from dymu.thresholds import Thresholds

BAD = REPO / "tests" / "data" / "bad_inputs"
GOOD = ["exif_rotated.jpg", "exif_rotated.png", "gray16.png"]
SKIPPED = {  # file -> what its one-line reason says
    "bomb_100000x100000.png": "pixels is over the limit",
    "empty.jpg": "empty file",
    "fake.png": "not an image file",
    "thin_1x20000.png": "aspect ratio",
    "truncated.jpg": "cannot be decoded",
}


def clean_equivalent(name: str) -> Image.Image:
    """The plain 8-bit upright RGB picture a viewer shows for a good hostile file (computed without dymu)."""
    with Image.open(BAD / name) as im:
        if name == "gray16.png":
            return Image.fromarray((np.asarray(im).astype(np.int64) // 257).astype(np.uint8), mode="L").convert("RGB")
        return ImageOps.exif_transpose(im).convert("RGB")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    bad, clean = root / "bad", root / "clean"
    shutil.copytree(BAD, bad, ignore=shutil.ignore_patterns("*.py"))
    clean.mkdir()
    for name in GOOD:  # same names, so that sorted order and batches are the same; PNG keeps pixels exact
        clean_equivalent(name).save(clean / name, format="PNG")
    return bad, clean


@pytest.fixture(scope="module")
def model_and_thresholds(demo_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_th") / "t.json"
    assert main(["calibrate", "--model", str(demo_llava_dir), "--images", str(IMAGES), "--max-images", "8",
                 "--batch-size", "8", "--quiet", "--out", str(out)]) == 0
    return demo_llava_dir, out


def check_skipped(skipped: list[dict]):
    reasons = {os.path.basename(s["path"]): s["reason"] for s in skipped}
    assert set(reasons) == set(SKIPPED)
    for name, words in SKIPPED.items():
        assert words in reasons[name] and "\n" not in reasons[name]


def test_encode(folders, model_and_thresholds, tmp_path, capsys):
    bad, clean = folders
    model, th = model_and_thresholds
    for folder in (bad, clean):
        assert main(["encode", "--model", str(model), "--thresholds", str(th), "--images", str(folder),
                     "--json", str(tmp_path / f"{folder.name}.json")]) == 0
    got = json.loads((tmp_path / "bad.json").read_text())
    want = json.loads((tmp_path / "clean.json").read_text())
    by_name = lambda d: {os.path.basename(r["path"]): (r["tokens"], r["group_of_patch"]) for r in d["images"]}
    assert by_name(got) == by_name(want) and sorted(by_name(got)) == GOOD
    check_skipped(got["skipped"])
    assert "skipped 5 unreadable files" in capsys.readouterr().err


def test_calibrate(folders, model_and_thresholds, tmp_path, capsys):
    bad, clean = folders
    model, _ = model_and_thresholds
    for folder in (bad, clean):
        assert main(["calibrate", "--model", str(model), "--images", str(folder), "--target-tokens", "40",
                     "--batch-size", "8", "--quiet", "--out", str(tmp_path / f"{folder.name}.json")]) == 0
    got, want = Thresholds.load(tmp_path / "bad.json"), Thresholds.load(tmp_path / "clean.json")
    assert got.images_seen == want.images_seen == 3
    assert got.thresholds == want.thresholds and got.tokens_kept_mean == want.tokens_kept_mean
    check_skipped(got.skipped)
    printed = capsys.readouterr().out
    assert all(name in printed for name in SKIPPED)


def test_analyze(folders, model_and_thresholds, tmp_path):
    bad, clean = folders
    model, th = model_and_thresholds
    assert main(["analyze", "--model", str(model), "--thresholds", str(th), "--images", str(bad),
                 "--images", str(clean), "--merge-maps", "0", "--quiet", "--out", str(tmp_path / "a")]) == 0
    with open(tmp_path / "a" / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    tokens = {(r["folder"], os.path.basename(r["path"])): r["tokens"] for r in rows}
    assert len(rows) == 6
    for name in GOOD:
        assert tokens[("bad", name)] == tokens[("clean", name)]
    with open(tmp_path / "a" / "skipped.csv") as f:
        check_skipped(list(csv.DictReader(f)))


def test_generate_each_file(folders, model_and_thresholds, capsys):
    bad, clean = folders
    model, th = model_and_thresholds
    for name in sorted(os.listdir(bad)):
        args = ["generate", "--model", str(model), "--thresholds", str(th), "--prompt", "hi",
                "--max-new-tokens", "1", "--json", "-", "--image"]
        code = main([*args, str(bad / name)])
        out, err = capsys.readouterr()
        if name in SKIPPED:
            assert code == 1 and "Traceback" not in err and len(error_lines(err)) == 1, err
            assert error_lines(err)[0].startswith(f"dymu generate: error: {bad / name}: ") and SKIPPED[name] in err
            continue
        assert code == 0, err
        assert main([*args, str(clean / name)]) == 0
        clean_out, _ = capsys.readouterr()
        assert json.loads(out)["visual_tokens"] == json.loads(clean_out)["visual_tokens"]
