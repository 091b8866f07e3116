"""The lmms-eval plugin: found through the entry point alone, run by lmms-eval's own entry points
on tiny local tasks (tests/integrations/lmms_eval_tasks) over the demo LLaVA, in modes full and
dymu, in one process and in two data-parallel processes; loglikelihood against a plain forward."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import ImageFile

from conftest import load_image
from plugin_helpers import instance as _instance, plugin as _plugin, plugin_documents

# lmms-eval sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES = True when its task module is
# imported; the rest of the suite checks that truncated images are refused, so every test here
# puts the flag back.
PIL_LOAD_TRUNCATED = ImageFile.LOAD_TRUNCATED_IMAGES

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("CI"):  # make test installs it; CI must never skip these
        raise ImportError("lmms-eval is not installed, but CI needs it: `make test` installs it "
                          "(pip install --no-deps lmms-eval==0.7.3 next to dymu[test])")
    pytest.skip("lmms-eval is not installed (pip install -e '.[eval]', or the CPU set in docs/install.md)",
                allow_module_level=True)

from dymu.integrations.lmms_eval import (
    cut_at_stop_strings,
    generation_kwargs,
    length_sorted_batches,
    visual_token_summary,
)

ImageFile.LOAD_TRUNCATED_IMAGES = PIL_LOAD_TRUNCATED


@pytest.fixture(autouse=True)
def keep_pil_strict():
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = PIL_LOAD_TRUNCATED


TASKS = Path(__file__).parent / "lmms_eval_tasks"
BOTH = "dymu_tiny_vqa,dymu_tiny_mc"


# --- pure helpers ------------------------------------------------------------------------------


def test_length_sorted_batches_cover_every_request_once_grouped_longest_first():
    rng = random.Random(0)
    lengths = [rng.randrange(1, 50) for _ in range(37)]
    keys = [rng.choice("abc") for _ in lengths]
    batches = length_sorted_batches(lengths, keys, 4)
    assert sorted(i for b in batches for i in b) == list(range(37))
    for batch in batches:
        assert len(batch) <= 4 and len({keys[i] for i in batch}) == 1
    for key in "abc":
        order = [i for b in batches for i in b if keys[i] == key]
        assert [lengths[i] for i in order] == sorted((lengths[i] for i in order), reverse=True)


def test_cut_at_stop_strings():
    assert cut_at_stop_strings("a cat\nUSER: more", ["\n", "USER:"]) == "a cat"
    assert cut_at_stop_strings("a cat. USER: x\n", ["\n", "USER:"]) == "a cat. "
    assert cut_at_stop_strings("a cat", []) == "a cat"


def test_generation_kwargs_follow_the_task():
    assert generation_kwargs({"max_new_tokens": 16, "temperature": 0, "do_sample": False, "top_p": None}, 128) == (
        {"max_new_tokens": 16, "do_sample": False}, [])
    assert generation_kwargs({"temperature": 0.2, "do_sample": False}, 128)[0] == {"max_new_tokens": 128, "do_sample": False}
    assert generation_kwargs({"temperature": 0.2, "top_p": 0.9}, 128)[0] == {
        "max_new_tokens": 128, "do_sample": True, "temperature": 0.2, "top_p": 0.9}
    assert generation_kwargs({"num_beams": 3, "image_aspect_ratio": "pad"}, 8) == (
        {"max_new_tokens": 8, "do_sample": False, "num_beams": 3}, ["image_aspect_ratio"])


def test_visual_token_summary_is_per_image_and_per_video():
    per_doc = {("a", 0): [("image", 10, 256)], ("a", 1): [("image", 20, 256), ("image", 30, 256)],
               ("b", 0): [("image", 256, 256)], ("b", 1): []}
    summary = visual_token_summary(per_doc)
    assert summary["visual_tokens"] == pytest.approx((10 + 20 + 30 + 256) / 4)
    assert summary["visual_tokens/a"] == pytest.approx(20.0) and summary["visual_tokens/b"] == 256.0
    assert summary["full_visual_tokens"] == 256.0 and summary["images"] == 4.0
    assert summary["images/a"] == 3.0 and summary["images/b"] == 1.0
    assert not any(key.startswith(("video", "full_video")) for key in summary)
    assert visual_token_summary({("a", 0): []}) == {}
    mixed = visual_token_summary({("v", 0): [("image", 100, 729), ("video", 900, 1568)], ("v", 1): [("video", 700, 1568)]})
    assert mixed["visual_tokens"] == 100 and mixed["images"] == 1 and mixed["full_visual_tokens"] == 729
    assert mixed["video_tokens"] == 800 and mixed["videos"] == 2 and mixed["full_video_tokens"] == 1568
    assert mixed["video_tokens/v"] == 800 and mixed["videos/v"] == 2


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory, demo_llava_dir):
    """The working folder of the runs: the tasks' dataset (dymu_tiny.parquet, images embedded,
    built from questions.json and tests/data/images) and `mid` thresholds for the demo model."""
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dymu.images import open_image
    from dymu.tools.calibration import calibrate
    from dymu.tools.demo import demo_image_paths

    folder = tmp_path_factory.mktemp("lmms_eval_run")
    rows = json.loads((TASKS / "questions.json").read_text())
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "image"}
    columns["image"] = [load_image(row["image"]) for row in rows]
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).to_parquet(folder / "dymu_tiny.parquet")

    model = LlavaForConditionalGeneration.from_pretrained(demo_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(demo_llava_dir)
    images = [open_image(p) for p in demo_image_paths()]
    thresholds = calibrate(model, images, preset="mid", batch_size=len(images), progress=False,
                           processor=processor.image_processor, model_ref=str(demo_llava_dir))
    thresholds.save(folder / "mid.json")
    return folder


def _env(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"}  # the entry point alone
    env.update(HF_HOME=str(folder / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH")] if p))
    return env


def _model_args(model_dir, mode: str, thresholds=None) -> str:
    args = f"pretrained={model_dir},mode={mode},batch_size=4"
    return args + (f",thresholds={thresholds}" if thresholds is not None else "")


def _run_cli(folder: Path, launcher: list[str], model_args: str, out: str) -> dict:
    """lmms-eval's command line in a child process; returns the results JSON and the samples."""
    cmd = [*launcher, "--model", "dymu", "--model_args", model_args, "--tasks", BOTH, "--include_path", str(TASKS),
           "--output_path", str(folder / out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=folder, env=_env(folder), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results_file] = glob.glob(str(folder / out / "*" / "*_results.json"))
    results = json.loads(Path(results_file).read_text())
    samples = {}
    for task in BOTH.split(","):
        [path] = glob.glob(str(folder / out / "*" / f"*_samples_{task}.jsonl"))
        samples[task] = {s["doc_id"]: s for s in map(json.loads, Path(path).read_text().splitlines())}
    results["stdout"] = proc.stdout
    return {"results": results, "samples": samples}


def _simple_evaluate(folder: Path, model_args: str, tasks: str, out: str | None = None) -> dict:
    """lmms-eval's Python entry point in this process (one process); with ``out``, the results and
    samples are written by lmms-eval's own EvaluationTracker, as its command line does."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        for key, value in _env(folder).items():
            if key.startswith(("HF_", "TOKENIZERS")):
                mp.setenv(key, value)
        mp.chdir(folder)  # the task YAMLs name their parquet file relative to the working folder
        tasks_here = TaskManager(include_path=str(TASKS), include_defaults=False)  # no need to index lmms-eval's own
        tracker = EvaluationTracker(output_path=str(folder / out)) if out else None
        results = simple_evaluate(model="dymu", model_args=model_args, tasks=tasks.split(","), log_samples=True,
                                  task_manager=tasks_here, bootstrap_iters=0, evaluation_tracker=tracker)
    samples = results.pop("samples")
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=get_datetime_str())
        assert glob.glob(str(folder / out / "*" / "*_results.json")), "lmms-eval did not write the results"
    results["stdout"] = stdout.getvalue()
    return {"results": results, "samples": {task: {s["doc_id"]: s for s in docs} for task, docs in samples.items()}}


@pytest.fixture(scope="session")
def full_run(eval_dir, demo_llava_dir):
    """Mode full through `simple_evaluate`, in this process."""
    return _simple_evaluate(eval_dir, _model_args(demo_llava_dir, "full"), BOTH, out="full")


@pytest.fixture(scope="session")
def dymu_run_2proc(eval_dir, demo_llava_dir):
    """Mode dymu, `accelerate launch ... -m lmms_eval` over 2 data-parallel processes, in child
    processes whose environment names no plugin: lmms-eval can only find `dymu` through the
    `lmms_eval.models` entry point. `accelerate launch --cpu --num_processes 2` would start only one
    process here (accelerate's CPU multi-process launch goes through mpirun); on a machine without
    CUDA, `--multi_gpu` starts 2 that accelerate runs on the CPU with gloo."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "lmms_eval"]
    return _run_cli(eval_dir, launcher, _model_args(demo_llava_dir, "dymu", eval_dir / "mid.json"), "dymu_2proc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tokens(sample: dict) -> list[list[int]]:
    return [entry["visual_tokens"] for entry in sample["token_counts"]]


def _answer(sample: dict) -> str:
    """A generate_until sample's answer (the samples file stores a one-answer list as the answer)."""
    resps = sample["filtered_resps"]
    return resps if isinstance(resps, str) else resps[0]


def test_full_and_dymu_through_lmms_eval(full_run, dymu_run_2proc):
    for run, mode in ((full_run, "full"), (dymu_run_2proc, "dymu")):
        results = run["results"]
        assert results["config"]["model"] == "dymu" and f"mode={mode}" in results["config"]["model_args"]
        assert results["config"]["model_backend"].startswith("dymu.integrations.lmms_eval.DyMU")
        vqa, mc = results["results"]["dymu_tiny_vqa"], results["results"]["dymu_tiny_mc"]
        # the metrics are the tasks' own, computed from the per-sample answers
        samples = run["samples"]["dymu_tiny_vqa"]
        assert len(samples) == 6
        expected = sum(_answer(s).strip().lower() == s["target"] for s in samples.values()) / 6
        assert vqa["exact_match,none"] == pytest.approx(expected)
        assert 0.0 <= mc["acc,none"] <= 1.0 and len(run["samples"]["dymu_tiny_mc"]) == 6
        # every sample logs its visual tokens; the run reports their mean next to the metrics
        per_image = [n for task in run["samples"].values() for s in task.values() for n in _tokens(s)[0]]
        for task in run["samples"].values():
            for s in task.values():
                assert all(t == _tokens(s)[0] for t in _tokens(s))  # every choice of a doc: the same image
                assert s["token_counts"][0]["full_visual_tokens"] == [256]
                # the names every dymu tool uses (the older ones above kept)
                assert s["token_counts"][0]["stock_positions"] == [256]
                assert s["token_counts"][0]["llm_rows"] == _tokens(s)[0]
                assert len(s["token_counts"][0]["encoder_tokens"]) == 1
                assert s["token_counts"][0]["visual_kinds"] == ["image"]
        throughput = results["throughput"]
        assert throughput["avg_visual_tokens"] == pytest.approx(sum(per_image) / len(per_image))
        assert throughput["avg_full_visual_tokens"] == 256 and throughput["avg_images"] == 12
        assert f"dymu [{mode}]:" in results["stdout"]
    assert full_run["results"]["throughput"]["avg_visual_tokens"] == 256
    assert dymu_run_2proc["results"]["throughput"]["avg_visual_tokens"] < 200  # mid keeps ~92 of 256 on average
    assert "visual_tokens/dymu_tiny_vqa" in {k.removeprefix("avg_") for k in dymu_run_2proc["results"]["throughput"]}


def test_two_processes_equal_one(eval_dir, demo_llava_dir, dymu_run_2proc):
    one = _simple_evaluate(eval_dir, _model_args(demo_llava_dir, "dymu", eval_dir / "mid.json"), BOTH)
    two = dymu_run_2proc
    assert one["results"]["throughput"]["avg_visual_tokens"] == pytest.approx(
        two["results"]["throughput"]["avg_visual_tokens"])
    for task in BOTH.split(","):
        assert set(one["samples"][task]) == set(two["samples"][task]) == set(range(6))
        for doc_id, s1 in one["samples"][task].items():
            s2 = two["samples"][task][doc_id]
            assert _tokens(s1) == _tokens(s2)
            if task == "dymu_tiny_vqa":
                assert _answer(s1) == _answer(s2)
            else:  # (nll, greedy) per choice; the JSON file holds them as strings
                for (nll1, greedy1), (nll2, greedy2) in zip(s1["filtered_resps"], s2["filtered_resps"]):
                    assert float(nll1) == pytest.approx(float(nll2), rel=1e-5) and str(greedy1) == str(greedy2)
        metric = "exact_match,none" if task == "dymu_tiny_vqa" else "acc,none"
        assert one["results"]["results"][task][metric] == two["results"]["results"][task][metric]


def test_multiple_choice_with_infinite_thresholds_equals_full(eval_dir, demo_llava_dir, full_run):
    off = _simple_evaluate(eval_dir, _model_args(demo_llava_dir, "dymu", "inf"), "dymu_tiny_mc")
    full = full_run["samples"]["dymu_tiny_mc"]
    for doc_id, sample in off["samples"]["dymu_tiny_mc"].items():
        assert _tokens(sample) == _tokens(full[doc_id])  # nothing merged: 256 per image
        for (nll, greedy), (nll_full, greedy_full) in zip(sample["filtered_resps"], full[doc_id]["filtered_resps"]):
            assert float(nll) == pytest.approx(float(nll_full), abs=1e-4) and str(greedy) == str(greedy_full)
    assert off["results"]["results"]["dymu_tiny_mc"]["acc,none"] == full_run["results"]["results"]["dymu_tiny_mc"]["acc,none"]


# --- the model's requests against plain transformers -------------------------------------------


@pytest.fixture(scope="module")
def plugin_docs():
    return plugin_documents()


def test_loglikelihood_equals_a_plain_forward_and_is_batch_invariant(demo_llava_dir, plugin_docs):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dymu.families.prompting import chat_text

    visual = lambda doc: [doc["image"]]
    asks = [("What is in this image?", " a cat", 0), ("What colour is it?", " white", 1),
            ("What is in this image? Answer in a few words.", " a dog, a bicycle and a truck", 2)]
    requests = [_instance("loglikelihood", (q, a, visual, d, "t", "test"), d) for q, a, d in asks]
    batched = _plugin(demo_llava_dir, plugin_docs, mode="full", batch_size=2).loglikelihood(requests)
    alone = _plugin(demo_llava_dir, plugin_docs, mode="full", batch_size=1).loglikelihood(requests)

    model = LlavaForConditionalGeneration.from_pretrained(demo_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(demo_llava_dir)
    for (question, answer, doc_id), got, got_alone in zip(asks, batched, alone):
        prompt = chat_text(processor, question, 1)
        n_prompt = len(processor.tokenizer(prompt)["input_ids"])
        n_answer = len(processor.tokenizer(prompt + answer)["input_ids"]) - n_prompt
        inputs = processor(images=[plugin_docs[doc_id]["image"]], text=prompt + answer, return_tensors="pt")
        with torch.no_grad():
            logp = model(**inputs).logits[0, -n_answer - 1 : -1].log_softmax(-1)
        target = inputs["input_ids"][0, -n_answer:]
        nll = -logp.gather(1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all())
        assert got.text[0] == pytest.approx(nll, abs=1e-4) and got.text[1] == greedy
        assert got_alone.text[0] == pytest.approx(got.text[0], abs=1e-4)
        assert got.token_counts.visual_tokens == [256]


def test_generate_until_answers_in_request_order_as_alone(demo_llava_dir, eval_dir, plugin_docs):
    from dymu.api import apply
    from dymu.thresholds import Thresholds
    from dymu.generation import generate, load_vlm

    visual = lambda doc: [doc["image"]]
    gen = {"max_new_tokens": 5, "until": ["\n"], "do_sample": False}
    questions = ["What is in this image? Describe it in detail, please.", "What colour?", "Count the objects."]
    requests = [_instance("generate_until", (q, dict(gen), visual, d, "t", "test"), d)
                for d, q in enumerate(questions)]
    lm = _plugin(demo_llava_dir, plugin_docs, mode="dymu", thresholds=str(eval_dir / "mid.json"), batch_size=2)
    out = lm.generate_until(requests)

    model, processor = load_vlm(str(demo_llava_dir), "cpu", "float32")
    apply(model, Thresholds.load(eval_dir / "mid.json"), mode="dymu")
    for question, doc, got in zip(questions, plugin_docs, out):
        ref = generate(model, processor, [question], [[doc["image"]]], max_new_tokens=5)
        assert got.text == cut_at_stop_strings(ref.answers[0], ["\n"])
        assert got.token_counts.visual_tokens == ref.report.visual_tokens[0]
        sample = got.token_counts.to_dict()
        for name in ("encoder_tokens", "llm_rows", "stock_positions"):
            assert sample[name] == getattr(ref.report, name)[0], name
        assert got.token_counts.visual_tokens[0] < 256
    counts = lm.visual_token_summary()
    assert counts["images"] == 3 and counts["visual_tokens"] == pytest.approx(
        sum(r.token_counts.visual_tokens[0] for r in out) / 3)


def test_bad_model_args_fail_with_one_clear_line(demo_llava_dir, plugin_docs, tmp_path):
    from dymu.integrations.lmms_eval import DyMU

    with pytest.raises(ValueError, match="unknown model_args thresold"):
        DyMU(pretrained=str(demo_llava_dir), thresold=1)
    with pytest.raises(ValueError, match="batch_size must be a positive whole number"):
        DyMU(pretrained=str(demo_llava_dir), batch_size="auto")
    with pytest.raises(ValueError, match="does not exist"):
        DyMU(pretrained=str(demo_llava_dir), thresholds=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="needs thresholds"):
        DyMU(pretrained=str(demo_llava_dir), mode="dymu")
    lm = _plugin(demo_llava_dir, plugin_docs, mode="full")
    video = _instance("generate_until", ("q", {}, lambda doc: ["clip.mp4"], 0, "t", "test"), 0)
    with pytest.raises(ValueError, match=r"video is not available for LlavaForConditionalGeneration: takes no video"):
        lm.generate_until([video])
    audio = _instance("generate_until", ("q", {}, lambda doc: [{"array": [0.0], "sampling_rate": 16000}], 0, "t", "test"), 0)
    with pytest.raises(ValueError, match="task t doc 0 gives a visual of type dict .* not audio or other data"):
        lm.generate_until([audio])
    with pytest.raises(ValueError, match="max_frames_num must be a positive whole number, not '0'"):
        DyMU(pretrained=str(demo_llava_dir), mode="full", max_frames_num="0")
    with pytest.raises(ValueError, match="cross_frame must be true or false, not 'maybe'"):
        DyMU(pretrained=str(demo_llava_dir), mode="full", cross_frame="maybe")
    with pytest.raises(ValueError, match="cross_frame is not available for LlavaForConditionalGeneration: takes no video"):
        DyMU(pretrained=str(demo_llava_dir), mode="full", cross_frame="true")


def test_report_turns_the_runs_into_a_table(eval_dir, full_run, dymu_run_2proc, capsys):
    from dymu.cli import main

    assert main(["report", str(eval_dir / "full"), str(eval_dir / "dymu_2proc")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | dymu_tiny_mc (acc) | dymu_tiny_vqa (exact_match) | visual tokens / image | stock |"
    for line, run in zip(lines[2:], (full_run, dymu_run_2proc)):
        results = run["results"]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == ("full" if run is full_run else "dymu (mid)")
        assert float(cells[1]) == pytest.approx(results["results"]["dymu_tiny_mc"]["acc,none"], abs=1e-3)
        assert float(cells[3]) == pytest.approx(results["throughput"]["avg_visual_tokens"], rel=1e-3)
        assert cells[4] == "256"


def test_token_budget_model_args_reach_the_encoder(demo_llava_dir, eval_dir, plugin_docs):
    """max_tokens / min_tokens model_args set the per-image budget of dymu.apply."""
    plain = _plugin(demo_llava_dir, plugin_docs, thresholds=str(eval_dir / "mid.json"))
    capped = _plugin(demo_llava_dir, plugin_docs, thresholds=str(eval_dir / "mid.json"), max_tokens="20")
    budget = capped.model.model.vision_tower._dymu_state.budget
    assert budget is not None and budget.max_tokens == 20
    assert plain.model.model.vision_tower._dymu_state.budget is None
    pixels = plain.processor.image_processor(images=[d["image"] for d in plugin_docs], return_tensors="pt")["pixel_values"]
    import dymu
    import torch

    free = dymu.encode(plain.model, pixels).num_tokens
    bounded = dymu.encode(capped.model, pixels).num_tokens
    assert free.max() > 20 and torch.equal(bounded, free.clamp(max=20))


# --- video tasks: LLaVA-OneVision and a Qwen VL through the same plugin --------------------------

VIDEO_TASKS = "dymu_tiny_video,dymu_tiny_video_mc"
FRAMES = 4  # max_frames_num: frames taken evenly from each 6-frame video


def write_video(path: Path, frames) -> None:
    """An mp4 (MPEG-4 part 2) of PIL frames, written with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pan(name: str, count: int = 6, size=(96, 64)):
    """``count`` frames panning across one test image, left to right."""
    image = load_image(name).resize((size[0] * 2, size[1]))
    return [image.crop((x, 0, x + size[0], size[1])) for x in range(0, size[0], size[0] // count)][:count]


@pytest.fixture(scope="session")
def video_eval(tmp_path_factory):
    """The video tasks' folder (three mp4 files, dymu_tiny_video.parquet) and, for a tiny OneVision
    and a tiny Qwen2.5-VL saved with save_pretrained, `mid` thresholds calibrated on test images."""
    import datasets
    import dymu
    from dymu.families.demos.llava import build_demo_anyres_model
    from dymu.families.demos.qwen import build_qwen_demo_model
    from dymu.generation import load_vlm

    folder = tmp_path_factory.mktemp("lmms_eval_video")
    (folder / "videos").mkdir()
    clips = {"cat": "skimage_chelsea_cat.png", "blank": "synthetic_blank_white.png", "street": "darknet_dog_bicycle_truck.jpg"}
    for clip, image in clips.items():
        write_video(folder / "videos" / f"{clip}.mp4", pan(image))
    rows = {"video": [f"videos/{clip}.mp4" for clip in clips], "question": ["What animal is this?", "What colour?",
                                                                            "What is in the street?"],
            "answer": ["cat", "white", "dog"], "choices": [["cat", "dog"], ["white", "black"], ["dog", "bird"]],
            "answer_index": [0, 0, 0]}
    datasets.Dataset.from_dict(rows).to_parquet(folder / "dymu_tiny_video.parquet")
    calibration = [load_image(n) for n in ("skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg",
                                           "skimage_coffee.png", "synthetic_gradient.png")]
    models = {}
    for family, build in (("onevision", lambda: build_demo_anyres_model("onevision")),
                          ("qwen2_5_vl", lambda: build_qwen_demo_model("qwen2_5_vl"))):
        model_dir = folder / family
        model, processor = build()
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        model, processor = load_vlm(str(model_dir), "cpu", "float32")
        thresholds = dymu.calibrate(model, calibration, preset="mid", batch_size=4, progress=False,
                                    processor=processor if family.startswith("qwen") else processor.image_processor,
                                    model_ref=str(model_dir))
        thresholds.save(folder / f"{family}-mid.json")
        models[family] = model_dir
    return folder, models


@pytest.mark.parametrize("family", ["onevision", "qwen2_5_vl"])
def test_video_tasks_full_and_dymu(video_eval, family):
    """Video requests run in modes full and dymu: the task metrics are computed, every sample logs
    its tokens per video, the run reports the mean per video (lower with dymu), and the plugin's
    answers and counts are those of dymu.generate on the same frames. (The Qwen VL's dymu run merges
    across frames: the cross_frame model arg.)"""
    import dymu
    from dymu.images import load_video
    from dymu.thresholds import Thresholds
    from dymu.generation import generate, load_vlm

    folder, models = video_eval
    args = f"pretrained={models[family]},batch_size=2,max_frames_num={FRAMES}"
    full = _simple_evaluate(folder, f"{args},mode=full", VIDEO_TASKS)
    cross_frame = family.startswith("qwen")
    merged = _simple_evaluate(folder, f"{args},mode=dymu,thresholds={folder / f'{family}-mid.json'}"
                                      + (",cross_frame=true" if cross_frame else ""), VIDEO_TASKS)
    off = _simple_evaluate(folder, f"{args},mode=dymu,thresholds=inf", "dymu_tiny_video_mc")
    for run in (full, merged):
        assert set(run["results"]["results"]) == set(VIDEO_TASKS.split(","))
        throughput = run["results"]["throughput"]
        assert throughput["avg_videos"] == 6 and "avg_images" not in throughput  # 3 docs x 2 tasks
        for task in run["samples"].values():
            for s in task.values():
                assert s["token_counts"][0]["visual_kinds"] == ["video"]
                assert s["token_counts"][0]["full_visual_tokens"] == [throughput["avg_full_video_tokens"]]
        assert "visual tokens per video on average" in run["results"]["stdout"]
    assert full["results"]["throughput"]["avg_video_tokens"] == full["results"]["throughput"]["avg_full_video_tokens"]
    assert merged["results"]["throughput"]["avg_video_tokens"] < full["results"]["throughput"]["avg_video_tokens"]
    # +inf thresholds: multiple-choice scores of the stock model
    for doc_id, sample in off["samples"]["dymu_tiny_video_mc"].items():
        stock = full["samples"]["dymu_tiny_video_mc"][doc_id]
        for (nll, _), (nll_full, _) in zip(sample["filtered_resps"], stock["filtered_resps"]):
            assert float(nll) == pytest.approx(float(nll_full), abs=1e-4)
    # the plugin answers as dymu.generate does on the same frames
    model, processor = load_vlm(str(models[family]), "cpu", "float32")
    dymu.apply(model, Thresholds.load(folder / f"{family}-mid.json"), mode="dymu",
               **({"cross_frame": True} if cross_frame else {}))
    for doc_id, sample in merged["samples"]["dymu_tiny_video"].items():
        frames = load_video(folder / "videos" / f"{['cat', 'blank', 'street'][doc_id]}.mp4", FRAMES)
        ref = generate(model, processor, [sample["doc"]["question"]], [[]], videos=[[frames]], max_new_tokens=4)
        assert _answer(sample) == cut_at_stop_strings(ref.answers[0], ["\n"])
        assert sample["token_counts"][0]["visual_tokens"] == ref.report.visual_tokens[0]
