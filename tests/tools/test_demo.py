"""`dymu demo`: the README's main command, and the offline round trip through its saved model."""

import json
import subprocess
import sys
import time

from conftest import IMAGES
from dymu.cli import main


def test_demo_runs_fast_and_counts_rise_with_clutter(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["demo", "--save-model", str(tmp_path / "tiny-llava"), "--max-new-tokens", "4"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert elapsed < 180, f"dymu demo took {elapsed:.0f}s"
    assert "RANDOM weights" in out and "noise" in out
    counts = [int(line.split()[1]) for line in out.splitlines() if line.strip().endswith("#") and "/" in line]
    assert len(counts) == 6
    assert counts[0] < counts[-1]  # blank keeps fewer tokens than the cluttered street scene
    assert "full" in out and "dymu" in out
    # Times are the bench's way (tools/bench/timing.py): a warm-up round, then interleaved runs, medians.
    assert "times are medians of 3 interleaved runs after 1 warm-up round" in out
    assert "(a demo: real calibrations use hundreds): target 92.0; per image, as inference runs them" in out

    # The saved model works offline with the other commands.
    model = str(tmp_path / "tiny-llava")
    thresholds = tmp_path / "t.json"
    assert main(["calibrate", "--model", model, "--images", str(IMAGES), "--max-images", "16", "--preset", "mid",
                 "--batch-size", "8", "--quiet", "--out", str(thresholds)]) == 0
    assert main(["encode", "--model", model, "--thresholds", str(thresholds), "--images",
                 str(IMAGES / "synthetic_blank_white.png"), str(IMAGES / "synthetic_noise.png"),
                 "--json", str(tmp_path / "enc.json")]) == 0
    encoded = json.loads((tmp_path / "enc.json").read_text())["images"]
    assert [e["full_tokens"] for e in encoded] == [256, 256]
    assert encoded[0]["tokens"] < encoded[1]["tokens"]
    assert sum(encoded[0]["sizes"]) == 256 and len(encoded[0]["group_of_patch"]) == 256
    capsys.readouterr()
    assert main(["generate", "--model", model, "--thresholds", str(thresholds), "--image",
                 str(IMAGES / "skimage_coffee.png"), "--prompt", "What is this?", "--max-new-tokens", "3",
                 "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "dymu" and report["visual_tokens"][0][0] < report["full_tokens"][0][0] == 256
    assert report["new_tokens"] == 3


def test_console_script_help_and_version():
    exe = [sys.executable, "-m", "dymu.cli"]
    assert "dymu 0.1.0" in subprocess.run([*exe, "--version"], capture_output=True, text=True).stdout
    helped = subprocess.run([*exe, "demo", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--save-model" in helped.stdout


def test_onevision_demo_and_its_saved_model_through_the_cli(tmp_path, capsys):
    from PIL import Image

    model = str(tmp_path / "tiny-ov")
    assert main(["demo", "--family", "onevision", "--save-model", model, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "LLaVA-OneVision-shaped" in out and "crops" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("image", "2 images", "video"))]
    assert len(rows) == 6  # full and dymu for one image, two images, a video

    thresholds = tmp_path / "t.json"
    assert main(["calibrate", "--model", model, "--images", str(IMAGES), "--max-images", "4", "--preset", "mid",
                 "--batch-size", "2", "--quiet", "--out", str(thresholds)]) == 0
    assert "AnyRes crops" in capsys.readouterr().out
    assert main(["encode", "--model", model, "--thresholds", str(thresholds), "--images",
                 str(IMAGES / "synthetic_blank_white.png"), "--json", str(tmp_path / "enc.json")]) == 0
    encoded = json.loads((tmp_path / "enc.json").read_text())["images"][0]
    assert encoded["full_tokens"] == 81 * len(encoded["crops"]) and encoded["tokens"] < encoded["full_tokens"]
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.open(IMAGES / "darknet_kite_beach.jpg").convert("RGB").resize((160, 120)).rotate(9 * i).save(
            frames / f"{i}.png")
    capsys.readouterr()
    assert main(["generate", "--model", model, "--thresholds", str(thresholds), "--image",
                 str(IMAGES / "skimage_coffee.png"), "--video", str(frames), "--prompt", "What?",
                 "--max-new-tokens", "2", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stock_tokens"][0][1] == 3 * 25 + 1  # 3 frames pooled to 5x5, one newline
    assert all(n <= s for n, s in zip(report["visual_tokens"][0], report["stock_tokens"][0]))
    assert main(["generate", "--model", model, "--thresholds", str(thresholds), "--image",
                 str(IMAGES / "skimage_coffee.png"), "--prompt", "What?", "--mode", "dtome"]) == 1
    assert "mode 'dtome' is not available for LlavaOnevisionForConditionalGeneration" in capsys.readouterr().err
