"""DToMe inside a stock ViT encoder (CLIP, SigLIP), shared by the per-family adapters (registry.py).

Each encoder layer of the tower is class-swapped, per instance, to a subclass whose forward is the
stock pre-norm block with one step added between the attention residual and the MLP: merge the
tokens whose keys are similar (merge.py). Every block after a merge adds log(size) to the attention
logits of every key (proportional attention) through the attention mask, which both eager and sdpa
honour. The state of one forward (sizes, group map, token counts) lives in a `TowerState` shared by
the layers of one tower; it is reset by a pre-hook on the tower's encoder, or by `encode`.

Weights and state-dict keys are untouched; `remove` swaps the classes back and drops the hooks.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import merge as M
from .. import compat
from ..encoded import EncodedImages  # noqa: F401  (imported from here too)
from ..patching import PatchedClasses
from ..token_order import DEFAULT_ORDER, check_order
from .budget import TokenBudget, _per_layer, _threshold_floats, holding_budget, make_budget  # noqa: F401  (imported from here too)
from .registry import FAMILIES, TowerFamily, family_of, find_towers, register_family  # noqa: F401  (imported from here too)

# ---------------------------------------------------------------------------------------------
# Merge rules and the per-forward state.

# encode_with_tower runs a batch as packed rows after its first merge: the same results, and faster
# than padded in most measured rounds on the (shared, noisy) bench CPU (README, Benchmarks, "Packed
# batches"). One image runs packed as well, so that it meets the same float operations alone and in a
# batch (README, "Fidelity to the paper's code", ties).
DEFAULT_PACKED = True


@dataclass
class TowerState:
    """What one forward of a tower has merged so far (padded batch layout, see merge.py)."""

    family: TowerFamily
    thresholds: list[float] | None  # DToMe: per layer, +inf = no merge, -inf = every edge (up to the cap)
    r: list[int] | None  # ToMe: per layer, fixed merges per image
    sizes: torch.Tensor | None = None  # (B, N) 0 = padding
    group_of_patch: torch.Tensor | None = None  # (B, N0) slot of every original token
    kept_per_layer: list[torch.Tensor] = field(default_factory=list)  # (B,) after each layer
    merged_any: bool = False
    keys: torch.Tensor | None = None  # (B, N, D) of the running layer, from the k_proj hook
    # Set by calibration to take over the choice of edges (batch-level top-k, Eq. 4).
    edge_chooser: Callable[[int, M.Matches], torch.Tensor] | None = None
    order: str = DEFAULT_ORDER  # where survivors go after a merge (token_order.py)
    budget: "TokenBudget | None" = None  # per-image bound on the tokens at the feature layer
    packed: bool = DEFAULT_PACKED  # encode_with_tower runs packed rows after the first merge
    # Set while a forward runs packed: image i owns rows cu_seqlens[i]:cu_seqlens[i+1] of the hidden
    # states (T, D), and sizes is (T,). None: the padded layout of merge.py.
    cu_seqlens: torch.Tensor | None = None
    pack_at_merge: bool = False  # this forward switches to packed rows at its first merge layer

    def reset(self, bsz: int, n: int, device: torch.device, packed: bool = False) -> None:
        self.sizes, self.group_of_patch = M.initial_groups(bsz, n, device)
        self.kept_per_layer = []
        self.merged_any = False
        self.keys = None
        self.cu_seqlens = None
        self.pack_at_merge = packed

    def tokens_alive(self) -> torch.Tensor:
        """(B,) live tokens of every image now."""
        return self.cu_seqlens.diff() if self.cu_seqlens is not None else (self.sizes > 0).sum(dim=1)

    def merges_at(self, layer_index: int) -> bool:
        if self.edge_chooser is not None:
            return True
        if self.r is not None and self.r[layer_index] > 0:
            return True
        if self.thresholds is not None and self.thresholds[layer_index] < math.inf:
            return True
        return self.budget is not None and self.budget.forces_merges(layer_index, self._mergeable())

    def choose_edges(self, layer_index: int, matches: M.Matches) -> torch.Tensor:
        if self.edge_chooser is not None:  # calibration: the batch-level rule alone, no budget
            return self.edge_chooser(layer_index, matches)
        if self.r is not None:
            chosen = M.top_r_edges(matches, self.r[layer_index])
        else:
            chosen = M.edges_above(matches, self.thresholds[layer_index])
        if self.budget is not None:
            chosen = self.budget.adjust(layer_index, matches, chosen, self._mergeable())
        return chosen

    def _mergeable(self) -> torch.Tensor:
        """(B,) live tokens per image that may merge (the class token never does)."""
        return self.tokens_alive() - int(self.family.has_class_token)


def _head_mean_unit(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*d) keys -> (B, N, d) head-averaged, L2-normalised: the similarity metric."""
    bsz, n, _ = keys.shape
    metric = keys.view(bsz, n, num_heads, -1).mean(dim=2)
    return metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class DyMUEncoderLayer(nn.Module):
    """Mixin forward for a pre-norm ViT block (CLIP and SigLIP share this exact block shape)."""

    _dymu_state: TowerState
    _dymu_index: int

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        state = self._dymu_state
        if state.cu_seqlens is not None:
            # Packed rows (T, D): norms, projections and the MLP are row-wise, so only attention
            # needs the images apart.
            def attend(x):
                return packed_attention(self.self_attn, x, state.cu_seqlens, state.sizes)

            merge = self._dymu_merge_packed
        else:
            if state.sizes is None or state.sizes.shape != hidden_states.shape[:2]:
                # Called outside a tower forward (e.g. a single layer): start from unmerged tokens.
                state.reset(hidden_states.shape[0], hidden_states.shape[1], hidden_states.device)
            if state.merged_any:
                bias = M.attention_bias(state.sizes, hidden_states.dtype)
                attention_mask = bias if attention_mask is None else attention_mask + bias

            def attend(x):
                return self.self_attn(hidden_states=x, attention_mask=attention_mask, **kwargs)[0]

            merge = self._dymu_merge
        hidden_states = hidden_states + attend(self.layer_norm1(hidden_states))
        if state.merges_at(self._dymu_index):
            hidden_states = merge(hidden_states, state)
        state.kept_per_layer.append(state.tokens_alive())
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

    def _dymu_merge(self, hidden_states: torch.Tensor, state: TowerState) -> torch.Tensor:
        if state.pack_at_merge:  # from here on the forward runs packed (encode_with_tower unpacks)
            hidden_states, state.sizes, state.cu_seqlens = M.pack(hidden_states, state.sizes)
            state.keys = state.keys.flatten(0, 1)  # no padding before the first merge: every row is live
            return self._dymu_merge_packed(hidden_states, state)
        metric = _head_mean_unit(state.keys, self.self_attn.num_heads)
        state.keys = None
        matches = M.match(metric, state.sizes, protect_first=state.family.has_class_token)
        chosen = state.choose_edges(self._dymu_index, matches)
        if not bool(chosen.any()):
            return hidden_states
        hidden_states, state.sizes, state.group_of_patch = M.merge(
            hidden_states, state.sizes, state.group_of_patch, matches, chosen, order=state.order
        )
        state.merged_any = True
        return hidden_states

    def _dymu_merge_packed(self, hidden_states: torch.Tensor, state: TowerState) -> torch.Tensor:
        metric = _head_mean_unit(state.keys.unsqueeze(0), self.self_attn.num_heads)[0]
        state.keys = None
        matches = M.match_packed(metric, state.cu_seqlens, protect_first=state.family.has_class_token)
        chosen = state.choose_edges(self._dymu_index, matches)
        if not bool(chosen.any()):
            return hidden_states
        hidden_states, state.sizes, state.group_of_patch, state.cu_seqlens = M.merge_packed(
            hidden_states, state.sizes, state.group_of_patch, state.cu_seqlens, matches, chosen, order=state.order
        )
        state.merged_any = True
        return hidden_states


