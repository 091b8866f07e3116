"""VTU for token mixers other than self-attention (linear attention, state-space layers), by description.

The VTU rule for every token mixer (paper Eq. 11 read beyond attention): row-wise operators
(projections, gates, norms, the MLP) run on the unique rows of the sequence; the token mixer itself
runs on the gathered full-length sequence, every copy of a row at its own position; its output is
averaged over each group, so the next layer again sees one row per group.

A `RowWiseMixer` describes a mixer module by its submodules: ``row_wise`` ones (called on (B, N, ·)
tensors, row by row: input projections, gates) and the ``averaged`` one (its last linear map: the
group mean of its input, then the map, equals the group mean of the mixer's output). A decoder layer
whose token mixer is such a module runs its *stock* forward, layer and mixer alike, with forward
hooks on those submodules and on the layer's own row-wise modules (``input_layernorm``,
``post_attention_layernorm``, ``mlp``): a hook gathers the unique rows (or the group means) of the
input, the module runs on U rows, a hook expands its output back to (B, N, ·). Everything between
them (the mixer's convolution, recurrence, masks, cache reads and writes) is the stock code at full
length, on exactly the inputs a stock model whose mixer outputs are group-averaged would give it: so
the recurrent and convolution states a prefill leaves in the cache are that model's, and decode
steps (length 1, no group map) are the stock forward. What it saves: every matmul of the layer but
the mixer's own sequence work; what it cannot: that work (a recurrence is inherently per position).
Hooks act only while a VTU prefill runs a mixer layer (`VTUState.mixer_groups`), so the stock
forward stays untouched otherwise.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
from torch import nn

from .. import compat, vtu
from .vtu_state import CHECK_GROUP_ROWS_ENV, GroupRowsError

# The pre-norm residual block around every token mixer VTU patches: these run row by row.
LAYER_ROW_WISE = ("input_layernorm", "post_attention_layernorm", "mlp")


class RowWiseMixer:
    """How VTU runs a decoder layer whose token mixer at ``attribute`` is one of ``classes`` (see the
    module docstring). ``row_wise``: its submodules applied row by row to (B, N, ·) inputs;
    ``averaged``: its output map (linear), whose input is averaged over each group."""

    def __init__(self, attribute: str, classes: tuple[type, ...], row_wise: tuple[str, ...], averaged: str):
        self.attribute, self.classes, self.row_wise, self.averaged = attribute, classes, row_wise, averaged

    @property
    def name(self) -> str:
        return " / ".join(c.__name__ for c in self.classes)

    def covers(self, layer: nn.Module) -> bool:
        return isinstance(getattr(layer, self.attribute, None), self.classes)

    def check(self, layer: nn.Module) -> None:
        compat.require_attributes(layer, LAYER_ROW_WISE, type(layer).__name__)
        mixer = getattr(layer, self.attribute)
        compat.require_attributes(mixer, (*self.row_wise, self.averaged), type(mixer).__name__)
        if not isinstance(getattr(mixer, self.averaged), nn.Linear):  # the mean commutes with a linear map only
            raise compat.refuse(f"{type(mixer).__name__}.{self.averaged} is not a linear map")

    def counted(self) -> tuple[str, ...]:
        """The submodules whose rows `rows_processed` counts."""
        return (*LAYER_ROW_WISE, *(f"{self.attribute}.{n}" for n in (*self.row_wise, self.averaged)))

    def attach(self, layer: nn.Module, state) -> list:
        """Register the unique-row hooks on ``layer``; their handles (removed by `remove_vtu`)."""
        handles = []
        mixer = getattr(layer, self.attribute)
        targets = [(layer.get_submodule(n), False) for n in LAYER_ROW_WISE]
        targets += [(mixer.get_submodule(n), False) for n in self.row_wise] + [(getattr(mixer, self.averaged), True)]
        for module, mean in targets:
            handles.append(module.register_forward_pre_hook(_Gather(state, mean)))
            handles.append(module.register_forward_hook(_Expand(state)))
        return handles

    def forward(self, layer: nn.Module, args: tuple, kwargs: dict):
        """The patched layer's forward: the stock one, with the hooks on for a VTU prefill."""
        hidden = args[0] if args else kwargs["hidden_states"]
        state = layer._dymu_vtu
        state.rows[layer._dymu_vtu_key] = Counter({"positions": hidden.shape[0] * hidden.shape[1]})
        groups = state.groups_for(hidden)
        stock = layer._dymu_stock.forward
        if groups is None:  # decode steps and forwards without a group map: stock
            return stock(layer, *args, **kwargs)
        if os.environ.get(CHECK_GROUP_ROWS_ENV) == "1" and not torch.equal(hidden, vtu.expand(vtu.unique_rows(hidden, groups), groups)):
            raise GroupRowsError(f"{type(layer).__name__} ({self.name}): rows of one VTU group differ at its input; "
                                 "VTU would silently use the first row of each group")
        state.mixer_groups = groups
        try:
            return stock(layer, *args, **kwargs)
        finally:
            state.mixer_groups = None


class _Gather:
    """Forward pre-hook: (B, N, ·) input -> its unique rows (or group means) (U, ·). An object, not a
    closure, so that deepcopy and pickle take it."""

    def __init__(self, state, mean: bool):
        self.state, self.mean = state, mean

    def __call__(self, module, args):
        groups = self.state.mixer_groups
        if groups is None:
            return None
        if not args or args[0].dim() < 3:
            raise compat.refuse(f"{type(module).__name__} was not called with a (batch, length, ·) tensor first")
        rows = vtu.merge_mean(args[0], groups) if self.mean else vtu.unique_rows(args[0], groups)
        return (rows, *args[1:])


class _Expand:
    """Forward hook: (U, ·) output -> (B, N, ·), every position its group's row."""

    def __init__(self, state):
        self.state = state

    def __call__(self, module, args, output):
        groups = self.state.mixer_groups
        return None if groups is None else vtu.expand(output, groups)


def uncovered(layer: nn.Module, name: str, mixers: tuple[RowWiseMixer, ...]) -> ValueError:
    """The one-line refusal of a decoder layer whose token mixer VTU does not cover."""
    known = {"self_attn", *LAYER_ROW_WISE}
    found = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children() if n not in known) or "none found"
    covered = ", ".join(["self-attention", *(m.name for m in mixers)])
    return ValueError(f"VTU does not cover the token mixer of decoder layer {name or type(layer).__name__!r} "
                      f"({type(layer).__name__}): {found}; it covers {covered}")
