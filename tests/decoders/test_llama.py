"""VTU decoder layers (dymu.decoders.llama) on tiny random Llama / Mistral (GQA) / Qwen2 models.

Oracles: identity groups ⇒ stock logits and tokens; truly duplicated rows ⇒ the
stock layer's full-length computation (Eq. 11 mean over each group); Eq. 10 path = fast path;
a padded batch ⇒ each sequence alone; remove ⇒ stock.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dymu import vtu
from dymu.decoders.llama import (
    supported_decoders,
    ChunkedPrefillError,
    apply_vtu,
    remove_vtu,
    rows_processed,
    set_groups,
    vtu_groups,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny-model builders
from lm_helpers import FAMILIES, VOCAB, average_within_groups, load_tiny, save_tiny, tiny_config  # noqa: E402

ATOL = 1e-5
N_LAYERS = tiny_config("llama").num_hidden_layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dirs = {}
    for family in FAMILIES:
        dirs[family] = tmp_path_factory.mktemp(family)
        save_tiny(family, dirs[family])
    return dirs


def prompt_with_image(length=24, span=(4, 16), seed=0):
    """input_ids (1, N) whose span holds copies of 3 tokens (non-contiguous groups), and its map.

    Copies of one token id have exactly equal embeddings: truly duplicated rows.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, length), generator=gen)
    palette = torch.randint(3, VOCAB, (3,), generator=gen)
    picks = torch.tensor([0, 1, 0, 0, 2, 1, 1, 0, 2, 2, 0, 1, 2, 0, 1, 1])[: span[1] - span[0]]
    ids[0, span[0]:span[1]] = palette[picks]
    labels = torch.full((1, length), -1)
    labels[0, span[0]:span[1]] = picks
    return ids, vtu.group_map_from_labels(labels)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_map_equals_stock_logits_and_greedy_tokens(saved, family, attn):
    stock, model = load_tiny(saved[family], attn), load_tiny(saved[family], attn)
    apply_vtu(model)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    # The canary for library drift: the decode steps read the KV cache the VTU prefill wrote, so a
    # cache the layer did not receive shows in the logits of every step after the first.
    run = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), vtu_groups(model, vtu.identity_group_map(2, 20)):
        logits = model(ids).logits
        rows = rows_processed(model)
        out = model.generate(ids, **run)
    assert rows["mlp"] == rows["q_proj"] == rows["positions"] == N_LAYERS * 2 * 20  # the VTU path ran
    assert max_diff(logits, stock(ids).logits) <= ATOL
    want = stock.generate(ids, **run)
    assert torch.equal(out.sequences, want.sequences)
    assert len(out.logits) == 6 and all(max_diff(a, b) <= ATOL for a, b in zip(out.logits, want.logits))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_duplicated_rows_first_layer_equals_stock_full_length(saved, family, attn):
    stock, model = load_tiny(saved[family], attn), load_tiny(saved[family], attn)
    apply_vtu(model)
    gen = torch.Generator().manual_seed(2)
    n = 24
    embeds = stock.get_input_embeddings()(torch.randint(3, VOCAB, (1, n), generator=gen)).detach()
    # Replace positions 4..15 by copies of the embeddings at 4, 5, 6: three non-contiguous groups.
    source = torch.arange(n)
    source[4:16] = torch.tensor([4, 5, 4, 4, 6, 5, 5, 4, 6, 6, 4, 5])
    embeds = embeds[:, source]
    group_map = vtu.group_map_from_labels(source.unsqueeze(0))  # same source embedding = same group
    singleton = (group_map[0].unsqueeze(0) == group_map[0].unsqueeze(1)).sum(1) == 1  # (N,)
    assert singleton.sum() == n - 12 and vtu.plan_groups(group_map).num_unique == n - 12 + 3

    with torch.no_grad():
        with vtu_groups(model, group_map):
            out = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1][0]
        plain = stock(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1][0]
        handle = stock.model.layers[0].self_attn.register_forward_hook(average_within_groups(group_map))
        try:
            merged = stock(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1][0]
        finally:
            handle.remove()

    # Text positions: literally the stock layer output. Group positions: the stock full-length
    # layer with the Eq. 11 mean, and all positions of a group hold exactly the same row.
    assert max_diff(out[singleton], plain[singleton]) <= ATOL
    assert max_diff(out, merged) <= ATOL
    for gid in group_map[0].unique():
        rows = out[group_map[0] == gid]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    # The copies really sit at different RoPE angles: without the mean, stock differs within groups.
    assert max_diff(plain[~singleton], merged[~singleton]) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_eq10_path_equals_fast_path(saved, family):
    fast, exact = load_tiny(saved[family], "eager"), load_tiny(saved[family], "eager")
    apply_vtu(fast)
    apply_vtu(exact, vtu_attention="exact")
    ids, group_map = prompt_with_image()
    with torch.no_grad(), vtu_groups(fast, group_map), vtu_groups(exact, group_map):
        a, b = fast(ids).logits, exact(ids).logits
        # Decode steps after an exact prefill are stock and read the cache the prefill wrote.
        ta = fast.generate(ids, max_new_tokens=4, do_sample=False)
        tb = exact.generate(ids, max_new_tokens=4, do_sample=False)
    assert max_diff(a, b) <= ATOL
    assert torch.equal(ta, tb)