def packed_attention(attn: nn.Module, x: torch.Tensor, cu_seqlens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """A stock CLIP/SigLIP attention module on packed rows x (T, D), with log(size) on every key.

    q/k/v/o run once on all rows; attention runs per image (one SDPA call each, no padding). The
    k_proj call fires the hook that keeps the keys for matching. Chosen by measurement on this CPU
    over flex_attention (uncompiled: it materialises the T x T scores), nested jagged tensors (no
    mask) and a padded call (README, Benchmarks, "Packed batches"); on CUDA a fused varlen kernel with a bias would do better (not done here).
    """
    heads, head_dim = attn.num_heads, attn.head_dim
    queries, keys, values = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    bias = sizes.to(x.dtype).log()
    dropout = attn.dropout if attn.training else 0.0
    out = torch.empty_like(queries)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        def heads_first(t, start=start, end=end):  # rows of one image -> (1, H, n, d)
            return t[start:end].view(1, end - start, heads, head_dim).transpose(1, 2)

        image = F.scaled_dot_product_attention(
            heads_first(queries), heads_first(keys), heads_first(values),
            attn_mask=bias[None, None, None, start:end], dropout_p=dropout, scale=attn.scale,
        )
        out[start:end] = image[0].transpose(0, 1).reshape(end - start, -1)
    return attn.out_proj(out)


_patched_class = PatchedClasses(__name__, "DyMU", DyMUEncoderLayer, lambda: [f.layer_class for f in FAMILIES])


def __getattr__(name: str):  # pickle finds the patched layer classes here (dymu/patching.py)
    return _patched_class.resolve(name)


_LAYER_ARGUMENTS = ("hidden_states", "attention_mask")
_LAYER_ATTRIBUTES = ("layer_norm1", "layer_norm2", "mlp", "self_attn.k_proj", "self_attn.num_heads")


def check_stock_layer(stock: type, layer: nn.Module) -> None:
    """Refuse (one line) a stock encoder layer whose forward or modules are not what DToMe's block expects."""
    compat.require_forward(stock, _LAYER_ARGUMENTS)
    compat.require_attributes(layer, _LAYER_ATTRIBUTES, stock.__name__)


def dtome_settings(tower: nn.Module, family: TowerFamily, thresholds=None, r=None,
                   order: str | None = None, budget: TokenBudget | None = None, feature_layer: int = -1) -> TowerState:
    """Validate what `apply_dtome` is given, changing nothing: the new (unattached) state, or a ValueError."""
    if (thresholds is None) == (r is None):
        raise ValueError("Give exactly one of thresholds (DToMe) or r (fixed ToMe merges per layer).")
    order = DEFAULT_ORDER if order is None else check_order(order)
    compat.require_attributes(tower, ("encoder.layers",), type(tower).__name__)
    layers = tower.encoder.layers
    for index, layer in enumerate(layers):
        stock = getattr(layer, "_dymu_stock_class", type(layer))
        if not issubclass(stock, family.layer_class):
            raise TypeError(f"layer {index} of the {family.name} tower is a {stock.__name__}, not a {family.layer_class.__name__}")
        check_stock_layer(stock, layer)
    state = TowerState(family=family, thresholds=_per_layer(thresholds, len(layers), "thresholds"),
                       r=_per_layer(r, len(layers), "r"), order=order, budget=budget)
    if budget is not None:
        budget.layers = layers_to_run(len(layers), feature_layer)
        budget.check(_patches_per_image(tower), budget.layers)
    if state.thresholds is not None:
        state.thresholds = _threshold_floats(state.thresholds)
    if state.r is not None:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or v != int(v)
               for v in state.r):
            raise ValueError(f"r must be whole numbers >= 0 (merges per layer), not {state.r}")
        state.r = [int(v) for v in state.r]
    return state


