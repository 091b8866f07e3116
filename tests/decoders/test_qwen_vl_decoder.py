"""VTU decoder layers on the text models of tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (M-RoPE).

Oracles: identity groups ⇒ stock logits and greedy tokens; image features made group-constant
(and Qwen3-VL's deepstack features too) ⇒ VTU prefill logits equal the stock model with every
layer's attention output averaged over each group (paper Eq. 11, written here as a plain loop);
deepstack rows left unmerged ⇒ the debug check raises instead of silently using the first row.
"""

import sys
from pathlib import Path

import pytest
import torch

from dymu import vtu
from dymu.decoders.llama import GroupRowsError, apply_vtu, remove_vtu, rows_processed, supported_decoders, vtu_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_image  # noqa: E402
from lm_helpers import mixers_averaged_within_groups  # noqa: E402
from qwen_helpers import QWEN_FAMILIES, image_prompts, load_qwen  # noqa: E402

ATOL = 1e-5


def _inputs(processor):
    eagle, grad = load_image("darknet_eagle.jpg"), load_image("synthetic_gradient.png")
    return image_prompts(processor, [("What is in this image?", [eagle]), ("Compare.", [grad, eagle])])


def _encoder_outputs(model, inputs, labels_per_image=None):
    """Stock image features; with labels, each image's rows (and deepstack rows) averaged per label."""
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    if labels_per_image is None:
        return out

    def average(rows, labels):
        rows = rows.clone()
        for label in labels.unique():
            rows[labels == label] = rows[labels == label].mean(0)
        return rows

    out.pooler_output = tuple(average(f, lab) for f, lab in zip(out.pooler_output, labels_per_image))
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [tuple(average(f, lab) for f, lab in zip(level, labels_per_image))
                                  for level in out.deepstack_features]
    return out


def _group_map(model, inputs, labels_per_image):
    labels = torch.full_like(inputs["input_ids"], -1)
    offset, parts = 0, []
    for lab in labels_per_image:
        parts.append(lab + offset)
        offset += len(lab)
    labels[inputs["input_ids"] == model.config.image_token_id] = torch.cat(parts)
    return vtu.group_map_from_labels(labels)


def _forward(model, inputs, encoder_outputs):
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
    return model(**{k: inputs[k] for k in keys}, mm_encoder_outputs={"image": encoder_outputs}).logits


def test_qwen_vl_decoders_are_registered():
    assert {"Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer"} <= set(supported_decoders())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_identity_groups_equal_stock_logits_and_tokens(qwen_dirs, family, attn):
    stock, processor = load_qwen(family, qwen_dirs[family], attn)
    model, _ = load_qwen(family, qwen_dirs[family], attn)
    apply_vtu(model.model.language_model)
    inputs = _inputs(processor)
    group_map = vtu.identity_group_map(*inputs["input_ids"].shape)
    run = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with vtu_groups(model.model.language_model, group_map):
            logits = model(**inputs).logits
            rows = rows_processed(model.model.language_model)
            out = model.generate(**inputs, **run)
        want = stock(**inputs).logits
        want_out = stock.generate(**inputs, **run)
    assert rows["mlp"] == rows["positions"] > 0  # the VTU path ran
    assert (logits - want).abs().max().item() <= ATOL
    assert torch.equal(out.sequences, want_out.sequences)  # and every decode step read the prefill's cache:
    assert len(out.logits) == 6 and all((a - b).abs().max().item() <= ATOL for a, b in zip(out.logits, want_out.logits))


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_merged_prefill_equals_stock_attention_averaged_per_group(qwen_dirs, family):
    stock, processor = load_qwen(family, qwen_dirs[family])
    model, _ = load_qwen(family, qwen_dirs[family])
    lm = model.model.language_model
    apply_vtu(lm)
    inputs = _inputs(processor)
    units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    gen = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, max(1, n // 3), (n,), generator=gen) for n in units]  # ~1/3 unique, scattered
    encoder_outputs = _encoder_outputs(stock, inputs, labels)
    group_map = _group_map(model, inputs, labels)
    with torch.no_grad():
        with vtu_groups(lm, group_map):
            logits = _forward(model, inputs, encoder_outputs)
            rows = rows_processed(lm)
        with mixers_averaged_within_groups(stock.model.language_model.layers, group_map):
            reference = _forward(stock, inputs, encoder_outputs)
        plain = _forward(stock, inputs, encoder_outputs)
    n_layers = len(lm.layers)
    assert rows["mlp"] == n_layers * vtu.plan_groups(group_map).num_unique < rows["positions"]
    assert (logits - reference).abs().max().item() <= ATOL
    # Copies of a row sit at different 3-D positions: without the mean the stock model differs.
    assert (plain - reference).abs().max().item() > 1e-3
    remove_vtu(lm)
    with torch.no_grad():
        assert torch.equal(_forward(model, inputs, encoder_outputs), plain)


def test_qwen3_deepstack_rows_not_merged_trip_the_debug_check(qwen_dirs):
    stock, processor = load_qwen("qwen3_vl", qwen_dirs["qwen3_vl"])
    lm = stock.model.language_model
    apply_vtu(lm)
    inputs = _inputs(processor)
    units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    labels = [torch.arange(n) // 2 for n in units]
    encoder_outputs = _encoder_outputs(stock, inputs, labels)
    with torch.no_grad():
        full = stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    encoder_outputs.deepstack_features = full.deepstack_features  # not group-constant
    with torch.no_grad(), vtu_groups(lm, _group_map(stock, inputs, labels)):
        with pytest.raises(GroupRowsError, match="decoder layer 1"):
            _forward(stock, inputs, encoder_outputs)
