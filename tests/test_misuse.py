"""One-line errors for misuse of the command line , and files that are never lost or clobbered."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import IMAGES, MIXED_IMAGES, build_tiny_tower, error_lines
from dymu.cli import main


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """One tiny CLIP tower (these checks do not depend on the family; conftest's runs both)."""
    folder = tmp_path_factory.mktemp("misuse_clip")
    build_tiny_tower("clip", folder)
    return folder


def one_error_line(capsys, code_expected=None):
    err = "\n".join(error_lines(capsys.readouterr().err))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def calibrate_args(tower_dir, out, *extra):
    return ["calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--max-images", "4", "--r", "5",
            "--quiet", "--out", str(out), *extra]


@pytest.mark.parametrize("option, value, words", [
    ("--batch-size", "0", "argument --batch-size: must be >= 1, not 0"),
    ("--batch-size", "-3", "argument --batch-size: must be >= 1, not -3"),
    ("--checkpoint-every", "0", "argument --checkpoint-every: must be >= 1, not 0"),
    ("--max-images", "0", "argument --max-images: must be >= 1, not 0"),
    ("--max-images", "-1", "argument --max-images: must be >= 1, not -1"),
])
def test_counts_must_be_positive(tower_dir, tmp_path, capsys, option, value, words):
    # 0 used to mean "all images" (--max-images) or crash later (--batch-size 0, --checkpoint-every 0).
    args = calibrate_args(tower_dir, tmp_path / "t.json")
    if option == "--max-images":
        args = args[:4] + args[6:]
    with pytest.raises(SystemExit) as exit_:
        main([*args, f"{option}={value}"])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "3,-2", "inf"])
def test_r_must_be_finite_and_not_negative(tower_dir, tmp_path, capsys, value):
    args = [a for a in calibrate_args(tower_dir, tmp_path / "t.json") if a not in ("--r", "5")]
    with pytest.raises(SystemExit):
        main([*args, f"--r={value}"])
    assert "--r expects finite numbers >= 0" in capsys.readouterr().err


def test_generate_r_must_not_be_negative(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "m", "--image", "x.png", "--prompt", "hi", "--mode", "tome", "--r=-4"])
    assert "argument --r: must be >= 0, not -4" in capsys.readouterr().err


def test_fifo_or_device_as_images(tower_dir, tmp_path, capsys):
    # A FIFO would block forever; a device would be read forever.
    fifo = tmp_path / "list.json"
    os.mkfifo(fifo)
    assert main(calibrate_args(tower_dir, tmp_path / "t.json")[:4] + [str(fifo), "--out", str(tmp_path / "t.json")]) == 1
    assert one_error_line(capsys) == f"dymu calibrate: error: {fifo}: not a regular file (a FIFO, socket or device?)"
    th = tmp_path / "th.json"
    assert main(calibrate_args(tower_dir, th)) == 0
    capsys.readouterr()
    out = tmp_path / "enc.json"
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    assert main(["encode", "--model", str(tower_dir), "--thresholds", str(th), "--images", str(pipe), "/dev/zero",
                 str(IMAGES / MIXED_IMAGES[0]), "--json", str(out)]) == 0
    skipped = {s["path"]: s["reason"] for s in json.loads(out.read_text())["skipped"]}
    assert skipped == {str(pipe): "is not a regular file (a FIFO, socket or device?)",
                       "/dev/zero": "is not a regular file (a FIFO, socket or device?)"}


def test_calibrate_out_is_checked_first(tower_dir, tmp_path, capsys):
    # --out is a folder: refused before the model loads or a batch runs (it used to fail at the end).
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(calibrate_args(tower_dir, folder)) == 1
    assert one_error_line(capsys) == f"dymu calibrate: error: --out {folder} is a folder; give a file name"
    assert main(calibrate_args(tower_dir, tmp_path / "nope" / "t.json")) == 1
    assert "folder " + str(tmp_path / "nope") + " does not exist" in one_error_line(capsys)


def test_calibrate_temporaries_never_follow_symlinks(tower_dir, tmp_path):
    # OUT.tmp and OUT.partial.tmp were fixed names; a planted symlink redirected the write.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("t.json.tmp", "t.json.partial.tmp"):
        (tmp_path / name).symlink_to(victim)
    assert main(calibrate_args(tower_dir, tmp_path / "t.json", "--batch-size", "2", "--checkpoint-every", "1")) == 0
    assert victim.read_text() == "precious\n" and (tmp_path / "t.json").is_file()


def test_encode_json_is_checked_first(tower_dir, tmp_path, capsys, monkeypatch):
    # --json into a missing folder used to lose every result at the final write.
    import dymu.loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --json was checked")

    monkeypatch.setattr(dymu.loading, "load_vision_model", no_model)
    th = tmp_path / "th.json"
    th.write_text("{}")
    out = tmp_path / "missing" / "enc.json"
    assert main(["encode", "--model", str(tower_dir), "--thresholds", str(th), "--images", str(IMAGES),
                 "--json", str(out)]) == 1
    assert one_error_line(capsys) == f"dymu encode: error: --json {out}: folder {out.parent} does not exist"


def test_missing_weights_are_an_error(tower_dir, tmp_path, capsys):
    # A config declaring more layers than the weights hold loaded with random layers, silently.
    import shutil

    from dymu.loading import LoadError, load_vision_model, resolve_device_dtype

    folder = tmp_path / "deeper"
    shutil.copytree(tower_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"the weights do not match the config: \d+ weights missing from the checkpoint"):
        load_vision_model(str(folder), *resolve_device_dtype("cpu", "float32"))
    assert main(calibrate_args(folder, tmp_path / "t.json")) == 1
    assert "encoder.layers.4." in one_error_line(capsys)


def test_an_empty_error_message_still_says_something(capsys, monkeypatch):
    import dymu.cli

    def fails(args):
        raise MemoryError()

    parser = dymu.cli.build_parser
    monkeypatch.setattr(dymu.cli, "build_parser", lambda: _with_func(parser(), "demo", fails))
    assert main(["demo"]) == 1
    assert one_error_line(capsys) == "dymu demo: error: MemoryError"


def _with_func(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


def test_ctrl_c_before_the_command_runs_is_one_line(capsys, monkeypatch):
    # Ctrl-C while the parser and transformers are imported used to print a traceback.
    import dymu.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(dymu.cli, "build_parser", interrupted)
    assert main(["demo"]) == 130
    assert one_error_line(capsys) == "dymu: interrupted"


def test_ctrl_c_during_calibration_keeps_the_progress(tower_dir, tmp_path):
    # No lost work: a real SIGINT to a running `dymu calibrate`.
    out = tmp_path / "t.json"
    ckpt = tmp_path / "t.json.partial"
    args = ["calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--r", "5", "--batch-size", "1",
            "--checkpoint-every", "1", "--quiet", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "dymu.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.splitlines()[-1], err
    assert err.splitlines()[-1] == f"dymu calibrate: interrupted; progress is saved in {ckpt}: the same command resumes"
    assert ckpt.exists() and not out.exists()
