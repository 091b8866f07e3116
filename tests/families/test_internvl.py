"""InternVL 3 / 3.5 beyond the family contract (tests/families/test_contract.py runs the common oracles on
the InternVL 3 demo model): the Qwen3 decoder of InternVL 3.5, another feature layer, tiles merging on
their own, calibration's exact B·r merges per block, token counts against image complexity, beams with
real merges, budgets, the thresholds file and the processor without torchvision."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dymu
from dymu.families.internvl_processor import tile_images
from dymu.tools.analyze.measure import jpeg_complexity, spearman
from dymu.tools.demo import save_demo_model
from dymu.families.demos.internvl import build_internvl_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import IMAGES, load_image  # noqa: E402
from lm_helpers import mixers_averaged_within_groups  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny models: InternVL 3 (Qwen2 decoder), InternVL 3.5 (Qwen3), and InternVL 3 read at layer -2."""
    out = {}
    for name, text in (("qwen2", "qwen2"), ("qwen3", "qwen3"), ("layer-2", "qwen2")):
        model, processor = build_internvl_demo_model(text)
        if name == "layer-2":
            model.config.vision_feature_layer = -2
        out[name] = save_demo_model(model, processor, tmp_path_factory.mktemp(name))
    return out


def load(folder):
    return dymu.load(str(folder), device="cpu", dtype="float32")


def calibrated(model, processor, images=None, **kwargs):
    from dymu.images import sample_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images
        return dymu.calibrate(model, images or sample_images(), processor=processor.image_processor, batch_size=4,
                              progress=False, **kwargs)


def batch():
    frames = [load_image("darknet_dog_bicycle_truck.jpg").resize((320, 240)).crop((8 * k, 0, 8 * k + 224, 168))
              for k in range(3)]
    return (["What is this?", "Compare the two pictures, please."],
            [[load_image("darknet_eagle.jpg")], [load_image("synthetic_gradient.png"), load_image("skimage_chelsea_cat.png")]],
            [[], [frames]])


def spy_maps(monkeypatch) -> list:
    from dymu.decoders.llama import VTUState

    maps, original = [], VTUState.set_group_map

    def spy(state, group_map):
        if group_map is not None:
            maps.append(group_map.clone())
        return original(state, group_map)

    monkeypatch.setattr(VTUState, "set_group_map", spy)
    return maps


@pytest.mark.parametrize("name", ["qwen3", "layer-2"])
def test_other_decoder_and_feature_layer_merge_off_and_slow_reference(folders, name, monkeypatch):
    model, processor = load(folders[name])
    prompts, images, videos = batch()
    inputs = dymu.prompt_inputs(model, processor, prompts, images, videos=videos)
    with torch.no_grad():
        stock = model(**inputs).logits
    thresholds = calibrated(model, processor)
    assert len(thresholds.thresholds) == (3 if name == "layer-2" else 4)  # blocks run up to the feature layer
    dymu.apply(model, math.inf)
    with torch.no_grad():
        assert (model(**dymu.prompt_inputs(model, processor, prompts, images, videos=videos)).logits
                - stock).abs().max().item() <= ATOL
    dymu.apply(model, thresholds)
    inputs = dymu.prompt_inputs(model, processor, prompts, images, videos=videos)
    maps = spy_maps(monkeypatch)
    with torch.no_grad():
        logits = model(**inputs).logits
    (group_map,) = maps
    assert sum(len(row.unique()) for row in group_map) < group_map.numel()  # real merging
    dymu.remove(model)
    with mixers_averaged_within_groups(model.model.language_model.layers, group_map), torch.no_grad():
        reference = model(**inputs).logits
    assert (logits - reference).abs().max().item() <= ATOL


