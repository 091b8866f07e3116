"""Hostile and careless inputs on the surfaces added last round (AnyRes, video, Qwen, budget, focus,
lmms-eval, report, output files): each gets a correct result or one line naming the file or argument
and the problem. The table below is the one in docs/reliability.md (a test keeps them in step)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

import dymu
from conftest import IMAGES, REPO, build_tiny_tower, error_lines, load_image
from dymu.cli import main

DOCS = REPO / "docs" / "reliability.md"


@dataclass
class Case:
    id: str
    surface: str
    hostile: str  # what the user does
    expected: str  # words of the one-line error
    run: Callable  # (ctx) -> the error text (CLI: stderr of a failed command; API: the exception)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, demo_llava_dir):
    root = tmp_path_factory.mktemp("hostile")
    tower = root / "tower"
    build_tiny_tower("clip", tower)
    thresholds = root / "th.json"
    assert main(["calibrate", "--model", str(tower), "--images", str(IMAGES), "--max-images", "4", "--r", "5",
                 "--quiet", "--out", str(thresholds)]) == 0
    image_list = root / "list.json"
    image_list.write_text(json.dumps([str(p) for p in sorted(IMAGES.glob("*.png"))[:2]]))
    return {"root": root, "tower": tower, "thresholds": thresholds, "list": image_list, "llava": demo_llava_dir}


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) if argv[0] == "argparse" else _nothing():
        code = main(argv[1:] if argv[0] == "argparse" else argv)
        assert code == 1
    err = "\n".join(error_lines(capsys.readouterr().err))
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def api_error(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def _qwen_thresholds_on_a_clip_tower(ctx, capsys):
    """A real Qwen2.5-VL thresholds file (as `dymu calibrate` writes one) given to a CLIP tower."""
    from dymu.thresholds import Thresholds
    from dymu.families.demos.qwen import build_qwen_demo_model
    from dymu.towers.qwen_vit import qwen_identity

    visual = build_qwen_demo_model("qwen2_5_vl")[0].model.visual
    steps = len(visual.blocks)
    wrong = Thresholds(thresholds=[0.9] * steps, encoder=qwen_identity(visual, "vit", steps),
                       feature_layer=-1).save(ctx["root"] / "q.json")
    return cli_error(capsys, ["encode", "--model", str(ctx["tower"]), "--thresholds", str(wrong),
                              "--images", str(IMAGES / "synthetic_gradient.png"), "--json", str(ctx["root"] / "o.json")])


def _planted_lock_symlink(ctx, capsys):
    out = ctx["root"] / "locked.json"
    victim = ctx["root"] / "elsewhere" / "victim"
    victim.parent.mkdir(exist_ok=True)
    Path(f"{out}.partial.lock").symlink_to(victim)
    err = cli_error(capsys, ["calibrate", "--model", str(ctx["tower"]), "--images", str(IMAGES), "--max-images", "2",
                             "--r", "5", "--quiet", "--out", str(out)])
    assert not victim.exists()  # nothing was created at the link's target
    return err


def _report_over_a_result(ctx, capsys):
    results = ctx["root"] / "results"
    results.mkdir(exist_ok=True)
    run = results / "20260101_000000_results.json"
    run.write_text(json.dumps({"results": {"gqa": {"exact_match,none": 0.5}}, "config": {"model_args": "mode=full"}}))
    assert main(["report", str(results), "--out", str(results / "table.md")]) == 0  # a table beside them is fine
    return cli_error(capsys, ["report", str(results), "--out", str(run)])


def _bench_json_in_a_missing_folder(ctx, capsys):
    missing = ctx["root"] / "missing"
    err = cli_error(capsys, ["bench", "--quick", "--only", "encoder", "--json", str(missing / "x.json")])
    assert not missing.exists()  # no folder made, checked before minutes of measuring
    return err


def _onevision_mixed_frame_counts(ctx):
    from dymu.families.demos.llava import build_demo_anyres_model

    model, processor = build_demo_anyres_model("onevision")
    frames = [load_image("skimage_chelsea_cat.png")] * 4
    return api_error(lambda: dymu.generate(model, processor, ["A?", "B?"], [[], []],
                                           videos=[[frames], [frames[:2]]], max_new_tokens=1))


def _focus_outside_the_centre_crop(ctx):
    from dymu.families.demos.llava import build_demo_model

    model, processor = build_demo_model()
    wide = load_image("darknet_dog_bicycle_truck.jpg").resize((1024, 576))
    return api_error(lambda: dymu.generate(model, processor, ["A?"], [[wide]], focus=[[(-50, -50, 200, 200)]],
                                           max_new_tokens=1))


def _lmms_eval_frames(ctx):
    from dymu.integrations.lmms_eval import DyMU

    return api_error(lambda: DyMU(pretrained=str(ctx["llava"]), mode="full", max_frames_num="100000"))


def _demo_llava():
    from dymu.families.demos.llava import build_demo_model

    return build_demo_model()


def _lmms_eval_arg(ctx, **args):
    from dymu.integrations.lmms_eval import DyMU

    return api_error(lambda: DyMU(pretrained=str(ctx["llava"]), **args))


def _edited_checkpoint(ctx, capsys):
    out = ctx["root"] / "resume.json"
    argv = ["calibrate", "--model", str(ctx["tower"]), "--images", str(IMAGES), "--max-images", "4", "--r", "5",
            "--batch-size", "2", "--quiet", "--out", str(out)]
    checkpoint = Path(f"{out}.partial")
    from dymu.tools import calibration

    real_save = calibration.Checkpoint.save
    calls = []

    def save_then_stop(self, records):  # the first batch's checkpoint is written, then a "kill"
        real_save(self, records)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    pytest.MonkeyPatch.setattr(pytest.MonkeyPatch(), calibration.Checkpoint, "save", save_then_stop)
    try:
        assert main(argv) == 130
    finally:
        calibration.Checkpoint.save = real_save
    data = json.loads(checkpoint.read_text())
    data["records"][0]["tau"][0] = 0.5  # a hand edit: the resumed thresholds would silently change
    checkpoint.write_text(json.dumps(data))
    return cli_error(capsys, argv)


def _weights_only_refusal(ctx, capsys):
    path = ctx["root"] / "paper.pt"
    torch.save({"blocks.0.threshold": torch.tensor(0.9), "code": _Unpicklable()}, path)
    return cli_error(capsys, ["thresholds", "import", str(path), "--model", str(ctx["tower"]),
                              "--out", str(ctx["root"] / "imported.json")])


class _Unpicklable:
    """An object a weights-only load refuses: torch's message about it is long."""


