"""The tower-family registry: every family declares the config model types it loads, and `load_vision_model`
finds a bare tower's class through it (no model class named outside towers/)."""

from __future__ import annotations

import pytest
import torch

from dymu.loading import LoadError, load_vision_model
from dymu.towers.registry import FAMILIES, family_for_model_type, family_of

CPU = (torch.device("cpu"), torch.float32)


def test_every_family_loads_its_own_vision_config_type():
    assert FAMILIES, "importing dymu.towers registers the built-in families"
    for family in FAMILIES:
        own = family.tower_class.config_class.model_type  # e.g. "clip_vision_model"
        assert own in family.model_types
        for model_type in family.model_types:
            assert family_for_model_type(model_type) is family
    assert family_for_model_type("clip").name == "CLIP" and family_for_model_type("siglip").name == "SigLIP"
    assert family_for_model_type("llama") is None


def test_a_saved_tower_loads_as_its_family(tower_dir, family):
    model, _ = load_vision_model(str(tower_dir), *CPU)
    found = family_of(model)
    assert found is not None and type(model) is found.tower_class
    assert found.name.lower() == family and model.config.model_type in found.model_types


def test_an_unknown_model_type_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(LoadError) as error:
        load_vision_model(str(tmp_path), *CPU)
    assert str(error.value) == f"{tmp_path} is a 'bert' model, not a CLIP/SigLIP vision model or a VLM with one."


@pytest.mark.parametrize("dual", ["clip", "siglip"])
def test_a_dual_encoder_checkpoint_loads_its_vision_half(dual, tmp_path):
    """openai/clip-vit-large-patch14-336 and the SigLIP checkpoints hold both encoders: the bare tower
    takes the vision half, equal to the dual model's own, and leaves the text half unused on purpose;
    a weight missing from the vision half is still refused."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    config_class, model_class = {"clip": (CLIPConfig, CLIPModel), "siglip": (SiglipConfig, SiglipModel)}[dual]
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    whole = model_class(config_class(text_config=small, vision_config=dict(small, image_size=56, patch_size=14))).eval()
    whole.save_pretrained(tmp_path)
    tower, _ = load_vision_model(str(tmp_path), *CPU)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(tower(pixel_values=pixels).last_hidden_state,
                           whole.vision_model(pixel_values=pixels).last_hidden_state)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if k.startswith("vision_model.") and k.endswith("fc1.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(LoadError, match="missing from the checkpoint"):
        load_vision_model(str(tmp_path), *CPU)
