"""Versions and library drift: `dymu env`, the one-line refusal of stock layers dymu does not recognise,
and the KV-cache guard of the VTU prefill. Also run on the oldest supported versions (`make test-oldest`)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from dymu.decoders.registry import DECODERS, DecoderFacts
from dymu import compat, vtu
from dymu.cli import main
from dymu.decoders import llama as vtu_layers
from dymu.decoders.llama import apply_vtu, vtu_groups
from dymu.tools import env


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("kv_cache", ["full", "compact"])
def test_identity_groups_generate_equals_stock(kv_cache):
    """The issue's reproduction: on transformers 5.24+ the VTU layer read the cache under its old name
    and every token after the first was wrong. Here every step's logits equal stock: exactly with the
    stock cache (decode steps are the stock forward), to rounding with the compact one (its decode
    attention is dymu's own, not the sdpa kernel)."""
    stock = tiny_llama()
    model = copy.deepcopy(stock)
    apply_vtu(model, kv_cache=kv_cache)
    ids = torch.randint(2, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    run = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), _no_future_warning():
        want = stock.generate(ids, **run)
        with vtu_groups(model, torch.arange(12)[None]):
            got = model.generate(ids, **run)
    diffs = [(a - b).abs().max().item() for a, b in zip(got.logits, want.logits)]
    assert torch.equal(got.sequences, want.sequences)
    assert diffs == [0.0] * 8 if kv_cache == "full" else max(diffs) <= 1e-6


class _no_future_warning:
    """dymu's own calls raise no deprecation warnings (transformers warns when a renamed keyword is used)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


class RenamedCacheLayer(LlamaDecoderLayer):
    """A stock layer as a future transformers might write it: the KV cache under a new keyword."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_store=None, use_cache=False,
                position_embeddings=None, **kwargs):
        return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)


class NoPositionEmbeddingsLayer(LlamaDecoderLayer):
    """A stock layer that computes its own rotary tables instead of receiving them."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        raise AssertionError("never called: apply refuses the layer")


@pytest.mark.parametrize("layer_class, problem", [
    (RenamedCacheLayer, "takes the KV cache under none of cache, past_key_values"),
    (NoPositionEmbeddingsLayer, "has no parameter 'position_embeddings'"),
])
def test_a_stock_layer_dymu_does_not_recognise_is_refused_in_one_line(monkeypatch, layer_class, problem):
    model = tiny_llama()
    for layer in model.model.layers:
        layer.__class__ = layer_class
    monkeypatch.setitem(DECODERS, layer_class, DecoderFacts(lambda attn: {}))
    with pytest.raises(compat.UnsupportedTransformersError) as err:
        apply_vtu(model)
    message = str(err.value)
    assert "\n" not in message and problem in message
    assert f"installed transformers {compat.installed_version('transformers')}" in message
    assert "dymu supports transformers>=5.23,<5.26" in message
    assert not any(isinstance(m, vtu_layers._VTUDecoderLayer) for m in model.modules())  # nothing patched


def test_a_missing_attention_projection_is_refused(monkeypatch):
    model = tiny_llama()
    del model.model.layers[1].self_attn.o_proj
    with pytest.raises(compat.UnsupportedTransformersError, match="LlamaDecoderLayer.self_attn has no attribute 'o_proj'"):
        apply_vtu(model)


class ForgetfulCache(DynamicCache):
    """A cache that returns the new states but keeps nothing: what a layer that misses its cache amounts to."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


def test_a_vtu_prefill_whose_cache_does_not_grow_raises():
    model = tiny_llama()
    apply_vtu(model)
    ids = torch.randint(2, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    cache_keyword = compat.cache_parameter(type(model))  # `cache` from transformers 5.24 on, else past_key_values
    with torch.no_grad(), vtu_groups(model, vtu.identity_group_map(1, 10)):
        model(ids, **{cache_keyword: DynamicCache(config=model.config)}, use_cache=True)  # a real cache: fine
        with pytest.raises(RuntimeError, match="the KV cache did not grow by the prompt length 10"):
            model(ids, **{cache_keyword: ForgetfulCache(config=model.config)}, use_cache=True)


def test_env_lists_versions_ranges_and_device(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for label in ("dymu", "torch", "transformers", "lmms-eval", "PyAV (av)", "device", "dtype", "attention"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    transformers_line = next(line for line in out.splitlines() if line.startswith("transformers"))
    assert "transformers>=5.23,<5.26" in transformers_line and transformers_line.endswith(" ok")
    assert "eager, sdpa" in out


def test_env_families_prints_the_declared_matrix(capsys):
    """What the CLI help points at for "which family offers which mode and option"."""
    from dymu.families.base import feature_matrix

    assert main(["env"]) == 0
    assert "| family |" not in capsys.readouterr().out  # only on request
    assert main(["env", "--families"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(feature_matrix()) and "| LLaVA-1.5 |" in out


def test_env_check_passes_on_every_family(capsys):
    """The self-test a user runs on their own stack: here on CPU float32, every family."""
    assert main(["env", "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    checks = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert [line.split()[1] for line in checks] == list(env._families())
    assert all(line.startswith("PASS") for line in checks), checks
    assert lines[-1] == f"self-test: {len(checks)} passed, 0 failed"


def test_env_check_fails_with_exit_status_1_when_a_check_fails(monkeypatch, capsys):
    """A planted fault (the VTU re-merge scaled by 1.01) makes the merge-off oracle fail."""
    merge_mean = vtu.merge_mean
    monkeypatch.setattr(vtu, "merge_mean", lambda *a, **k: merge_mean(*a, **k) * 1.01)
    families = env._families()
    monkeypatch.setattr(env, "_families", lambda: {"llava": families["llava"]})
    assert main(["env", "--check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("FAIL llava") and "merge off" in lines[-2]
    assert lines[-1] == "self-test: 0 passed, 1 failed (llava)"


def test_a_tower_layer_dymu_does_not_recognise_is_refused_in_one_line(tmp_path):
    from conftest import build_tiny_tower

    tower = build_tiny_tower("clip", tmp_path)
    layers = [m for m in tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    del layers[2].self_attn.k_proj
    with pytest.raises(compat.UnsupportedTransformersError, match="CLIPEncoderLayer has no attribute 'self_attn.k_proj'"):
        import dymu

        dymu.apply(tower, 0.9)


def test_a_vlm_whose_stock_model_lacks_a_hook_point_is_refused(monkeypatch):
    """A future LlavaModel without mm_encoder_outputs (the hook generate uses) is refused before any change."""
    import dymu
    from dymu.families.demos.llava import build_demo_model

    model, _ = build_demo_model()
    stock_forward = type(model.model).forward

    def forward(self, input_ids=None, pixel_values=None, **kwargs):  # no mm_encoder_outputs
        return stock_forward(self, input_ids=input_ids, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(type(model.model), "forward", forward)
    with pytest.raises(compat.UnsupportedTransformersError, match="LlavaModel.forward\\(\\) has no parameter 'mm_encoder_outputs'"):
        dymu.apply(model, 0.9)
    assert type(model.model).__name__ == "LlavaModel"
