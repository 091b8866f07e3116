"""VTU on the decoder layers of a causal LM (Llama, Mistral, Qwen2 and the registered ones), per instance and
reversible: the patch and its bookkeeping. The VTU forward itself is `decoders/vtu_layer.py`; what differs per
decoder class, `decoders/registry.py`.

`apply_vtu(model)` checks every supported decoder layer found in `model` (a causal LM or a VLM holding one)
against what the VTU forward reads, then swaps its class for a subclass (`VTU` + the stock name, made once
per stock class with its forward's signature captured) whose forward runs the norms, the q/k/v/o
projections and the MLP on the unique rows of the sequence only. `remove_vtu` restores the stock classes.

Group maps do not travel as forward/generate kwargs (transformers 5.x `generate` rejects unknown
kwargs). They are stored on a per-model state object that the patched layers read:

    apply_vtu(model)
    with vtu_groups(model, group_map):          # or set_groups(model, group_map) / set_groups(model, None)
        out = model.generate(input_ids, ...)    # the prefill (length N) uses the map, decode steps do not

A map of shape (B, N) (see `dymu.vtu` for the format) is used by every forward whose sequence
length is N; a batch of B·k rows (num_return_sequences, beam search) repeats each map k times, as
`generate` does with its inputs. Length-1 forwards (decode steps) ignore it. Any other length while
a map is set is a chunked prefill, which would split groups across chunks: it raises.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections import Counter

from torch import Tensor, nn

from .. import compat
from ..patching import PatchedClasses
from .mixers import uncovered
from .registry import DECODERS, SUPPORTED_MODELS, supported_decoders
from .vtu_layer import _VTUDecoderLayer
from .vtu_state import (  # noqa: F401  (imported from here too)
    _COUNTED,
    CHECK_GROUP_ROWS_ENV,
    KV_CACHES,
    ChunkedPrefillError,
    GroupRowsError,
    VTUState,
    _PositionRecorder,
    _RowCounter,
)


def _vtu_class_attributes(stock: type) -> dict:
    """What the patched class keeps of its stock class (checked first): the class to restore, its family's
    RoPE, its forward's signature, the name of its **kwargs and of its KV cache parameter."""
    check_stock_layer(stock)
    signature = inspect.signature(inspect.unwrap(stock.forward))
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)
    rope = staticmethod(sys.modules[stock.__module__].apply_rotary_pos_emb)
    return {"_dymu_stock": stock, "_dymu_rope": rope, "_dymu_signature": signature,
            "_dymu_var_keyword": var_keyword, "_dymu_cache_arg": compat.cache_parameter(stock)}


# MRO: (VTUX, _VTUDecoderLayer, stock, ...): forward() reaches the stock forward via super(), and
# isinstance(layer, stock) still holds, so HF output capturing (hidden_states) keeps working.
_vtu_class = PatchedClasses(__name__, "VTU", _VTUDecoderLayer, lambda: list(DECODERS), _vtu_class_attributes)


def __getattr__(name: str):  # pickle finds the VTU layer classes here (dymu/patching.py)
    return _vtu_class.resolve(name)


# What the VTU forward reads from the stock layer: its call's arguments, its submodules, the attention
# module's projections and settings, and the family's own apply_rotary_pos_emb.
_LAYER_ARGUMENTS = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")
_LAYER_ATTRIBUTES = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTENTION_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config",
                         "attention_dropout")


def check_stock_layer(stock: type, layer: nn.Module | None = None, name: str = "") -> None:
    """Refuse (one line) a stock decoder layer whose forward or modules are not what the VTU layer expects,
    or whose token mixer VTU does not cover."""
    compat.require_forward(stock, _LAYER_ARGUMENTS)
    compat.cache_parameter(stock)
    if not hasattr(sys.modules[stock.__module__], "apply_rotary_pos_emb"):
        raise compat.refuse(f"{stock.__module__} has no apply_rotary_pos_emb")
    mixer = _mixer_of(layer) if layer is not None else None
    if mixer is not None:
        mixer.check(layer)
    elif layer is not None and stock in DECODERS and DECODERS[stock].mixers and not hasattr(layer, "self_attn"):
        raise uncovered(layer, name, DECODERS[stock].mixers)
    elif layer is not None:
        sandwich = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if DECODERS[stock].sandwich_norms else ()
        compat.require_attributes(layer, (*_LAYER_ATTRIBUTES, *sandwich), stock.__name__)
        attention = (*_ATTENTION_ATTRIBUTES, *(("q_norm", "k_norm") if DECODERS[stock].head_norms else ()))
        compat.require_attributes(layer.self_attn, attention, f"{stock.__name__}.self_attn")


