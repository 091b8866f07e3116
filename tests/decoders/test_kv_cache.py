"""The compact VTU KV cache (dymu.kv_cache) on tiny random Llama / Mistral (GQA, sliding window) / Qwen2
(GQA, one full + two sliding layers) models and the Qwen VL text decoders (M-RoPE).

Oracle: VTU with the stock full-length cache (kv_cache="full"), itself tested against the stock model
in test_llama.py: 16 generated tokens equal and logits within 1e-5 at every step, greedy, beams,
sampling, left-padded batches, a next turn after a cached prefix, sliding windows shorter than the
prompt (they cut through groups and evict them). Identity maps: the stock model's tokens and logits.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import dymu
from dymu import compat, vtu
from dymu.decoders.llama import apply_vtu, remove_vtu, vtu_groups
from dymu.kv_cache import CompactLayer, pack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from lm_helpers import FAMILIES, VOCAB, load_tiny  # noqa: E402
from qwen_helpers import QWEN_FAMILIES, load_qwen  # noqa: E402
from test_llama import prompt_with_image, saved  # noqa: E402,F401  (saved: the tiny decoders, one folder each)
from test_qwen_vl import batch as qwen_batch  # noqa: E402

ATOL = 1e-5
NEW = 16


def pair(folder, attn="eager"):
    """(VTU with the full cache, VTU with the compact cache) on the same weights."""
    full, compact = load_tiny(folder, attn), load_tiny(folder, attn)
    apply_vtu(full, kv_cache="full")
    apply_vtu(compact)
    return full, compact


def run(model, ids, group_map, cache=None, seed=0, **kwargs):
    """generate() with the map set; the cache (a fresh DynamicCache unless given) is returned too."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    settings = dict(max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, do_sample=False)
    settings.update(kwargs)
    with torch.no_grad(), vtu_groups(model, group_map):
        torch.manual_seed(seed)
        out = model.generate(ids, **{compat.cache_parameter(type(model)): cache}, **settings)
    return out, cache


def assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits) == NEW
    worst = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))
    assert worst <= ATOL, worst


def compact_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, CompactLayer)]


def two_prompts():
    """Two prompts with their maps, the first left-padded to the second's length (24)."""
    (ids_a, map_a), (ids_b, map_b) = prompt_with_image(18, (2, 14), seed=4), prompt_with_image(24, (4, 16), seed=3)
    n, pad = 24, 6
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.ones(2, n, dtype=torch.long)
    group_map = vtu.identity_group_map(2, n)
    ids[0, pad:], mask[0, :pad], group_map[0, pad:] = ids_a[0], 0, map_a[0] + pad
    ids[1], group_map[1] = ids_b[0], map_b[0]
    return ids, mask, group_map


