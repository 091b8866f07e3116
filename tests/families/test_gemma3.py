"""DyMU in a tiny random Gemma 3 (dymu.families.demos.gemma3), saved and reloaded: a SigLIP tower of 32x32
patches pooled 4x4 into 64 LLM tokens, one sliding-window and one global decoder layer.

The family contract (tests/families/test_contract.py) runs the stock / slow-reference / batch oracles on
it; here: the prompt is longer than the sliding window (so the slow reference covers the windowed
mask), a blank image keeps at most 15% of its LLM positions at the "mid" preset, LLM rows follow image
complexity, calibration merges exactly B·r units per block, ToMe exactly r, the report's three counts,
the budget, thresholds files that record the family, and the refusals.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.decoders.gemma3 import NO_COMPACT
from dymu.families.gemma3 import encode_gemma3, unit_grid
from dymu.images import sample_images
from dymu.tools.analyze.measure import jpeg_complexity, spearman
from dymu.tools.demo import save_demo_model
from dymu.families.demos.gemma3 import build_gemma3_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import IMAGES, load_image  # noqa: E402

PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, processor = build_gemma3_demo_model()
    return save_demo_model(model, processor, tmp_path_factory.mktemp("gemma3"))


def load(folder):
    return dymu.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def mid(folder):
    model, processor = load(folder)
    return dymu.calibrate(model, sample_images(), processor=processor, batch_size=len(sample_images()),
                          progress=False, warn=lambda message: None)


def rows(model, processor, image, **kwargs):
    report = dymu.generate(model, processor, [PROMPT], [[image]], max_new_tokens=1, **kwargs).report
    return report.llm_rows[0][0], report.stock_positions[0][0], report.encoder_tokens[0][0]


def test_units_come_from_the_config(folder):
    model, _ = load(folder)
    assert unit_grid(model.config) == (32, 4)
    model.config.mm_tokens_per_image = 48
    with pytest.raises(dymu.compat.UnsupportedTransformersError, match="does not tile"):
        unit_grid(model.config)


def test_prompt_is_longer_than_the_sliding_window(folder):
    model, processor = load(folder)
    inputs = dymu.prompt_inputs(model, processor, [PROMPT], [[load_image("darknet_eagle.jpg")]])
    assert model.config.text_config.sliding_window < model.config.mm_tokens_per_image < inputs["input_ids"].shape[1]
    assert set(model.config.text_config.layer_types) == {"sliding_attention", "full_attention"}


def test_thresholds_file_records_the_family(folder, mid, tmp_path):
    model, _ = load(folder)
    assert mid.encoder["family"] == "gemma3" and len(mid.thresholds) == 4
    mid.save(tmp_path / "mid.json")
    again = dymu.Thresholds.load(tmp_path / "mid.json")
    dymu.apply(model, again)
    assert model.model._dymu.thresholds == [float(t) for t in mid.thresholds]
    again.encoder = {**again.encoder, "family": "qwen2_vl"}
    with pytest.raises(ValueError, match="not a Gemma 3 vision tower"):
        dymu.apply(model, again)


def test_blank_image_keeps_few_llm_rows(folder, mid):
    model, processor = load(folder)
    dymu.apply(model, mid)
    llm_rows, positions, encoder = rows(model, processor, load_image("synthetic_blank_white.png"))
    assert positions == 64 and encoder == 16 * llm_rows
    assert llm_rows <= 0.15 * positions, (llm_rows, positions)


def test_llm_rows_follow_image_complexity(folder, mid):
    model, processor = load(folder)
    dymu.apply(model, mid)
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))
    images = [load_image(p.name) for p in paths]
    encoded = dymu.encode(model, images, processor=processor)
    kept = encoded.kept_per_image.tolist()
    rho = spearman([jpeg_complexity(im) for im in images], kept)
    assert rho > 0.5, (rho, list(zip([p.name for p in paths], kept)))


def test_calibration_merges_exactly_b_times_r(folder):
    model, processor = load(folder)
    images = [load_image(n) for n in ("darknet_eagle.jpg", "synthetic_blank_white.png", "skimage_coffee.png",
                                      "synthetic_noise.png", "skimage_chessboard.png")]
    thresholds = dymu.calibrate(model, images, r=0.1, batch_size=len(images), processor=processor, progress=False,
                                warn=lambda message: None)
    units = 64 * len(images)
    alive = [units] + [round(m * len(images)) for m in thresholds.tokens_kept_mean]
    assert [alive[i] - alive[i + 1] for i in range(4)] == [round(0.1 * units)] * 4


def test_tome_merges_exactly_r_units_per_block(folder):
    model, processor = load(folder)
    pixels = processor.image_processor(images=[load_image("darknet_eagle.jpg"), load_image("skimage_coffee.png")],
                                       return_tensors="pt")["pixel_values"]
    encoded = encode_gemma3(model, pixels, r=[3, 0, 5, 2])
    assert encoded.kept_per_block.tolist() == [[61, 61, 56, 54]] * 2
    dymu.apply(model, mode="tome", r=[3, 0, 5, 2])
    assert rows(model, processor, load_image("darknet_eagle.jpg"))[0] == 54


def test_budget_bounds_llm_rows_and_reports_the_unbounded_count(folder, mid):
    model, processor = load(folder)
    dymu.apply(model, mid)
    image = load_image("skimage_coffee.png")
    free = rows(model, processor, image)[0]
    report = dymu.generate(model, processor, [PROMPT], [[image]], max_new_tokens=1, max_tokens=8).report
    assert report.llm_rows[0][0] <= 8 < free
    assert report.visual_tokens_without_budget_or_focus == [[free]]


def test_refusals_name_their_reason(folder, mid):
    model, processor = load(folder)
    with pytest.raises(ValueError, match="different bases"):
        dymu.apply(model, mid, kv_cache="compact")
    with pytest.raises(ValueError, match="bidirectional block"):
        dymu.apply(model, mid, mode="dtome")
    with pytest.raises(ValueError, match="takes no video"):
        dymu.generate(model, processor, [PROMPT], [[]], videos=[[[load_image("darknet_eagle.jpg")] * 2]])
    with pytest.raises(ValueError, match="one threshold per block"):
        dymu.apply(model, [0.5] * 3)
    assert "different bases" in NO_COMPACT


def test_sandwich_norms_are_a_declared_fact(folder, monkeypatch):
    """The shared VTU layer computes Gemma 3's post-norms because the registration declares them: without
    the fact the same layer runs as a Llama-style block and the merge-off logits leave the stock ones."""
    from dataclasses import replace

    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    from dymu.decoders.registry import DECODERS

    model, processor = load(folder)
    inputs = dymu.prompt_inputs(model, processor, [PROMPT], [[load_image("darknet_eagle.jpg")]])
    with torch.no_grad():
        stock = model(**inputs).logits
    dymu.apply(model, math.inf)
    inputs = dymu.prompt_inputs(model, processor, [PROMPT], [[load_image("darknet_eagle.jpg")]])
    with torch.no_grad():
        assert (model(**inputs).logits - stock).abs().max().item() <= 1e-4
        monkeypatch.setitem(DECODERS, Gemma3DecoderLayer, replace(DECODERS[Gemma3DecoderLayer], sandwich_norms=False))
        assert (model(**inputs).logits - stock).abs().max().item() > 1e-2


def test_demo_command_saves_a_model_that_loads(tmp_path, capsys):
    from dymu.cli import main

    folder = tmp_path / "demo"
    assert main(["demo", "--family", "gemma3", "--save-model", str(folder), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "LLM rows per image with them" in printed and (folder / "images").is_dir()
    model, processor = dymu.load(str(folder), device="cpu", dtype="float32")
    assert dymu.families.vlm_family_of(model).name == "gemma3" and processor.image_seq_length == 64
