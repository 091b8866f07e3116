"""DyMU in a tiny random Qwen3.5 (dymu.families.demos.qwen): a Qwen3-VL-style tower and a hybrid decoder of
Gated DeltaNet linear-attention layers and one gated full-attention layer.

Oracles: thresholds +inf ⇒ stock logits and generated tokens (one image, two images, a video, left
padding); with real merges the prefill equals a slow reference written here (the stock model fed the
same virtually unmerged features, every token mixer's output, attention AND Gated DeltaNet, averaged
over each group by forward hooks: paper Eq. 11), the cache it leaves (attention keys/values,
convolution and recurrent states) is the reference's, and so is the decode after it; batch
invariance; calibration merges exactly round(r·units) per block; a token mixer VTU does not cover and
kv_cache="compact" are refused in one line.
"""

import copy
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dymu
from dymu.decoders.llama import rows_processed
from dymu.families.qwen_processors import qwen_inputs
from dymu.tools.calibration import calibrate
from dymu.families.demos.qwen import build_qwen_demo_model
from dymu.towers.qwen_vit import encode_qwen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_image  # noqa: E402
from qwen_helpers import chat  # noqa: E402

ATOL = 1e-4
NEW_TOKENS = 6
MIXERS = ("self_attn", "linear_attn")


def frames(n=4):
    photo = load_image("darknet_dog_bicycle_truck.jpg").resize((320, 240))
    return [photo.crop((8 * k, 0, 8 * k + 224, 168)) for k in range(n)]


@pytest.fixture(scope="module")
def stock():
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
    model, processor = build_qwen_demo_model("qwen3_5")
    types = model.config.text_config.layer_types
    assert "full_attention" in types and types.count("linear_attention") == 3
    eagle, grad = load_image("darknet_eagle.jpg"), load_image("synthetic_gradient.png")
    items = [("What is this?", [eagle]), ("Compare the two pictures, please.", [eagle, grad]),
             ("What happens in this video?", [frames()])]
    texts = [chat(processor, text, ["video" if isinstance(m, list) else "image" for m in media])
             for text, media in items]
    inputs = qwen_inputs(processor, texts, [media for _, media in items])
    assert (inputs["attention_mask"] == 0).any()  # left padding
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return model, processor, inputs, logits, tokens


def patched(stock, *args, **kwargs):
    model = copy.deepcopy(stock[0])
    dymu.apply(model, *args, **kwargs)
    return model


def test_merge_off_equals_stock(stock):
    _, _, inputs, want_logits, want_tokens = stock
    model = patched(stock, math.inf)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert (logits - want_logits).abs().max().item() <= ATOL
    assert torch.equal(tokens, want_tokens)
    dymu.remove(model)
    assert type(model.model) is type(stock[0].model)


def reference_group_map(model, inputs, encoded):
    """Plain loop: placeholders in row-major order, images then videos, each labelled (item, its unit's group)."""
    ids = inputs["input_ids"]
    group_map = torch.empty_like(ids)
    labels, base = {}, 0
    for modality in ("image", "video"):
        groups = iter(encoded[modality].group_of_unit.tolist())
        token = getattr(model.config, f"{modality}_token_id")
        for b in range(ids.shape[0]):
            for n in range(ids.shape[1]):
                if ids[b, n] == token:
                    labels[b, n] = base + next(groups)
        base += int(encoded[modality].group_of_unit.max()) + 1
    for b in range(ids.shape[0]):
        seen = {}
        for n in range(ids.shape[1]):
            group_map[b, n] = seen.setdefault(labels.get((b, n), ("text", n)), len(seen))
    return group_map


def averaging_hook(group_map):
    """Forward hook on a token mixer (attention: (out, weights); Gated DeltaNet: out): its output averaged
    over each group, at the prefill only (decode steps have length 1)."""

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.shape[1] != group_map.shape[1]:
            return None
        mean = out.clone()
        for b in range(group_map.shape[0]):
            for gid in group_map[b].unique():
                members = group_map[b] == gid
                mean[b, members] = out[b, members].mean(0)
        return (mean, *output[1:]) if isinstance(output, tuple) else mean

    return hook