def apply_dtome(
    tower: nn.Module,
    family: TowerFamily,
    thresholds: float | Sequence[float] | None = None,
    r: int | Sequence[int] | None = None,
    order: str | None = None,
    budget: TokenBudget | None = None,
    feature_layer: int = -1,
    packed: bool | None = None,
) -> TowerState:
    """Patch one tower. ``thresholds`` (DToMe) or ``r`` (ToMe), per layer or one value.

    A threshold of +inf (or None) never merges at that layer, -inf merges every edge; every layer
    merges at most (t - protected) // 2 tokens of an image of t live tokens (the paper's cap).
    ``order``: where survivors go after a merge (token_order.py; default DEFAULT_ORDER).
    ``budget``: a `TokenBudget` checked against ``feature_layer`` (the layer the caller reads;
    `encode_with_tower` re-checks it for the layer each call reads).
    Everything is validated before anything changes: on an error the tower keeps its previous patch.
    ``packed``: `encode_with_tower` holds a batch as packed rows after the first merge (default
    DEFAULT_PACKED); False keeps the padded layout (the reference). Same tokens either way.
    """
    state = dtome_settings(tower, family, thresholds=thresholds, r=r, order=order, budget=budget,
                           feature_layer=feature_layer)
    state.packed = DEFAULT_PACKED if packed is None else bool(packed)
    layers = tower.encoder.layers
    if hasattr(tower, "_dymu_state"):
        remove_dtome(tower)
    handles = []
    for index, layer in enumerate(layers):
        stock = type(layer)
        layer.__class__ = _patched_class(stock)
        layer._dymu_stock_class = stock
        layer._dymu_state = state
        layer._dymu_index = index
        handles.append(layer.self_attn.k_proj.register_forward_hook(_KeepKeys(state)))
    handles.append(tower.encoder.register_forward_pre_hook(_ResetOnForward(state), with_kwargs=True))
    tower._dymu_state = state
    tower._dymu_handles = handles
    return state


# The hooks are small objects, not closures: `copy.deepcopy(model)` copies an object together with
# the state it refers to (one copy, shared with the copied layers), whereas a closure would be
# shared by both models and write the copy's keys into the original's state.


class _KeepKeys:
    def __init__(self, state: TowerState):
        self.state = state

    def __call__(self, module, args, output):
        self.state.keys = output


