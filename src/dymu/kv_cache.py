"""A compact KV cache for VTU: one unrotated key and one value per merged group.

Rows of a VTU group are identical entering every decoder layer, so their keys before RoPE and their
values are identical too. A cache layer therefore needs, per group, one unrotated key and one value,
plus for each position of the group its column in the stock sequence and its rotary position ids.
A later query scores every position with the group's key rotated at that position's own angle, and
reads the values once per group:

    score(q, p) = q · R(p) k_g(p)            output = Σ_g (Σ_{p ∈ g} softmax_p) · v_g

which is exactly what attention over the full-length cache computes. Singleton positions (text,
padding, generated tokens) are stored as the stock cache stores them (rotated keys), so attention
over them is the stock product.

`CompactLayer` is a transformers cache layer (`CacheLayerMixin`): the VTU decoder layer swaps it into
the stock `DynamicCache` in place of an empty `DynamicLayer` / `DynamicSlidingWindowLayer` at a VTU
prefill, so `generate`, beam search (`reorder_cache`), `num_return_sequences`
(`batch_repeat_interleave`), `crop` and cache reuse go through the stock Cache API. Layout (B
sequences; slots are packed per sequence with padding in front, a padding slot has column -1 and
is never visible)::

    keys, values     (B, Hkv, T, d)    singleton slots; keys rotated, as stock
    columns          (B, T)            their columns in the stock sequence (what masks index)
    group_keys       (B, Hkv, G, d)    one unrotated key per group, its (x_f, x_{f+d/2}) rotate-half
                                       pairs interleaved: one complex number per frequency
    group_values     (B, Hkv, G, d)
    group_of         (B, P)            the group row of every grouped position
    group_columns    (B, P)
    group_positions  (B, P, R)         the rotary module's position ids (R = 1, or 3 for M-RoPE)

Index tensors cost < 1 % of the stock cache: 3 to 5 int64 per grouped position per layer against
2·Hkv·d floats. No cos/sin tables are stored: the VTU layer recomputes them from the position ids with
the model's own rotary module when the grouped positions change (normally once after the prefill;
shared by all layers and decode steps, and by all sequences with equal positions), so they are
bitwise the tables the prefill used.

Formulation, measured on the 2-core AMD EPYC (AVX-512) VM this project runs on, one thread, float32,
one layer of one decode step at Qwen2-7B shapes (28 query / 4 KV heads, d = 128; 3,456 grouped
positions in 558 groups + 64 text), quiet machine: rotating the gathered keys (one gather, one
complex multiply, then a BLAS matmul) scores them in about 1.6 ms at batch 1; the cos/sin
decomposition of the score (per frequency f: q·R(p)k = Σ_f cos_f(p)(q1k1 + q2k2)_f +
sin_f(p)(q2k1 − q1k2)_f, products per group, expanded with shared position tables) takes 64 ms, and
8x that at batch 8. Why: with grouped-query attention the decomposition's per-position work runs once
per *query* head (7x the KV heads) as an elementwise gather-multiply-reduce, while the rotation runs
once per KV head and leaves the contraction to a matmul. Two CPU facts shaped the code: a fresh
transient over ~32 MB (one layer's rotated keys at batch 8) is an mmap whose pages fault in at
several µs each on this VM, which costs more than the arithmetic, so the rotated keys go to a
workspace reused by every layer and step; and on a loaded machine every parallel op waits for its
descheduled threads (~15 ms each at load 6 on 2 cores), so the attention is a handful of whole-batch
ops, not a loop over blocks. (`dymu bench --only decode` re-measures both formulations: its
``formulations`` rows.)
In float32 the result equals attention over the full cache up to rounding (the complex product
rounds like the stock rotate-half formula to within an ulp); in bf16/fp16 the rotation runs in
float32 and is rounded once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

# ---- pure helpers -----------------------------------------------------------------------------

def pack(select: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) bool -> (index (B, K), valid (B, K)): per row the selected positions in order, padding first.

    K is the largest count over the rows; a row with fewer selected positions starts with unselected
    ones (valid False). A stable sort keeps the order of the selected positions.
    """
    count = int(select.sum(1).max()) if select.numel() else 0
    order = torch.sort(select.to(torch.int8), dim=1, stable=True).indices  # unselected first, then selected
    index = order[:, select.shape[1] - count:]
    return index, select.gather(1, index)


