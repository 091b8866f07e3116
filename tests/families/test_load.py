"""`dymu.load` on every family's demo model saved to a folder, in this environment without torchvision:
a working processor, then `dymu.generate` on an image (and a video where the family takes one)."""

import importlib.util

import pytest

import dymu
from conftest import load_image
from dymu.families import get_vlm_family
from dymu.tools.demo_models import DEMO_MODELS


@pytest.mark.parametrize("demo", DEMO_MODELS)
def test_load_gives_a_working_processor_without_torchvision(demo, tmp_path):
    assert importlib.util.find_spec("torchvision") is None  # what a CPU-only install has
    takes_video = get_vlm_family(DEMO_MODELS[demo].family).supports("video")
    model, processor = DEMO_MODELS[demo].build()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = dymu.load(tmp_path, device="cpu", dtype="float32")
    assert type(loaded) is type(model) and not loaded.training
    image = load_image("skimage_chelsea_cat.png")
    frames = [load_image(name).resize((64, 48)) for name in ("skimage_chelsea_cat.png", "synthetic_gradient.png")] * 2
    videos = [[frames]] if takes_video else None
    result = dymu.generate(loaded, loaded_processor, ["What is it?"], [[image]], videos=videos, max_new_tokens=2)
    assert result.report.new_tokens == 2 and len(result.report.visual_tokens[0]) == (2 if takes_video else 1)


def test_load_refuses_a_model_it_does_not_support(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(dymu.loading.LoadError, match="is a 'llama' model"):
        dymu.load(tmp_path)
