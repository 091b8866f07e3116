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
