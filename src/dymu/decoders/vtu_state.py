"""The state one model's VTU decoder layers share (`VTUState`: the group map and its plans, the KV cache
mode, what the compact cache needs from the rotary module, row counts), the hooks that fill it, and the
errors a VTU forward raises (with the switch of its debug check)."""

from __future__ import annotations

import inspect
from collections import Counter

import torch
from torch import Tensor, nn

from .. import kv_cache, vtu

# Debug check (on in the tests): rows of one group must be bitwise equal entering every VTU layer.
# A model that adds per-position inputs between layers (Qwen3-VL deepstack) would otherwise silently
# keep only the first row of each group.
CHECK_GROUP_ROWS_ENV = "DYMU_CHECK_GROUP_ROWS"


class GroupRowsError(RuntimeError):
    """Rows of one VTU group differ entering a decoder layer (debug check, DYMU_CHECK_GROUP_ROWS=1)."""


# The modules whose rows `rows_processed` counts on an attention layer.
_COUNTED = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "post_attention_layernorm", "mlp")


class ChunkedPrefillError(RuntimeError):
    """A forward of length > 1 that is not the length of the group map set on the model."""


KV_CACHES = ("compact", "full")


class VTUState:
    """Shared by all patched layers of one model: the group map, the attention mode, the KV cache
    mode, row counts, and what the compact cache needs from the model's rotary module."""

    def __init__(self, attention: str = "fast", kv_cache: str = "compact"):
        self.attention = attention
        self.kv_cache = kv_cache
        self.rotary: nn.Module | None = None  # the text model's rotary module (compact cache)
        self.rotary_ids: Tensor | None = None  # position ids of its last call (recorded by a hook)
        self._table: tuple | None = None  # (position ids, e^{iθ}) of the last grouped positions asked for
        self._workspace: Tensor | None = None  # the rotated grouped keys of one layer, reused (kv_cache.py)
        self.rotation_checked = False  # the compact rotation was compared with the stock one on a prompt
        self.group_map: Tensor | None = None  # (B, N) long
        self.mixer_groups: vtu.Groups | None = None  # the running mixer layer's plan (decoders/mixers.py)
        self._plans: dict = {}  # (batch, device) -> vtu.Groups, valid for the current map
        # layer key (its _dymu_vtu_key, stable under copy.deepcopy, unlike id()) -> rows seen by each
        # counted module in the last forward
        self.rows: dict[int, Counter] = {}
        self.rows_keys: list[int] = []
        self.hooks: list = []

    def set_group_map(self, group_map: Tensor | None) -> None:
        if group_map is not None:
            vtu.check_group_map(group_map)
            group_map = group_map.detach().long()
        self.group_map = group_map
        self._plans = {}

    def groups_for(self, hidden_states: Tensor) -> vtu.Groups | None:
        """The plan for this forward, or None for the stock path (no map, or a decode step)."""
        if self.group_map is None:
            return None
        batch, length = hidden_states.shape[:2]
        b0, n = self.group_map.shape
        if length != n:
            if length == 1:
                return None  # decode step: one new token per sequence, the stock path
            raise ChunkedPrefillError(
                f"VTU has a group map for sequences of length {n} but this forward has length {length}: "
                "chunked prefill (or a different prompt) would split groups across forwards. Prefill the "
                "whole prompt at once (prefill_chunk_size=None), or clear the map with set_groups(model, None)."
            )
        if batch % b0:
            raise ValueError(f"VTU group map has batch {b0}, which does not divide this forward's batch {batch}")
        key = (batch, hidden_states.device)
        if key not in self._plans:
            # generate() expands inputs with repeat_interleave (num_return_sequences, beams): do the same.
            group_map = self.group_map.to(hidden_states.device).repeat_interleave(batch // b0, dim=0)
            self._plans[key] = vtu.plan_groups(group_map)
        return self._plans[key]

    def positions(self, batch: int, length: int) -> Tensor:
        """This forward's rotary position ids as (B, L, R), R = 1 (RoPE) or 3 (M-RoPE)."""
        ids = self.rotary_ids
        if ids is None or ids.shape[-1] != length:
            raise RuntimeError(f"the compact KV cache needs this forward's rotary position ids (length {length}), but the "
                               "rotary module was not called with them; use kv_cache='full' for this model")
        ids = ids.reshape(-1, *ids.shape[-2:])  # (R, B or 1, L)
        return ids.expand(-1, batch, -1).permute(1, 2, 0)

    def workspace(self, shape, device) -> Tensor:
        """A float32 buffer of `shape`, reused by every layer and decode step (see dymu.kv_cache)."""
        numel = int(torch.Size(shape).numel())
        if self._workspace is None or self._workspace.numel() < numel or self._workspace.device != device:
            self._workspace = torch.empty(numel, dtype=torch.float32, device=device)
        return self._workspace[:numel].view(shape)

    def rotation_table(self, positions: Tensor, like: Tensor) -> Tensor:
        """e^{iθ} (B or 1, 1, P, d/2) at `positions` (B, P, R) from the model's rotary module. Every layer
        and every decode step asks with equal ids until the cache changes (a new prefill, a beam reorder,
        an eviction): computed once then, and once for a batch whose rows share them."""
        if self._table is not None and self._table[0].shape == positions.shape and torch.equal(self._table[0], positions):
            return self._table[1]
        shared = positions[:1] if bool((positions == positions[:1]).all()) else positions
        ids = shared[..., 0] if shared.shape[-1] == 1 else shared.permute(2, 0, 1)
        cos, sin = self.rotary.forward(like, ids)  # .forward: not the model's call, the recording hook stays out
        table = kv_cache.rotation_table(cos, sin).unsqueeze(1)
        self._table = (positions, table)
        return table


class _PositionRecorder:
    """Forward hook on the rotary module: records the position ids of its last call (an object, not a
    closure: see deepcopy)."""

    def __init__(self, state: VTUState, rotary: nn.Module):
        self.state = state
        self.signature = inspect.signature(inspect.unwrap(type(rotary).forward))

    def __call__(self, module, args, kwargs, output):
        self.state.rotary_ids = self.signature.bind(module, *args, **kwargs).arguments["position_ids"]


class _RowCounter:
    """Forward hook counting the rows a module processed (an object, not a closure: see deepcopy)."""

    def __init__(self, state: VTUState, key: int, name: str):
        self.state, self.key, self.name = state, key, name

    def __call__(self, module, args, output):
        if self.key in self.state.rows:
            self.state.rows[self.key][self.name] += args[0].shape[:-1].numel()
