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


def tower_identity(arch: dict, *, family: str, num_layers: int, class_token: bool, model_ref: str | None = None,
                   named=None, patches_per_image: int | None = None, **more) -> dict:
    """What a thresholds file records about the tower it was calibrated on (``encoder``): the model (``model_ref``,
    else the ``_name_or_path`` of the config ``named``), the family, a short hash of the tower's shape ``arch``
    (a file calibrated on another shape is refused), the layers or blocks that merge, the patches per image
    (None where units vary per image or tile: presets are then fractions of each one's units), whether the
    tower has a class token, and what else the family records (``more``: merge point, unit side)."""
    import hashlib
    import json

    return {"model": model_ref or getattr(named, "_name_or_path", "") or "", "family": family,
            "config_hash": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16],
            "num_layers": num_layers, "patches_per_image": patches_per_image, "class_token": class_token, **more}
