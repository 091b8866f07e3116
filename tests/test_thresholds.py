"""The thresholds file: round trip, validation against the encoder, import of the paper's checkpoints."""

import json
import math

import pytest
import torch

import dymu
from conftest import build_tiny_tower
from dymu.cli import main
from dymu.thresholds import Thresholds, ThresholdsError, read_paper_thresholds


def calibrated(tower):
    from conftest import MIXED_IMAGES, image_path

    return dymu.calibrate(tower, [image_path(n) for n in MIXED_IMAGES[:4]], r=8, batch_size=4, progress=False,
                          model_ref="tiny-test-tower")


def test_round_trip_is_plain_json_and_exact(tower, tmp_path):
    thresholds = calibrated(tower)
    path = thresholds.save(tmp_path / "t.json")
    data = json.loads(path.read_text())  # human-readable, no pickle
    for key in ("format_version", "dymu_version", "encoder", "feature_layer", "schedule", "r", "thresholds",
                "tokens_kept_mean", "tokens_kept_std", "images_seen", "skipped", "order"):
        assert key in data
    assert set(data["encoder"]) == {"model", "family", "config_hash", "num_layers", "patches_per_image", "class_token"}
    loaded = Thresholds.load(path)
    assert loaded == thresholds
    assert any(math.isinf(t) for t in loaded.thresholds) == (data["thresholds"].count(None) > 0)


def test_files_without_an_order_load_as_interleaved_and_infinities_round_trip(tower, tmp_path):
    thresholds = calibrated(tower)
    assert thresholds.order == "ab"
    old = thresholds.to_json()
    del old["order"]  # written before the setting existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Thresholds.load(tmp_path / "old.json").order == "interleaved"

    thresholds.thresholds = [-math.inf, 0.5, math.inf, 0.25]
    path = thresholds.save(tmp_path / "inf.json")
    assert json.loads(path.read_text())["thresholds"] == ["-inf", 0.5, None, 0.25]  # plain JSON
    assert Thresholds.load(path).thresholds == [-math.inf, 0.5, math.inf, 0.25]

    for bad, message in (('NaN', "layer 1 threshold nan is not a number"),
                         ('"high"', "layer 1 threshold 'high' is not a number")):
        path.write_text(path.read_text().replace("0.5", bad))
        with pytest.raises(ThresholdsError, match=message):
            Thresholds.load(path)
        path.write_text(path.read_text().replace(bad, "0.5"))
    data = json.loads(path.read_text())
    data["order"] = "zigzag"
    path.write_text(json.dumps(data))
    with pytest.raises(ThresholdsError, match="has order 'zigzag'; dymu knows interleaved, ab, ab-score"):
        Thresholds.load(path)
    thresholds.thresholds[1] = math.nan
    with pytest.raises(ThresholdsError, match="a threshold is NaN"):
        thresholds.save(tmp_path / "nan.json")


def test_loading_validates_against_the_encoder(tower, family, tmp_path):
    thresholds = calibrated(tower)
    deeper = build_tiny_tower(family, tmp_path / "deeper", num_hidden_layers=5)
    with pytest.raises(ThresholdsError, match=r"have 4 layers but this vision tower has 5\.$"):
        dymu.apply(deeper, thresholds)
    finer = build_tiny_tower(family, tmp_path / "finer", patch_size=16)
    with pytest.raises(ThresholdsError, match=r"expect 196 patches per image but this vision tower makes 49\.$"):
        dymu.apply(finer, thresholds)
    wider = build_tiny_tower(family, tmp_path / "wider", hidden_size=96, num_attention_heads=4)
    with pytest.raises(ThresholdsError, match="differently shaped"):
        dymu.apply(wider, thresholds)
    dymu.apply(tower, thresholds)  # the encoder it was made for is fine


def test_bad_files_get_one_clear_sentence(tmp_path):
    with pytest.raises(ThresholdsError, match="does not exist"):
        Thresholds.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ThresholdsError, match="not dymu JSON"):
        Thresholds.load(tmp_path / "junk.json")
    (tmp_path / "v9.json").write_text(json.dumps({"format_version": 9, "thresholds": [], "encoder": {}}))
    with pytest.raises(ThresholdsError, match="format_version 9"):
        Thresholds.load(tmp_path / "v9.json")


PAPER_LAYOUTS = {
    # open_clip as the paper trains it: DataParallel prefix, wrapped in a "state_dict" key.
    "open_clip": lambda i: f"module.visual.transformer.resblocks.{i}.threshold",
    # timm trunk inside open_clip (SigLIP).
    "timm": lambda i: f"visual.trunk.blocks.{i}.threshold",
    # Hugging Face naming.
    "hf": lambda i: f"vision_model.encoder.layers.{i}.threshold",
}


@pytest.mark.parametrize("layout", PAPER_LAYOUTS)
def test_import_of_the_papers_checkpoints(layout, tower_dir, family, tmp_path):
    values = [0.97, 0.95, 0.9, 0.85]
    state = {PAPER_LAYOUTS[layout](i): torch.tensor(v, dtype=torch.bfloat16) for i, v in enumerate(values)}
    state["visual.proj"] = torch.zeros(3, 3)  # other weights are ignored
    if layout == "open_clip":
        state = {"state_dict": state, "epoch": 3}
    ckpt = tmp_path / "paper.pt"
    torch.save(state, ckpt)
    expected = [float(torch.tensor(v, dtype=torch.bfloat16)) for v in values]
    assert read_paper_thresholds(ckpt) == expected

    out = tmp_path / "ours.json"
    assert main(["thresholds", "import", str(ckpt), "--model", str(tower_dir), "--out", str(out)]) == 0
    ours = Thresholds.load(out)
    assert ours.thresholds == expected and ours.encoder["num_layers"] == 4
    # The layout the paper's code infers with: A survivors by slot with a class token, by score without.
    assert ours.order == ("ab" if family == "clip" else "ab-score")


def test_import_refuses_pickled_code_and_wrong_layer_counts(tower_dir, tmp_path, capsys):
    import argparse

    evil = tmp_path / "evil.pt"
    torch.save({"x": argparse.Namespace(a=1)}, evil)  # an arbitrary class: unpickling it could run code
    with pytest.raises(ThresholdsError, match="weights-only"):
        read_paper_thresholds(evil)
    short = tmp_path / "short.pt"
    torch.save({f"visual.trunk.blocks.{i}.threshold": torch.tensor(0.9) for i in range(3)}, short)
    assert main(["thresholds", "import", str(short), "--model", str(tower_dir), "--out", str(tmp_path / "o.json")]) == 1
    assert "has thresholds for 3 layers but" in capsys.readouterr().err
