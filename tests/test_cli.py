"""The `dymu` command line: help, version, calibrate (bad files, resume, torchrun)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import IMAGES, MIXED_IMAGES, error_lines
from dymu import __version__
from dymu.cli import main
from dymu.thresholds import Thresholds


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "calibrate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.fixture
def messy_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in MIXED_IMAGES[:5]:
        shutil.copy(IMAGES / name, folder / name)
    shutil.copy(IMAGES / "skimage_rocket.jpg", folder / "sub" / "rocket.jpg")  # found recursively
    (folder / "empty.jpg").write_bytes(b"")
    data = (IMAGES / "darknet_eagle.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.png").write_text("this is text, not a picture\n")
    return folder


def test_calibrate_skips_and_reports_bad_files(tower_dir, messy_folder, tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(["calibrate", "--model", str(tower_dir), "--images", str(messy_folder), "--target-tokens", "100",
                 "--batch-size", "3", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "calibrated on 6 images" in printed and "skipped 3 unreadable files" in printed
    for name in ("empty.jpg", "truncated.jpg", "notes.png"):
        assert name in printed
    thresholds = Thresholds.load(out)
    assert sorted(os.path.basename(s["path"]) for s in thresholds.skipped) == ["empty.jpg", "notes.png", "truncated.jpg"]
    assert thresholds.images_seen == 6
    assert not (tmp_path / "t.json.partial").exists()


def test_calibrate_from_a_json_list_and_clear_errors(tower_dir, tmp_path, capsys):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": n} for n in MIXED_IMAGES[:4]]))
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(tower_dir), "--images", str(listing), "--image-root", str(IMAGES),
                 "--r", "5", "--quiet", "--out", str(out)]) == 0
    assert Thresholds.load(out).images_seen == 4

    assert main(["calibrate", "--model", str(tmp_path / "nope"), "--images", str(listing),
                 "--out", str(out)]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tower_dir), "--images", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tower_dir), "--images", str(listing), "--image-root", str(IMAGES),
                 "--r", "1,2", "--out", str(out)]) == 1
    assert "give 1 or one per layer" in capsys.readouterr().err


def run_cli(args, **env):
    """The CLI in a fresh process, one thread, as torchrun's workers run."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=300)


