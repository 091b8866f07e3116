"""`Encoded`: what `dymu.encode` returns for every family, read the same way on all of them.

An *item* is what merges on its own: an image, one crop or tile of an image (AnyRes crops, InternVL
and SmolVLM tiles: see the family's `encode`), or a video. Every item has stock positions (the patches,
or the units of k x k patches that become one LLM token, that the stock model keeps) and the merged
tokens DyMU kept of them; the group map says which merged token every stock position became.

The subclasses add what their tower computes (padded per-image tokens and sizes for CLIP / SigLIP
towers, packed LLM-side tokens for the Qwen ViTs, merged units for the unit towers), documented on
each; `per_item` and `groups_per_item` are the one interface the tools rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class Encoded:
    """Base of every `dymu.encode` result (see the module docstring)."""

    def per_item(self) -> list[tuple[int, int]]:
        """(merged tokens kept, stock positions) of every item, in input order."""
        raise NotImplementedError

    def groups_per_item(self) -> list[Tensor]:
        """Per item, (stock positions,) long: the merged token (numbered from 0 within the item) that
        every stock position belongs to, positions in the stock order."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.per_item())

    def __repr__(self) -> str:  # counts, not whole tensors
        pairs = self.per_item()
        shown = ", ".join(f"{k}/{n}" for k, n in pairs[:8]) + (", ..." if len(pairs) > 8 else "")
        return f"{type(self).__name__}({len(pairs)} items, kept/stock [{shown}])"


@dataclass(repr=False)
class EncodedImages(Encoded):
    """Encoder output for a batch of images (an item each), padded: image i owns ``tokens[i, :num_tokens[i]]``.

    ``group_of_patch[i, p]`` is the index of the token that original patch p belongs to (class
    token excluded when it was dropped); ``sizes[i, j]`` the number of patches of token j (0 on
    padding); ``kept_per_layer[i, l]`` the tokens alive after layer l (class token included when
    the tower has one).
    """

    tokens: torch.Tensor  # (B, n_max, D)
    sizes: torch.Tensor  # (B, n_max)
    group_of_patch: torch.Tensor  # (B, P)
    kept_per_layer: torch.Tensor  # (B, layers run)

    @property
    def num_tokens(self) -> torch.Tensor:
        return (self.sizes > 0).sum(dim=1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __repr__(self) -> str:  # shapes and counts, not whole tensors
        counts = self.num_tokens.tolist()
        shown = ", ".join(map(str, counts[:8])) + (", ..." if len(counts) > 8 else "")
        return (f"EncodedImages({len(self)} images, tokens kept [{shown}] of {self.group_of_patch.shape[1]}; "
                f"tokens {tuple(self.tokens.shape)}, sizes {tuple(self.sizes.shape)}, "
                f"group_of_patch {tuple(self.group_of_patch.shape)}, kept_per_layer {tuple(self.kept_per_layer.shape)})")

    def per_item(self) -> list[tuple[int, int]]:
        return [(n, self.group_of_patch.shape[1]) for n in self.num_tokens.tolist()]

    def groups_per_item(self) -> list[torch.Tensor]:
        return list(self.group_of_patch)

    def image(self, i: int) -> dict[str, torch.Tensor]:
        """One image's tokens (n_i, D), sizes (n_i), group_of_patch (P), kept_per_layer."""
        n = int(self.num_tokens[i])
        return {
            "tokens": self.tokens[i, :n],
            "sizes": self.sizes[i, :n],
            "group_of_patch": self.group_of_patch[i],
            "kept_per_layer": self.kept_per_layer[i],
        }
