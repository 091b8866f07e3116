"""First use without surprises: each test is one thing a new user does, through the CLI."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import dymu
from conftest import IMAGES, MIXED_IMAGES, REPO, load_image
from dymu.cli import build_parser, main
from test_cli import one_error_line
from dymu.thresholds import Thresholds


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from conftest import build_tiny_tower

    folder = tmp_path_factory.mktemp("tiny_clip")
    build_tiny_tower("clip", folder)
    return folder


def calibrate_args(model, out, *extra):
    return ["calibrate", "--model", str(model), "--out", str(out), "--quiet", *extra]


# ---- 1. calibration says when it misses its target, why, and records both ----

def test_1_calibration_reports_target_vs_reached_and_warns(tower_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    some = [str(IMAGES / n) for n in MIXED_IMAGES[:6]]
    assert main(calibrate_args(tower_dir, out, "--images", *some, "--target-tokens", "5", "--batch-size", "3")) == 0
    captured = capsys.readouterr()
    th = Thresholds.load(out)
    assert th.target_tokens == 5 and th.reached_tokens == th.tokens_kept_mean[-1] > 5.5
    assert th.capped_layers, "a target of 5 of 196 tokens must hit the at-most-half-per-layer cap"
    assert "target 5.0; per image, as inference runs them," in captured.out
    assert th.per_image_tokens["images"] == 6 and th.per_image_tokens["mean"] > 5.5
    err = captured.err
    assert "warning: the thresholds keep" in err and "not the target 5.0" in err
    assert f"layer{'s' if len(th.capped_layers) > 1 else ''} {', '.join(map(str, th.capped_layers))} hit the " \
           "per-layer cap" in err
    assert "warning: calibrating on only 6 images" in err and "warning: batches of 3 images" in err

    # A reachable target: no target warning, enough images and a batch of 8: no warnings at all.
    assert main(calibrate_args(tower_dir, out, "--images", str(IMAGES), "--max-images", "16", "--batch-size", "8",
                               "--target-tokens", "120")) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    th = Thresholds.load(out)
    assert abs(th.reached_tokens - 120) <= 12 and th.target_tokens == 120 and th.capped_layers == []

    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert "(default: 32)" in helped and "batches of 8 or more" in helped


# ---- 2. --r is never dropped or misread ----

def test_2_r_with_a_schedule_and_one_value_per_layer_that_runs(tower_dir, family, tmp_path, capsys):
    out = tmp_path / "t.json"
    images = ["--images", str(IMAGES), "--max-images", "8", "--batch-size", "8"]
    run = 3 if family == "clip" else 4  # CLIP is read at layer -2 (3 of 4 layers run), SigLIP at -1
    assert main(calibrate_args(tower_dir, out, *images, "--r", "20", "--schedule", "linear")) == 0
    th = Thresholds.load(out)
    assert th.schedule == "linear"
    assert th.r[0] > th.r[run - 1] > 0 and math.isclose(sum(th.r), 20 * run)  # the average r is 20

    per_layer = ",".join(str(5 * (k + 1)) for k in range(run))
    assert main(calibrate_args(tower_dir, out, *images, "--r", per_layer)) == 0
    th = Thresholds.load(out)
    assert th.schedule == "explicit" and th.r == [5.0 * (k + 1) for k in range(run)] + [0.0] * (4 - run)
    capsys.readouterr()

    assert main(calibrate_args(tower_dir, out, *images, "--r", per_layer, "--schedule", "linear")) == 1
    assert "has nothing to spread" in capsys.readouterr().err
    if run < 4:  # one value per layer of the tower is refused, naming the layers that run
        assert main(calibrate_args(tower_dir, out, *images, "--r", "1,2,3,4")) == 1
        assert f"one per layer that runs: {run} (layers 0-{run - 1}" in capsys.readouterr().err


# ---- 3. modes never fall back quietly ----

@pytest.fixture(scope="module")
def llava(demo_llava_dir, tmp_path_factory):
    from dymu.generation import load_vlm

    th_file = tmp_path_factory.mktemp("th") / "t.json"
    assert main(["calibrate", "--model", str(demo_llava_dir), "--images", str(IMAGES), "--max-images", "16",
                 "--batch-size", "8", "--quiet", "--out", str(th_file)]) == 0
    model, processor = load_vlm(str(demo_llava_dir), "cpu", "float32")
    return model, processor, Thresholds.load(th_file), th_file


def test_3_modes_that_change_the_prompt_refuse_stock_generate_and_name_real_functions(llava, tmp_path, capsys):
    model, processor, th, th_file = llava
    image = load_image("skimage_coffee.png")
    stock = processor(images=[image], text=["USER: <image>\nWhat is this? ASSISTANT:"], return_tensors="pt")
    try:
        for mode in ("downsample", "dtome"):
            dymu.apply(model, th, mode=mode)
            with pytest.raises(ValueError) as err:
                model.generate(**stock, max_new_tokens=2)
            named = re.findall(r"dymu\.(\w+)", str(err.value))
            assert "prompt_inputs" in named and all(hasattr(dymu, name) for name in named), str(err.value)
            # ...and the helper it names works with the stock generate, as dymu.generate does.
            inputs = dymu.prompt_inputs(model, processor, ["What is this?"], [[image]])
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            expected = dymu.generate(model, processor, ["What is this?"], [[image]], max_new_tokens=3)
            assert out[:, inputs["input_ids"].shape[1]:].tolist() == \
                expected.sequences[:, inputs["input_ids"].shape[1]:].tolist()
            assert (inputs["input_ids"] == model.config.image_token_id).sum() < model.config.image_seq_length
    finally:
        dymu.remove(model)

    imported = Thresholds(thresholds=th.thresholds, encoder=th.encoder, feature_layer=th.feature_layer,
                          schedule="imported from paper.pt")  # what `dymu thresholds import` writes
    with pytest.raises(ValueError, match="has no calibration statistics"):
        dymu.apply(model, imported, mode="downsample")
    imported.save(tmp_path / "imported.json")
    assert main(["generate", "--model", str(llava_dir(model)), "--thresholds", str(tmp_path / "imported.json"),
                 "--images", str(IMAGES / "skimage_coffee.png"), "--prompt", "hi", "--mode", "downsample"]) == 1
    err = capsys.readouterr().err
    assert "has no calibration statistics" in err and "dymu calibrate" in err


def llava_dir(model):
    return model.config._name_or_path


# ---- 5. one way to pass images ----

def test_5_every_command_takes_any_mix_of_images_with_the_same_help(clip_dir, tmp_path, capsys):
    tower_dir = clip_dir
    from dymu.cli import IMAGES_HELP

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    helps = {}
    for command in ("calibrate", "encode", "analyze", "generate"):
        action = next(a for a in sub[command]._actions if a.dest == "images")
        assert action.nargs == "+" and "--images" in action.option_strings
        helps[command] = action.help
    assert all(h.startswith(IMAGES_HELP) for h in helps.values())
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--image", "a.jpg", "--images", "b.jpg",
                              "c/*.png"])
    assert args.images == ["a.jpg", "b.jpg", "c/*.png"]

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in MIXED_IMAGES[:3]:
        shutil.copy(IMAGES / name, folder / "sub" / name)  # found recursively
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": n} for n in MIXED_IMAGES[3:5]]))
    pattern = str(IMAGES / "skimage_c*.png")
    globbed = sorted(p for p in IMAGES.iterdir() if p.name.startswith("skimage_c") and p.suffix == ".png")
    mix = [str(folder), pattern, str(IMAGES / MIXED_IMAGES[5])]
    out = tmp_path / "t.json"
    assert main(calibrate_args(tower_dir, out, "--images", *mix, "--images", str(listing),
                               "--image-root", str(IMAGES), "--r", "4")) == 0
    assert Thresholds.load(out).images_seen == 3 + len(globbed) + 1 + 2
    assert main(["encode", "--model", str(tower_dir), "--thresholds", str(out), "--images", *mix,
                 "--json", str(tmp_path / "e.json")]) == 0
    assert len(json.loads((tmp_path / "e.json").read_text())["images"]) == 3 + len(globbed) + 1
    capsys.readouterr()
    assert main(calibrate_args(tower_dir, out, "--images", str(tmp_path / "none*.jpg"))) == 1
    assert "none*.jpg: no image files match this pattern" in capsys.readouterr().err


# ---- 6. prompts in the CLI ----

def test_6_a_prompt_with_the_image_token_is_explained_or_used_raw(llava, capsys):
    model, _, _, th_file = llava
    base = ["generate", "--model", llava_dir(model), "--thresholds", str(th_file), "--images",
            str(IMAGES / "skimage_coffee.png"), "--max-new-tokens", "2"]
    full_prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    assert main([*base, "--prompt", full_prompt]) == 1
    err = one_error_line(capsys)
    assert "already contains the image token '<image>'" in err and "--raw-prompt" in err
    assert main([*base, "--prompt", full_prompt, "--raw-prompt", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 2
    assert main([*base, "--prompt", "What is this?", "--raw-prompt"]) == 1
    assert "has 0 image token(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert "chat template" in helped and "--raw-prompt" in helped


# ---- 7. progress that tells the truth ----

def run_cli(args, **env):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=300)


def test_7_loading_line_resume_line_and_a_bar_over_all_ranks(clip_dir, tmp_path, monkeypatch, capsys):
    tower_dir = clip_dir
    import dymu.tools.calibration as C

    out = tmp_path / "t.json"
    args = ["calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--max-images", "16",
            "--batch-size", "4", "--r", "4", "--checkpoint-every", "1", "--out", str(out)]
    real, calls = C.open_images, {"n": 0}

    def dies_after_two_batches(items):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt  # what a kill looks like from inside
        return real(items)

    monkeypatch.setattr(C, "open_images", dies_after_two_batches)
    assert main(args) == 130
    assert f"loading {tower_dir}…" in capsys.readouterr().err
    monkeypatch.setattr(C, "open_images", real)
    assert main(args) == 0
    assert f"resuming from {out}.partial: 2 of 4 batches done" in capsys.readouterr().err

    # torchrun: rank 0's bar counts the images of both ranks (24), not its own 12.
    two = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dymu.cli",
                   "calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--max-images", "24",
                   "--batch-size", "4", "--target-tokens", "70", "--device", "cpu", "--out", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "24/24" in two.stderr and "12/12" not in two.stderr
    assert two.stderr.count("loading ") == 1  # rank 0 only


# ---- 8. small things a user sees ----

def test_8_small_things(llava, tmp_path, capsys):
    model, processor, th, th_file = llava
    # EncodedImages prints shapes, not tensors.
    pixels = processor.image_processor(images=[load_image("skimage_coffee.png")] * 2, return_tensors="pt")
    dymu.apply(model, th, mode="dtome")
    try:
        text = repr(dymu.encode(model, pixels["pixel_values"]))
    finally:
        dymu.remove(model)
    assert "tensor(" not in text and "2 images" in text and "group_of_patch (2, 256)" in text and len(text) < 400

    # The Python API records the model's name, not "".
    cal = dymu.calibrate(model, [IMAGES / n for n in MIXED_IMAGES], r=8, batch_size=8, progress=False)
    assert cal.encoder["model"] == llava_dir(model) != ""

    # encode --json has kept_per_layer.
    assert main(["encode", "--model", llava_dir(model), "--thresholds", str(th_file), "--images",
                 str(IMAGES / "skimage_coffee.png"), "--json", str(tmp_path / "e.json")]) == 0
    record = json.loads((tmp_path / "e.json").read_text())["images"][0]
    assert len(record["kept_per_layer"]) == 5 and record["kept_per_layer"][-1] == record["tokens"] + 1  # + CLS

    # Error prefixes name the subcommand.
    capsys.readouterr()
    assert main(["thresholds", "import", str(tmp_path / "nope.pt"), "--model", llava_dir(model),
                 "--out", str(tmp_path / "x.json")]) == 1
    assert one_error_line(capsys).startswith("dymu thresholds import: error:")


def test_8_a_hub_id_without_network_fails_fast_in_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    import dymu.loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored afterwards
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    dymu.loading.hub_unreachable.cache_clear()
    start = time.perf_counter()  # torch and transformers are imported already: this times the network part
    assert main(["calibrate", "--model", "dymu-test-org/no-such-model", "--images", str(IMAGES),
                 "--out", str(tmp_path / "t.json")]) == 1
    elapsed = time.perf_counter() - start
    err = one_error_line(capsys)
    assert err.startswith("dymu calibrate: error:") and "dymu-test-org/no-such-model" in err
    assert elapsed < 5, f"took {elapsed:.1f} s"
    dymu.loading.hub_unreachable.cache_clear()


# ---- 9. thresholds from the Hub (a local folder and a pre-filled offline cache; no network) ----

def fill_hub_cache(cache, repo_id, files: dict):
    """The layout huggingface_hub reads offline: models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / commit / name).write_text(data)


