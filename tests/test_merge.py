"""DToMe math against slow, obviously correct references."""

import math

import pytest
import torch

from dymu import merge as M


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def slow_layout(survivors, score, order, protect_first):
    """The slots of the survivors in the order the merge order lays them out (token_order.py)."""
    if order == "interleaved":
        return sorted(survivors)
    a = [s for s in sorted(survivors) if s % 2 == 0]
    b = [s for s in sorted(survivors) if s % 2 == 1]
    if order == "ab-score":
        first = [0] if protect_first and 0 in a else []
        a = first + sorted((s for s in a if s not in first), key=lambda s: (-float(score[s // 2]), s))
    return a + b


def slow_merge_one_image(x, sizes, partner, chosen, score=None, order="interleaved", protect_first=False):
    """Per-token reference: merge chosen A tokens (even slots) into their B partner (odd slots)."""
    n = int((sizes > 0).sum())
    members = {t: [t] for t in range(n)}  # destination slot -> source slots
    for ai, is_chosen in enumerate(chosen.tolist()):
        if is_chosen:
            members[2 * int(partner[ai]) + 1] += members.pop(2 * ai)
    out, out_sizes = [], []
    layout = slow_layout(members, score, order, protect_first) if chosen.any() else sorted(members)
    for slot in layout:
        srcs = members[slot]
        w = torch.tensor([float(sizes[s]) for s in srcs])
        out.append(sum(w[k] * x[s] for k, s in enumerate(srcs)) / w.sum())
        out_sizes.append(int(w.sum()))
    return torch.stack(out), torch.tensor(out_sizes)


@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("order", ["interleaved", "ab", "ab-score"])
def test_merge_matches_slow_reference_on_a_padded_batch(order, protect_first):
    torch.manual_seed(0)
    bsz, n, dim = 4, 23, 8
    x = torch.randn(bsz, n, dim)
    sizes = torch.randint(1, 5, (bsz, n))
    sizes[1, 17:] = 0  # image 1 has 17 live tokens
    sizes[2, 10:] = 0
    sizes[3, 3:] = 0  # image 3 merges nothing (below): its layout must stay as it is
    group = torch.arange(n).expand(bsz, n).clone()
    metric = unit(torch.randn(bsz, n, 5))
    metric[3, :3] = unit(torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 0]]))
    matches = M.match(metric, sizes, protect_first=protect_first)
    chosen = M.edges_above(matches, 0.2)
    assert chosen[:3].any(1).all() and not chosen[3].any()
    out, out_sizes, _ = M.merge(x, sizes, group, matches, chosen, order=order)
    for i in range(bsz):
        ref, ref_sizes = slow_merge_one_image(x[i], sizes[i], matches.partner[i], chosen[i], matches.score[i],
                                              order, protect_first)
        k = len(ref)
        torch.testing.assert_close(out[i, :k], ref, atol=1e-6, rtol=1e-6)
        assert out_sizes[i, :k].tolist() == ref_sizes.tolist()
        assert (out_sizes[i, k:] == 0).all() and (out[i, k:] == 0).all()


def test_padding_is_never_matched_and_class_token_never_merged():
    torch.manual_seed(1)
    metric = unit(torch.randn(2, 12, 4))
    metric[:, :] = metric[0, 0]  # everything identical: every allowed edge scores 1
    sizes = torch.ones(2, 12, dtype=torch.long)
    sizes[1, 7:] = 0
    matches = M.match(metric, sizes, protect_first=True)
    assert matches.score[:, 0].isneginf().all()
    # Image 1: live slots 0..6, so live A = 0,2,4,6 (0 protected) and live B = 1,3,5.
    assert torch.isfinite(matches.score[1]).tolist() == [False, True, True, True, False, False]
    assert (2 * matches.partner[1, 1:4] + 1 < 7).all()


def test_repeated_merges_give_group_means_and_a_valid_partition():
    """Merging is exact averaging: after any chain of merges each token is the mean of its patches."""
    torch.manual_seed(2)
    bsz, n, dim = 4, 50, 6
    x0 = torch.randn(bsz, n, dim, dtype=torch.float64)
    x0[0] = x0[0, :1]  # one image is all one token: it must collapse the most
    x, (sizes, group) = x0.clone(), M.initial_groups(bsz, n, x0.device)
    for _ in range(5):
        matches = M.match(unit(x), sizes, protect_first=False)
        x, sizes, group = M.merge(x, sizes, group, matches, M.edges_above(matches, 0.3))
    for i in range(bsz):
        live = int((sizes[i] > 0).sum())
        assert sizes[i].sum() == n
        assert group[i].min() >= 0 and group[i].max() == live - 1
        counts = torch.bincount(group[i], minlength=live)
        assert counts.tolist() == sizes[i, :live].tolist()  # every token has >= 1 patch
        for j in range(live):
            torch.testing.assert_close(x[i, j], x0[i][group[i] == j].mean(0))
    assert (sizes > 0).sum(1)[0] < (sizes > 0).sum(1)[1:].min()


def test_the_cap_is_per_image_and_keeps_the_best_edges():
    """At most (t_i - protected) // 2 merges for image i: its best edges, ties to the lower slot."""
    torch.manual_seed(5)
    sizes = torch.ones(3, 9, dtype=torch.long)
    sizes[1, 7:] = 0  # 7 live tokens: 4 A, 3 B
    sizes[2, 6:] = 0  # 6 live tokens: 3 A, 3 B, never capped
    matches = M.match(unit(torch.randn(3, 9, 4)), sizes, protect_first=False)
    assert matches.cap.tolist() == [4, 3, 3]
    every = M.edges_above(matches, -math.inf)
    for i, cap in enumerate([4, 3, 3]):
        live_a = [a for a in range(5) if sizes[i, 2 * a]]
        best = sorted(live_a, key=lambda a: (-float(matches.score[i, a]), a))[:cap]
        assert every[i].nonzero().flatten().tolist() == sorted(best)
    assert M.top_r_edges(matches, 100).tolist() == every.tolist()
    # Equal scores everywhere: the cap keeps the first slots.
    flat = M.Matches(torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.long), cap=torch.tensor([2]))
    assert M.edges_above(flat, -math.inf).tolist() == [[True, True, False, False, False]]
    assert M.top_r_edges(flat, 3).tolist() == [[True, True, False, False, False]]
    with_class = M.match(unit(torch.randn(2, 9, 4)), torch.ones(2, 9, dtype=torch.long), protect_first=True)
    assert with_class.cap.tolist() == [4, 4]  # 4 mergeable A tokens: with a class token the cap never binds
    assert M.edges_above(with_class, -math.inf).sum(1).tolist() == [4, 4]


