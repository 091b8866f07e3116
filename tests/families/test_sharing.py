"""A patched LLaVA that is safe to share: apply is all or nothing, deep copies work, threads get their own results."""

import copy
import threading

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import dymu
from conftest import IMAGES, load_image

NAMES = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg",
         "synthetic_gradient.png", "synthetic_noise.png"]


@pytest.fixture(scope="module")
def thresholds(demo_llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(demo_llava_dir).eval()
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))[:16]
    processor = AutoProcessor.from_pretrained(demo_llava_dir).image_processor
    return dymu.calibrate(model, paths, preset="mid", batch_size=8, processor=processor, progress=False)


def load(folder, attn="sdpa"):
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


def test_apply_is_all_or_nothing(demo_llava_dir, thresholds):
    # A refused apply used to leave the tower patched (exact on sdpa) or the model unpatched (tome, no r).
    model, processor = load(demo_llava_dir, "sdpa")
    dymu.apply(model, thresholds, mode="dymu")
    images = [[load_image(NAMES[1])]]
    before = dymu.generate(model, processor, ["What is it?"], images, max_new_tokens=3)
    for bad in (dict(mode="dymu", vtu_attention="exact"),  # Eq. 10 is eager only; this model is sdpa
                dict(mode="dtome", vtu_attention="fastest"),
                dict(mode="tome"),  # no r
                dict(mode="dymu", vtu_attention="fastest")):
        with pytest.raises(ValueError):
            dymu.apply(model, thresholds, **bad)
        assert dymu.api.settings_of(model).mode == "dymu" and type(model.model).__name__ == "DyMULlavaModel"
        assert model.model.vision_tower._dymu_state.thresholds == \
            [float(t) for t in thresholds.thresholds]
    after = dymu.generate(model, processor, ["What is it?"], images, max_new_tokens=3)
    assert after.report.mode == "dymu" and after.report.visual_tokens == before.report.visual_tokens
    assert torch.equal(after.sequences, before.sequences)
    with pytest.raises(ValueError):  # a bare tower keeps its patch too (wrong length)
        dymu.apply(model.model.vision_tower, [0.9, 0.9])
    assert model.model.vision_tower._dymu_state.thresholds[0] == thresholds.thresholds[0]


def test_deepcopy_of_a_patched_model(demo_llava_dir, thresholds):
    # The copy's hooks wrote into the original's state, so the copy failed on first use.
    model, processor = load(demo_llava_dir, "eager")
    dymu.apply(model, thresholds, mode="dymu")
    twin = copy.deepcopy(model)
    images = [[load_image(NAMES[1]), load_image(NAMES[3])]]
    ours = dymu.generate(model, processor, ["Describe."], images, max_new_tokens=4, output_scores=True)
    theirs = dymu.generate(twin, processor, ["Describe."], images, max_new_tokens=4, output_scores=True)
    assert theirs.report.visual_tokens == ours.report.visual_tokens
    assert all(n < 256 for n in ours.report.visual_tokens[0])  # really merged
    assert torch.equal(theirs.sequences, ours.sequences)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(ours.scores, theirs.scores))
    from dymu.decoders.llama import rows_processed
    from dymu.families.prompting import chat_text

    inputs = processor(images=images[0], text=[chat_text(processor, "Describe.", 2)], return_tensors="pt")
    with torch.no_grad():
        twin(**inputs)
    rows = rows_processed(twin)  # the copy's own VTU row counters
    assert 0 < rows["mlp"] < rows["positions"]
    dymu.remove(twin)  # undoing the copy leaves the original patched
    assert type(model.model).__name__ == "DyMULlavaModel" and type(twin.model).__name__ == "LlavaModel"
    again = dymu.generate(model, processor, ["Describe."], images, max_new_tokens=4)
    assert torch.equal(again.sequences, ours.sequences)


def test_two_threads_get_the_results_of_sequential_calls(demo_llava_dir, thresholds):
    # 2 threads x 10 calls on one patched model; each call must get what it gets alone.
    model, processor = load(demo_llava_dir, "sdpa")
    dymu.apply(model, thresholds, mode="dymu")
    images = {name: load_image(name) for name in NAMES}
    calls = [(f"Question {k}?", [images[NAMES[k % len(NAMES)]]]) for k in range(20)]

    def run(k):
        prompt, ims = calls[k]
        result = dymu.generate(model, processor, [prompt], [ims], max_new_tokens=3)
        return result.report.visual_tokens, result.answers, result.sequences

    sequential = [run(k) for k in range(20)]
    assert len({str(v) for v, _, _ in sequential}) > 1  # the calls really differ
    threaded, errors = [None] * 20, []

    def worker(ks):
        for k in ks:
            try:
                threaded[k] = run(k)
            except Exception as err:  # noqa: BLE001 - collected and reported below
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(range(t, 20, 2),)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (v1, a1, s1), (v2, a2, s2) in zip(sequential, threaded):
        assert v1 == v2 and a1 == a2 and torch.equal(s1, s2)
