"""The VLM family adapters (one module per family) and their registry: see `dymu.families.base`."""

from .base import (
    BUILTIN_FAMILIES,
    PreparedInputs,
    Request,
    VLMFamily,
    family_model_types,
    get_vlm_family,
    register_vlm_family,
    supported_vlm_names,
    vlm_families,
    vlm_family_for,
    vlm_family_of,
)
from .qwen_processors import unpatchify  # a Qwen VL processor's patches -> pixels (`dymu.tools.analyze` shows it)

__all__ = ["BUILTIN_FAMILIES", "PreparedInputs", "Request", "VLMFamily", "family_model_types", "get_vlm_family",
           "register_vlm_family", "supported_vlm_names", "vlm_families", "vlm_family_for", "vlm_family_of",
           "unpatchify"]