@pytest.mark.parametrize("decoding", ["greedy", "beams", "sampling"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_cache_generates_what_the_full_cache_generates(saved, family, decoding):
    full, compact = pair(saved[family])
    ids, group_map = prompt_with_image(24, (4, 16))  # 12 grouped positions in 3 groups; windows of 12
    kwargs = {"greedy": {}, "beams": dict(num_beams=2, num_return_sequences=2),
              "sampling": dict(do_sample=True, top_k=0, num_return_sequences=2)}[decoding]
    want, _ = run(full, ids, group_map, **kwargs)
    got, cache = run(compact, ids, group_map, **kwargs)
    assert_same(got, want)
    layers = compact_layers(cache)
    assert len(layers) == len(cache.layers)  # every layer compact, the sliding ones too
    if family == "llama":  # full attention: the 3 groups are stored once, their 12 positions by index
        assert [(layer.keys.shape[2], layer.group_keys.shape[2], layer.group_of.shape[1]) for layer in layers] == \
            [(12 + NEW - 1, 3, 12)] * len(layers)
    else:  # windows of 12: every grouped position and group evicted, as stock evicts them
        sliding = [layer for layer in layers if layer.window is not None]
        assert sliding and all(layer.group_of.shape[1] == layer.group_keys.shape[2] == 0 for layer in sliding)
        assert all(int((layer.columns >= 0).sum(1).max()) == layer.window - 1 for layer in sliding)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_with_different_maps(saved, family, attn):
    full, compact = pair(saved[family], attn)
    ids, mask, group_map = two_prompts()
    want, _ = run(full, ids, group_map, attention_mask=mask)
    got, cache = run(compact, ids, group_map, attention_mask=mask)
    assert_same(got, want)
    assert compact_layers(cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_next_turn_after_a_cached_prefix(saved, family):
    """Turn 1 (an image) fills the cache; turn 2 appends text and a second image to the same cache
    (its own map, of the uncached length) and generates on: a multi-position forward over the cache."""
    full, compact = pair(saved[family])
    ids, group_map = prompt_with_image(24, (4, 16), seed=5)
    outputs = {}
    for name, model in (("full", full), ("compact", compact)):
        first, cache = run(model, ids, group_map)
        more, more_map = prompt_with_image(14, (3, 11), seed=6)
        history = torch.cat([first.sequences, more], dim=1)
        # generate feeds what the cache lacks: the last generated token (its own group), then the new turn
        uncached = torch.cat([torch.zeros(1, 1, dtype=torch.long), more_map + 1], dim=1)
        assert history.shape[1] - cache.get_seq_length() == uncached.shape[1]
        outputs[name] = run(model, history, uncached, cache=cache)[0], first
    assert_same(outputs["compact"][1], outputs["full"][1])
    assert_same(outputs["compact"][0], outputs["full"][0])


def test_cache_crop_and_reuse_without_a_map(saved):
    """crop() then continuing without a group map (every position its own row) on the same cache."""
    full, compact = pair(saved["llama"])
    ids, group_map = prompt_with_image(24, (4, 16), seed=7)
    results = []
    for model in (full, compact):
        first, cache = run(model, ids, group_map)
        cache.crop(-5)
        history = first.sequences[:, : cache.get_seq_length()]
        tail = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(8))
        results.append(run(model, torch.cat([history, tail], dim=1), None, cache=cache)[0])
    assert_same(results[1], results[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_map_gives_the_stock_model(saved, family):
    stock = load_tiny(saved[family])
    _, compact = pair(saved[family])
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    got, cache = run(compact, ids, vtu.identity_group_map(2, 20))
    want = stock.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert_same(got, want)
    assert len(compact_layers(cache)) == len(cache.layers)


def test_compact_cache_holds_text_plus_groups(saved):
    _, compact = pair(saved["llama"])
    ids, group_map = prompt_with_image(24, (4, 16))
    cache = DynamicCache(config=compact.config)
    with torch.no_grad(), vtu_groups(compact, group_map):
        compact(ids, **{compat.cache_parameter(type(compact)): cache}, use_cache=True)
    layer = cache.layers[0]
    assert layer.get_seq_length() == 24
    stock_bytes = 2 * 24 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
    float_bytes = 2 * (12 + 3) * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
    assert float_bytes < layer.nbytes() < float_bytes + 24 * 5 * 8  # + the index tensors
    assert layer.nbytes() < stock_bytes


def test_static_cache_keeps_the_full_cache_with_a_warning(saved):
    full, compact = pair(saved["llama"])
    ids, group_map = prompt_with_image(24, (4, 16))
    settings = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad(), vtu_groups(full, group_map):
        want = full.generate(ids, **settings)
    with torch.no_grad(), vtu_groups(compact, group_map), pytest.warns(UserWarning, match="full-length KV cache for this "
                                                                           "layer: the cache layer is a StaticLayer"):
        got = compact.generate(ids, **settings)
    assert torch.equal(got, want)


def test_dynamic_rope_falls_back_to_the_full_cache(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                 "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="rope type 'dynamic'"):
        apply_vtu(model)
    assert model.model.layers[0]._dymu_vtu.kv_cache == "full"


def test_bad_kv_cache_values_are_refused(saved):
    model = load_tiny(saved["llama"])
    with pytest.raises(ValueError, match="kv_cache must be 'compact' or 'full', got 'small'"):
        apply_vtu(model, kv_cache="small")
    with pytest.raises(ValueError, match="kv_cache must be 'compact' or 'full', got 'small'"):
        dymu.apply(model, kv_cache="small")
    apply_vtu(model)
    remove_vtu(model)
    assert not any(m._forward_hooks for m in model.modules())  # the rotary recorder is gone too


def test_pack_keeps_order_and_pads_in_front():
    select = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = pack(select)
    assert index[0].tolist() == [0, 2, 3] and valid[0].all()
    assert valid[1].tolist() == [False, False, True] and index[1, 2] == 1


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_vl_decoders_with_merges(qwen_dirs, family):
    """M-RoPE (per-position 3-D tables), images, videos and left padding, through dymu.apply."""
    models = {}
    for kv_cache in ("full", "compact"):
        model, processor = load_qwen(family, qwen_dirs[family])
        dymu.apply(model, 0.6, kv_cache=kv_cache)
        models[kv_cache] = model
    inputs = qwen_batch(processor)
    outs = {}
    for name, model in models.items():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            outs[name] = model.generate(**inputs, **{compat.cache_parameter(type(model)): cache}, max_new_tokens=NEW,
                                        do_sample=False, output_logits=True, return_dict_in_generate=True)
        if name == "compact":
            layers = compact_layers(cache)
            assert layers and all(layer.group_keys.shape[2] > 0 for layer in layers)
            assert all(math.prod(layer.group_positions.shape[1:]) == 3 * layer.group_of.shape[1] for layer in layers)
    assert_same(outs["compact"], outs["full"])
