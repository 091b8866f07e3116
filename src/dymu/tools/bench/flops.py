"""FLOP models for the FLOP-ideal speedups (a multiply and an add count as 2 FLOPs; norms, softmax,
RoPE and gathers are left out of the ideals: they are what the measurement shows on top)."""

from __future__ import annotations

import math

# The paper's Table 1 (attention MFLOPs, N = 576 visual tokens, 32 heads, head dim 128).
PAPER_TABLE1 = {"full": 1359.0, 94: 72.4, 209: 357.8, 393: 1265.0}


def vit_layer_flops(n_attn: int, n_mlp: int, hidden: int, mlp: int) -> float:
    """One pre-norm ViT block: attention over n_attn tokens, MLP over n_mlp (DToMe merges in between)."""
    projections = 2 * n_attn * 4 * hidden * hidden  # q, k, v, o
    attention = 2 * 2 * n_attn * n_attn * hidden  # QK^T and PV, all heads
    return projections + attention + 2 * 2 * n_mlp * hidden * mlp


def encoder_flops(kept_per_layer: list[float], n0: int, hidden: int, mlp: int, patch_in: int) -> float:
    """FLOPs of one image through the layers run, from the tokens kept after each layer's merge."""
    total = 2 * (n0 - 1) * patch_in * hidden  # patch embedding (a conv = a matmul per patch)
    n_in = n0
    for n_out in kept_per_layer:
        total += vit_layer_flops(n_in, n_out, hidden, mlp)
        n_in = n_out
    return total


def decoder_layer_flops(rows: int, positions: int, hidden: int, mlp: int, kv_hidden: int) -> float:
    """One Llama block: projections and MLP over `rows` (unique rows under VTU), attention over all
    `positions` (VTU keeps the full-length attention). Dense attention count (no causal skipping)."""
    projections = 2 * rows * (2 * hidden * hidden + 2 * hidden * kv_hidden)  # q, o + k, v
    attention = 2 * 2 * positions * positions * hidden
    return projections + attention + 2 * rows * 3 * hidden * mlp


def table1(n: int = 576, heads: int = 32, head_dim: int = 128, n_un: tuple[int, ...] = (94, 209, 393)) -> list[dict]:
    """Attention FLOPs of one layer, in the form of the paper's Table 1, counted honestly.

    Counted (multiply and add = 2 FLOPs, dense N x N, no causal halving):
    - logits: full: Q K^T = 2 N^2 d H. Eq. 10: the unique products Q K^T and Q x K^T
      (2 x 2 N_un^2 d H) plus their expansion to N x N with the cos/sin diagonals, per frequency
      pair and entry 4 terms x 2 multiplies + 4 adds = 12 -> 12 N^2 (d/2) H = 6 N^2 d H.
      A rewrite with cos(θi-θj), sin(θi-θj) tables gets that to 2 N^2 d H: the full model's cost.
    - softmax over N x N logits: scale, mask, max, subtract, exp, sum, divide ~ 7 N^2 H.
    - P V: 2 N^2 d H (V at full length; V has no position, but every row of P differs).
    The paper's numbers are N^2 d H (full) and 2 N_un^2 d H (VTU): the unique products only, in
    multiply-adds.
    """
    nd = n * n * head_dim * heads
    softmax = 7 * n * n * heads
    rows = []
    full_total = 2 * nd + softmax + 2 * nd
    rows.append(dict(variant="full", n_un=n, paper_mflops=PAPER_TABLE1["full"], paper_formula_mflops=nd / 1e6,
                     logits_mflops=2 * nd / 1e6, softmax_mflops=softmax / 1e6, pv_mflops=2 * nd / 1e6,
                     total_mflops=full_total / 1e6, vs_full=1.0))
    for u in n_un:
        unique = 2 * 2 * u * u * head_dim * heads
        expansion = 6 * nd
        total = unique + expansion + softmax + 2 * nd
        rows.append(dict(variant="VTU Eq. 10", n_un=u, paper_mflops=PAPER_TABLE1.get(u, math.nan),
                         paper_formula_mflops=2 * u * u * head_dim * heads / 1e6,
                         logits_mflops=(unique + expansion) / 1e6, unique_products_mflops=unique / 1e6,
                         expansion_mflops=expansion / 1e6, softmax_mflops=softmax / 1e6, pv_mflops=2 * nd / 1e6,
                         total_mflops=total / 1e6, vs_full=total / full_total))
    rows.append(dict(variant="VTU gather + stock attention (dymu)", n_un="any", paper_mflops=math.nan,
                     paper_formula_mflops=math.nan, logits_mflops=2 * nd / 1e6, softmax_mflops=softmax / 1e6,
                     pv_mflops=2 * nd / 1e6, total_mflops=full_total / 1e6, vs_full=1.0))
    return rows
