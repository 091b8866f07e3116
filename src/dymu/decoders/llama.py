"""VTU decoder layers for Llama, Mistral and Qwen2, per-instance and reversible.

`apply_vtu(model)` swaps the class of every supported decoder layer found in `model` (a causal LM
or a VLM holding one) for a subclass whose forward runs the norms, the q/k/v/o projections and the
MLP on the unique rows of the sequence only. Attention itself is stock: q/k/v are gathered back to
full length, rotated by the stock RoPE at their real positions and passed with the stock mask and
KV cache to the stock attention function; its output is averaged over each group (Eq. 11). So the
full-length sequence, positions, masks, cache and `generate` stay stock, and decode steps (one new
token, no groups) take the stock forward unchanged.

KV cache (``kv_cache``): "compact" (default) swaps a `dymu.kv_cache.CompactLayer` into the
stock `DynamicCache` at a VTU prefill: one unrotated key and one value per group, singletons as stock;
every later forward on that cache (decode steps, a next turn) runs its attention here, exactly. "full"
keeps the stock full-length cache (decode steps are then the stock forward). The compact cache is
used only where it is exact and the Cache API supports it; otherwise that layer keeps the stock
cache, with a warning naming why (see `_compact_layer_for`).

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
import os
import sys
import warnings
from collections import Counter

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .. import compat, kv_cache, vtu
from ..patching import PatchedClasses
from .registry import DECODERS, SUPPORTED_MODELS, supported_decoders
from .vtu_state import (  # noqa: F401  (imported from here too)
    _COUNTED,
    KV_CACHES,
    ChunkedPrefillError,
    GroupRowsError,
    VTUState,
    _PositionRecorder,
    _RowCounter,
)

try:  # transformers' output capturing (output_attentions=...) records attention modules by hook
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers layouts: no check
    _active_collector = None

# Debug check (on in the tests): rows of one group must be bitwise equal entering every VTU layer.
# A model that adds per-position inputs between layers (Qwen3-VL deepstack) would otherwise silently
# keep only the first row of each group.
CHECK_GROUP_ROWS_ENV = "DYMU_CHECK_GROUP_ROWS"


class _VTUDecoderLayer:
    """Mixed in before a stock decoder-layer class; `_dymu_vtu` (VTUState) is set per instance."""

    _dymu_vtu: VTUState  # per instance
    _dymu_stock: type  # per class: the stock class to restore
    _dymu_rope = None  # per class: the family's own stock apply_rotary_pos_emb
    _dymu_mixer = None  # per instance: a token mixer other than self-attention (decoders/mixers.py), or None

    def forward(self, *args, **kwargs) -> Tensor:
        # The stock call is forwarded untouched (positional or keyword, the cache under whatever name
        # this transformers uses); only a VTU prefill, or a forward over a compact cache, reads its
        # arguments, bound to the stock signature.
        if self._dymu_mixer is not None:  # a token mixer other than self-attention (decoders/mixers.py)
            return self._dymu_mixer.forward(self, args, kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        state = self._dymu_vtu
        state.rows[self._dymu_vtu_key] = Counter()  # the counting hooks fill it during this forward
        state.rows[self._dymu_vtu_key]["positions"] = hidden_states.shape[0] * hidden_states.shape[1]
        groups = state.groups_for(hidden_states)
        if groups is None and not any(_compact_at(v, self.self_attn.layer_idx) for v in (*args, *kwargs.values())):
            return super().forward(*args, **kwargs)
        call = self._dymu_signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        arguments = dict(call.arguments)
        extra = dict(arguments.pop(self._dymu_var_keyword))  # forwarded to the attention function, as stock does
        cache = arguments[self._dymu_cache_arg]
        for name in list(extra):
            if compat.is_cache(extra[name]):
                if name not in compat.CACHE_PARAMETERS or cache is not None:
                    raise compat.refuse(f"{self._dymu_stock.__name__}.forward() was handed a KV cache as {name!r}")
                cache = extra.pop(name)  # the other transformers name of the same argument (deprecated alias)
        attention_mask, position_ids = arguments["attention_mask"], arguments["position_ids"]
        position_embeddings = arguments["position_embeddings"]
        # A named parameter of most layers; others (Qwen3.5) get it in **kwargs, forwarded as stock does.
        use_cache = arguments["use_cache"] if "use_cache" in arguments else extra.pop("use_cache", None)

        collector = _active_collector.get() if _active_collector is not None else None
        if collector is not None and "attentions" in collector:
            # The stock attention module's forward (where HF records attention weights) is not run.
            raise NotImplementedError("output_attentions is not supported on a VTU forward (group map set, or a "
                                      "compact KV cache): use kv_cache='full' and no group map")
        attn = self.self_attn
        batch, length, _ = hidden_states.shape
        # Without a map (a forward over a compact cache: decode steps, a next turn) every position is a row.
        if groups is None:
            residual = hidden_states.flatten(0, 1)

            def full(rows):  # (B*L, ...) -> (B, L, ...)
                return rows.view(batch, length, *rows.shape[1:])
        else:
            residual = vtu.unique_rows(hidden_states, groups)  # (U, D)

            def full(rows):  # (U, ...) -> (B, N, ...)
                return vtu.expand(rows, groups)
            if os.environ.get(CHECK_GROUP_ROWS_ENV) == "1" and not torch.equal(hidden_states, full(residual)):
                raise GroupRowsError(f"decoder layer {attn.layer_idx}: rows of one VTU group differ at its input; "
                                     "VTU would silently use the first row of each group")
        x = self.input_layernorm(residual)
        rows = x.shape[0]
        gate_rows = None
        if DECODERS[self._dymu_stock].output_gate:  # (query, gate) per head, as the stock attention splits them
            q_rows, gate_rows = attn.q_proj(x).view(rows, -1, 2 * attn.head_dim).chunk(2, dim=-1)
            gate_rows = gate_rows.reshape(rows, -1)
        else:
            q_rows = attn.q_proj(x).view(rows, -1, attn.head_dim)  # (U, Hq, d)
        k_rows = attn.k_proj(x).view(rows, -1, attn.head_dim)  # (U, Hkv, d)
        v_rows = attn.v_proj(x).view(rows, -1, attn.head_dim)
        if DECODERS[self._dymu_stock].head_norms:  # per-head RMSNorm: row-wise, so on the unique rows
            q_rows, k_rows = attn.q_norm(q_rows), attn.k_norm(k_rows)

        # Stock RoPE at the full positions: every copy of a unique row gets its own angle. V has no
        # position and is only gathered. (B, H, N, d): the stock attention layout.
        exact = state.attention == "exact" and groups is not None  # Eq. 10 is for a VTU prefill
        if exact and attn.config._attn_implementation != "eager":
            raise ValueError("vtu_attention='exact' is eager only: load the model with attn_implementation='eager'")
        if exact and cache is not None and cache.get_seq_length(attn.layer_idx):
            raise ValueError("vtu_attention='exact' needs an empty KV cache: its keys are the unique rows of this forward")
        cos, sin = position_embeddings
        query, key = self._dymu_rope(full(q_rows).transpose(1, 2), full(k_rows).transpose(1, 2), cos, sin)
        value = full(v_rows).transpose(1, 2)
        compact = self._compact_layer_for(cache, groups, key, k_rows, cos, full) if cache is not None else None
        before = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        dropout = attn.attention_dropout if self.training else 0.0
        if compact is not None and before:
            # Attention over the compact cache (this forward's positions written first, as stock).
            kv_offset = compact.get_mask_sizes(length)[1]
            self._write(compact, key, value, k_rows, v_rows, groups, batch, length)
            positions = compact.group_positions
            table = state.rotation_table(positions, key) if positions.shape[1] else None
            columns = torch.arange(before, before + length, device=key.device)
            out = compact.attend(query, columns, attention_mask, kv_offset, attn.scaling, table, dropout, self.training,
                                 state.workspace)
        else:
            if compact is not None:  # a prefill into an empty compact layer: attend to this forward's own K/V
                self._write(compact, key, value, k_rows, v_rows, groups, batch, length)
            elif cache is not None:
                key, value = cache.update(key, value, attn.layer_idx)
            if exact:  # the paper's Eq. 10 from the unrotated unique rows; the rotated keys only feed the cache
                out = vtu.eq10_attention(q_rows, k_rows, value, groups, cos, sin, attention_mask,
                                         attn.scaling, dropout, self.training)
            else:
                interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                  eager_attention_forward)
                out, _ = interface(attn, query, key, value, attention_mask, dropout=dropout, scaling=attn.scaling,
                                   position_ids=position_ids, use_cache=use_cache,
                                   **DECODERS[self._dymu_stock].attention_kwargs(attn), **extra)
        if compact is not None:
            compact.trim()
        if cache is not None and cache.get_seq_length(attn.layer_idx) != before + length:
            # Cheap guard against a cache that silently does not take the prompt (the failure mode of
            # reading a renamed keyword): it must grow by exactly this forward's length.
            raise RuntimeError(f"decoder layer {attn.layer_idx}: the KV cache did not grow by the prompt length "
                               f"{length} during a VTU forward; generation would be wrong after the first token")
        # out: (B, N, Hq, d). Re-merge (Eq. 11) before o_proj: the mean commutes with the linear map.
        out = out.reshape(batch, length, -1)
        out = out.flatten(0, 1) if groups is None else vtu.merge_mean(out, groups)  # (U, Hq*d)
        if gate_rows is not None:
            out = out * torch.sigmoid(gate_rows)
        if DECODERS[self._dymu_stock].sandwich_norms:  # every norm is row-wise: on the unique rows
            hidden = residual + self.post_attention_layernorm(attn.o_proj(out))
            hidden = hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        else:
            hidden = residual + attn.o_proj(out)
            hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return full(hidden)  # (B, N, D): rows of a group stay exactly equal

    def _write(self, compact, key, value, k_rows, v_rows, groups, batch, length) -> None:
        positions = self._dymu_vtu.positions(batch, length)
        if groups is None:
            compact.write(key, value, k_rows, v_rows, None, None, None, positions)
        else:
            compact.write(key, value, k_rows, v_rows, groups.sizes, groups.index, groups.first, positions)

    def _compact_layer_for(self, cache, groups, key, k_rows, cos, full):
        """This layer's `CompactLayer` in `cache`: the one already there, or (at a VTU prefill into an
        empty stock dynamic layer, kv_cache='compact') a new one swapped in. None: the stock cache."""
        state, index = self._dymu_vtu, self.self_attn.layer_idx
        layers = compat.cache_layers(cache)
        if index < len(layers) and isinstance(layers[index], kv_cache.CompactLayer):
            return layers[index]
        if state.kv_cache != "compact" or groups is None:
            return None
        replicate = getattr(cache, "layer_class_to_replicate", None)
        stock = layers[index] if index < len(layers) else replicate
        kind = stock if isinstance(stock, type) or stock is None else type(stock)
        window = getattr(stock, "sliding_window", None) if stock is not kind else None
        reason = None
        if kind not in _DYNAMIC_LAYERS:
            reason = f"the cache layer is a {getattr(kind, '__name__', kind)}, not a DynamicLayer / DynamicSlidingWindowLayer"
        elif type(cache).update is not _STOCK_UPDATE:
            reason = f"{type(cache).__name__} customises Cache.update, which the compact cache would bypass"
        elif getattr(cache, "offloading", False):
            reason = "the cache offloads its layers"
        elif cache.get_seq_length(index):
            reason = "the cache already holds a prefix written by the stock cache"
        elif not torch.equal(cos[..., : cos.shape[-1] // 2], cos[..., cos.shape[-1] // 2:]):
            reason = "the rotary tables are not in the rotate-half convention"
        elif not state.rotation_checked:
            reason = self._check_rotation(key, k_rows, full)
        if reason is not None:
            warnings.warn(f"dymu: VTU keeps the full-length KV cache for this layer: {reason}", stacklevel=3)
            return None
        while len(layers) <= index:  # a lazily grown cache (DynamicCache without a config), as Cache.update does
            layers.append(replicate())
        layers[index] = kv_cache.CompactLayer(window=window)
        return layers[index]

    def _check_rotation(self, key, k_rows, full) -> str | None:
        """Once per model: the compact cache's rotation (complex product with the rotary module's tables
        recomputed from the position ids) must reproduce the stock rotated keys of this prompt."""
        state = self._dymu_vtu
        batch, _, length, _ = key.shape
        positions = state.positions(batch, length)
        table = state.rotation_table(positions, key)  # (B or 1, 1, L, d/2)
        mine = kv_cache.rotate(kv_cache.interleave(full(k_rows)).transpose(1, 2), table)  # (B, Hkv, L, d)
        try:
            torch.testing.assert_close(kv_cache.deinterleave(mine), key)
        except AssertionError:
            return "its rotation differs from the stock RoPE of this model"
        state.rotation_checked = True
        return None


def _vtu_class_attributes(stock: type) -> dict:
    check_stock_layer(stock)
    signature = inspect.signature(inspect.unwrap(stock.forward))
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)
    rope = staticmethod(sys.modules[stock.__module__].apply_rotary_pos_emb)
    return {"_dymu_stock": stock, "_dymu_rope": rope, "_dymu_signature": signature,
            "_dymu_var_keyword": var_keyword, "_dymu_cache_arg": compat.cache_parameter(stock)}


def _stock_cache() -> tuple[tuple[type, ...], object]:
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

    return (DynamicLayer, DynamicSlidingWindowLayer), Cache.update


# The stock cache layers a CompactLayer replaces (exact types: a subclass may store differently), in a
# cache whose update() is the stock one (a subclass that customises it expects every write to pass there).
_DYNAMIC_LAYERS, _STOCK_UPDATE = _stock_cache()


def _compact_at(value, index: int) -> bool:
    """Whether `value` is a KV cache whose layer `index` is a compact VTU layer."""
    if not compat.is_cache(value):
        return False
    layers = compat.cache_layers(value)
    return index < len(layers) and isinstance(layers[index], kv_cache.CompactLayer)


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
        from .mixers import uncovered

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
