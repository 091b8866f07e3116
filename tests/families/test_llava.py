"""LLaVA-1.5 end to end: the demo's small random-weight model, saved and reloaded with from_pretrained."""

import math

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import dymu
from conftest import load_image
from dymu.decoders.llama import rows_processed

IMAGES = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg",
          "synthetic_gradient.png"]


@pytest.fixture(scope="session")
def llava_dir(demo_llava_dir):
    return demo_llava_dir


@pytest.fixture
def llava(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="session")
def thresholds(llava_dir):
    from conftest import IMAGES as ALL

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    paths = sorted(p for p in ALL.iterdir() if p.suffix in (".png", ".jpg"))
    processor = AutoProcessor.from_pretrained(llava_dir).image_processor
    return dymu.calibrate(model, paths, preset="mid", batch_size=8, processor=processor, progress=False)


def batch_inputs(processor, prompts, images):
    from dymu.families.prompting import chat_text

    texts = [chat_text(processor, p, len(ims)) for p, ims in zip(prompts, images)]
    flat = [im for ims in images for im in ims]
    return processor(images=flat or None, text=texts, return_tensors="pt", padding=True)


PROMPTS = ["What is in this image?", "Describe the picture in detail please.", "Count the objects."]


def prompt_images():
    return [[load_image(IMAGES[0])], [load_image(IMAGES[1]), load_image(IMAGES[3])], [load_image(IMAGES[2])]]


def test_no_merge_dymu_equals_full_and_remove_restores(llava):
    model, processor = llava
    inputs = batch_inputs(processor, PROMPTS, prompt_images())
    with torch.no_grad():
        full = model(**inputs).logits
        dymu.apply(model, [math.inf] * 6, mode="dymu")
        merged_off = model(**inputs).logits
        dymu.remove(model)
        again = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (merged_off - full)[mask].abs().max() <= 1e-5
    assert torch.equal(again, full)
    assert type(model.model).__name__ == "LlavaModel"


def test_batched_prompts_equal_each_prompt_alone(llava, thresholds):
    model, processor = llava
    dymu.apply(model, thresholds, mode="dymu")
    images = prompt_images()
    inputs = batch_inputs(processor, PROMPTS, images)
    with torch.no_grad():
        batch_logits = model(**inputs).logits
    batch = dymu.generate(model, processor, PROMPTS, images, max_new_tokens=6, output_scores=True)
    assert sum(map(len, batch.report.visual_tokens)) == 4
    assert all(n < 256 for ns in batch.report.visual_tokens for n in ns)
    for i, prompt in enumerate(PROMPTS):
        alone_inputs = batch_inputs(processor, [prompt], [images[i]])
        with torch.no_grad():
            alone_logits = model(**alone_inputs).logits[0]
        n = alone_logits.shape[0]
        assert (batch_logits[i, -n:] - alone_logits).abs().max() <= 1e-5
        alone = dymu.generate(model, processor, [prompt], [images[i]], max_new_tokens=6, output_scores=True)
        assert alone.answers[0] == batch.answers[i]
        assert alone.report.visual_tokens[0] == batch.report.visual_tokens[i]
        for step_alone, step_batch in zip(alone.scores, batch.scores):
            assert (step_alone[0] - step_batch[i]).abs().max() <= 1e-5


def test_vtu_really_runs_the_mlp_on_fewer_rows(llava, thresholds):
    model, processor = llava
    dymu.apply(model, thresholds, mode="dymu")
    inputs = batch_inputs(processor, PROMPTS[:1], [[load_image(IMAGES[0])]])
    with torch.no_grad():
        model(**inputs)
    rows = rows_processed(model)
    kept = int(model.model._dymu.last_encoded.num_tokens[0])
    text = inputs["input_ids"].shape[1] - 256
    layers = model.config.text_config.num_hidden_layers
    assert rows["mlp"] == layers * (text + kept) < rows["positions"]


def test_stock_generate_works_in_dymu_mode_and_with_beams(llava, thresholds):
    model, processor = llava
    dymu.apply(model, thresholds, mode="dymu")
    images = [[load_image(IMAGES[2])]]
    inputs = batch_inputs(processor, PROMPTS[:1], images)
    stock_call = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    ours = dymu.generate(model, processor, PROMPTS[:1], images, max_new_tokens=5)
    assert torch.equal(stock_call, ours.sequences)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2


@pytest.mark.parametrize("mode", ["dtome", "tome", "tome-no-vtu", "downsample"])
def test_ablation_modes_run_with_fewer_visual_tokens(llava, thresholds, mode):
    model, processor = llava
    if mode.startswith("tome"):
        dymu.apply(model, r=8, mode="tome", tome_vtu=mode == "tome")
    else:
        dymu.apply(model, thresholds, mode=mode)
    images = prompt_images()
    result = dymu.generate(model, processor, PROMPTS, images, max_new_tokens=4)
    assert result.report.mode == mode.removesuffix("-no-vtu")
    counts = [n for ns in result.report.visual_tokens for n in ns]
    full = [n for ns in result.report.full_tokens for n in ns]
    assert len(counts) == 4 and all(n < f for n, f in zip(counts, full))
    assert result.report.encoder_s > 0 and result.report.prefill_s > 0
    if mode == "downsample":
        side = round(math.sqrt(thresholds.tokens_kept_mean[-1]))
        assert counts == [side * side] * 4 and result.report.image_size == side * 14


def test_modes_without_vtu_refuse_the_stock_prompt(llava, thresholds):
    model, processor = llava
    dymu.apply(model, thresholds, mode="dtome")
    inputs = batch_inputs(processor, PROMPTS[:1], [[load_image(IMAGES[2])]])
    with pytest.raises(ValueError, match="one placeholder per kept token"):
        model(**inputs)


def test_apply_errors(llava, thresholds):
    model, _ = llava
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        dymu.apply(model, thresholds, mode="fast")
    with pytest.raises(ValueError, match="mode 'tome' needs r"):
        dymu.apply(model, mode="tome")
    with pytest.raises(ValueError, match="needs thresholds"):
        dymu.apply(model, mode="dymu")


def test_a_prompt_without_images_in_a_batch_with_images(llava, thresholds):
    model, processor = llava
    dymu.apply(model, thresholds, mode="dymu")
    image = load_image(IMAGES[2])
    batch = dymu.generate(model, processor, ["Hello there", PROMPTS[0]], [[], [image]], max_new_tokens=3,
                          output_scores=True)
    assert batch.report.visual_tokens[0] == [] and len(batch.report.visual_tokens[1]) == 1
    alone = dymu.generate(model, processor, ["Hello there"], [[]], max_new_tokens=3, output_scores=True)
    assert alone.answers[0] == batch.answers[0]
    assert (alone.scores[0][0] - batch.scores[0][0]).abs().max() <= 1e-5
