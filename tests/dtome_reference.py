"""The slow reference for DToMe on a CLIP / SigLIP tower: the paper's batch-1 rule written out token by
token for one image (its thresholded `bipartite_soft_matching` + `merge_wavg`), with dymu's per-image
token budget on top. Independent of dymu.merge: the encoder and budget tests compare against it.

Ties. On flat images (a white canvas, a chart, text on a flat background) many scores are equal or
differ in the last bit, so the reference also fixes the float steps where the paper's code fixes them,
and takes the paper's choice among exact ties where that choice depends on the image alone:
- a token's partner among tied B tokens: the first (lowest position), as `torch.max(dim)` returns;
- the ranking of tied edges (what the cap drops, the ``ab-score`` layout): by position, which is what the
  paper's argsort gives when it keeps ties in place (it is unstable: otherwise its order among ties is
  the sort algorithm's, different on CPU and CUDA, so no rule of the image's to follow);
- a merged token's sum: the destination first, then the tokens merged into it, best edge first (the
  paper's `scatter_reduce(..., "sum")` over its ranking), divided by the summed sizes; every survivor
  is multiplied by its size and divided by it again, as `merge_wavg` does;
- attention after a merge: one scaled-dot-product attention call with log(size) added to every key's
  logit (the paper's fused attention; dymu's `packed_attention`); before any merge, the stock module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def proportional_attention(attn, h, sizes):
    """The attention of one image (h: (n, D)) with log(size) on every key: the paper's fused path."""
    n, heads, head_dim = h.shape[0], attn.num_heads, attn.head_dim

    def heads_first(t):  # (n, H*d) -> (1, H, n, d)
        return t.view(1, n, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        heads_first(attn.q_proj(h)), heads_first(attn.k_proj(h)), heads_first(attn.v_proj(h)),
        attn_mask=sizes.log()[None, None, None, :], scale=attn.scale,
    )
    return attn.out_proj(out[0].transpose(0, 1).reshape(n, -1))


def dtome_one_image(tower, pixels, thresholds, order: str, class_token: bool, *, run: int | None = None,
                    max_tokens: int | None = None, min_tokens: int | None = None):
    """DToMe over the first ``run`` layers (default: one per threshold) of ``tower`` on one image.

    Per layer, with t live tokens (m = t - class token mergeable): A = even positions, B = odd
    positions; every A token's best B by cosine of the head-averaged keys (ties: the first B); the class
    token never merges. The edges are ranked by score (ties: lower position); the thresholded merges are
    the edges above the threshold, at most m // 2. The budget, when given (the issue's text, not the
    library's code): ``min_tokens`` lowers that count to m - min_tokens; ``max_tokens`` raises it to
    m - max_tokens * 2**j, with j the layers left after this one (what they, each halving at best,
    could not remove), taking the best remaining edges; never past m // 2. Each merged A token joins
    its B as the size-weighted mean (summed as the module docstring says). If nothing merges nothing
    moves, else the survivors are laid out in ``order``. Every later attention adds log(size) to the
    logits of each key.

    Returns (tokens after the last layer, the token of every original position, the token count after
    every layer).
    """
    layers = tower.encoder.layers[: len(thresholds) if run is None else run]
    with torch.no_grad():
        x = tower(pixels, output_hidden_states=True).hidden_states[0][0]  # (N, D) the embeddings
        members = [[k] for k in range(len(x))]
        counts = []
        merged_yet = False
        for index, (layer, tau) in enumerate(zip(layers, thresholds)):
            t = len(members)
            sizes = torch.tensor([float(len(g)) for g in members])
            h = layer.layer_norm1(x)
            keys = layer.self_attn.k_proj(h)  # (t, H*d)
            if merged_yet:
                x = x + proportional_attention(layer.self_attn, h, sizes)
            else:  # every size is 1: the stock block
                x = x + layer.self_attn(h[None])[0][0]
            metric = keys.view(t, layer.self_attn.num_heads, -1).mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
            sims = (metric[0::2] @ metric[1::2].T).tolist()  # (A, B) cosine similarities
            best = {}  # A position -> (score, B position)
            for i, a in enumerate(a_pos):
                if b_pos and not (class_token and a == 0):
                    j = max(range(len(b_pos)), key=lambda k: (sims[i][k], -k))  # the first of tied partners
                    best[a] = (sims[i][j], b_pos[j])
            ranked = sorted(best, key=lambda a: (-best[a][0], a))
            m = t - int(class_token)
            n = len([a for a in ranked if best[a][0] > tau][: m // 2])
            if min_tokens is not None:
                n = min(n, max(0, m - min_tokens))
            if max_tokens is not None:
                n = max(n, m - max_tokens * 2 ** (len(layers) - 1 - index))
            merged = ranked[: min(n, m // 2)]
            if merged:
                merged_yet = True
                into = {b: [b] for b in b_pos}
                for a in merged:  # best edge first
                    into[best[a][1]].append(a)
                rows = {p: sizes[p] * x[p] / sizes[p] for p in a_pos if p not in merged}  # as merge_wavg
                groups = {p: members[p] for p in rows}
                for b, sources in into.items():
                    total = sizes[sources[0]] * x[sources[0]]
                    for s in sources[1:]:
                        total = total + sizes[s] * x[s]
                    rows[b] = total / sizes[sources].sum()
                    groups[b] = [k for s in sources for k in members[s]]
                a_kept = [a for a in a_pos if a not in merged]
                if order == "interleaved":
                    layout = sorted(rows)
                elif order == "ab":
                    layout = a_kept + b_pos
                else:  # ab-score: the class token first, the other A survivors best score first
                    first = [0] if class_token else []
                    rest = [a for a in ranked if a not in merged and a not in first]
                    rest += [a for a in a_kept if a not in first and a not in best]  # no B partner
                    layout = first + rest + b_pos
                x = torch.stack([rows[p] for p in layout])
                members = [groups[p] for p in layout]
            x = x + layer.mlp(layer.layer_norm2(x))
            counts.append(len(members))
    group = torch.empty(sum(len(g) for g in members), dtype=torch.long)
    for token, patches in enumerate(members):
        group[patches] = token
    return x, group, counts
