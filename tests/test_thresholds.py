"""The thresholds file: round trip, validation against the encoder, import of the paper's checkpoints."""

import json
import math

import pytest
import torch

import dymu
from conftest import build_tiny_tower, error_lines
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

    for bad, message in (('NaN', r"field 'thresholds\[1\]' must be a finite number .*, not nan"),
                         ('"high"', r"field 'thresholds\[1\]' must be a finite number .*, not 'high'")):
        path.write_text(path.read_text().replace("0.5", bad))
        with pytest.raises(ThresholdsError, match=message):
            Thresholds.load(path)
        path.write_text(path.read_text().replace(bad, "0.5"))
    data = json.loads(path.read_text())
    data["order"] = "zigzag"
    path.write_text(json.dumps(data))
    with pytest.raises(ThresholdsError, match="field 'order' is 'zigzag'; dymu knows interleaved, ab, ab-score"):
        Thresholds.load(path)
    thresholds.thresholds[1] = math.nan
    with pytest.raises(ThresholdsError, match=r"field 'thresholds\[1\]' must be a finite number .*not nan"):
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


# ---- every field is validated on load, naming the file and the field ----

BROKEN = {
    # field edit -> words of the error
    "nan threshold": (lambda d: d["thresholds"].__setitem__(0, float("nan")), "'thresholds[0]' must be a finite number"),
    "negative threshold": (lambda d: d["thresholds"].__setitem__(1, -0.5), "'thresholds[1]' must be a finite number >= 0"),
    "string threshold": (lambda d: d["thresholds"].__setitem__(0, "0.9"), "'thresholds[0]'"),
    "layer count": (lambda d: d["thresholds"].append(0.9), "'thresholds' has 5 entries but the encoder has 4 layers"),
    "huge tokens kept": (lambda d: d["tokens_kept_mean"].__setitem__(-1, 1e12),
                         "must be a finite number between 1 and 196"),
    "zero tokens kept": (lambda d: d["tokens_kept_mean"].__setitem__(0, 0), "'tokens_kept_mean[0]'"),
    "num_layers type": (lambda d: d["encoder"].__setitem__("num_layers", "4"), "'encoder.num_layers' must be a whole number"),
    "feature layer": (lambda d: d.__setitem__("feature_layer", 99), "'feature_layer' must be a layer index"),
    "r nan": (lambda d: d["r"].__setitem__(0, float("nan")), "'r[0]'"),
    "images_seen": (lambda d: d.__setitem__("images_seen", -3), "'images_seen' must be a whole number >= 0"),
    "skipped": (lambda d: d.__setitem__("skipped", [3]), "'skipped' must be a list"),
    "bool layers": (lambda d: d["encoder"].__setitem__("num_layers", True), "'encoder.num_layers'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_every_field_is_validated_on_load(tower, tmp_path, case):
    edit, words = BROKEN[case]
    data = calibrated(tower).to_json()
    edit(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))  # NaN is written as the JSON extension NaN, which json reads back
    with pytest.raises(ThresholdsError, match="^thresholds file " + str(path).replace(".", r"\.") + ": field ") as err:
        Thresholds.load(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_huge_tokens_kept_mean_never_reaches_downsample(tower, tmp_path, capsys):
    # 1e12 tokens would make --mode downsample allocate until killed.
    data = calibrated(tower).to_json()
    data["tokens_kept_mean"][-1] = 1e12
    (tmp_path / "t.json").write_text(json.dumps(data))
    from conftest import IMAGES

    assert main(["generate", "--model", str(tmp_path), "--thresholds", str(tmp_path / "t.json"),
                 "--image", str(IMAGES / "skimage_coffee.png"), "--prompt", "hi", "--mode", "downsample"]) == 1
    assert "field 'tokens_kept_mean[" in capsys.readouterr().err


def test_import_refuses_nan_or_negative_thresholds(tower_dir, tmp_path, capsys):
    ckpt = tmp_path / "nan.pt"
    torch.save({f"visual.trunk.blocks.{i}.threshold": torch.tensor(v) for i, v in
                enumerate([0.9, float("nan"), 0.8, -0.2])}, ckpt)
    out = tmp_path / "o.json"
    assert main(["thresholds", "import", str(ckpt), "--model", str(tower_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}: field 'thresholds[1]' must be a finite number" in err and len(error_lines(err)) == 1
    assert not out.exists()


def test_import_of_a_file_that_is_not_a_checkpoint_is_one_line(tower_dir, tmp_path, capsys):
    # Torch's own error text runs over many lines.
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint\n" * 5)
    assert main(["thresholds", "import", str(text), "--model", str(tower_dir), "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(error_lines(err)) == 1 and f"checkpoint {text} is not a torch checkpoint" in err, err
