"""`dymu demo --family ...` and the CLI round trip through a saved tiny Qwen VL (calibrate, encode,
generate with an image and a video, bench rows)."""

import json

from conftest import IMAGES
from dymu.cli import main


def test_qwen_demo_counts_rise_with_clutter(tmp_path, capsys):
    assert main(["demo", "--family", "qwen3_vl", "--save-model", str(tmp_path / "q3"), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Warning:" not in captured.err, captured.err  # never Python's raw "file:line: CalibrationWarning: ..."
    assert "RANDOM weights" in out and "video    dymu, cross_frame" in out
    lines = [line for line in out.splitlines() if line.strip().endswith("#") and "/" in line]
    assert len(lines) == 12  # 6 images, merge_point vit and post
    kept = [int(line.split()[1]) / int(line.split()[3]) for line in lines]
    assert kept[0] < kept[5] and kept[6] < kept[11]  # blank page < cluttered street, both merge points
    assert (tmp_path / "q3" / "config.json").exists()
    assert len(list((tmp_path / "q3" / "images").glob("*.*g"))) == 6 and (tmp_path / "q3" / "images" / "SOURCES.md").exists()


def test_qwen_cli_round_trip(qwen_dirs, tmp_path, capsys):
    model = str(qwen_dirs["qwen2_5_vl"])
    thresholds = tmp_path / "post.json"
    assert main(["calibrate", "--model", model, "--images", str(IMAGES), "--max-images", "8", "--preset", "mid",
                 "--merge-point", "post", "--rounds", "2", "--batch-size", "4", "--quiet", "--out",
                 str(thresholds)]) == 0
    saved = json.loads(thresholds.read_text())
    assert saved["encoder"]["merge_point"] == "post" and len(saved["thresholds"]) == 2
    assert main(["encode", "--model", model, "--thresholds", str(thresholds), "--images",
                 str(IMAGES / "synthetic_blank_white.png"), str(IMAGES / "darknet_dog_bicycle_truck.jpg"),
                 "--json", str(tmp_path / "enc.json")]) == 0
    encoded = json.loads((tmp_path / "enc.json").read_text())["images"]
    assert encoded[0]["tokens"] / encoded[0]["full_tokens"] < encoded[1]["tokens"] / encoded[1]["full_tokens"]
    assert len(encoded[1]["group_of_unit"]) == encoded[1]["full_tokens"]
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        (frames / f"{k:03d}.png").write_bytes((IMAGES / "synthetic_gradient.png").read_bytes())
    capsys.readouterr()
    assert main(["generate", "--model", model, "--thresholds", str(thresholds), "--image",
                 str(IMAGES / "darknet_eagle.jpg"), "--video", str(frames), "--prompt", "What?",
                 "--max-new-tokens", "2", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "dymu" and len(report["visual_tokens"][0]) == 2
    assert all(k < f for k, f in zip(report["visual_tokens"][0], report["full_tokens"][0]))
    per_patch = report["video_tokens_per_temporal_patch"]  # 3 frames -> padded to 4 -> 2 temporal patches
    assert len(per_patch) == 1 and len(per_patch[0]) == 2 and sum(per_patch[0]) == report["visual_tokens"][0][1]
    # dtome: merged tokens fed straight to the LLM, one placeholder per kept token.
    assert main(["generate", "--model", model, "--thresholds", str(thresholds), "--image",
                 str(IMAGES / "darknet_eagle.jpg"), "--prompt", "x", "--mode", "dtome", "--max-new-tokens", "2",
                 "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "dtome" and report["visual_tokens"][0][0] < report["stock_tokens"][0][0]


def test_qwen_bench_rows_quick(capsys):
    assert main(["bench", "--quick", "--only", "qwen_vit,qwen_prefill"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-VL vision tower" in out and "| DToMe mid (vit) |" in out and "| VTU mid |" in out


def test_qwen3_5_bench_rows_quick(tmp_path, capsys):
    """The Qwen3.5 rows: the tower at the presets and a linear-attention + full-attention prefill with VTU."""
    assert main(["bench", "--quick", "--only", "qwen3_5", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "Qwen3.5 vision tower" in out and "linear_attention, full_attention layers" in out
    rows = json.loads((tmp_path / "b.json").read_text())["qwen3_5"]["prefill"]
    assert [r["variant"] for r in rows] == ["stock", "VTU low", "VTU mid", "VTU high"]
    assert rows[0]["rows"] == rows[0]["positions"] and all(r["rows"] < r["positions"] for r in rows[1:])
    assert all(r["flop_ideal"] > 1 for r in rows[1:])


def test_qwen_calibration_under_torchrun_equals_one_process(qwen_dirs, tmp_path):
    from test_cli import run_cli

    from dymu.thresholds import Thresholds

    common = ["calibrate", "--model", str(qwen_dirs["qwen2_vl"]), "--images", str(IMAGES), "--max-images", "12",
              "--preset", "mid", "--batch-size", "3", "--quiet", "--device", "cpu"]
    one = run_cli(["-m", "dymu.cli", *common, "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr
    two = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "dymu.cli", *common, "--out", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = Thresholds.load(tmp_path / "one.json"), Thresholds.load(tmp_path / "two.json")
    assert a.thresholds == b.thresholds and a.images_seen == b.images_seen == 12
    assert a.tokens_kept_mean == b.tokens_kept_mean
    assert two.stdout.count("calibrated on") == 1  # only rank 0 writes and reports


def test_qwen_calibrate_refuses_options_it_would_ignore(qwen_dirs, tmp_path, capsys):
    model = str(qwen_dirs["qwen2_vl"])
    base = ["calibrate", "--model", model, "--images", str(IMAGES), "--max-images", "2", "--quiet",
            "--out", str(tmp_path / "t.json")]
    qwen = "does not apply to a Qwen2-VL / Qwen2.5-VL / Qwen3-VL"
    for extra, message in ((["--order", "ab"], f"--order {qwen}"),
                           (["--rounds", "2"], f"--rounds {qwen}: rounds are for --merge-point post"),
                           (["--target-tokens", "40"], f"--target-tokens {qwen}")):
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