def _feature_layer_0(ctx, capsys):
    data = json.loads(ctx["thresholds"].read_text())
    data["feature_layer"] = 0
    path = ctx["root"] / "layer0.json"
    path.write_text(json.dumps(data))
    return cli_error(capsys, ["encode", "--model", str(ctx["tower"]), "--thresholds", str(path), "--images",
                              str(IMAGES / "synthetic_gradient.png"), "--json", str(ctx["root"] / "l0.json")])


def _missing_tokenizer(ctx, capsys):
    import shutil

    folder = ctx["root"] / "no_tokenizer"
    shutil.copytree(ctx["llava"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return cli_error(capsys, ["generate", "--model", str(folder), "--mode", "full", "--images",
                              str(IMAGES / "synthetic_gradient.png"), "--prompt", "Hi?"])


LOW_CASES = [
    Case("apply-negative-thresholds", "API", "`dymu.apply(model, [-1.0] * layers)` (files refuse negatives too)",
         "thresholds are >= 0", lambda ctx, capsys: api_error(lambda: dymu.apply(_demo_llava()[0], [-1.0] * 6))),
    Case("apply-bool-threshold", "API", "`dymu.apply(model, True)` or a complex number", "must be a real number",
         lambda ctx, capsys: api_error(lambda: dymu.apply(_demo_llava()[0], True))),
    Case("tome-fractional-r", "API", "`dymu.apply(model, mode='tome', r=1.5)`", "r must be whole numbers",
         lambda ctx, capsys: api_error(lambda: dymu.apply(_demo_llava()[0], mode="tome", r=1.5))),
    Case("min-tokens-above-patches", "budget", "`--min-tokens 1000` on 256-patch images", "is not below the 256 patches",
         lambda ctx, capsys: api_error(lambda: dymu.apply(_demo_llava()[0], 0.9, min_tokens=1000))),
    Case("focus-fractions", "focus", "focus box `0.5,0.5,0.9,0.9` (fractions, not pixels)", "boxes are in pixels",
         lambda ctx, capsys: api_error(lambda: dymu.generate(*_demo_llava(), ["A?"], [[load_image(
             "skimage_chelsea_cat.png")]], focus=[[(0.5, 0.5, 0.9, 0.9)]], max_new_tokens=1))),
    Case("generate-empty-prompts", "API", "`dymu.generate(model, processor, [], [])`", "prompts must be a non-empty list",
         lambda ctx, capsys: api_error(lambda: dymu.generate(*_demo_llava(), [], []))),
    Case("generate-unnested-images", "API", "`dymu.generate(model, processor, ['A?'], [image])` (not `[[image]]`)",
         "images[0] must be the list of prompt 0's images",
         lambda ctx, capsys: api_error(lambda: dymu.generate(*_demo_llava(), ["A?"], [load_image(
             "skimage_chelsea_cat.png")]))),
    Case("device-meta", "CLI", "`--device meta` (or tpu)", "is not one dymu runs on",
         lambda ctx, capsys: cli_error(capsys, ["encode", "--model", str(ctx["tower"]), "--thresholds",
                                                str(ctx["thresholds"]), "--images", str(ctx["list"]), "--device",
                                                "meta", "--json", str(ctx["root"] / "m.json")])),
    Case("lmms-eval-negative-thresholds", "lmms-eval", "model_args `thresholds=-1`", "thresholds must be a number >= 0",
         lambda ctx, capsys: _lmms_eval_arg(ctx, thresholds="-1")),
    Case("lmms-eval-fractional-budget", "lmms-eval", "model_args `max_tokens=1.5`",
         "max_tokens must be a whole number >= 1, not '1.5'", lambda ctx, capsys: _lmms_eval_arg(ctx, max_tokens="1.5")),
    Case("lmms-eval-r-abc", "lmms-eval", "model_args `mode=tome,r=abc`", "r must be a whole number >= 0, not 'abc'",
         lambda ctx, capsys: _lmms_eval_arg(ctx, mode="tome", r="abc")),
    Case("checkpoint-edited", "calibration", "a calibration checkpoint edited by hand, then resumed",
         "does not match its digest", _edited_checkpoint),
    Case("weights-only-refusal", "thresholds import", "a paper checkpoint that does not load weights-only",
         "is not a torch checkpoint that loads weights-only", _weights_only_refusal),
    Case("feature-layer-0", "thresholds file", "`\"feature_layer\": 0` in a thresholds file",
         "the embeddings before the first layer", _feature_layer_0),
    Case("missing-tokenizer", "loading", "a model folder without its tokenizer files",
         "its processor or tokenizer cannot be loaded (Couldn't instantiate the backend tokenizer from one of: (1)",
         _missing_tokenizer),
]


CASES = [
    Case("calibrate-out-is-image-list", "output files", "`calibrate --images list.json --out list.json`",
         "is also an input of this command",
         lambda ctx, capsys: cli_error(capsys, ["calibrate", "--model", str(ctx["tower"]), "--images",
                                                str(ctx["list"]), "--r", "5", "--quiet", "--out", str(ctx["list"])])),
    Case("encode-json-is-thresholds", "output files", "`encode --thresholds th.json --json th.json`",
         "is also an input of this command",
         lambda ctx, capsys: cli_error(capsys, ["encode", "--model", str(ctx["tower"]), "--thresholds",
                                                str(ctx["thresholds"]), "--images", str(ctx["list"]),
                                                "--json", str(ctx["thresholds"])])),
    Case("analyze-out-inside-images", "output files", "`analyze --images photos --out-dir photos/analysis`",
         "is inside the input folder",
         lambda ctx, capsys: cli_error(capsys, ["analyze", "--model", str(ctx["tower"]), "--thresholds",
                                                str(ctx["thresholds"]), "--images", str(IMAGES), "--out-dir",
                                                str(IMAGES / "analysis")])),
    Case("report-out-is-a-result", "report", "`report results/ --out results/x_results.json`",
         "is also an input of this command",
         lambda ctx, capsys: _report_over_a_result(ctx, capsys)),
    Case("bench-json-missing-folder", "output files", "`bench --json /missing/x.json`", "does not exist",
         _bench_json_in_a_missing_folder),
    Case("lock-file-symlink", "output files", "a symbolic link planted at `OUT.partial.lock`",
         "is a symbolic link", _planted_lock_symlink),
    Case("frames-100000", "video", "`generate --video clip.mp4 --frames 100000`", "at most 256 frames",
         lambda ctx, capsys: cli_error(capsys, ["argparse", "generate", "--model", "x", "--video", "v.mp4",
                                                "--frames", "100000"])),
    Case("lmms-eval-frames", "lmms-eval", "model_args `max_frames_num=100000`",
         "max_frames_num: the number of frames must be a whole number from 1 to 256",
         lambda ctx, capsys: _lmms_eval_frames(ctx)),
    Case("onevision-mixed-frame-counts", "video", "OneVision videos of 4 and 2 frames in one `dymu.generate` call",
         "they need one frame count", lambda ctx, capsys: _onevision_mixed_frame_counts(ctx)),
    Case("focus-outside-centre-crop", "focus", "LLaVA-1.5, focus box -50,-50,200,200 on a 1024x576 image",
         "lies outside the part of the 1024x576 image that the processor keeps",
         lambda ctx, capsys: _focus_outside_the_centre_crop(ctx)),
    Case("qwen-thresholds-on-siglip", "Qwen", "a Qwen VL thresholds file on a CLIP/SigLIP tower",
         "are for a qwen2_5_vl_vision encoder, not CLIP", _qwen_thresholds_on_a_clip_tower),
]


CASES += LOW_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_one_line(case, ctx, capsys):
    message = case.run(ctx, capsys)
    assert "\n" not in message and case.expected in message, message


def test_the_docs_table_lists_every_case():
    table = DOCS.read_text()
    for case in CASES:
        assert f"| `{case.id}` |" in table, f"docs/reliability.md has no row for {case.id}"


def test_a_patched_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save / pickle of a patched model: its classes made on the fly are found again by name."""
    from dymu.families.demos.llava import build_demo_model

    model, processor = build_demo_model()
    dymu.apply(model, 0.9)
    image = load_image("skimage_chelsea_cat.png")
    want = dymu.generate(model, processor, ["What?"], [[image]], max_new_tokens=4)
    twin = pickle.loads(pickle.dumps(model))
    got = dymu.generate(twin, processor, ["What?"], [[image]], max_new_tokens=4)
    assert torch.equal(got.sequences, want.sequences) and got.report.visual_tokens == want.report.visual_tokens
    torch.save(model, tmp_path / "model.pt")
    processor.save_pretrained(tmp_path / "processor")
    image.save(tmp_path / "cat.png")
    script = ("import sys, torch, dymu; from transformers import AutoProcessor; from PIL import Image\n"
              f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
              f"p = AutoProcessor.from_pretrained({str(tmp_path / 'processor')!r})\n"
              f"r = dymu.generate(m, p, ['What?'], [[Image.open({str(tmp_path / 'cat.png')!r}).convert('RGB')]], "
              "max_new_tokens=4)\nprint(r.sequences.tolist(), r.report.visual_tokens)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"{want.sequences.tolist()} {want.report.visual_tokens}"


@pytest.mark.parametrize("before_apply", [True, False])
def test_a_torch_compile_wrapped_tower(before_apply):
    """`model.model.vision_tower = torch.compile(...)` before or after apply: the same results as
    without it, and one warning that the wrapper is bypassed while merging."""
    from dymu.families.demos.llava import build_demo_model

    model, processor = build_demo_model()
    image = load_image("skimage_chelsea_cat.png")
    reference, _ = build_demo_model()
    dymu.apply(reference, 0.9)
    want = dymu.generate(reference, processor, ["What?"], [[image]], max_new_tokens=3)
    if not before_apply:
        dymu.apply(model, 0.9)
    model.model.vision_tower = torch.compile(model.model.vision_tower)
    if before_apply:
        dymu.apply(model, 0.9)
    got = dymu.generate(model, processor, ["What?"], [[image]], max_new_tokens=3)
    assert torch.equal(got.sequences, want.sequences) and got.report.visual_tokens == want.report.visual_tokens


def test_video_frames_are_capped_and_decoded_small(tmp_path):
    """A 720p video: frames come back at most FRAME_MAX_SIDE a side; more than MAX_FRAMES is refused."""
    av = pytest.importorskip("av")
    from dymu.images import FRAME_MAX_SIDE, MAX_FRAMES, load_video

    path = tmp_path / "hd.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for k in range(12):
            frame = av.VideoFrame.from_image(Image.new("RGB", (1280, 720), (20 * k, 100, 200)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = load_video(path, 6)
    assert len(frames) == 6 and all(max(f.size) == FRAME_MAX_SIDE and f.size == (1024, 576) for f in frames)
    assert load_video(path, 2, max_side=None)[0].size == (1280, 720)
    with pytest.raises(ValueError, match=f"from 1 to {MAX_FRAMES}, not 100000"):
        load_video(path, 100000)


def test_lmms_eval_batches_keep_one_frame_count():
    from dymu.integrations.lmms_eval import length_sorted_batches

    keys = [("gen", (8,)), ("gen", (5,)), ("gen", (8,)), ("gen", (5,))]
    batches = length_sorted_batches([10, 10, 10, 10], keys, 4)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]]


def test_apply_takes_a_thresholds_path_as_a_file(ctx):
    """`dymu.apply(model, "th.json")` (or a Path) loads the file; it used to read the string as a list."""
    from dymu.thresholds import Thresholds
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(ctx["tower"]).eval()
    for given in (str(ctx["thresholds"]), ctx["thresholds"]):
        dymu.apply(tower, given)
        patched, _ = dymu.api.vision_tower_of(tower)
        assert patched._dymu_state.thresholds == Thresholds.load(ctx["thresholds"]).thresholds


def test_analyze_reruns_leave_no_stale_maps_and_one_run_at_a_time(ctx, tmp_path):
    from dymu.files import LockedError, exclusive_lock

    out = tmp_path / "analysis"
    run = ["analyze", "--model", str(ctx["tower"]), "--thresholds", str(ctx["thresholds"]), "--quiet", "--out", str(out)]
    assert main([*run, "--images", str(IMAGES / "synthetic_gradient.png"), str(IMAGES / "skimage_chelsea_cat.png")]) == 0
    assert len(list((out / "merge_maps").glob("*.png"))) == 2
    assert main([*run, "--images", str(IMAGES / "synthetic_gradient.png")]) == 0
    assert [p.name for p in (out / "merge_maps").glob("*.png")] == ["synthetic_gradient.png"]  # the cat's is gone
    with exclusive_lock(out / ".dymu-analyze.lock", "held by another run"):
        with pytest.raises(LockedError, match="is in use by another process"):
            dymu.tools.analyze.analyze(__import__("transformers").CLIPVisionModel.from_pretrained(ctx["tower"]),
                                       ctx["thresholds"], [IMAGES / "synthetic_gradient.png"], out)


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    import os
    import time

    from dymu.files import STALE_SECONDS, atomic_write_text

    out = tmp_path / "result.json"
    old, fresh = tmp_path / ".result.json.abc123.tmp", tmp_path / ".result.json.def456.tmp"
    for leftover in (old, fresh):
        leftover.write_text("partial")
    past = time.time() - STALE_SECONDS - 5
    os.utime(old, (past, past))
    atomic_write_text(out, "{}")
    assert not old.exists() and fresh.exists()  # a write possibly still running is left alone
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_calibrate_counts_only_the_images_it_could_read(ctx, tmp_path, capsys):
    images = tmp_path / "few"
    images.mkdir()
    for name in ("synthetic_gradient.png", "skimage_chelsea_cat.png", "synthetic_noise.png"):
        (images / name).write_bytes((IMAGES / name).read_bytes())
    (images / "broken.png").write_bytes(b"not an image")
    assert main(["calibrate", "--model", str(ctx["tower"]), "--images", str(images), "--r", "5", "--quiet",
                 "--out", str(tmp_path / "t.json")]) == 0
    assert "calibrating on only 3 readable of the 4 listed images" in capsys.readouterr().err


def test_a_frame_folders_other_files_are_named(tmp_path):
    from dymu.images import load_video

    for k in range(3):
        Image.new("RGB", (32, 32), (40 * k, 0, 0)).save(tmp_path / f"frame{k}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    with pytest.warns(UserWarning, match="skipped 1 file\\(s\\) that are not images: notes.txt"):
        assert len(load_video(tmp_path, 3)) == 3
