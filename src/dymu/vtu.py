"""Virtual Token Unmerging (VTU) math: pure torch, no model code.

A batch of B sequences of N positions is described by a *group map*: a LongTensor (B, N) giving,
for every position, the id of the group (unique row) it belongs to. Ids are local to each
sequence, are >= 0 and < N, and need not be contiguous; positions of one sequence with the same id
share one row. Text and padding tokens are groups of size 1. Example for N = 7, a prompt
``[t0, img, img, img, img, t1, t2]`` whose 4 image positions hold 2 distinct tokens A B A A::

    group_map = [[0, 1, 2, 1, 1, 3, 4]]          # 5 unique rows instead of 7

`plan_groups` turns a map into a `Groups` plan whose unique rows are flattened across the batch
(U = total number of groups, no padding): row-wise operators (norms, linear layers, MLP) run on
(U, D) tensors, `expand` gathers them back to (B, N, D) for RoPE + attention, and `merge_mean`
averages the attention output over each group (paper Eq. 11) so the next layer again sees exactly
U distinct rows. Nothing here is N x N except the exact Eq. 10 reference (`eq10_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Groups:
    """Where every position of a (B, N) batch reads its unique row, and back."""

    index: Tensor  # (B, N) long: row in [0, U) of the flattened unique rows for every position
    first: Tensor  # (U,) long: flat position b*N + n of each group's first occurrence
    sizes: Tensor  # (U,) long: number of positions in each group (>= 1)

    @property
    def num_unique(self) -> int:
        return self.first.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)


def check_group_map(group_map: Tensor) -> None:
    """Raise ValueError unless `group_map` is a valid (B, N) integer map with ids in [0, N)."""
    if not isinstance(group_map, Tensor) or group_map.dim() != 2:
        raise ValueError(f"group_map must be a 2-D (batch, length) tensor, got {type(group_map).__name__}"
                         f"{tuple(group_map.shape) if isinstance(group_map, Tensor) else ''}")
    if group_map.dtype.is_floating_point or group_map.dtype == torch.bool:
        raise ValueError(f"group_map must hold integer group ids, got dtype {group_map.dtype}")
    n = group_map.shape[1]
    if group_map.numel() and (int(group_map.min()) < 0 or int(group_map.max()) >= n):
        raise ValueError(f"group ids must lie in [0, {n}) (one id per position at most), got "
                         f"[{int(group_map.min())}, {int(group_map.max())}]")


def plan_groups(group_map: Tensor) -> Groups:
    """Flatten a (B, N) group map into unique rows shared by the whole batch.

    Unique rows are ordered by (sequence, group id), so the plan is a function of the map alone.
    """
    check_group_map(group_map)
    b, n = group_map.shape
    # A global id per position: ids are < N, so b*N + id never collides across sequences.
    offsets = torch.arange(b, device=group_map.device).unsqueeze(1) * n
    global_ids = (group_map.long() + offsets).flatten()  # (B*N,)
    _, index = torch.unique(global_ids, sorted=True, return_inverse=True)  # index: (B*N,) in [0, U)
    u = int(index.max()) + 1 if index.numel() else 0
    positions = torch.arange(b * n, device=group_map.device)
    first = torch.full((u,), b * n, dtype=torch.long, device=group_map.device)
    first = first.scatter_reduce(0, index, positions, reduce="amin")
    sizes = torch.bincount(index, minlength=u)
    return Groups(index=index.view(b, n), first=first, sizes=sizes)


def unique_rows(x: Tensor, groups: Groups) -> Tensor:
    """(B, N, ...) -> (U, ...): the first row of every group.

    Rows of a group are equal between VTU layers (they are written by `expand`), so the first one
    stands for all of them. For the model input it is the caller's promise that they are equal.
    """
    return x.flatten(0, 1)[groups.first]


def expand(rows: Tensor, groups: Groups) -> Tensor:
    """(U, ...) -> (B, N, ...): virtual unmerge, every position gets its group's row."""
    return rows[groups.index]


def merge_mean(x: Tensor, groups: Groups) -> Tensor:
    """(B, N, ...) -> (U, ...): mean over the positions of each group (paper Eq. 11).

    Accumulates in float32 (at least) so bf16/fp16 groups of hundreds of positions stay accurate.
    """
    flat = x.flatten(0, 1)  # (B*N, ...)
    acc_dtype = torch.promote_types(flat.dtype, torch.float32)
    sums = torch.zeros((groups.num_unique, *flat.shape[1:]), dtype=acc_dtype, device=flat.device)
    sums.index_add_(0, groups.index.flatten(), flat.to(acc_dtype))
    sizes = groups.sizes.to(acc_dtype).view(-1, *([1] * (flat.dim() - 1)))
    return (sums / sizes).to(x.dtype)


