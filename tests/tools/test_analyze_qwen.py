"""`dymu analyze` on tiny random Qwen VLs (saved and reloaded): images at native resolution, so every
image has its own stock token count; merge_point "vit" and "post"; the CLI end to end.

Oracles: analyze's tokens equal `dymu.encode` of the patched model on the image alone; the merge map
is drawn from that image's own groups on its (h/2, w/2) unit grid; the model's view round-trips
through the processor; batch size 1 and 4 give the same rows."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dymu
from conftest import IMAGES, error_lines
from dymu.cli import main
from dymu.images import open_image
from dymu.tools import analyze as A

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen_helpers import load_qwen  # noqa: E402

# Different sizes and aspect ratios (64, 54, 52... units at the demo's 224x224 pixel cap), blank to noise.
NAMES = ["synthetic_blank_white.png", "darknet_dog_bicycle_truck.jpg", "clip_diagram_transparent.png",
         "synthetic_noise.png", "skimage_coffee.png", "sam_model_diagram_wide.png"]
CASES = [("qwen2_5_vl", "vit"), ("qwen3_vl", "post")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_images")
    for name in NAMES:
        shutil.copy(IMAGES / name, out / name)
    return out


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request, qwen_dirs):
    """A stock tiny Qwen VL, its image processor and thresholds calibrated (preset mid) at the merge point."""
    family, merge_point = request.param
    model, processor = load_qwen(family, qwen_dirs[family])
    images = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))[:8]
    thresholds = dymu.calibrate(model, images, preset="mid", batch_size=4, processor=processor, progress=False,
                                merge_point=merge_point, rounds=2 if merge_point == "post" else None)
    assert thresholds.encoder["merge_point"] == merge_point
    return model, processor.image_processor, thresholds, qwen_dirs[family]


def test_rows_merge_maps_and_encode_agree(case, folder, tmp_path):
    model, processor, thresholds, saved = case
    seen = {}
    analysis = A.measure(model, thresholds, folder, processor=processor, batch_size=len(NAMES),
                         each=lambda row, pixels, groups, grid: seen.update({row["path"]: (pixels, groups, grid)}))
    assert len(analysis.rows) == len(NAMES) and not analysis.skipped
    assert analysis.full_tokens is None  # the sizes differ
    assert not hasattr(model.model, "_dymu")  # the model is left stock
    patched = dymu.apply(load_qwen(model.config.model_type, saved)[0], thresholds)
    # The same images in one call of the patched model: the same counts and groups.
    inputs = processor(images=[open_image(r["path"]) for r in analysis.rows], return_tensors="pt")
    grid_thw = inputs["image_grid_thw"]
    encoded = dymu.encode(patched, inputs["pixel_values"], grid_thw=grid_thw)
    assert encoded.per_item(grid_thw) == [(r["tokens"], r["full_tokens"]) for r in analysis.rows]
    for row, groups_of_encode, (_, h, w) in zip(analysis.rows, encoded.groups_per_item(grid_thw), grid_thw.tolist()):
        assert row["full_tokens"] == h * w // 4 and 0 < row["tokens"] <= row["full_tokens"]
        # Merge map data: that image's own groups on its unit grid, one region per kept token.
        pixels, groups, grid = seen[row["path"]]
        assert grid == (h // 2, w // 2) and groups.numel() == row["full_tokens"]
        assert len(groups.unique()) == row["tokens"]
        assert torch.equal(groups, groups_of_encode.cpu())
        # The image alone: the same count (batch invariance; its groups may differ where scores tie
        # exactly, as on a blank page, because a different padding changes the last float bits).
        alone = processor(images=[open_image(row["path"])], return_tensors="pt")
        one = dymu.encode(patched, alone["pixel_values"], grid_thw=alone["image_grid_thw"])
        assert one.per_item(alone["image_grid_thw"]) == [(row["tokens"], row["full_tokens"])]
        # The model's view is exactly what the processor made: it round-trips through the processor.
        view = A.model_view(pixels, processor)
        assert view.size == (w * processor.patch_size, h * processor.patch_size)
        again = processor(images=[view], return_tensors="pt")
        assert torch.equal(again["image_grid_thw"], alone["image_grid_thw"])
        assert (again["pixel_values"] - alone["pixel_values"]).abs().max() < 1e-5


def test_batch_size_does_not_change_rows(case, folder):
    model, processor, thresholds, _ = case
    one = A.measure(model, thresholds, folder, processor=processor, batch_size=1).rows
    four = A.measure(model, thresholds, folder, processor=processor, batch_size=4).rows
    assert one == four


def test_analyze_writes_files_and_both_rho(case, folder, tmp_path):
    model, processor, thresholds, _ = case
    analysis = A.analyze(model, thresholds, folder, tmp_path, processor=processor, batch_size=3)
    with open(tmp_path / "tokens.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], int(r["tokens"]), int(r["full_tokens"])) for r in rows] == \
        [(r["path"], r["tokens"], r["full_tokens"]) for r in analysis.rows]
    assert len({r["full_tokens"] for r in rows}) > 1
    for name in ("complexity_vs_tokens.png", "min_median_max.png", "skipped.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "merge_maps").iterdir()) == sorted(r["merge_map"] for r in rows)
    fraction = [r["tokens"] / r["full_tokens"] for r in analysis.rows]
    assert analysis.spearman_kept_fraction == A.spearman([r["complexity_jpeg_q75"] for r in analysis.rows], fraction)
    blank = next(r for r in analysis.rows if "blank" in r["path"])
    noise = next(r for r in analysis.rows if "noise" in r["path"])
    assert A.fraction_kept(blank) < A.fraction_kept(noise)


def test_cli_end_to_end(qwen_dirs, folder, tmp_path, capsys):
    model = str(qwen_dirs["qwen2_5_vl"])
    thresholds = tmp_path / "vit.json"
    assert main(["calibrate", "--model", model, "--images", str(IMAGES), "--max-images", "8", "--preset", "mid",
                 "--batch-size", "4", "--quiet", "--out", str(thresholds)]) == 0
    assert json.loads(thresholds.read_text())["encoder"]["merge_point"] == "vit"
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["analyze", "--model", model, "--thresholds", str(thresholds), "--images", str(IMAGES),
                 "--out", str(out), "--quiet", "--batch-size", "8", "--merge-maps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "of each image's stock tokens" in printed and "kept fraction" in printed
    assert "rho = " in printed and "of JPEG complexity and kept fraction: rho = " in printed
    with open(out / "tokens.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 37 and all(0 < int(r["tokens"]) <= int(r["full_tokens"]) for r in rows)
    assert len(list((out / "merge_maps").iterdir())) == 2
    # Loose: the kept fraction follows complexity on the test images (+0.69 when this was written).
    rho = A.spearman([float(r["complexity_jpeg_q75"]) for r in rows],
                     [int(r["tokens"]) / int(r["full_tokens"]) for r in rows])
    assert rho > 0.5 and f"kept fraction: rho = {rho:+.2f}" in printed
    # analyze measures the thresholds alone: a budget or focus regions are refused in one line, exit 1.
    for extra in (["--max-tokens", "20"], ["--focus", "0,0,10,10"]):
        assert main(["analyze", "--model", model, "--thresholds", str(thresholds), "--images", str(folder),
                     "--out", str(tmp_path / "x"), "--quiet", *extra]) == 1
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "token budgets and focus regions are applied by dymu generate" in err[0], err
    assert not (tmp_path / "x").exists()


def test_needs_the_processor(case, folder):
    model, _, thresholds, _ = case
    with pytest.raises(ValueError, match="needs its image processor"):
        A.measure(model, thresholds, folder)


def test_unpatchify_inverts_the_processor_layout():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(do_normalize=False, do_rescale=False, max_pixels=112 * 168)
    picture = (np.arange(112 * 168 * 3) % 251).astype(np.uint8).reshape(112, 168, 3)
    out = processor(images=[Image.fromarray(picture)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]]  # no resize: 112x168 is a multiple of 28
    back = A.unpatchify(out["pixel_values"], out["image_grid_thw"][0], 14, 2)
    assert torch.equal(back, torch.from_numpy(picture).permute(2, 0, 1).float())