def test_exact_path_requires_eager(saved):
    model = load_tiny(saved["llama"], "sdpa")
    with pytest.raises(ValueError, match="eager only"):
        apply_vtu(model, vtu_attention="exact")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_with_different_maps_equals_each_sequence_alone(saved, family, attn):
    model = load_tiny(saved[family], attn)
    apply_vtu(model)
    prompts = [prompt_with_image(24, (4, 16), seed=3), prompt_with_image(18, (2, 14), seed=4),
               prompt_with_image(13, (5, 10), seed=5)]
    n = 24
    ids = torch.zeros(3, n, dtype=torch.long)
    attention_mask = torch.zeros(3, n, dtype=torch.long)
    group_map = vtu.identity_group_map(3, n)  # padding: every position its own group
    for b, (p_ids, p_map) in enumerate(prompts):
        length = p_ids.shape[1]
        ids[b, n - length:] = p_ids[0]
        attention_mask[b, n - length:] = 1
        group_map[b, n - length:] = p_map[0] + (n - length)  # shift ids clear of the padding's ids
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)

    with torch.no_grad():
        with vtu_groups(model, group_map):
            batched = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits
            rows = rows_processed(model)
        for b, (p_ids, p_map) in enumerate(prompts):
            with vtu_groups(model, p_map):
                alone = model(p_ids).logits[0]
            assert max_diff(batched[b, n - p_ids.shape[1]:], alone) <= ATOL, f"sequence {b}"
    unique = vtu.plan_groups(group_map).num_unique
    assert unique == (n - 12 + 3) + (n - 12 + 3) + (n - 5 + 3)  # padding counted as text
    assert rows["mlp"] == N_LAYERS * unique


def test_row_counter_shows_text_plus_unique_rows(saved):
    model = load_tiny(saved["llama"])
    apply_vtu(model)
    ids, group_map = prompt_with_image(24, (4, 16))  # 12 text positions + 12 image positions = 3 unique
    with torch.no_grad(), vtu_groups(model, group_map):
        model(ids)
        rows = rows_processed(model)
        assert rows == {"positions": N_LAYERS * 24, "input_layernorm": N_LAYERS * 15, "q_proj": N_LAYERS * 15,
                        "k_proj": N_LAYERS * 15, "v_proj": N_LAYERS * 15, "o_proj": N_LAYERS * 15,
                        "post_attention_layernorm": N_LAYERS * 15, "mlp": N_LAYERS * 15}
        # Counts are per forward: a decode step (stock path) processes one row per layer.
        model.generate(ids, max_new_tokens=2, do_sample=False)
        assert rows_processed(model)["mlp"] == N_LAYERS * 1
    # Without a map the stock path runs every position.
    with torch.no_grad():
        model(ids)
    assert rows_processed(model)["mlp"] == N_LAYERS * 24


def test_remove_restores_stock(saved):
    stock, model = load_tiny(saved["qwen2"]), load_tiny(saved["qwen2"])
    stock_classes = [type(m) for m in model.modules()]
    apply_vtu(model)
    apply_vtu(model)  # idempotent: no double wrapping, no doubled hooks
    layer_classes = {type(layer).__name__ for layer in model.model.layers}
    assert layer_classes == {"VTUQwen2DecoderLayer"}
    ids, group_map = prompt_with_image()
    with torch.no_grad():
        set_groups(model, group_map)
        merged = model(ids).logits
        assert rows_processed(model)["mlp"] == N_LAYERS * 15
        remove_vtu(model)
        restored = model(ids).logits
        expected = stock(ids).logits
    assert [type(m) for m in model.modules()] == stock_classes
    assert all(not m._forward_hooks and not hasattr(m, "_dymu_vtu") for m in model.modules())
    assert torch.equal(restored, expected)
    assert max_diff(merged, expected) > 1e-3  # the map did change the model while applied
    with pytest.raises(ValueError, match="apply_vtu"):
        set_groups(model, group_map)
    remove_vtu(model)  # removing twice is a no-op