def test_a_tile_merges_on_its_own(folders):
    model, processor = load(folders["qwen2"])
    dymu.apply(model, calibrated(model, processor))
    family = dymu.families.vlm_family_of(model)
    alone = tile_images(processor, [load_image("darknet_eagle.jpg")])["pixel_values"]
    other = tile_images(processor, [load_image("skimage_chelsea_cat.png")])["pixel_values"]
    one = family.encode(model, alone)
    both = family.encode(model, torch.cat([other, alone, other[:1]]))
    tiles = len(alone)
    assert one.kept_per_image.tolist() == both.kept_per_image[len(other):len(other) + tiles].tolist()
    for a, b in zip(one.groups_per_item(), both.groups_per_item()[len(other):len(other) + tiles]):
        assert torch.equal(a, b)
    assert len(set(one.kept_per_image.tolist())) > 1  # the tiles and the thumbnail differ


def test_calibration_merges_exactly_b_r_units_per_block(folders):
    model, processor = load(folders["qwen2"])
    images = [load_image(n) for n in ("darknet_eagle.jpg", "synthetic_gradient.png", "skimage_chelsea_cat.png",
                                      "synthetic_blank_white.png")]
    family = dymu.families.vlm_family_of(model)
    steps, identity = family.unit_calibration(model, "vit", None, None)
    assert steps == 4 and identity["family"] == "internvl"
    from dymu.tools.calibration.loop import batch_top_edges

    fractions, tau, seen = [0.1, 0.05, 0.2, 0.0], [math.nan] * 4, []

    def chooser(units):
        seen.append(units)
        return batch_top_edges(fractions, units, tau)

    kept = family.unit_calibration_batch(model, processor.image_processor, images, "vit", steps, chooser)
    tiles = len(tile_images(processor, images)["pixel_values"])
    assert kept.shape == (len(images), steps) and seen == [tiles * 36]  # every tile's units of the batch
    alive = [seen[0]] + kept.sum(0).tolist()
    assert [a - b for a, b in zip(alive, alive[1:])] == [round(f * seen[0]) for f in fractions]
    assert all(t >= 0 for t, f in zip(tau, fractions) if f > 0)
    thresholds = calibrated(model, processor, images, r=0.1)
    assert thresholds.encoder["family"] == "internvl" and thresholds.images_seen == len(images)


def test_token_counts_rise_with_image_complexity(folders):
    model, processor = load(folders["qwen2"])
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))[:16]
    images = [load_image(p.name) for p in paths]
    dymu.apply(model, calibrated(model, processor, images))
    records, _ = dymu.families.vlm_family_of(model).encode_records(model, processor, list(zip(paths, images)), [])
    fraction = [r["llm_rows"] / r["stock_positions"] for r in records]
    rho = spearman([jpeg_complexity(im) for im in images], fraction)
    assert rho > 0.5, rho


def test_beams_with_real_merges_keep_each_tiles_groups(folders, monkeypatch):
    model, processor = load(folders["qwen2"])
    dymu.apply(model, calibrated(model, processor))
    prompts, images, videos = batch()
    maps = spy_maps(monkeypatch)
    dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=2)
    dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=2, num_beams=2,
                  num_return_sequences=2)
    single, expanded = maps
    assert sum(len(row.unique()) for row in single) < single.numel()
    assert torch.equal(expanded, single.repeat_interleave(2, dim=0))  # generate re-stacked the tiles


def test_budget_counts_llm_tokens_per_tile(folders):
    model, processor = load(folders["qwen2"])
    dymu.apply(model, calibrated(model, processor), max_tokens=8)
    family = dymu.families.vlm_family_of(model)
    pixels = tile_images(processor, [load_image("darknet_dog_bicycle_truck.jpg")])["pixel_values"]
    assert max(family.encode(model, pixels).kept_per_image.tolist()) <= 8
    report = dymu.generate(model, processor, ["What is this?"], [[load_image("darknet_dog_bicycle_truck.jpg")]],
                           max_new_tokens=1, max_tokens=4).report
    assert report.llm_rows[0][0] <= 4 * len(pixels)


def test_thresholds_file_records_the_family_and_is_checked(folders, tmp_path):
    model, processor = load(folders["qwen2"])
    thresholds = calibrated(model, processor)
    thresholds.save(tmp_path / "t.json")
    loaded = dymu.Thresholds.load(tmp_path / "t.json")
    assert loaded.encoder["family"] == "internvl" and loaded.thresholds == thresholds.thresholds
    other, _ = load(folders["layer-2"])  # reads its tower after 3 blocks, not 4
    with pytest.raises(ValueError, match="reads its tower after 3"):
        dymu.apply(other, loaded)
    with pytest.raises(ValueError, match="needs 4 thresholds"):
        dymu.apply(model, [0.5] * 3)