def test_torchrun_two_processes_equal_one(tower_dir, tmp_path):
    common = ["calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--max-images", "24",
              "--target-tokens", "70", "--batch-size", "4", "--quiet", "--device", "cpu"]
    one = run_cli(["-m", "dymu.cli", *common, "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr
    # --standalone: a private rendezvous on a free local port, so runs never collide on a fixed port.
    two = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "dymu.cli", *common, "--out", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = Thresholds.load(tmp_path / "one.json"), Thresholds.load(tmp_path / "two.json")
    assert a.thresholds == b.thresholds
    assert a.tokens_kept_mean == b.tokens_kept_mean and a.images_seen == b.images_seen == 24
    assert two.stdout.count("calibrated on") == 1  # only rank 0 writes and reports


# ---- the README's error table: one line naming the thing and the problem, exit code != 0 ----

@pytest.fixture(scope="module")
def saved_llava(demo_llava_dir, tmp_path_factory):
    folder = demo_llava_dir
    thresholds = tmp_path_factory.mktemp("th") / "t.json"
    assert main(["calibrate", "--model", str(folder), "--images", str(IMAGES), "--max-images", "8",
                 "--batch-size", "8", "--quiet", "--out", str(thresholds)]) == 0
    return folder, thresholds


def gen_args(model, thresholds, image, *extra):
    return ["generate", "--model", str(model), "--thresholds", str(thresholds), "--image", str(image),
            "--prompt", "hi", "--max-new-tokens", "2", *extra]


def one_error_line(capsys):
    """The error is one line (after the 'loading MODEL…' line that commands print before slow loads)."""
    err = "\n".join(error_lines(capsys.readouterr().err))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_error_missing_image(saved_llava, tmp_path, capsys):
    model, th = saved_llava
    assert main(gen_args(model, th, tmp_path / "cat.jpg")) == 1
    assert one_error_line(capsys) == f"dymu generate: error: {tmp_path / 'cat.jpg'}: no such file"


def test_error_unreadable_image(saved_llava, tmp_path, capsys):
    model, th = saved_llava
    bad = tmp_path / "bad.jpg"
    bad.write_bytes((IMAGES / "darknet_eagle.jpg").read_bytes()[:500])
    assert main(gen_args(model, th, bad)) == 1
    assert one_error_line(capsys).startswith(f"dymu generate: error: {bad}: cannot be decoded")


def test_error_thresholds_for_another_encoder(saved_llava, tower_dir, tmp_path, capsys):
    model, _ = saved_llava
    other = tmp_path / "other.json"
    assert main(["calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--max-images", "4",
                 "--quiet", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(gen_args(model, other, IMAGES / "skimage_coffee.png")) == 1
    assert one_error_line(capsys).endswith(("have 4 layers but this vision tower has 6.",  # CLIP thresholds
                                            "are for a SigLIP encoder, not CLIP."))  # SigLIP's: the family first


def test_error_model_that_is_not_a_supported_vlm(saved_llava, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "lm")
    assert main(gen_args(tmp_path / "lm", saved_llava[1], IMAGES / "skimage_coffee.png")) == 1
    assert "is a 'llama' model; dymu supports the VLM model types llava" in one_error_line(capsys)


def test_error_bf16_on_a_cpu_without_it(saved_llava, capsys, monkeypatch):
    import dymu.loading

    monkeypatch.setattr(dymu.loading, "cpu_supports_bfloat16", lambda: False)
    model, th = saved_llava
    assert main(gen_args(model, th, IMAGES / "skimage_coffee.png", "--device", "cpu", "--dtype", "bfloat16")) == 1
    assert "bfloat16 was asked for but this CPU cannot run bfloat16 matmuls" in one_error_line(capsys)


def test_error_unknown_mode(saved_llava, capsys):
    model, th = saved_llava
    with pytest.raises(SystemExit) as exit_:
        main(gen_args(model, th, IMAGES / "skimage_coffee.png", "--mode", "fast"))
    assert exit_.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_debug_shows_the_traceback(saved_llava, tmp_path):
    model, th = saved_llava
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", *gen_args(model, th, tmp_path / "missing.jpg")])


def test_transparent_images_are_composited_on_white(tmp_path):
    from PIL import Image

    from dymu.images import open_image

    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    assert open_image(IMAGES / "sam2_emoji_heart_eyes_palette.png").getpixel((0, 0)) == (255, 255, 255)


# ---- one CLI: every parser alike, one meaning per option name ----

def all_parsers():
    """(name, parser) for `dymu` and every (sub)command."""
    import argparse

    from dymu.cli import build_parser

    found, todo = [], [("dymu", build_parser())]
    while todo:
        name, parser = todo.pop(0)
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


def test_every_parser_refuses_abbreviations_and_documents_every_option():
    import argparse

    parsers = all_parsers()
    assert {"dymu generate", "dymu thresholds import", "dymu env"} <= {name for name, _ in parsers}
    for name, parser in parsers:
        assert parser.allow_abbrev is False, name
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help text"
        # --debug and --quiet everywhere (before or after the subcommand)
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"--debug", "--quiet"} <= flags, name


def test_json_means_a_file_everywhere():
    """`--json FILE` (with `-` for stdout) on every command that has it: never a switch."""
    for name, parser in all_parsers():
        for action in parser._actions:
            if "--json" in action.option_strings:
                assert action.nargs is None and action.metavar == "FILE", name
                assert "'-' prints it to stdout" in action.help, name


def test_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--qui", "--device", "cpu"])  # not --quick, not --quiet: refused
    assert exit_.value.code == 2 and "unrecognized arguments: --qui" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_and_quiet_before_or_after_the_command(saved_llava, tmp_path, where, capsys):
    model, th = saved_llava
    command = gen_args(model, th, tmp_path / "missing.jpg")
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]
    with pytest.raises(Exception, match="no such file"):
        main(argv)
    assert "loading" in capsys.readouterr().err
    argv = ["--quiet", *command] if where == "before" else [*command, "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "loading" not in err and err.strip().startswith("dymu generate: error:"), err


def test_generate_json_file_and_stdout(saved_llava, tmp_path, capsys):
    model, th = saved_llava
    image = IMAGES / "skimage_coffee.png"
    out = tmp_path / "answer.json"
    assert main(gen_args(model, th, image, "--max-new-tokens", "1", "--json", str(out))) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["answer"] in printed and written["images"] == [str(image)]  # the answer still prints
    assert main(gen_args(model, th, image, "--max-new-tokens", "1", "--json", "-")) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == written["visual_tokens"]
    assert main(gen_args(model, th, image, "--json", str(tmp_path / "missing" / "a.json"))) == 1  # checked first
    assert one_error_line(capsys) == f"dymu generate: error: --json {tmp_path / 'missing' / 'a.json'}: folder " \
                                     f"{tmp_path / 'missing'} does not exist"


def test_analyze_out_dir_and_its_old_spelling(capsys):
    from dymu.cli import build_parser

    parser = build_parser()
    base = ["analyze", "--model", "m", "--thresholds", "t", "--images", "x"]
    assert parser.parse_args([*base, "--out-dir", "a"]).out == "a"
    assert parser.parse_args([*base, "--out", "a"]).out == "a"  # hidden alias: commands written before still run
    with pytest.raises(SystemExit):
        main(base)
    assert "the following arguments are required: --out-dir" in capsys.readouterr().err


def test_warnings_are_one_formatted_line(capsys):
    import warnings

    from dymu.tools.console import one_line_warnings, warning_line
    from dymu.tools.calibration import CalibrationWarning

    with one_line_warnings("calibrate"):
        warnings.warn("calibrating on only 6 images:\nthresholds are noisy", CalibrationWarning)
        warnings.warn("dymu: VTU keeps the full-length KV cache", UserWarning)
    err = capsys.readouterr().err
    assert err.splitlines() == ["dymu calibrate: warning: calibrating on only 6 images: thresholds are noisy",
                                "dymu calibrate: warning: VTU keeps the full-length KV cache"]
    assert warning_line("report", "dymu report: a and b differ") == "dymu report: warning: a and b differ"
