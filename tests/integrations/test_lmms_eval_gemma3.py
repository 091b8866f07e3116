"""The lmms-eval plugin on a tiny random Gemma 3 (dymu.families.demos.gemma3): loglikelihood in mode full
equals a plain forward of the stock model, and generate_until in mode dymu answers as `dymu.generate`
does, with the three token counts per image."""

import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.integrations.lmms_eval import cut_at_stop_strings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plugin_helpers import instance as _instance, plugin as _plugin, plugin_documents  # noqa: E402

pytest.importorskip("lmms_eval")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    from dymu.images import sample_images
    from dymu.tools.demo import save_demo_model
    from dymu.families.demos.gemma3 import build_gemma3_demo_model

    model, processor = build_gemma3_demo_model()
    folder = save_demo_model(model, processor, tmp_path_factory.mktemp("gemma3"))
    dymu.calibrate(model, sample_images(), processor=processor, batch_size=6, progress=False,
                   warn=lambda message: None).save(folder / "mid.json")
    return folder


@pytest.fixture(scope="module")
def docs():
    return plugin_documents()


def test_loglikelihood_in_mode_full_equals_a_plain_forward(gemma3_dir, docs):
    from dymu.families.prompting import chat_text

    visual = lambda doc: [doc["image"]]
    asks = [("What is in this image?", " a cat", 0), ("What colour is it?", " white", 1)]
    requests = [_instance("loglikelihood", (q, a, visual, d, "t", "test"), d) for q, a, d in asks]
    got = _plugin(gemma3_dir, docs, mode="full", batch_size=2).loglikelihood(requests)
    model, processor = dymu.load(str(gemma3_dir), device="cpu", dtype="float32")
    for (question, answer, doc_id), result in zip(asks, got):
        prompt = chat_text(processor, question, 1)
        n_prompt = len(processor.tokenizer(prompt)["input_ids"])
        n_answer = len(processor.tokenizer(prompt + answer)["input_ids"]) - n_prompt
        inputs = processor(images=[docs[doc_id]["image"]], text=prompt + answer, return_tensors="pt")
        with torch.no_grad():
            logp = model(**inputs).logits[0, -n_answer - 1 : -1].log_softmax(-1)
        target = inputs["input_ids"][0, -n_answer:]
        assert result.text[0] == pytest.approx(-logp.gather(1, target[:, None]).sum().item(), abs=1e-4)
        assert result.token_counts.visual_tokens == [64]


def test_generate_until_in_mode_dymu_answers_as_dymu_generate(gemma3_dir, docs):
    gen = {"max_new_tokens": 4, "until": ["\n"], "do_sample": False}
    questions = ["What is in this image? Describe it.", "What colour?", "Count the objects."]
    requests = [_instance("generate_until", (q, dict(gen), lambda doc: [doc["image"]], d, "t", "test"), d)
                for d, q in enumerate(questions)]
    out = _plugin(gemma3_dir, docs, mode="dymu", thresholds=str(gemma3_dir / "mid.json"), batch_size=2
                  ).generate_until(requests)
    model, processor = dymu.load(str(gemma3_dir), device="cpu", dtype="float32")
    dymu.apply(model, dymu.Thresholds.load(gemma3_dir / "mid.json"))
    for question, doc, got in zip(questions, docs, out):
        ref = dymu.generate(model, processor, [question], [[doc["image"]]], max_new_tokens=4)
        assert got.text == cut_at_stop_strings(ref.answers[0], ["\n"])
        sample = got.token_counts.to_dict()
        for name in ("encoder_tokens", "llm_rows", "stock_positions"):
            assert sample[name] == getattr(ref.report, name)[0], name
    assert out[1].token_counts.to_dict()["llm_rows"][0] < 64  # the blank image merges