@pytest.fixture(scope="module")
def merged(stock):
    """The patched model's prefill and decode, and the slow reference's, on the same prompt batch."""
    model_stock, _, inputs, _, _ = stock
    model = patched(stock, 0.6)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        rows = rows_processed(model.model.language_model)
        encoded = dict(model.model._dymu.last_encoded)
        features = {"image": model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]),
                    "video": model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])}
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
    for enc in encoded.values():
        assert enc.kept_per_segment.sum() < enc.units_per_segment.sum()  # real merging
    group_map = reference_group_map(model, inputs, encoded)
    layers = model_stock.model.language_model.layers
    handles = [getattr(layer, name).register_forward_hook(averaging_hook(group_map))
               for layer in layers for name in MIXERS if hasattr(layer, name)]
    assert len(handles) == len(layers)
    call = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
    try:
        with torch.no_grad():
            reference = model_stock(**call, mm_encoder_outputs=features, use_cache=True)
            ref_tokens = model_stock.generate(**call, mm_encoder_outputs=features, max_new_tokens=NEW_TOKENS,
                                              do_sample=False, output_scores=True, return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    return dict(out=out, reference=reference, tokens=tokens, ref_tokens=ref_tokens, rows=rows, group_map=group_map)


def _cache(output):
    return getattr(output, "past_key_values", None) or getattr(output, "cache", None)


def test_real_merges_equal_the_slow_reference(merged):
    assert (merged["out"].logits - merged["reference"].logits).abs().max().item() <= ATOL
    group_map = merged["group_map"]
    unique = sum(len(row.unique()) for row in group_map)
    rows = merged["rows"]
    assert rows["positions"] == 4 * group_map.numel() and rows["mlp"] == 4 * unique  # every layer on unique rows
    assert rows["in_proj_qkv"] == rows["out_proj"] == 3 * unique and rows["q_proj"] == unique


def test_the_prefill_leaves_the_reference_state(merged, stock):
    mine, want = _cache(merged["out"]), _cache(merged["reference"])
    for i, kind in enumerate(stock[0].config.text_config.layer_types):
        if kind == "linear_attention":
            pairs = [(mine.get_conv_state(i), want.get_conv_state(i)),
                     (mine.get_recurrent_state(i), want.get_recurrent_state(i))]
        else:
            pairs = [(mine.layers[i].keys, want.layers[i].keys), (mine.layers[i].values, want.layers[i].values)]
        for got, ref in pairs:
            assert got is not None and got.shape == ref.shape and (got - ref).abs().max().item() <= ATOL


def test_the_decode_after_a_vtu_prefill_is_the_references(merged):
    tokens, want = merged["tokens"], merged["ref_tokens"]
    assert torch.equal(tokens.sequences, want.sequences)
    for got, ref in zip(tokens.scores, want.scores):
        assert (got - ref).abs().max().item() <= ATOL


def test_an_image_alone_and_in_a_batch(stock):
    model, _, inputs, _, _ = stock
    visual = model.model.visual
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    together = encode_qwen(visual, pixels, grid, [0.6] * len(visual.blocks), "vit")
    start_row, start_unit = 0, 0
    for i, (rows, units) in enumerate(zip(grid.prod(-1).tolist(), (grid.prod(-1) // 4).tolist())):
        alone = encode_qwen(visual, pixels[start_row:start_row + rows], grid[i:i + 1], [0.6] * len(visual.blocks), "vit")
        groups = together.group_of_unit[start_unit:start_unit + units]
        assert torch.equal(groups - groups.min(), alone.group_of_unit)
        assert (together.features[start_unit:start_unit + units] - alone.features).abs().max().item() <= 1e-5
        start_row, start_unit = start_row + rows, start_unit + units


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_calibration_merges_exactly_r_times_units_per_block(stock, merge_point):
    model, processor = stock[0], stock[1]
    images = [load_image(n) for n in ("darknet_eagle.jpg", "synthetic_blank_white.png", "synthetic_gradient.png",
                                      "skimage_chessboard.png")]
    thresholds = calibrate(model, images, r=0.15, batch_size=len(images), processor=processor, progress=False,
                           merge_point=merge_point, rounds=2 if merge_point == "post" else None)
    units = int(processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"].prod(-1).sum()) // 4
    alive = [units] + [round(k * len(images)) for k in thresholds.tokens_kept_mean]
    steps = len(thresholds.thresholds)
    assert [alive[i] - alive[i + 1] for i in range(steps)] == [round(0.15 * units)] * steps


class ShortConvMixer(nn.Module):
    """A token mixer VTU knows nothing about."""

    def forward(self, hidden_states, **kwargs):
        return hidden_states


def test_a_token_mixer_vtu_does_not_cover_is_refused_in_one_line(stock):
    model = copy.deepcopy(stock[0])
    model.model.language_model.layers[1].linear_attn = ShortConvMixer()
    with pytest.raises(ValueError, match=r"VTU does not cover the token mixer of decoder layer 'layers\.1'.*"
                                         r"linear_attn \(ShortConvMixer\)") as err:
        dymu.apply(model, 0.6)
    assert "\n" not in str(err.value)
    assert type(model.model).__name__ == "Qwen3_5Model" and dymu.families.vlm_family_of(model).mode_of(model) == "full"


def test_compact_kv_cache_and_exact_attention_are_refused_in_one_line(stock):
    model = copy.deepcopy(stock[0])
    with pytest.raises(ValueError, match="kv_cache='compact' is not available for Qwen3_5ForConditionalGeneration: "
                                         ".*partial rotary") as err:
        dymu.apply(model, 0.6, kv_cache="compact")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="vtu_attention='exact'.*other token mixers"):
        dymu.apply(model, 0.6, vtu_attention="exact")
    dymu.apply(model, 0.6, mode="dtome", kv_cache="compact")  # no VTU, no KV cache of dymu's: not refused
    family = dymu.families.vlm_family_of(model)
    assert family.name == "qwen3_5" and family.default_kv_cache == "full"


def test_demo_saves_a_model_that_dymu_load_reloads(tmp_path, capsys):
    from dymu.cli import main

    assert main(["demo", "--family", "qwen3_5", "--save-model", str(tmp_path / "q35"), "--max-new-tokens", "2"]) == 0
    assert "video    dymu, cross_frame" in capsys.readouterr().out
    model, processor = dymu.load(tmp_path / "q35", device="cpu", dtype="float32")
    assert dymu.families.vlm_family_of(model).name == "qwen3_5"
    dymu.apply(model, 0.6)
    report = dymu.generate(model, processor, ["What is this?"], [[load_image("darknet_eagle.jpg")]],
                           max_new_tokens=2).report
    assert report.llm_rows[0][0] < report.stock_positions[0][0]
