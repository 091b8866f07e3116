"""DToMe math: bipartite matching, thresholded or fixed-r merging, sizes and the group map.

Pure torch, model-agnostic. A batch is held padded: every image keeps its live tokens in a
contiguous prefix ``[0, n_i)`` of the token axis, in an order that depends on the image alone
(the merge order, token_order.py), and padded slots carry size 0. Padded slots never take part
in matching, and get -inf in the attention mask built from the sizes. That is what makes merging a
function of the image alone, whatever batch it is in (the reference code's padded and unpadded
code paths are not).

Shapes: B images, N token slots (live + padding), D features, C metric dims, P original patches
(tokens) per image before any merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from .token_order import check_order


@dataclass
class Matches:
    """The best A→B edge of every A token (A = even slots, B = odd slots)."""

    score: torch.Tensor  # (B, Na) cosine similarity; -inf where the A token may not merge
    partner: torch.Tensor  # (B, Na) index into the B tokens (odd slots) of the best partner
    cap: torch.Tensor | None = None  # (B,) most merges an image may make at this layer; None = no cap
    protect_first: bool = False  # slot 0 is a class token

    @cached_property
    def by_score(self) -> torch.Tensor:
        """(B, Na) every image's A tokens (indices into the A slots) by descending score.

        Stable: tied scores keep slot order. The paper ranks with an unstable argsort, whose order
        among ties is the sort algorithm's (it differs between CPU and CUDA), not the image's; the
        stable order is what that sort gives whenever it happens to keep ties in place.
        """
        return torch.sort(self.score, dim=-1, descending=True, stable=True).indices

    @cached_property
    def rank(self) -> torch.Tensor:
        """(B, Na) place of every edge in its image's edges by descending score (stable: ties by slot)."""
        order = self.by_score
        places = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        return torch.empty_like(order).scatter_(-1, order, places)


def match(metric: torch.Tensor, sizes: torch.Tensor, protect_first: bool) -> Matches:
    """Bipartite matching: every even-slot token A finds its most similar odd-slot token B.

    ``metric`` (B, N, C) should be L2-normalised so that dot products are cosine similarities.
    ``protect_first`` keeps slot 0 (CLIP's class token) from ever being merged away; slot 0 is an A
    token, so it is never a merge destination either.

    The cap is the paper's per-layer limit, per image: at most ``(t_i - protected) // 2`` merges,
    with t_i the image's own live tokens (so it does not depend on the batch). It only binds without
    a class token and with an odd t_i, when every A token would merge (729 tokens of SigLIP-384/14).
    """
    live = sizes > 0  # (B, N)
    a, b = metric[:, 0::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C)
    scores = a @ b.transpose(1, 2)  # (B, Na, Nb)
    # Padding is neither a source nor a destination.
    scores = scores.masked_fill(~live[:, 1::2, None].transpose(1, 2), float("-inf"))
    if scores.shape[-1] == 0:  # one slot per row (a segment merged down to one unit): nothing to match
        score = scores.new_full(scores.shape[:2], float("-inf"))
        partner = scores.new_zeros(scores.shape[:2], dtype=torch.long)
    else:
        score, partner = scores.max(dim=-1)  # (B, Na)
    score = score.masked_fill(~live[:, 0::2], float("-inf"))
    if protect_first:
        score[:, 0] = float("-inf")
    cap = (live.sum(dim=1) - int(protect_first)) // 2  # (B,)
    return Matches(score=score, partner=partner, cap=cap, protect_first=protect_first)


def _past_cap(matches: Matches) -> torch.Tensor | None:
    """(B, Na) True on the edges ranked past their image's cap; None when no edge can be.

    With a class token the cap never binds (an image of t live tokens has at most
    ceil(t/2) - 1 = (t - 1) // 2 mergeable A tokens), so CLIP's hot path skips the sort.
    """
    if matches.cap is None or matches.protect_first:
        return None
    return matches.rank >= matches.cap[:, None]


def edges_above(matches: Matches, threshold: float | torch.Tensor) -> torch.Tensor:
    """DToMe: merge every edge whose score exceeds the layer threshold, within the cap (the best ones).

    A threshold of -inf merges every edge (up to the cap), +inf none. Returns (B, Na) bool.
    """
    chosen = matches.score > threshold
    past_cap = _past_cap(matches)
    return chosen if past_cap is None else chosen & ~past_cap


def top_r_edges(matches: Matches, r: int) -> torch.Tensor:
    """Plain ToMe: merge the r best edges of each image (at most its cap), whatever their score.

    A stable sort makes the choice among tied scores depend on slot order only, never on the batch.
    Returns (B, Na) bool.
    """
    limit = torch.full_like(matches.rank[:, 0], r) if matches.cap is None else matches.cap.clamp(max=r)
    return (matches.rank < limit[:, None]) & torch.isfinite(matches.score)