def group_map_from_labels(labels: Tensor) -> Tensor:
    """Build a group map from per-position labels (B, N).

    ``labels[b, n] = -1`` makes position n its own group (text, padding); positions of the same
    sequence with the same label >= 0 form one group (e.g. the label is the index of the merged
    visual token a patch position stands for; give every image of a sequence its own label range).
    Returns a LongTensor (B, N) with ids numbered 0.. in order of first appearance per sequence.

    >>> group_map_from_labels(torch.tensor([[-1, 5, 7, 5, 5, -1, -1]]))
    tensor([[0, 1, 2, 1, 1, 3, 4]])
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, length), got shape {tuple(labels.shape)}")
    b, n = labels.shape
    labels = labels.long()
    positions = torch.arange(n, device=labels.device).expand(b, n)
    # A key per position: labelled positions by label, unlabelled ones by a key no label can take.
    key = torch.where(labels >= 0, labels, labels.max().clamp(min=0) + 1 + positions)
    offsets = torch.arange(b, device=labels.device).unsqueeze(1) * (int(key.max()) + 1)
    _, inverse = torch.unique((key + offsets).flatten(), return_inverse=True)
    inverse = inverse.view(b, n)
    # First position of every key, then rank keys by it within their sequence.
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, inverse.flatten(), positions.flatten(), reduce="amin")
    first_pos = first[inverse]  # (B, N): first position of my group
    is_first = first_pos == positions
    ids_at_first = is_first.long().cumsum(1) - 1  # group id = how many groups started before
    return ids_at_first.gather(1, first_pos)


def identity_group_map(batch: int, length: int, device=None) -> Tensor:
    """Every position its own group: VTU then computes exactly what the stock model does."""
    return torch.arange(length, device=device).expand(batch, length).clone()


# ---- the paper's exact attention decomposition (Eq. 10): reference only, O(B·H·N²) per frequency ----

def eq10_scores(q_rows: Tensor, k_rows: Tensor, groups: Groups, cos: Tensor, sin: Tensor) -> Tensor:
    """Attention logits q_rot·k_rot (unscaled) of the virtually unmerged sequence, by paper Eq. 10.

    q_rows (U, H, d) and k_rows (U, H, d) are the *unrotated* unique queries/keys (k already
    repeated to H heads for grouped-query attention); cos, sin (B or 1, N, d) are the stock RoPE
    tables in the rotate-half convention (cos[..., f] == cos[..., f + d/2]). With M the one-hot
    map from positions to unique rows and C/S = diag(cos/sin) of one frequency f:

        A = C·M·QKᵀ·Mᵀ·C + S·M·QKᵀ·Mᵀ·S + S·M(Q×Kᵀ)Mᵀ·C − C·M(Q×Kᵀ)Mᵀ·S   (summed over f)

    where QKᵀ and Q×Kᵀ are the dot and 2-D cross products of the (f, f + d/2) pair of every unique
    query with every unique key. Returns (B, H, N, N).
    """
    half = q_rows.shape[-1] // 2
    q1, q2 = q_rows[..., :half], q_rows[..., half:]  # (U, H, d/2): the two halves rotate as pairs
    k1, k2 = k_rows[..., :half], k_rows[..., half:]
    # Per frequency, between unique rows only: (H, d/2, U, U).
    dot = torch.einsum("uhf,vhf->hfuv", q1, k1) + torch.einsum("uhf,vhf->hfuv", q2, k2)
    cross = torch.einsum("uhf,vhf->hfuv", q1, k2) - torch.einsum("uhf,vhf->hfuv", q2, k1)
    idx = groups.index  # (B, N)
    rows, cols = idx[:, :, None], idx[:, None, :]  # M·X·Mᵀ = X[index_i, index_j], per sequence
    b, n = idx.shape
    scores = q_rows.new_zeros(b, q_rows.shape[1], n, n)
    for f in range(half):  # one frequency at a time keeps memory at B·H·N² (the paper used ·d/2)
        d_f = dot[:, f][:, rows, cols].transpose(0, 1)  # (H, B, N, N) -> (B, H, N, N)
        x_f = cross[:, f][:, rows, cols].transpose(0, 1)
        c = cos[..., f].unsqueeze(1)  # (B, 1, N): diag(cos) of this frequency
        s = sin[..., f].unsqueeze(1)
        ci, cj, si, sj = c.unsqueeze(-1), c.unsqueeze(-2), s.unsqueeze(-1), s.unsqueeze(-2)
        scores += ci * d_f * cj + si * d_f * sj + si * x_f * cj - ci * x_f * sj
    return scores


def eq10_attention(
    q_rows: Tensor,
    k_rows: Tensor,
    value: Tensor,
    groups: Groups,
    cos: Tensor,
    sin: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Eager attention with Eq. 10 logits; mirrors the stock eager attention after its QKᵀ.

    q_rows (U, Hq, d), k_rows (U, Hkv, d) unrotated unique rows; value (B, Hkv, N, d) at full
    length; attention_mask: the stock additive/bool 4-D mask or None. Returns (B, N, Hq, d).
    """
    n_rep = q_rows.shape[1] // k_rows.shape[1]
    k_rows = k_rows.repeat_interleave(n_rep, dim=1)  # same head order as repeat_kv
    value = value.repeat_interleave(n_rep, dim=1)  # (B, Hq, N, d)
    weights = eq10_scores(q_rows, k_rows, groups, cos, sin) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q_rows.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()