def test_threshold_infinities():
    matches = M.match(unit(torch.randn(1, 10, 4)), torch.ones(1, 10, dtype=torch.long), protect_first=True)
    assert not M.edges_above(matches, math.inf).any()
    assert M.edges_above(matches, -math.inf).sum() == 4  # every edge but the class token's


def test_rows_of_one_token_have_no_edges():
    """A batch whose rows hold one token each (a Qwen segment merged down to one unit, alone in its
    call) has no B slots: no edge, even at -inf, and no error."""
    matches = M.match(unit(torch.randn(2, 1, 4)), torch.ones(2, 1, dtype=torch.long), protect_first=False)
    assert matches.score.shape == (2, 1) and not M.edges_above(matches, -math.inf).any()


def test_top_r_merges_exactly_r_per_image():
    torch.manual_seed(3)
    sizes = torch.ones(3, 20, dtype=torch.long)
    sizes[2, 9:] = 0
    matches = M.match(unit(torch.randn(3, 20, 4)), sizes, protect_first=True)
    chosen = M.top_r_edges(matches, 4)
    assert chosen.sum(1).tolist() == [4, 4, 4]
    # Never more than the image's mergeable A tokens.
    assert M.top_r_edges(matches, 100).sum(1).tolist() == [9, 9, 4]
    no_class = M.match(unit(torch.randn(3, 20, 4)), sizes, protect_first=False)
    assert M.top_r_edges(no_class, 100).sum(1).tolist() == [10, 10, 4]  # cap (9 - 0) // 2 = 4 of 5 A tokens


