"""CLIP vision tower (LLaVA-1.5's encoder): a class token in slot 0, pre-layernorm on the embeddings."""

from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel

from .registry import TowerFamily, register_family


def _processor(config):
    # The PIL processor: the default one needs torchvision, which we do not depend on.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _embed(tower, pixel_values):
    return tower.pre_layrnorm(tower.embeddings(pixel_values))


CLIP = register_family(
    TowerFamily(
        name="CLIP",
        tower_class=CLIPVisionModel,
        layer_class=CLIPEncoderLayer,
        has_class_token=True,
        embed=_embed,
        default_processor=_processor,
        model_types=("clip_vision_model", "clip"),
    )
)
