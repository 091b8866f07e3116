"""The vision-tower families DToMe patches layer by layer: one `TowerFamily` per stock ViT (clip.py, siglip.py
register theirs), found by a tower module's class (`family_of`, `find_towers`) or, before anything is
loaded, by a checkpoint's config model type (`family_for_model_type`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..compat import unwrap_compiled


@dataclass(frozen=True)
class TowerFamily:
    name: str
    tower_class: type  # the vision model, e.g. CLIPVisionModel: what a VLM holds, and what a bare tower loads as
    layer_class: type  # e.g. CLIPEncoderLayer
    has_class_token: bool
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # tower, pixel_values -> (B, N, D)
    # The stock preprocessing for a config, for towers saved without a preprocessor_config.json.
    default_processor: Callable[[object], object]
    # The config model types of the checkpoints that load as a bare `tower_class`: the vision model's own
    # and its dual encoder's (whose vision half `tower_class.from_pretrained` reads).
    model_types: tuple[str, ...] = ()


FAMILIES: list[TowerFamily] = []  # filled by towers/clip.py and towers/siglip.py


def register_family(family: TowerFamily) -> TowerFamily:
    FAMILIES.append(family)
    return family


def family_of(tower: nn.Module) -> TowerFamily | None:
    for family in FAMILIES:
        if isinstance(unwrap_compiled(tower), family.tower_class):
            return family
    return None


def find_towers(model: nn.Module) -> list[tuple[nn.Module, TowerFamily]]:
    """Every supported vision tower in ``model`` (the model itself, or a VLM's vision tower)."""
    found = []
    for module in model.modules():
        family = family_of(module)
        if family is not None:
            found.append((module, family))
    return found


def family_for_model_type(model_type: str) -> TowerFamily | None:
    """The family whose bare vision model a checkpoint of this config ``model_type`` loads as (None: none)."""
    return next((family for family in FAMILIES if model_type in family.model_types), None)
