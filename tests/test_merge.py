"""DToMe math against slow, obviously correct references."""

import torch

from dymu import merge as M


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def slow_merge_one_image(x, sizes, partner, chosen):
    """Per-token reference: merge chosen A tokens (even slots) into their B partner (odd slots)."""
    n = int((sizes > 0).sum())
    members = {t: [t] for t in range(n)}  # destination slot -> source slots
    for ai, is_chosen in enumerate(chosen.tolist()):
        if is_chosen:
            members[2 * int(partner[ai]) + 1] += members.pop(2 * ai)
    out, out_sizes = [], []
    for slot in sorted(members):  # survivors keep their order
        srcs = members[slot]
        w = torch.tensor([float(sizes[s]) for s in srcs])
        out.append(sum(w[k] * x[s] for k, s in enumerate(srcs)) / w.sum())
        out_sizes.append(int(w.sum()))
    return torch.stack(out), torch.tensor(out_sizes)


def test_merge_matches_slow_reference_on_a_padded_batch():
    torch.manual_seed(0)
    bsz, n, dim = 3, 23, 8
    x = torch.randn(bsz, n, dim)
    sizes = torch.randint(1, 5, (bsz, n))
    sizes[1, 17:] = 0  # image 1 has 17 live tokens
    sizes[2, 10:] = 0
    group = torch.arange(n).expand(bsz, n).clone()
    matches = M.match(unit(torch.randn(bsz, n, 5)), sizes, protect_first=True)
    chosen = M.edges_above(matches, 0.2)
    out, out_sizes, _ = M.merge(x, sizes, group, matches, chosen)
    for i in range(bsz):
        ref, ref_sizes = slow_merge_one_image(x[i], sizes[i], matches.partner[i], chosen[i])
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


def test_top_r_merges_exactly_r_per_image():
    torch.manual_seed(3)
    sizes = torch.ones(3, 20, dtype=torch.long)
    sizes[2, 9:] = 0
    matches = M.match(unit(torch.randn(3, 20, 4)), sizes, protect_first=True)
    chosen = M.top_r_edges(matches, 4)
    assert chosen.sum(1).tolist() == [4, 4, 4]
    # Never more than the image's mergeable A tokens.
    assert M.top_r_edges(matches, 100).sum(1).tolist() == [9, 9, 4]


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


def test_attention_bias_is_log_size_and_masks_padding():
    bias = M.attention_bias(torch.tensor([[1, 4, 0]]), torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == 0 and torch.isclose(bias[0, 0, 0, 1], torch.tensor(4.0).log())
    assert bias[0, 0, 0, 2].isneginf()