def interleave(x: Tensor) -> Tensor:
    """(..., d) rotate-half layout [x_0..x_{h-1}, x_h..x_{d-1}] -> pairs (x_f, x_{f+h}) side by side."""
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)


def deinterleave(x: Tensor) -> Tensor:
    """Inverse of `interleave`."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.cat((pairs[..., 0], pairs[..., 1]), dim=-1)


def rotation_table(cos: Tensor, sin: Tensor) -> Tensor:
    """Stock rotate-half cos/sin tables (..., d) -> e^{iθ} per frequency (..., d/2), complex64.

    In the rotate-half convention cos[..., f] == cos[..., f + d/2] (checked by the caller on the
    prefill's own tables), so half of each table holds every angle.
    """
    half = cos.shape[-1] // 2
    return torch.complex(cos[..., :half].float(), sin[..., :half].float())


def rotate(rows: Tensor, table: Tensor) -> Tensor:
    """Interleaved unrotated keys (..., d) times e^{iθ} (broadcast to (..., d/2)): interleaved rotated keys.

    (k1 + i·k2)(cos + i·sin) = (k1·cos − k2·sin) + i(k1·sin + k2·cos): the stock rotate-half RoPE.
    """
    z = torch.view_as_complex(rows.float().unflatten(-1, (-1, 2)).contiguous()) * table
    return torch.view_as_real(z).flatten(-2).to(rows.dtype)


# ---- the cache layer --------------------------------------------------------------------------

class CompactLayer(CacheLayerMixin):
    """One decoder layer's compact cache (layout: module docstring). ``window``: a sliding-window
    layer's window (stock `DynamicSlidingWindowLayer` semantics: a query sees the last ``window``
    columns, itself included; older slots are evicted), None for full attention."""

    is_croppable = True

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window
        self.is_sliding = window is not None
        self.seen = 0  # columns so far: the stock sequence length

    # The tensors, all batch-first; reorder / repeat / select / offload apply to each.
    _TENSORS = ("keys", "values", "columns", "group_keys", "group_values", "group_of", "group_columns",
                "group_positions")

    def _map(self, fn) -> None:
        if self.is_initialized:
            for name in self._TENSORS:
                setattr(self, name, fn(getattr(self, name)))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        new = dict(dtype=key_states.dtype, device=self.device)
        index = dict(dtype=torch.long, device=self.device)
        self.keys, self.values = key_states.new_zeros(b, h, 0, d), value_states.new_zeros(b, h, 0, d)
        self.columns = torch.zeros(b, 0, **index)
        self.group_keys = torch.zeros(b, h, 0, d, **new)
        self.group_values = value_states.new_zeros(b, h, 0, d)
        self.group_of = torch.zeros(b, 0, **index)
        self.group_columns = torch.zeros(b, 0, **index)
        self.group_positions = None  # (B, P, R): R is known at the first write
        self.is_initialized = True

    # -- writing ------------------------------------------------------------------------------

    def write(self, key: Tensor, value: Tensor, key_rows: Tensor, value_rows: Tensor, sizes: Tensor | None,
              row_index: Tensor | None, row_first: Tensor | None, positions: Tensor) -> None:
        """Append one forward of L positions.

        key (B, Hkv, L, d) rotated and value (B, Hkv, L, d): the full-length tensors (singletons are
        read from them); key_rows / value_rows (U, Hkv, d): the unrotated unique rows; sizes (U,),
        row_index (B, L) and row_first (U,) from `dymu.vtu.Groups` (None: every position is its own
        row, a decode step); positions (B, L, R): the rotary position ids.
        """
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        b, h, length, d = key.shape
        start = self.seen
        if self.group_positions is None:
            self.group_positions = positions.new_zeros(b, 0, positions.shape[-1])
        if sizes is None:  # every position a singleton: the stock append
            self.keys = torch.cat([self.keys, key], dim=-2)
            self.values = torch.cat([self.values, value], dim=-2)
            columns = torch.arange(start, start + length, device=self.device).expand(b, length)
            self.columns = torch.cat([self.columns, columns], dim=1)
        else:
            single = sizes[row_index] == 1  # (B, L)
            index, valid = pack(single)
            take = index[:, None, :, None].expand(b, h, index.shape[1], d)
            self.keys = torch.cat([self.keys, key.gather(2, take)], dim=-2)
            self.values = torch.cat([self.values, value.gather(2, take)], dim=-2)
            self.columns = torch.cat([self.columns, torch.where(valid, index + start, -1)], dim=1)
            self._write_groups(key_rows, value_rows, sizes, row_index, row_first, positions, ~single, start)
        self.seen += length

    def _write_groups(self, key_rows, value_rows, sizes, row_index, row_first, positions, grouped, start):
        b, length = row_index.shape
        h, d = key_rows.shape[1:]
        # Rows of groups with several positions, packed per sequence (padding first), after the
        # rows already stored. Unique rows are ordered by (sequence, group id): see vtu.plan_groups.
        multi = sizes > 1
        seq = row_first[multi] // length
        count = torch.bincount(seq, minlength=b)
        width = int(count.max()) if seq.numel() else 0
        rank = torch.arange(seq.numel(), device=seq.device) - (count.cumsum(0) - count)[seq]
        slot = width - count[seq] + rank
        old = self.group_keys.shape[2]
        new_keys = key_rows.new_zeros(b, width, h, d)
        new_keys[seq, slot] = interleave(key_rows[multi])
        new_values = value_rows.new_zeros(b, width, h, d)
        new_values[seq, slot] = value_rows[multi]
        self.group_keys = torch.cat([self.group_keys, new_keys.transpose(1, 2)], dim=2)
        self.group_values = torch.cat([self.group_values, new_values.transpose(1, 2)], dim=2)
        slot_of_row = torch.zeros_like(sizes)
        slot_of_row[multi] = slot + old
        # Their positions, packed per sequence the same way.
        index, valid = pack(grouped)
        self.group_of = torch.cat([self.group_of, slot_of_row[row_index.gather(1, index)]], dim=1)
        self.group_columns = torch.cat([self.group_columns, torch.where(valid, index + start, -1)], dim=1)
        take = index[..., None].expand(-1, -1, positions.shape[-1])
        self.group_positions = torch.cat([self.group_positions, positions.gather(1, take)], dim=1)

    def _keep(self, keep: Tensor, keep_grouped: Tensor) -> None:
        """Keep the singleton slots `keep` (B, T) and grouped positions `keep_grouped` (B, P), repacked;
        group rows no kept position reads are dropped."""
        index, valid = pack(keep)
        b, h, _, d = self.keys.shape
        take = index[:, None, :, None].expand(b, h, index.shape[1], d)
        self.keys, self.values = self.keys.gather(2, take), self.values.gather(2, take)
        self.columns = torch.where(valid, self.columns.gather(1, index), -1)
        index, valid = pack(keep_grouped)
        group_of = self.group_of.gather(1, index)
        self.group_columns = torch.where(valid, self.group_columns.gather(1, index), -1)
        self.group_positions = self.group_positions.gather(1, index[..., None].expand(-1, -1, self.group_positions.shape[-1]))
        used = torch.zeros(b, self.group_keys.shape[2], dtype=torch.bool, device=self.device)
        used.scatter_(1, torch.where(valid, group_of, 0), valid)
        rows, _ = pack(used)
        take = rows[:, None, :, None].expand(b, h, rows.shape[1], d)
        self.group_keys, self.group_values = self.group_keys.gather(2, take), self.group_values.gather(2, take)
        new_row = torch.zeros_like(used, dtype=torch.long)
        new_row.scatter_(1, rows, torch.arange(rows.shape[1], device=self.device).expand_as(rows))
        self.group_of = torch.where(valid, new_row.gather(1, group_of), 0)

    def trim(self) -> None:
        """After a forward's attention, a sliding-window layer keeps what the stock one keeps: the last
        window - 1 columns (padding slots go too)."""
        if self.window is None:
            return
        first = self.seen - self.window + 1
        if (self.columns < first).any() or (self.group_columns < first).any():
            self._keep(self.columns >= first, self.group_columns >= first)

    # -- reading ------------------------------------------------------------------------------

    def rotated_keys(self, table: Tensor, workspace=None) -> Tensor:
        """Every grouped position's key rotated at its own angle, interleaved: (B, Hkv, P, d).
        `table` (B or 1, 1, P, d/2); `workspace(shape, device)`: a reusable float32 buffer, or None."""
        b, h, g, d = self.group_keys.shape
        positions = self.group_of.shape[1]
        # Whole rows of d values copied by one index_select: much faster than gather's per-element indexing.
        rows = (self.group_of[:, None, :] + torch.arange(b * h, device=self.device).view(b, h, 1) * g).flatten()
        flat = self.group_keys.reshape(b * h * g, d)
        if workspace is None or self.group_keys.dtype != torch.float32:
            return rotate(flat.index_select(0, rows).view(b, h, positions, d), table)
        out = torch.index_select(flat, 0, rows, out=workspace((rows.numel(), d), self.device)).view(b, h, positions, d)
        torch.view_as_complex(out.unflatten(-1, (-1, 2))).mul_(table)
        return out

    def attend(self, query: Tensor, query_columns: Tensor, mask: Tensor | None, kv_offset: int, scaling: float,
               table: Tensor | None, dropout: float = 0.0, training: bool = False, workspace=None) -> Tensor:
        """Attention of `query` (B, Hq, Lq, d), rotated, at columns `query_columns` (Lq,) over the whole
        layer (this forward's positions already written). `mask`: the stock 4-D mask (bool or additive)
        whose last axis covers columns [kv_offset, kv_offset + mask.shape[-1]), or None (causal).
        `table` (B or 1, 1, P, d/2): e^{iθ} at every grouped position; `workspace`: see `rotated_keys`.
        Returns (B, Lq, Hq, d)."""
        b, hq, lq, d = query.shape
        hkv = self.keys.shape[1]
        rep = hq // hkv
        q = query.reshape(b, hkv, rep * lq, d)  # query head h*rep + r reads KV head h (repeat_kv's order)
        scores = [q @ self.keys.transpose(-1, -2)]  # (B, Hkv, rep*Lq, T)
        positions = self.group_of.shape[1]
        if positions:  # the query's pairs interleaved like the keys': the same dot product
            scores.append(interleave(q) @ self.rotated_keys(table, workspace).transpose(-1, -2))
        scores = torch.cat(scores, dim=-1).view(b, hkv, rep, lq, -1) * scaling
        columns = torch.cat([self.columns, self.group_columns], dim=1)  # (B, S)
        seen = columns[:, None, :]  # (B, 1, S) against queries (1, Lq, 1)
        q_cols = query_columns.view(1, lq, 1)
        allowed = (seen >= 0) & (seen <= q_cols)
        if self.window is not None:
            allowed &= q_cols - seen < self.window
        if mask is not None:
            mask = mask.expand(b, -1, lq, -1)  # a mask may broadcast over the batch
            where = seen - kv_offset
            inside = (where >= 0) & (where < mask.shape[-1])
            heads = mask.shape[1]
            picked = mask.gather(-1, where.clamp(0, mask.shape[-1] - 1)[:, None].expand(b, heads, lq, -1))
            picked = picked.view(b, hkv if heads > 1 else 1, rep if heads > 1 else 1, lq, -1)
            allowed = allowed & inside
            if picked.dtype == torch.bool:
                allowed = allowed[:, None, None] & picked
            else:
                scores = scores + picked
        if allowed.dim() == 3:
            allowed = allowed[:, None, None]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = torch.nn.functional.dropout(probs, p=dropout, training=training).view(b, hkv, rep * lq, -1)
        text = self.keys.shape[2]
        out = probs[..., :text] @ self.values
        if positions:
            mass = probs.new_zeros(b, hkv, rep * lq, self.group_values.shape[2])  # softmax mass per group
            mass.scatter_add_(-1, self.group_of[:, None, None, :].expand(b, hkv, rep * lq, positions), probs[..., text:])
            out = out + mass @ self.group_values
        return out.view(b, hq, lq, d).transpose(1, 2)

    # -- the Cache API ------------------------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a compact VTU cache layer is written by the VTU decoder layer, not by Cache.update(); "
                           "this decoder layer is not a VTU layer (was remove_vtu called between prefill and decode?)")

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The stock DynamicLayer / DynamicSlidingWindowLayer sizes, so masks have the stock shape.
        if self.window is None:
            return self.seen + query_length, 0
        kv_offset = max(self.seen - self.window + 1, 0)
        return min(self.seen, self.window - 1) + query_length, kv_offset

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.window is not None and self.seen >= self.window:
            raise RuntimeError("cannot crop a sliding-window cache layer past its window: the evicted states are gone")
        end = self.seen + tokens_to_remove
        self._keep((self.columns >= 0) & (self.columns < end), (self.group_columns >= 0) & (self.group_columns < end))
        self.seen = end

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        """Bytes held (every tensor, index tensors included)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._TENSORS))