def _mixer_of(layer: nn.Module):
    """The description of ``layer``'s token mixer when it is not self-attention (decoders/mixers.py), else None."""
    facts = DECODERS.get(getattr(layer, "_dymu_stock", type(layer)))
    return next((m for m in (facts.mixers if facts else ()) if m.covers(layer)), None)


def _patched_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _VTUDecoderLayer)]


def _state(model: nn.Module) -> VTUState:
    layers = _patched_layers(model)
    if not layers:
        raise ValueError("VTU is not applied to this model: call apply_vtu(model) first")
    return layers[0]._dymu_vtu


def apply_vtu(model: nn.Module, vtu_attention: str = "fast", kv_cache: str = "compact") -> None:
    """Patch every supported decoder layer (`supported_decoders()`) in `model` (in place, per instance) for VTU.

    vtu_attention: "fast" (gather + stock RoPE + stock attention; eager, sdpa, flash) or "exact"
    (the paper's Eq. 10 decomposition, eager only, O(B·H·N²) per frequency: a reference).
    kv_cache: "compact" (one key and value per group, `dymu.kv_cache`) or "full" (the stock
    full-length cache). A model whose rotary frequencies change with the sequence length (rope
    types "dynamic", "longrope") keeps the full cache, with a warning: keys rotated later would not
    match those rotated at the prefill.
    Applying again only updates `vtu_attention` and `kv_cache`. Undo with `remove_vtu(model)`.
    """
    stock, patched = check_vtu(model, vtu_attention, kv_cache)
    state = patched[0]._dymu_vtu if patched else VTUState()
    state.attention = vtu_attention
    state.kv_cache = kv_cache
    if kv_cache == "compact" and state.rotary is None:
        rotary = _rotary_module(model, stock + patched)
        rope_type = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":
            warnings.warn(f"dymu: kv_cache='compact' falls back to the full-length KV cache: rope type {rope_type!r} "
                          "changes its frequencies with the sequence length", stacklevel=2)
            state.kv_cache = "full"
        else:
            state.rotary = rotary
            state.hooks.append(rotary.register_forward_hook(_PositionRecorder(state, rotary), with_kwargs=True))
    for layer in stock:
        mixer = _mixer_of(layer)
        layer.__class__ = _vtu_class(type(layer))
        layer._dymu_vtu, layer._dymu_mixer = state, mixer
        layer._dymu_vtu_key = len(state.rows_keys)
        state.rows_keys.append(layer._dymu_vtu_key)
        if mixer is not None:  # its row-wise modules run on the unique rows (hooks, decoders/mixers.py)
            state.hooks.extend(mixer.attach(layer, state))
        for name in _COUNTED if mixer is None else mixer.counted():
            hook = _RowCounter(state, layer._dymu_vtu_key, name.split(".")[-1])
            state.hooks.append(layer.get_submodule(name).register_forward_hook(hook))