def test_batch_top_edges_ranks_the_whole_batch_and_reports_the_next_score():
    torch.manual_seed(4)
    matches = M.match(unit(torch.randn(4, 30, 4)), torch.ones(4, 30, dtype=torch.long), protect_first=True)
    chosen, threshold = M.top_edges_of_batch(matches, 10)
    assert int(chosen.sum()) == 10
    taken = matches.score[chosen]
    rest = matches.score[~chosen & torch.isfinite(matches.score)]
    assert taken.min() >= rest.max()
    assert threshold == rest.max().clamp(min=0)
    # Re-applying the recorded threshold selects the same edges (no ties with random data).
    if threshold > 0:
        assert torch.equal(M.edges_above(matches, threshold), chosen)


def test_batch_top_edges_leave_out_edges_past_an_images_cap():
    """An image that would give up every A token keeps one (its cap), so the threshold reproduces k."""
    score = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    matches = M.Matches(score, torch.zeros(2, 3, dtype=torch.long), cap=torch.tensor([2, 2]))
    chosen, threshold = M.top_edges_of_batch(matches, 3)
    assert chosen.tolist() == [[True, True, False], [True, False, False]]
    assert float(threshold) == 0.5
    assert torch.equal(M.edges_above(matches, threshold), chosen)


def test_attention_bias_is_log_size_and_masks_padding():
    bias = M.attention_bias(torch.tensor([[1, 4, 0]]), torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == 0 and torch.isclose(bias[0, 0, 0, 1], torch.tensor(4.0).log())
    assert bias[0, 0, 0, 2].isneginf()


@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("order", ["interleaved", "ab", "ab-score"])
def test_packed_match_and_merge_equal_the_padded_ones_over_layers(order, protect_first):
    """Packed rows (Σ n_i) give the padded path's edges, tokens, sizes and group maps, layer after
    layer, with the cap binding (every edge, odd counts) and an image that merges nothing."""
    torch.manual_seed(1)
    bsz, n, dim = 5, 25, 6
    counts = [25, 18, 7, 1, 12]  # odd and even; a single-token image has no edge at all
    sizes = (torch.arange(n) < torch.tensor(counts)[:, None]).long()
    x = torch.randn(bsz, n, dim) * sizes[..., None]
    group = torch.arange(n) % torch.tensor(counts)[:, None]  # every patch in a live token
    rows, row_sizes, cu = M.pack(x, sizes)
    packed_group = group.clone()
    assert cu.tolist() == [0, 25, 43, 50, 51, 63] and rows.shape == (63, dim)
    for layer, threshold in enumerate([0.3, -math.inf, 0.5, -math.inf]):
        metric = unit(torch.randn(bsz, x.shape[1], 4))  # any metric: the same rows on both sides
        padded = M.match(metric, sizes, protect_first=protect_first)
        packed = M.match_packed(metric[sizes > 0], cu, protect_first=protect_first)
        # Per-image matmuls round like the batched one up to the last bits (as an image alone does).
        torch.testing.assert_close(packed.score, padded.score, atol=1e-6, rtol=0)
        assert torch.equal(packed.cap, padded.cap)
        live_edges = torch.isfinite(padded.score)
        assert torch.equal(packed.partner[live_edges], padded.partner[live_edges])
        chosen = M.edges_above(padded, threshold)
        chosen[2] = False  # image 2 merges nothing at this layer: its layout stays
        x, sizes, group = M.merge(x, sizes, group, padded, chosen, order=order)
        rows, row_sizes, packed_group, cu = M.merge_packed(rows, row_sizes, packed_group, cu, packed, chosen,
                                                           order=order)
        assert cu.diff().tolist() == (sizes > 0).sum(1).tolist()
        assert torch.equal(packed_group, group)
        back, back_sizes = M.unpack(rows, row_sizes, cu)
        assert torch.equal(back_sizes, sizes)
        torch.testing.assert_close(back, x, atol=1e-6, rtol=1e-6)
    assert (sizes > 0).sum(1).tolist() != counts  # it merged