def top_edges_of_batch(matches: Matches, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration (paper Eq. 4): merge the k best edges of the whole batch ranked together.

    Returns the (B, Na) bool mask of merged edges and the threshold: the score of the first edge
    not merged, clamped at >= 0 (0 when every mergeable edge was taken).

    The batch is ranked as a whole, as in the paper; unlike the paper's threshold finder, the edges
    an image could not take at inference (past its per-image cap) are not in the ranking, so the
    threshold merges exactly these k edges on this batch again. It only differs without a class
    token, for an image of odd t that gives up every A token (a blank image, say).
    """
    past_cap = _past_cap(matches)
    score = matches.score if past_cap is None else matches.score.masked_fill(past_cap, float("-inf"))
    flat = score.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    k = max(0, min(k, int(torch.isfinite(flat).sum())))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order[:k]] = True
    if k < flat.numel() and torch.isfinite(flat[order[k]]):
        threshold = flat[order[k]].clamp(min=0)
    else:
        threshold = flat.new_zeros(())
    return chosen.view_as(matches.score), threshold


# ---------------------------------------------------------------------------------------------
# Token budget (paper §4.3: cost control): a per-image bound on the tokens at the feature layer.


def budget_merge_count(
    chosen: torch.Tensor,
    mergeable: torch.Tensor,
    max_tokens: int | None,
    min_tokens: int | None,
    layers_after: int,
) -> torch.Tensor:
    """(B,) merges each image makes at this layer once its budget is applied to ``chosen`` (B,).

    ``mergeable`` (B,): the image's live tokens, class token excluded (the budget counts those).
    ``layers_after``: merging layers left before the feature layer. ``min_tokens`` stops merging
    an image before it would drop under it. ``max_tokens`` forces extra merges as late as possible:
    a layer merges only what the later layers, each merging at most half (the cap), could not,
    i.e. it leaves at most ``max_tokens · 2**layers_after`` tokens. So an image already within budget
    merges exactly as without it, and the extra merges land in the last layers. Never past the cap.
    """
    count = chosen
    if min_tokens is not None:
        count = torch.minimum(count, (mergeable - min_tokens).clamp(min=0))
    if max_tokens is not None:
        most_left = max_tokens * 2 ** min(layers_after, 62)  # ceil-halving j times reaches k from k·2^j
        count = torch.maximum(count, mergeable - min(most_left, 2**62))
    return count.clamp(min=0).minimum(mergeable // 2)


def top_ranked_edges(matches: Matches, count: torch.Tensor) -> torch.Tensor:
    """(B, Na) bool: each image's ``count[i]`` best edges (stable ranking, as `top_r_edges`).

    Thresholded edges are a prefix of this ranking, so a budget that adds or removes merges keeps
    the thresholded choice and takes the best remaining edges (or drops the worst chosen ones).
    """
    return (matches.rank < count[:, None]) & torch.isfinite(matches.score)


def reachable_tokens(tokens: int, layers: int) -> int:
    """Fewest tokens ``layers`` merging layers can leave of ``tokens`` (each merges at most half)."""
    for _ in range(layers):
        tokens -= tokens // 2
    return tokens


def survivor_layout(matches: Matches, merged: torch.Tensor, n: int, order: str) -> torch.Tensor | None:
    """(B, N) every image's slots in the order their survivors are laid out; None for ``interleaved``.

    An image that merges nothing at this layer keeps its layout, as in the paper's batch-1 path
    (which returns early): so the layout is a function of the image alone, whatever its batch.
    """
    if check_order(order) == "interleaved":
        return None
    device = merged.device
    bsz = merged.shape[0]
    a_slots = torch.arange(0, n, 2, device=device).expand(bsz, -1)  # (B, Na)
    if order == "ab-score":
        key = matches.score  # -inf on protected and padded A slots; neither kind is a survivor...
        if matches.protect_first:  # ...except the class token, which stays first
            key = key.clone()
            key[:, 0] = float("inf")
        a_slots = 2 * torch.sort(key, dim=-1, descending=True, stable=True).indices
    layout = torch.cat([a_slots, torch.arange(1, n, 2, device=device).expand(bsz, -1)], dim=1)
    unchanged = torch.arange(n, device=device).expand(bsz, n)
    return torch.where(merged.any(dim=1, keepdim=True), layout, unchanged)


def accumulation_order(matches: Matches, n: int) -> torch.Tensor:
    """(B, N) every image's slots in the order their (size-weighted) features are summed into their destination.

    The B slots first, then the A slots by descending score: each destination starts from its own
    value and adds the A tokens merged into it best edge first. That is the paper's float sum
    (``merge_wavg``: ``dst.scatter_reduce(..., src, "sum")`` with the sources in its ranking), taken
    with the stable ranking. The order is not cosmetic: on flat images many scores tie or nearly tie
    at the last bit, and one rounding step of the sum is enough to move a later layer's best partner.
    """
    bsz = matches.score.shape[0]
    b_slots = torch.arange(1, n, 2, device=matches.score.device).expand(bsz, -1)
    return torch.cat([b_slots, 2 * matches.by_score], dim=1)


def _merge_plan(
    sizes: torch.Tensor, matches: Matches, merged: torch.Tensor, order: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bookkeeping of a merge, shared by the padded and the packed path (slot indices, (B, N)).

    Returns ``dest`` (where each slot's content goes: merged A slots to their partner's slot, the
    rest stay), the sizes after the merge at every slot (0 = merged away or padding), ``keep`` (the
    survivors) and ``new_index`` (each survivor's slot in its image's compacted, re-laid-out prefix).
    Features are summed into ``dest`` in `accumulation_order`.
    """
    bsz, n = sizes.shape
    slot = torch.arange(n, device=sizes.device)
    dest = slot.expand(bsz, n).clone()  # (B, N)
    a_slots = dest[:, 0::2]
    dest[:, 0::2] = torch.where(merged, 2 * matches.partner + 1, a_slots)
    new_sizes = torch.zeros_like(sizes).scatter_add_(1, dest, sizes)
    keep = new_sizes > 0  # (B, N): survivors (live and not merged away)
    layout = survivor_layout(matches, merged, n, order)
    if layout is None:
        new_index = keep.cumsum(1) - 1  # (B, N) compacted slot of every survivor
    else:  # count survivors along the layout instead of along the slots
        place = keep.gather(1, layout).cumsum(1) - 1
        new_index = torch.empty_like(place).scatter_(1, layout, place)
    return dest, new_sizes, keep, new_index


def merge(
    x: torch.Tensor,
    sizes: torch.Tensor,
    group_of_patch: torch.Tensor,
    matches: Matches,
    merged: torch.Tensor,
    order: str = "interleaved",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the chosen A tokens into their partners and compact every image to a live prefix.

    A destination becomes the size-weighted mean of itself and every A token merged into it, its
    size the sum of their sizes. Survivors are laid out in ``order`` (token_order.py); the new slot
    count is the largest number of survivors in the batch, the rest is padding (zeros, size 0).

    Returns new ``x`` (B, N', D), ``sizes`` (B, N') and ``group_of_patch`` (B, P).
    """
    bsz, n, dim = x.shape
    dest, new_sizes, keep, new_index = _merge_plan(sizes, matches, merged, order)
    weight = sizes.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    acc = accumulation_order(matches, n)  # (B, N); scatter_add_ sums in index order
    summed = torch.zeros_like(x).scatter_add_(
        1, dest.gather(1, acc).unsqueeze(-1).expand(-1, -1, dim), (x * weight).gather(1, acc.unsqueeze(-1).expand(-1, -1, dim))
    )
    n_new = int(keep.sum(1).max())
    # Non-survivors write to a scratch slot n_new that is cut off afterwards.
    target = torch.where(keep, new_index, torch.full_like(new_index, n_new))
    means = summed / new_sizes.clamp(min=1).to(x.dtype).unsqueeze(-1)
    out = x.new_zeros(bsz, n_new + 1, dim).scatter_(1, target.unsqueeze(-1).expand(-1, -1, dim), means)
    out_sizes = sizes.new_zeros(bsz, n_new + 1).scatter_(1, target, new_sizes)

    slot_of_patch = torch.gather(dest, 1, group_of_patch)  # where each patch's token went
    new_group_of_patch = torch.gather(new_index, 1, slot_of_patch)
    return out[:, :n_new], out_sizes[:, :n_new], new_group_of_patch


def attention_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention as an additive mask: log(size) on every key, -inf on padding.

    Shape (B, 1, 1, N): the same for every query and head. The eager and sdpa attention
    implementations both add a float mask to the logits, so this needs no attention-code change.
    """
    return sizes.to(dtype).log()[:, None, None, :]


def initial_groups(bsz: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes (all 1) and group map (identity) before any merge."""
    sizes = torch.ones(bsz, n, dtype=torch.long, device=device)
    group_of_patch = torch.arange(n, device=device).expand(bsz, n).clone()
    return sizes, group_of_patch


# ---------------------------------------------------------------------------------------------
# Packed batches: the live tokens of all images as rows (T, ...) with T = Σ n_i, image i owning
# rows cu_seqlens[i]:cu_seqlens[i+1] in the same order as its padded prefix. The matmuls and
# attention then cost Σ n_i rows, not B · max n_i. The per-edge bookkeeping (B, Na) and per-slot
# integers (B, N) stay padded: they are cheap, and so the edge choice (thresholds, fixed r, the
# calibration's batch ranking) is literally the padded path's.


def pack(x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (B, N, D) and sizes (B, N) -> rows (T, D), sizes (T,) and cu_seqlens (B + 1,)."""
    live = sizes > 0
    counts = live.sum(dim=1)
    return x[live], sizes[live], offsets(counts)


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (B + 1,) from per-image token counts (B,): image i owns rows cu[i]:cu[i+1]."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def unpack(x: torch.Tensor, sizes: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (T, D) and sizes (T,) -> padded (B, n_max, D) with zeros and sizes (B, n_max) with 0 on padding."""
    live = _live_slots(cu_seqlens)
    out = x.new_zeros(*live.shape, x.shape[-1])
    out[live] = x
    out_sizes = sizes.new_zeros(live.shape)
    out_sizes[live] = sizes
    return out, out_sizes


def _live_slots(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(B, n_max) True on every image's live prefix."""
    counts = cu_seqlens.diff()
    n = int(counts.max()) if counts.numel() else 0
    return torch.arange(n, device=counts.device) < counts[:, None]


def match_packed(metric: torch.Tensor, cu_seqlens: torch.Tensor, protect_first: bool) -> Matches:
    """`match` for packed rows: metric (T, C); the scores of each image alone (no B × N × N tensor).

    The edges come back padded, (B, Na) with -inf past an image's A tokens, exactly the `Matches`
    that `match` gives for the same images padded.
    """
    counts = cu_seqlens.diff()
    bsz = counts.numel()
    n = int(counts.max())
    score = metric.new_full((bsz, (n + 1) // 2), float("-inf"))
    partner = torch.zeros(score.shape, dtype=torch.long, device=metric.device)
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        tokens = metric[start:end]
        a, b = tokens[0::2], tokens[1::2]
        if b.shape[0] == 0:  # a single token: no partner
            continue
        score[i, : a.shape[0]], partner[i, : a.shape[0]] = (a @ b.T).max(dim=-1)
    if protect_first:
        score[:, 0] = float("-inf")
    cap = (counts - int(protect_first)) // 2
    return Matches(score=score, partner=partner, cap=cap, protect_first=protect_first)


def merge_packed(
    x: torch.Tensor,
    sizes: torch.Tensor,
    group_of_patch: torch.Tensor,
    cu_seqlens: torch.Tensor,
    matches: Matches,
    merged: torch.Tensor,
    order: str = "interleaved",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge` for packed rows: x (T, D), sizes (T,); group_of_patch (B, P) holds slots within each image.

    The same merge, layout and group map as `merge` on the padded batch (the bookkeeping is shared);
    only the features move as rows. Returns x (T', D), sizes (T',), group_of_patch, cu_seqlens.
    """
    live = _live_slots(cu_seqlens)  # (B, N)
    padded_sizes = sizes.new_zeros(live.shape)
    padded_sizes[live] = sizes
    dest, new_sizes, keep, new_index = _merge_plan(padded_sizes, matches, merged, order)
    new_cu = offsets(keep.sum(dim=1))
    # Slot indices -> row indices: image i's slot j is row cu[i] + j (before) / new_cu[i] + j (after).
    # Rows are summed in each image's `accumulation_order` (index_add_ sums in index order).
    acc = accumulation_order(matches, live.shape[1])  # (B, N) slots
    acc_live = live.gather(1, acc)
    acc_row = (acc + cu_seqlens[:-1, None])[acc_live]  # (T,) old rows in summing order
    dest_row = (dest.gather(1, acc) + cu_seqlens[:-1, None])[acc_live]  # (T,) their destination rows
    summed = torch.zeros_like(x).index_add_(0, dest_row, (x * sizes.to(x.dtype).unsqueeze(-1))[acc_row])
    keep_row = keep[live]  # (T,) survivors among the old rows
    target_row = (new_index + new_cu[:-1, None])[keep]  # their new rows (row-major = old row order)
    kept_sizes = new_sizes[keep]
    out = x.new_empty(int(new_cu[-1]), x.shape[-1])
    out[target_row] = summed[keep_row] / kept_sizes.to(x.dtype).unsqueeze(-1)
    out_sizes = sizes.new_empty(out.shape[0])
    out_sizes[target_row] = kept_sizes
    slot_of_patch = torch.gather(dest, 1, group_of_patch)  # where each patch's token went
    return out, out_sizes, torch.gather(new_index, 1, slot_of_patch), new_cu


# (step index, matches over the rows of the batch) -> the merged edges: how calibration (batch-level
# top-k, Eq. 4) and the fixed-fraction benches take over the choice of edges.
EdgeChooser = Callable[[int, Matches], Tensor]