def test_generate_num_return_sequences_expands_maps_like_inputs(saved, monkeypatch):
    model = load_tiny(saved["mistral"])
    apply_vtu(model)
    (ids_a, map_a), (ids_b, map_b) = prompt_with_image(20, (3, 15), seed=6), prompt_with_image(20, (6, 18), seed=7)
    ids, group_map = torch.cat([ids_a, ids_b]), torch.cat([map_a, map_b])
    kwargs = dict(max_new_tokens=5, do_sample=True, top_k=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with vtu_groups(model, group_map):
            torch.manual_seed(0)
            expanded = model.generate(ids, num_return_sequences=2, **kwargs)  # batch 4 = [a, a, b, b]
        with vtu_groups(model, group_map.repeat_interleave(2, dim=0)):
            torch.manual_seed(0)
            explicit = model.generate(ids.repeat_interleave(2, dim=0), **kwargs)
        monkeypatch.setenv("DYMU_CHECK_GROUP_ROWS", "0")  # the wrong map on purpose: rows of its groups differ
        with vtu_groups(model, group_map.repeat(2, 1)):  # the wrong expansion [a, b, a, b]
            torch.manual_seed(0)
            wrong = model.generate(ids.repeat_interleave(2, dim=0), **kwargs)
    assert expanded.sequences.shape == (4, 25)
    assert torch.equal(expanded.sequences, explicit.sequences)
    # The prefill logits (first generated step) show which map each row used.
    assert max_diff(expanded.logits[0], explicit.logits[0]) <= ATOL
    assert max_diff(expanded.logits[0], wrong.logits[0]) > 1e-2


def test_generate_beam_search_with_maps_equals_each_sequence_alone(saved):
    model = load_tiny(saved["qwen2"])
    apply_vtu(model)
    (ids_a, map_a), (ids_b, map_b) = prompt_with_image(20, (3, 15), seed=8), prompt_with_image(20, (6, 18), seed=9)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        with vtu_groups(model, torch.cat([map_a, map_b])):
            batched = model.generate(torch.cat([ids_a, ids_b]), **kwargs)
        with vtu_groups(model, map_a):
            alone_a = model.generate(ids_a, **kwargs)
        with vtu_groups(model, map_b):
            alone_b = model.generate(ids_b, **kwargs)
    assert torch.equal(batched, torch.cat([alone_a, alone_b]))


def test_chunked_prefill_with_a_map_raises(saved):
    model = load_tiny(saved["llama"])
    apply_vtu(model)
    ids, group_map = prompt_with_image()
    with vtu_groups(model, group_map):
        with pytest.raises(ChunkedPrefillError, match="chunked prefill"):
            model.generate(ids, max_new_tokens=2, prefill_chunk_size=8)
        with pytest.raises(ChunkedPrefillError, match="length 24 but this forward has length 10"):
            model(ids[:, :10])
    with pytest.raises(ValueError, match="does not divide"):
        with vtu_groups(model, group_map.repeat(2, 1)):
            model(ids.repeat(3, 1))


def test_output_attentions_on_a_vtu_prefill_raises(saved):
    model = load_tiny(saved["llama"])
    apply_vtu(model)
    ids, group_map = prompt_with_image()
    with torch.no_grad(), vtu_groups(model, group_map):
        with pytest.raises(NotImplementedError, match="output_attentions"):
            model(ids, output_attentions=True)
        assert len(model(ids, output_hidden_states=True).hidden_states) == N_LAYERS + 1
    assert len(model(ids, output_attentions=True).attentions) == N_LAYERS  # no map: stock path


def test_unsupported_architecture_raises_naming_supported_layers():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer") as info:
        apply_vtu(model)
    assert "GPT2LMHeadModel" in str(info.value)
    assert supported_decoders()[:3] == ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    with pytest.raises(ValueError, match="'fast' or 'exact'"):
        apply_vtu(model, vtu_attention="fastest")


def test_language_model_inside_a_vlm_is_patched():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=tiny_config("llama").to_dict(), image_token_id=VOCAB - 1,
    )
    torch.manual_seed(0)
    stock = LlavaForConditionalGeneration(config).eval()
    model = LlavaForConditionalGeneration(config).eval()
    model.load_state_dict(stock.state_dict())
    apply_vtu(model)
    patched = [m for m in model.modules() if type(m).__name__ == "VTULlamaDecoderLayer"]
    assert len(patched) == N_LAYERS
    ids, group_map = prompt_with_image()
    with torch.no_grad(), vtu_groups(model, vtu.identity_group_map(1, ids.shape[1])):
        assert max_diff(model(input_ids=ids).logits, stock(input_ids=ids).logits) <= ATOL
        assert rows_processed(model)["mlp"] == N_LAYERS * ids.shape[1]
    remove_vtu(model)
    assert not [m for m in model.modules() if type(m).__name__.startswith("VTU")]