def test_processor_without_torchvision_expands_video_frames(folders):
    _, processor = load(folders["qwen2"])
    frames = batch()[2][1][0]
    out = processor(videos=[frames], text=["<video>\nWhat happens?"], return_tensors="pt")
    assert len(out["pixel_values"]) == len(frames)  # one tile per frame
    assert int((out["input_ids"] == processor.image_token_id).sum()) == len(frames) * processor.image_seq_length
    assert processor.decode(out["input_ids"][0]).startswith("Frame1: <img>")


def test_lmms_eval_plugin_answers_as_dymu_generate(folders, tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from dymu.integrations.lmms_eval import DyMU

    model, processor = load(folders["qwen2"])
    calibrated(model, processor).save(tmp_path / "mid.json")
    docs = [{"image": load_image(n)} for n in ("skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg")]
    gen = {"max_new_tokens": 3, "until": ["\n"], "do_sample": False}
    requests = [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": d, "repeats": 1},
                         arguments=(q, dict(gen), lambda doc: [doc["image"]], d, "t", "test"))
                for d, q in enumerate(["What is in this image?", "Count the objects."])]
    lm = DyMU(pretrained=str(folders["qwen2"]), mode="dymu", thresholds=str(tmp_path / "mid.json"), batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    out = lm.generate_until(requests)
    dymu.apply(model, dymu.Thresholds.load(tmp_path / "mid.json"))
    for request, doc, got in zip(requests, docs, out):
        ref = dymu.generate(model, processor, [request.arguments[0]], [[doc["image"]]], max_new_tokens=3).report
        sample = got.token_counts.to_dict()
        for name in ("encoder_tokens", "llm_rows", "stock_positions"):
            assert sample[name] == getattr(ref, name)[0], name
        assert sample["llm_rows"][0] < sample["stock_positions"][0]


def test_analyze_counts_every_tile_of_an_image(folders, tmp_path):
    import csv
    import shutil

    from dymu.cli import main

    model, processor = load(folders["qwen2"])
    calibrated(model, processor).save(tmp_path / "mid.json")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("synthetic_blank_white.png", "darknet_dog_bicycle_truck.jpg", "skimage_chessboard.png"):
        shutil.copyfile(IMAGES / name, images / name)  # the same bytes (re-saving a JPEG changes its pixels)
    assert main(["analyze", "--model", str(folders["qwen2"]), "--thresholds", str(tmp_path / "mid.json"),
                 "--images", str(images), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with open(tmp_path / "out" / "tokens.csv") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    dymu.apply(model, dymu.Thresholds.load(tmp_path / "mid.json"))
    for name, row in rows.items():
        report = dymu.generate(model, processor, ["What is this?"], [[load_image(name)]], max_new_tokens=1).report
        assert int(row["llm_rows"]) == report.llm_rows[0][0] and int(row["stock_positions"]) == report.stock_positions[0][0]
    assert int(rows["synthetic_blank_white.png"]["llm_rows"]) < int(rows["darknet_dog_bicycle_truck.jpg"]["llm_rows"])


@pytest.mark.parametrize("layer", [-1, -2, 2])
def test_tower_variants_merge_off_equal_the_stock_features(layer):
    """InternViT-6B-style options (RMS q/k norms, RMS block norms, a real final norm: use_mean_pooling off),
    read at several feature layers: thresholds +inf give the stock features exactly."""
    from transformers import InternVLForConditionalGeneration

    from dymu.families.internvl import encode_internvl
    from dymu.families.demos.internvl import build_internvl_tokenizer, internvl_config

    config = internvl_config(build_internvl_tokenizer())
    config.vision_config.use_qk_norm, config.vision_config.norm_type = True, "rms_norm"
    config.vision_config.use_mean_pooling = False
    config.vision_feature_layer = layer
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2", "norm.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
        pixels = torch.randn(3, 3, 168, 168)
        stock = model.model.get_image_features(pixels).pooler_output  # (tiles, units, D)
        encoded, projected = encode_internvl(model.model, pixels, None)
    assert encoded.kept_per_image.tolist() == [36] * 3
    ours = projected[encoded.group_of_unit].view_as(stock)
    assert (ours - stock).abs().max().item() <= 1e-5


def test_encode_with_focus_and_the_encode_command(folders, tmp_path, capsys):
    import json
    import shutil

    from dymu.cli import main

    model, processor = load(folders["qwen2"])
    thresholds = calibrated(model, processor)
    thresholds.save(tmp_path / "mid.json")
    dymu.apply(model, thresholds)
    photo = load_image("darknet_dog_bicycle_truck.jpg")
    whole = dymu.encode(model, [photo], processor=processor)
    focused = dymu.encode(model, [photo], processor=processor, focus=[(0, 0, 100, 100)])
    assert whole.units_per_image.tolist() == focused.units_per_image.tolist()  # the same tiles
    assert int(focused.kept_per_image.sum()) < int(whole.kept_per_image.sum())  # white outside the box merges
    shutil.copyfile(IMAGES / "darknet_dog_bicycle_truck.jpg", tmp_path / "photo.jpg")
    assert main(["encode", "--model", str(folders["qwen2"]), "--thresholds", str(tmp_path / "mid.json"),
                 "--images", str(tmp_path / "photo.jpg"), "--json", "-", "--quiet"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["images"]
    assert record["llm_rows"] == int(whole.kept_per_image.sum()) and record["tiles"] == len(whole.kept_per_image)
    assert record["stock_positions"] == 36 * record["tiles"] and len(record["group_of_unit"]) == record["tiles"]


def test_demo_walkthrough_saves_a_loadable_model_with_images(tmp_path):
    from dymu.cli import main
    from dymu.tools.walkthrough import run_walkthrough

    lines = []
    results = run_walkthrough("internvl", save_model=str(tmp_path / "tiny"), max_new_tokens=2, out=lines.append)
    counts = results["counts"]["default"]
    assert counts["synthetic_blank_white.png"][0] < counts["darknet_dog_bicycle_truck.jpg"][0]
    full = results["results"][("image", "full")].report
    assert full.llm_rows == full.stock_positions
    assert ("video", "dymu") in results["results"]  # InternVL takes video: the walkthrough times one
    assert (tmp_path / "tiny" / "images" / "SOURCES.md").exists()
    model, processor = dymu.load(str(tmp_path / "tiny"))
    assert dymu.families.vlm_family_of(model).name == "internvl" and processor.image_seq_length == 36
    assert main(["demo", "--family", "internvl", "--max-new-tokens", "1"]) == 0


@pytest.mark.parametrize("mode", ["dtome", "tome"])
def test_without_vtu_merge_off_equals_stock_and_merges_shorten_the_prompt(folders, mode):
    model, processor = load(folders["qwen2"])
    prompts, images, videos = batch()
    with torch.no_grad():
        stock = model(**dymu.prompt_inputs(model, processor, prompts, images, videos=videos)).logits
    off = dict(thresholds=math.inf) if mode == "dtome" else dict(thresholds=None, r=0, tome_vtu=False)
    dymu.apply(model, off.pop("thresholds"), mode=mode, **off)
    with torch.no_grad():
        got = model(**dymu.prompt_inputs(model, processor, prompts, images, videos=videos)).logits
    assert got.shape == stock.shape and (got - stock).abs().max().item() <= ATOL  # every unit kept, in stock order
    on = dict(thresholds=calibrated(model, processor)) if mode == "dtome" else dict(thresholds=None, r=3,
                                                                                       tome_vtu=False)
    dymu.apply(model, on.pop("thresholds"), mode=mode, **on)
    inputs = dymu.prompt_inputs(model, processor, prompts, images, videos=videos)
    report = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=2).report
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert placeholders == [sum(rows) for rows in report.llm_rows] and placeholders[0] < report.stock_positions[0][0]
