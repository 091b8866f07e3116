"""VTU math (dymu.vtu): group maps, dedup/expand/re-merge, and the exact Eq. 10 decomposition."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from dymu import vtu


def random_group_map(batch, length, generator):
    """Random non-contiguous groups: each position picks one of a few labels or stays alone."""
    labels = torch.randint(-1, 4, (batch, length), generator=generator)
    return vtu.group_map_from_labels(labels)


def test_group_map_from_labels_numbers_groups_by_first_appearance():
    labels = torch.tensor([[-1, 5, 7, 5, 5, -1, -1], [3, 3, -1, 2, 2, 3, -1]])
    assert vtu.group_map_from_labels(labels).tolist() == [[0, 1, 2, 1, 1, 3, 4], [0, 0, 1, 2, 2, 0, 3]]
    # Labels are local to each sequence: the same label in two sequences gives two groups.
    assert vtu.plan_groups(vtu.group_map_from_labels(labels)).num_unique == 5 + 4


def test_plan_groups_index_first_sizes():
    group_map = torch.tensor([[0, 1, 2, 1, 1, 3, 4], [0, 0, 1, 2, 2, 0, 3]])
    g = vtu.plan_groups(group_map)
    assert g.index.tolist() == [[0, 1, 2, 1, 1, 3, 4], [5, 5, 6, 7, 7, 5, 8]]
    assert g.first.tolist() == [0, 1, 2, 5, 6, 7, 9, 10, 13]
    assert g.sizes.tolist() == [1, 3, 1, 1, 1, 3, 1, 2, 1]


def test_plan_groups_accepts_sparse_ids_and_rejects_bad_maps():
    # Ids need not be contiguous: only equality within a sequence matters.
    g = vtu.plan_groups(torch.tensor([[3, 2, 3, 0]]))
    assert g.index.tolist() == [[2, 1, 2, 0]] and g.sizes.tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="2-D"):
        vtu.plan_groups(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        vtu.plan_groups(torch.tensor([[0, 1, 2, 4]]))
    with pytest.raises(ValueError, match="integer"):
        vtu.plan_groups(torch.zeros(1, 4))


def test_unique_rows_expand_merge_mean():
    gen = torch.Generator().manual_seed(0)
    group_map = random_group_map(3, 17, gen)
    g = vtu.plan_groups(group_map)
    rows = torch.randn(g.num_unique, 5, generator=gen)
    x = vtu.expand(rows, g)  # (B, N, 5), equal within every group
    assert x.shape == (3, 17, 5)
    assert torch.equal(vtu.unique_rows(x, g), rows)
    torch.testing.assert_close(vtu.merge_mean(x, g), rows, rtol=0, atol=1e-6)  # sum/size: rounding only

    # Eq. 11 against a plain loop over the groups of every sequence.
    y = torch.randn(3, 17, 2, 4, generator=gen)
    merged = vtu.merge_mean(y, g)
    assert merged.shape == (g.num_unique, 2, 4)
    for b in range(3):
        for gid in group_map[b].unique():
            members = group_map[b] == gid
            row = g.index[b][members][0]
            torch.testing.assert_close(merged[row], y[b][members].mean(0), rtol=0, atol=1e-6)


def test_identity_group_map_keeps_every_row():
    g = vtu.plan_groups(vtu.identity_group_map(2, 6))
    assert g.num_unique == 12 and g.sizes.eq(1).all()
    x = torch.randn(2, 6, 3)
    assert torch.equal(vtu.expand(vtu.unique_rows(x, g), g), x)


def _rope_tables(batch, length, head_dim, generator):
    """Stock RoPE tables at per-sequence positions (as with left padding: different offsets)."""
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(config)
    offsets = torch.randint(0, 30, (batch, 1), generator=generator)
    position_ids = torch.arange(length).unsqueeze(0) + offsets
    return rotary(torch.zeros(1, dtype=torch.float32), position_ids)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_eq10_scores_equal_gather_and_stock_rope(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads + kv_heads)
    batch, length, head_dim = 3, 19, 16
    g = vtu.plan_groups(random_group_map(batch, length, gen))
    q_rows = torch.randn(g.num_unique, heads, head_dim, generator=gen)
    k_rows = torch.randn(g.num_unique, heads, head_dim, generator=gen)
    cos, sin = _rope_tables(batch, length, head_dim, gen)

    # The fast path: gather to full length, stock rotation, plain QKᵀ.
    q, k = apply_rotary_pos_emb(vtu.expand(q_rows, g).transpose(1, 2), vtu.expand(k_rows, g).transpose(1, 2), cos, sin)
    fast = q @ k.transpose(2, 3)  # (B, H, N, N)
    exact = vtu.eq10_scores(q_rows, k_rows, g, cos, sin)
    assert fast.abs().max() > 1.0  # the comparison is not between tiny numbers
    torch.testing.assert_close(exact, fast, rtol=0, atol=1e-5)

    # And the whole attention against the stock eager attention (GQA: k/v with fewer heads).
    k_rows = k_rows[:, :kv_heads]
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    q, k = apply_rotary_pos_emb(vtu.expand(q_rows, g).transpose(1, 2), vtu.expand(k_rows, g).transpose(1, 2), cos, sin)
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1).expand(batch, 1, length, length)

    class Module(torch.nn.Module):
        num_key_value_groups = heads // kv_heads

    scaling = head_dim**-0.5
    stock, _ = eager_attention_forward(Module().eval(), q, k, v, mask, scaling=scaling)
    out = vtu.eq10_attention(q_rows, k_rows, v, g, cos, sin, mask, scaling)
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-5)
