"""The VTU forward: the mixin whose forward replaces a stock decoder layer's (decoders/llama.py swaps it in).

The forward runs the norms, the q/k/v/o projections and the MLP on the unique rows of the sequence only.
Attention itself is stock: q/k/v are gathered back to full length, rotated by the stock RoPE at their real
positions and passed with the stock mask and KV cache to the stock attention function; its output is
averaged over each group (Eq. 11). So the full-length sequence, positions, masks, cache and `generate` stay
stock, and decode steps (one new token, no groups) take the stock forward unchanged. What differs per
decoder class (extra attention arguments, head norms, an output gate, sandwich norms, other token mixers)
is read from its `DecoderFacts` (decoders/registry.py).

KV cache (``kv_cache``): "compact" (default) swaps a `dymu.kv_cache.CompactLayer` into the
stock `DynamicCache` at a VTU prefill: one unrotated key and one value per group, singletons as stock;
every later forward on that cache (decode steps, a next turn) runs its attention here, exactly. "full"
keeps the stock full-length cache (decode steps are then the stock forward). The compact cache is
used only where it is exact and the Cache API supports it; otherwise that layer keeps the stock
cache, with a warning naming why (see `_VTUDecoderLayer._compact_layer_for`).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter

import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .. import compat, kv_cache, vtu
from .registry import DECODERS
from .vtu_state import CHECK_GROUP_ROWS_ENV, GroupRowsError, VTUState

try:  # transformers' output capturing (output_attentions=...) records attention modules by hook
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers layouts: no check
    _active_collector = None


class _VTUDecoderLayer:
    """Mixed in before a stock decoder-layer class; the per-class attributes are captured from the stock
    class when the patched class is made, the per-instance ones set by `apply_vtu` (decoders/llama.py)."""

    _dymu_vtu: VTUState  # per instance
    _dymu_vtu_key: int  # per instance: this layer's key in the state's row counts
    _dymu_mixer = None  # per instance: a token mixer other than self-attention (decoders/mixers.py), or None
    _dymu_stock: type  # per class: the stock class to restore
    _dymu_rope = None  # per class: the family's own stock apply_rotary_pos_emb
    _dymu_signature: inspect.Signature  # per class: the stock forward's, to bind a call's arguments
    _dymu_var_keyword: str  # per class: the name of its **kwargs
    _dymu_cache_arg: str  # per class: the name of its KV cache parameter in this transformers

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

