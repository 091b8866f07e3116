"""SigLIP vision tower (LLaVA-OneVision's encoder): no class token, no pre-layernorm."""

from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionModel

from .registry import TowerFamily, register_family


def _processor(config):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})


def _embed(tower, pixel_values):
    return tower.embeddings(pixel_values)


SIGLIP = register_family(
    TowerFamily(
        name="SigLIP",
        tower_class=SiglipVisionModel,
        layer_class=SiglipEncoderLayer,
        has_class_token=False,
        embed=_embed,
        default_processor=_processor,
        model_types=("siglip_vision_model", "siglip"),
    )
)