def check_vtu(model: nn.Module, vtu_attention: str = "fast",
              kv_cache: str = "compact") -> tuple[list[nn.Module], list[nn.Module]]:
    """Validate `apply_vtu`'s arguments without changing anything: (stock layers, patched layers)."""
    if vtu_attention not in ("fast", "exact"):
        raise ValueError(f"vtu_attention must be 'fast' or 'exact', got {vtu_attention!r}")
    check_kv_cache(kv_cache)
    named = [(n, m) for n, m in model.named_modules() if type(m) in DECODERS]
    for name, layer in named:
        check_stock_layer(type(layer), layer, name)
    stock = [m for _, m in named]
    patched = _patched_layers(model)
    if kv_cache == "compact":
        for layer in stock + patched:
            kind = getattr(layer, "_dymu_stock", type(layer))
            if DECODERS[kind].no_compact:
                raise ValueError(f"kv_cache='compact' is not available for {kind.__name__}: {DECODERS[kind].no_compact}; "
                                 "use kv_cache='full'")
    if not stock and not patched:
        raise ValueError(
            f"VTU supports only {', '.join(supported_decoders())} decoder layers ({', '.join(SUPPORTED_MODELS)}, or a VLM "
            f"whose language model is one of them); found none in {type(model).__name__}."
        )
    if vtu_attention == "exact":
        if any(_mixer_of(m) is not None for m in stock + patched):
            raise ValueError("vtu_attention='exact' is the paper's Eq. 10 for attention layers; this decoder also has "
                             "other token mixers: use vtu_attention='fast'")
        impls = {m.self_attn.config._attn_implementation for m in stock + patched}
        if impls != {"eager"}:
            raise ValueError(f"vtu_attention='exact' is eager only, the model uses {sorted(impls)}: "
                             "load it with attn_implementation='eager'")
    return stock, patched


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be 'compact' or 'full', got {kv_cache!r}")


def _rotary_module(model: nn.Module, layers: list[nn.Module]) -> nn.Module:
    """The rotary module of the text model holding `layers` (its `rotary_emb`, called once per forward
    with the position ids): the compact cache recomputes the cos/sin of cached positions with it."""
    ids = {id(layer) for layer in layers}
    owners = [m for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
              and any(id(layer) in ids for layer in m.layers)]
    if len(owners) != 1:
        raise compat.refuse(f"found {len(owners)} text models holding the decoder layers of {type(model).__name__} "
                            "(the compact KV cache expects one; use kv_cache='full')")
    compat.require_attributes(owners[0], ("rotary_emb",), type(owners[0]).__name__)
    rotary = owners[0].rotary_emb
    compat.require_forward(type(rotary), ("x", "position_ids"), var_keyword=False)
    return rotary


def remove_vtu(model: nn.Module) -> None:
    """Undo `apply_vtu`: restore the stock layer classes, remove hooks and VTU state. No-op if not applied."""
    for layer in _patched_layers(model):
        state = layer._dymu_vtu
        for handle in state.hooks:
            handle.remove()
        state.hooks.clear()
        state.set_group_map(None)
        state.rotary = state.rotary_ids = state._table = state._workspace = None
        state.rows.clear()
        state.rows_keys.clear()
        layer.__class__ = layer._dymu_stock
        del layer._dymu_vtu, layer._dymu_vtu_key
        layer.__dict__.pop("_dymu_mixer", None)


def set_groups(model: nn.Module, group_map: Tensor | None) -> None:
    """Set (or clear with None) the group map (B, N) used by the prefill forwards of length N.

    group_map[b, n] is the id of the unique row of position n in sequence b (ids local to each
    sequence, in [0, N)); text and padding positions must be groups of their own. The rows of the
    model input (inputs_embeds) within a group are expected to be equal; the first one is used.
    Build maps with `dymu.vtu.group_map_from_labels`.
    """
    _state(model).set_group_map(group_map)


@contextlib.contextmanager
def vtu_groups(model: nn.Module, group_map: Tensor | None):
    """Context manager: `set_groups(model, group_map)` inside, the previous map restored on exit."""
    state = _state(model)
    previous = state.group_map
    state.set_group_map(group_map)
    try:
        yield
    finally:
        state.set_group_map(previous)


def rows_processed(model: nn.Module) -> dict[str, int]:
    """Rows each sub-module processed in the last forward, summed over the patched decoder layers.

    Keys: input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm, mlp (counted
    by forward hooks on those modules), and positions: batch × length, what the stock model runs.
    """
    total = Counter()
    for layer in _patched_layers(model):
        total.update(layer._dymu_vtu.rows.get(layer._dymu_vtu_key, Counter()))
    keys = ("positions", *(n.removeprefix("self_attn.") for n in _COUNTED))
    return {key: total[key] for key in (*keys, *sorted(set(total) - set(keys)))}  # then other mixers' modules
