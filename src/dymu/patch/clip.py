"""CLIP vision tower (LLaVA-1.5's encoder): a class token in slot 0, pre-layernorm on the embeddings."""

from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel

from .encoder import TowerFamily, register_family


def _embed(tower, pixel_values):
    return tower.pre_layrnorm(tower.embeddings(pixel_values))


CLIP = register_family(
    TowerFamily(
        name="CLIP",
        tower_class=CLIPVisionModel,
        layer_class=CLIPEncoderLayer,
        has_class_token=True,
        embed=_embed,
    )
)