def test_9_thresholds_from_a_folder_and_from_the_hub_cache(llava, tmp_path, monkeypatch, capsys):
    model, _, th, _ = llava
    folder = tmp_path / "repo"
    assert th.save_pretrained(folder) == folder / "thresholds.json"
    assert Thresholds.from_pretrained(folder).to_json() == th.to_json()

    cache = tmp_path / "hub"
    text = json.dumps(th.to_json())
    fill_hub_cache(cache, "dymu-org/llava-mid", {"thresholds.json": text, "other.json": text})
    loaded = Thresholds.from_pretrained("dymu-org/llava-mid", cache_dir=cache, local_files_only=True)
    assert loaded.to_json() == th.to_json()
    with pytest.raises(ValueError, match="cannot load thresholds.json from dymu-org/absent"):
        Thresholds.from_pretrained("dymu-org/absent", cache_dir=cache, local_files_only=True)

    # The CLI, offline, with the Hub cache above: what HF_HUB_OFFLINE=1 HF_HUB_CACHE=... would set.
    from huggingface_hub import constants

    import dymu.loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    dymu.loading.hub_unreachable.cache_clear()
    try:
        for ref in ("dymu-org/llava-mid", "dymu-org/llava-mid:other.json", str(folder)):
            assert main(["encode", "--model", llava_dir(model), "--thresholds", ref, "--images",
                         str(IMAGES / "skimage_coffee.png"), "--json", str(tmp_path / "e.json")]) == 0, \
                capsys.readouterr().err
            assert json.loads((tmp_path / "e.json").read_text())["thresholds"] == ref
    finally:
        dymu.loading.hub_unreachable.cache_clear()


