"""The slow reference for DToMe on a CLIP / SigLIP tower: the paper's batch-1 rule written out token by
token for one image (its thresholded `bipartite_soft_matching` + `merge_wavg`), with dymu's per-image
token budget on top. Independent of dymu.merge: the encoder and budget tests compare against it."""

from __future__ import annotations

import torch


def dtome_one_image(tower, pixels, thresholds, order: str, class_token: bool, *, run: int | None = None,
                    max_tokens: int | None = None, min_tokens: int | None = None):
    """DToMe over the first ``run`` layers (default: one per threshold) of ``tower`` on one image.

    Per layer, with t live tokens (m = t - class token mergeable): A = even positions, B = odd
    positions; every A token's best B by cosine of the head-averaged keys; the class token never
    merges. The edges are ranked by score (ties: lower position); the thresholded merges are the edges
    above the threshold, at most m // 2. The budget, when given (the issue's text, not the library's
    code): ``min_tokens`` lowers that count to m - min_tokens; ``max_tokens`` raises it to
    m - max_tokens * 2**j, with j the layers left after this one (what they, each halving at best,
    could not remove), taking the best remaining edges; never past m // 2. Each merged A token joins
    its B as the size-weighted mean. If nothing merges nothing moves, else the survivors are laid out
    in ``order``. Every later attention adds log(size) to the logits of each key.

    Returns (tokens after the last layer, the token of every original position, the token count after
    every layer).
    """
    layers = tower.encoder.layers[: len(thresholds) if run is None else run]
    with torch.no_grad():
        x = tower(pixels, output_hidden_states=True).hidden_states[0][0]  # (N, D) the embeddings
        members = [[k] for k in range(len(x))]
        counts = []
        for index, (layer, tau) in enumerate(zip(layers, thresholds)):
            t = len(members)
            sizes = torch.tensor([float(len(g)) for g in members])
            h = layer.layer_norm1(x[None])
            keys = layer.self_attn.k_proj(h)[0]  # (t, H*d)
            x = x + layer.self_attn(h, attention_mask=sizes.log()[None, None, None, :])[0][0]
            metric = keys.view(t, layer.self_attn.num_heads, -1).mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
            sims = (metric[0::2] @ metric[1::2].T).tolist()  # (A, B) cosine similarities
            best = {}  # A position -> (score, B position)
            for i, a in enumerate(a_pos):
                if b_pos and not (class_token and a == 0):
                    j = max(range(len(b_pos)), key=lambda k: (sims[i][k], -k))
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
                into = {b: [b] for b in b_pos}
                for a in merged:
                    into[best[a][1]].append(a)
                rows = {p: x[p] for p in a_pos if p not in merged}
                groups = {p: members[p] for p in rows}
                for b, sources in into.items():
                    w = sizes[sources]
                    rows[b] = (w[:, None] * x[sources]).sum(0) / w.sum()
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
            x = x + layer.mlp(layer.layer_norm2(x[None]))[0]
            counts.append(len(members))
    group = torch.empty(sum(len(g) for g in members), dtype=torch.long)
    for token, patches in enumerate(members):
        group[patches] = token
    return x, group, counts
