"""The public entry points: `apply`, `remove`, `encode`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .patch import clip as _clip  # noqa: F401  (registers the CLIP family)
from .patch import siglip as _siglip  # noqa: F401  (registers the SigLIP family)
from .patch.encoder import (
    FAMILIES,
    EncodedImages,
    TowerFamily,
    apply_dtome,
    encode_with_tower,
    find_towers,
    remove_dtome,
)


def _single_tower(model: nn.Module) -> tuple[nn.Module, TowerFamily]:
    towers = find_towers(model)
    if not towers:
        names = ", ".join(f.tower_class.__name__ for f in FAMILIES)
        raise ValueError(f"{type(model).__name__} has no supported vision tower (supported: {names}).")
    if len(towers) > 1:
        raise ValueError(f"{type(model).__name__} has {len(towers)} vision towers; pass the one to use.")
    return towers[0]


def _threshold_values(thresholds, tower: nn.Module):
    """Accept a Thresholds object (validated against the tower), a list, a tensor or one number."""
    if hasattr(thresholds, "check_compatible"):
        thresholds.check_compatible(tower)
        return thresholds.thresholds
    return thresholds


def apply(
    model: nn.Module,
    thresholds=None,
    *,
    r: int | Sequence[int] | None = None,
) -> nn.Module:
    """Patch ``model`` in place with DyMU and return it.

    ``model`` is a CLIP or SigLIP vision model, or a model that contains one (a VLM). The vision
    tower merges with ``thresholds`` (DToMe: one number, one per layer, or a `Thresholds` file
    object; +inf disables merging at a layer) or ``r`` (plain ToMe: a fixed number of merges per
    image and layer). Undo with `remove`.
    """
    tower, family = _single_tower(model)
    if thresholds is not None:
        thresholds = _threshold_values(thresholds, tower)
    apply_dtome(tower, family, thresholds=thresholds, r=r)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: stock classes, no hooks, no DyMU state. Weights were never touched."""
    for tower, _ in find_towers(model):
        remove_dtome(tower)
    return model


def default_feature_layer(model: nn.Module, family: TowerFamily) -> tuple[int, bool]:
    """(feature layer, drop class token) as the VLM reads them, else LLaVA-1.5 / LLaVA-OV defaults."""
    config = getattr(model, "config", None)
    layer = getattr(config, "vision_feature_layer", None)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if isinstance(layer, int) and strategy in ("default", "full"):
        return layer, strategy == "default"
    return (-2, True) if family.has_class_token else (-1, False)


@torch.no_grad()
def encode(
    model: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int | None = None,
    drop_class_token: bool | None = None,
) -> EncodedImages:
    """Encode images with the (patched or stock) vision tower of ``model``.

    Returns per image the tokens at ``feature_layer`` (``hidden_states[feature_layer]`` in HF
    terms), their sizes, the group map of the original patches and the tokens kept after every
    layer. Layers after the feature layer are not computed. Defaults follow the VLM's config
    (``vision_feature_layer`` / ``vision_feature_select_strategy``) when ``model`` is a VLM, else
    -2 without the class token for CLIP (LLaVA-1.5) and -1 for SigLIP (LLaVA-OneVision).
    """
    tower, family = _single_tower(model)
    default_layer, default_drop = default_feature_layer(model, family)
    feature_layer = default_layer if feature_layer is None else feature_layer
    drop_class_token = default_drop if drop_class_token is None else drop_class_token
    return encode_with_tower(tower, family, pixel_values, feature_layer, drop_class_token)
