"""`dymu.encode` and `dymu.generate` from several threads on one patched model: every call gets the
result it gets alone (the patched layers keep the running forward's state on the model, so calls on
one model take a per-model lock: dymu/locks.py)."""

from __future__ import annotations

import threading

import pytest
import torch

import dymu
from conftest import MIXED_IMAGES, load_image
from dymu.families.demos.llava import build_demo_anyres_model, build_demo_model
from dymu.families.demos.qwen import build_qwen_demo_model

ROUNDS = 20
# One threshold for every layer / block: on these random-weight towers it merges flat images much
# more than busy ones, so consecutive calls differ (a call reading another's state would show).
BUILDERS = {
    "llava": (build_demo_model, 0.9),
    "onevision": (lambda: build_demo_anyres_model("onevision"), 0.9),
    "qwen2_5_vl": (lambda: build_qwen_demo_model("qwen2_5_vl"), 0.9),
}


def _encode_call(model, processor, image):
    """One dymu.encode call -> what it returned, as plain data."""
    if hasattr(processor, "video_token") and hasattr(model.model, "visual"):  # a Qwen VL: its own inputs
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        out = dymu.encode(model, inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        return out.kept_per_segment.tolist(), out.group_of_unit.tolist(), out.features
    out = dymu.encode(model, [image])  # the tower family's stock processor (AnyRes: the base crop)
    return out.num_tokens.tolist(), out.group_of_patch.tolist(), out.tokens


def _generate_call(model, processor, image):
    out = dymu.generate(model, processor, ["What is it?"], [[image]], max_new_tokens=3)
    return out.report.visual_tokens, out.answers, out.sequences


def _same(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _run_threads(jobs):
    """Run jobs[k]() for every k on 2 threads (alternating); results in job order, errors collected."""
    results, errors = [None] * len(jobs), []

    def worker(ks):
        for k in ks:
            try:
                results[k] = jobs[k]()
            except Exception as err:  # noqa: BLE001 - collected and reported by the test
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(range(t, len(jobs), 2),)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.fixture(scope="module", params=list(BUILDERS))
def patched(request):
    build, threshold = BUILDERS[request.param]
    model, processor = build()
    processor.tokenizer.padding_side = "left"
    dymu.apply(model, threshold)
    images = [load_image(name) for name in MIXED_IMAGES[:4]]
    return model, processor, images


def test_two_threads_encoding_get_the_sequential_results(patched):
    model, processor, images = patched
    jobs = [lambda k=k: _encode_call(model, processor, images[k % len(images)]) for k in range(ROUNDS * 2)]
    sequential = [job() for job in jobs]
    assert len({str(counts) for counts, _, _ in sequential}) > 1  # the calls really differ
    threaded, errors = _run_threads(jobs)
    assert not errors, errors
    assert all(_same(a, b) for a, b in zip(sequential, threaded))


def test_encode_beside_generate_gets_the_sequential_results(patched):
    model, processor, images = patched
    jobs = []
    for k in range(ROUNDS):
        image = images[k % len(images)]
        jobs += [lambda image=image: _encode_call(model, processor, image),
                 lambda image=image: _generate_call(model, processor, image)]
    sequential = [job() for job in jobs]
    threaded, errors = _run_threads(jobs)  # one thread encodes while the other generates
    assert not errors, errors
    assert all(_same(a, b) for a, b in zip(sequential, threaded))