# ---- 10. the README's quick start ----

def readme_section(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else len(text)]


def test_10_readme_quick_start_and_the_offline_walkthrough(llava, tmp_path, monkeypatch, capsys):
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:60])
    assert 'dymu.apply(model, mode="tome", r=16)' in first_screen
    assert "dymu.Thresholds.from_pretrained(" in first_screen and "dymu.apply(model, thresholds)" in first_screen
    assert "make demo" in first_screen and "make test" in first_screen

    # The quick start's first path on a model (no data, no calibration): stock generate works on it.
    model, processor, _, _ = llava
    stock = processor(images=[load_image("skimage_coffee.png")], text=["USER: <image>\nWhat is this? ASSISTANT:"],
                      return_tensors="pt")
    dymu.apply(model, mode="tome", r=16)
    try:
        assert model.generate(**stock, max_new_tokens=2).shape[1] == stock["input_ids"].shape[1] + 2
    finally:
        dymu.remove(model)

    # "## Try it offline": its first block is the three commands to a working run; tests/test_docs.py runs
    # every block of the section as written, in a shell.
    section = readme_section("## Try it offline")
    first = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    commands = [line.strip() for line in first.strip().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 3 and all(c.startswith("dymu ") for c in commands), commands
    assert commands[-1].startswith("dymu generate ")