class _ResetOnForward:
    def __init__(self, state: TowerState):
        self.state = state

    def __call__(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds", args[0] if args else None)
        self.state.reset(embeds.shape[0], embeds.shape[1], embeds.device)


@contextlib.contextmanager
def dtome_patched(tower: nn.Module, family: TowerFamily, thresholds=None, r=None, order: str | None = None,
                  budget: TokenBudget | None = None, feature_layer: int = -1, packed: bool | None = None):
    """Patch ``tower`` for the duration of a block, then restore whatever patch (or none) it had."""
    previous = getattr(tower, "_dymu_state", None)
    state = apply_dtome(tower, family, thresholds=thresholds, r=r, order=order, budget=budget,
                        feature_layer=feature_layer, packed=packed)
    try:
        yield state
    finally:
        remove_dtome(tower)
        if previous is not None:
            restored = apply_dtome(tower, family, thresholds=previous.thresholds, r=previous.r, order=previous.order,
                                   packed=previous.packed)
            restored.budget = previous.budget


@contextlib.contextmanager
def budget_set(tower: nn.Module, budget: TokenBudget | None):
    """Use ``budget`` (None: no budget) on a patched tower for the duration of a block."""
    with holding_budget(tower._dymu_state, budget) as state:
        yield state


@contextlib.contextmanager
def choosing_edges(tower: nn.Module, edge_chooser):
    """A patched tower merges the edges ``edge_chooser`` picks (calibration's batch-level Eq. 4) inside
    the block, and by its thresholds (or r) again after it."""
    state: TowerState = tower._dymu_state
    state.edge_chooser = edge_chooser
    try:
        yield state
    finally:
        state.edge_chooser = None


def _patches_per_image(tower: nn.Module) -> int:
    """Patches per image of the tower's config (the class token not counted)."""
    config = tower.config
    return (config.image_size // config.patch_size) ** 2


def remove_dtome(tower: nn.Module) -> None:
    for handle in getattr(tower, "_dymu_handles", []):
        handle.remove()
    for layer in tower.encoder.layers:
        if hasattr(layer, "_dymu_stock_class"):
            layer.__class__ = layer._dymu_stock_class
            for name in ("_dymu_stock_class", "_dymu_state", "_dymu_index"):
                delattr(layer, name)
    for name in ("_dymu_state", "_dymu_handles"):
        if hasattr(tower, name):
            delattr(tower, name)


# ---------------------------------------------------------------------------------------------
# Encoding: run the tower up to the feature layer, return per-image tokens and their groups.


def layers_to_run(num_layers: int, feature_layer: int) -> int:
    """How many layers produce ``hidden_states[feature_layer]`` (index 0 = the embeddings)."""
    count = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= count <= num_layers:
        raise ValueError(f"feature_layer {feature_layer} is out of range for a {num_layers}-layer tower")
    return count


def encode_with_tower(
    tower: nn.Module,
    family: TowerFamily,
    pixel_values: torch.Tensor,
    feature_layer: int,
    drop_class_token: bool,
) -> EncodedImages:
    layers = tower.encoder.layers
    state: TowerState | None = getattr(tower, "_dymu_state", None)
    run = layers_to_run(len(layers), feature_layer)
    hidden = family.embed(tower, pixel_values.to(next(tower.parameters()).dtype))
    bsz, n0, _ = hidden.shape
    if state is not None:
        # One image runs packed too, and so does a budget: every image then goes through the same
        # float operations whatever its batch (attention, matching and sums per image), so the choices
        # among tied and nearly tied scores, frequent on flat images, never depend on the batch.
        state.reset(bsz, n0, hidden.device, packed=state.packed)
        if state.budget is not None:  # the budget holds at the layer this call reads
            state.budget.layers = run
            state.budget.check(n0 - int(family.has_class_token), run, f" (feature layer {feature_layer})")
    try:
        for layer in layers[:run]:
            hidden = layer(hidden, None)
        if state is not None and state.cu_seqlens is not None:
            hidden, state.sizes = M.unpack(hidden, state.sizes, state.cu_seqlens)
    finally:
        if state is not None:  # a later stock tower forward (HF's own loop) must run padded
            state.cu_seqlens, state.pack_at_merge = None, False
    if state is not None:
        sizes, group_of_patch = state.sizes, state.group_of_patch
        kept = torch.stack(state.kept_per_layer, dim=1) if state.kept_per_layer else sizes.new_zeros(bsz, 0)
    else:
        sizes, group_of_patch = M.initial_groups(bsz, n0, hidden.device)
        kept = torch.full((bsz, run), n0, dtype=torch.long, device=hidden.device)
    hidden = hidden * (sizes > 0).unsqueeze(-1).to(hidden.dtype)  # clean padding
    if drop_class_token and family.has_class_token:
        # The class token sits in slot 0 forever (never merged), so dropping it shifts every
        # other token down by one.
        hidden, sizes, group_of_patch = hidden[:, 1:], sizes[:, 1:], group_of_patch[:, 1:] - 1
    return EncodedImages(tokens=hidden, sizes=sizes, group_of_patch=group_of_patch, kept_per_layer=kept)
