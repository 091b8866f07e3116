"""`dymu bench --quick`: a smoke test of the whole benchmark. It checks the structure of the JSON and
the markdown, never a timing (timings depend on the machine and on what else runs on it)."""

from __future__ import annotations

import json
import re
import math

import pytest

from dymu.tools.bench import report as bench
from dymu.cli import main


def test_bench_quick_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench.json"  # its folder must exist: bench checks --json before it measures
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "Warning:" not in captured.err, captured.err  # never Python's raw "file:line: CalibrationWarning: ..."
    result = json.loads(out.read_text())

    # Every section ran and is in the JSON, with the machine description and the settings.
    for key in ("date", "machine", "settings", "encoder", "prefill", "exact", "attention_flops", "calibration",
                "merge_off", "onevision", "packed", "decode", "targets", "notes", "elapsed_s", "section_s"):
        assert key in result, key
    for key in ("cpu", "cpu_cores", "torch", "transformers", "device"):
        assert key in result["machine"], key
    assert result["settings"]["plan"] == "quick"
    assert result["settings"]["dtype"] == "float32"
    assert result["settings"]["runs"] == 1
    assert any("random weights" in note for note in result["notes"])

    # Encoder: full + low/mid/high for each batch size, with times and ratios.
    enc = result["encoder"]
    assert [(r["batch"], r["variant"]) for r in enc] == [
        (b, v) for b in result["settings"]["batches"] for v in ("full", "low", "mid", "high")
    ]
    for r in enc:
        assert len(r["times_s"]) == 1 and r["median_s"] > 0
        for key in ("speedup", "flop_ideal", "quotient", "speedup_paired", "tokens_at_feature_layer", "rule"):
            assert math.isfinite(r[key]) if isinstance(r[key], float) else r[key], key
        assert len(r["kept_per_layer"]) == r["layers_run"]
    full = [r for r in enc if r["variant"] == "full"]
    assert all(r["flop_ideal"] == 1.0 for r in full)
    # Merging keeps fewer tokens and needs fewer FLOPs (structure of the counts, not a timing).
    for r in enc:
        if r["variant"] != "full":
            assert r["flop_ideal"] > 1.0
            assert r["tokens_at_feature_layer"] < full[0]["tokens_at_feature_layer"]

    # Decode: stock, VTU full, VTU compact per preset and batch; the compact cache holds fewer bytes
    # (counts, not timings), the full-length ones exactly the stock bytes.
    dec = result["decode"]
    names = ["stock"] + [f"VTU {p} {c}" for c in ("full", "compact") for p in ("low", "mid", "high")]
    assert [(r["batch"], r["variant"]) for r in dec["rows"]] == [(b, n) for b in dec["settings"]["batches"] for n in names]
    for r in dec["rows"]:
        assert r["kv_bytes"] > 0 and r["ms_per_token"] > 0 and r["sequences_in_8gb"] > 0
        assert r["kv_ratio"] == 1.0 if r["kv_cache"] != "compact" else r["kv_ideal_ratio"] < r["kv_ratio"] < 1.0
    assert {r["formulation"] for r in dec["formulations"]} == {
        "stock attention, full cache", "compact: rotate gathered keys", "compact scores: cos/sin decomposition"}

    # Prefill: full + VTU at three N_un; rows per layer = text + unique visual rows.
    pre = result["prefill"]
    assert [r["variant"] for r in pre] == ["full", "VTU low", "VTU mid", "VTU high"]
    text = result["settings"]["text_before"] + result["settings"]["text_after"]
    assert pre[0]["rows_per_layer"] == pre[0]["positions"]
    for r in pre[1:]:
        assert r["rows_per_layer"] == r["n_un"] + text
        assert r["flop_ideal"] > 1.0 and r["speedup"] > 0
    assert pre[1]["n_un"] < pre[2]["n_un"] < pre[3]["n_un"]

    # Exact Eq. 10 vs the gather path at one N_un.
    assert [r["variant"] for r in result["exact"]] == ["full", "fast", "exact"]
    assert result["exact"][1]["n_un"] == result["exact"][2]["n_un"] == pre[1]["n_un"]

    # Table 1: the paper's numbers are reproduced by its formulas.
    fl = result["attention_flops"]
    assert [r["n_un"] for r in fl[:4]] == [576, 94, 209, 393]
    for r in fl[:4]:
        assert abs(r["paper_formula_mflops"] - r["paper_mflops"]) < 0.5
    assert fl[0]["paper_formula_mflops"] == pytest.approx(576 * 576 * 128 * 32 / 1e6)
    assert fl[1]["paper_formula_mflops"] == pytest.approx(2 * 94 * 94 * 128 * 32 / 1e6)

    # OneVision prefill: one AnyRes image in the packed layout, full + VTU low/mid/high.
    ov = result["onevision"]
    rows, text = ov["rows"], sum(result["settings"]["onevision_text"])
    assert [r["variant"] for r in rows] == ["full", "VTU low", "VTU mid", "VTU high"]
    assert ov["image"]["crops"] > 1 and rows[0]["positions"] == ov["image"]["positions"] + text
    for r in rows[1:]:
        assert r["rows_per_layer"] == r["n_un"] + text and r["flop_ideal"] > 1.0
    assert rows[1]["n_un"] < rows[2]["n_un"] < rows[3]["n_un"] < ov["image"]["positions"]
    # ... and the merge-point rows: a photo whose canvas anyres_max_9 downsamples and an 8-frame video, each
    # full vs vit / post / both, with the three counts (encoder tokens, LLM rows, stock positions).
    mp = ov["merge_points"]
    assert mp["image"]["crops"] == 13 and mp["video"]["frames"] == 8  # a 3x4 grid of crops + the base crop
    tokens_per_crop = ov["image"]["tokens_per_crop"]
    # Not downsampled, the image would take base + canvas + a newline per canvas row > every crop's tokens.
    assert mp["image"]["stock_positions"] < mp["image"]["crops"] * tokens_per_crop
    for name, items in (("image", mp["image"]["crops"]), ("video", mp["video"]["frames"])):
        by = {r["variant"]: r for r in mp[name]["rows"]}
        assert list(by) == ["full", "vit", "post", "both"]
        full = by["full"]
        assert full["encoder_tokens"] == items * tokens_per_crop == by["post"]["encoder_tokens"]  # the stock tower
        assert full["llm_rows"] == full["stock_positions"] == mp[name]["stock_positions"]
        assert full["rows_per_layer"] == full["positions"] == full["stock_positions"] + text
        assert full["flop_ideal"] == full["encoder_flop_ideal"] == 1.0
        for merge_point in ("vit", "post", "both"):
            r = by[merge_point]
            assert r["stock_positions"] == full["stock_positions"] and r["positions"] == full["positions"]
            assert r["rows_per_layer"] == r["llm_rows"] + text and r["llm_rows"] <= r["stock_positions"]
            assert r["speedup"] > 0 and r["flop_ideal"] >= 1.0
        for merge_point in ("vit", "both"):  # DToMe in the tower: fewer encoder tokens, fewer tower FLOPs
            assert by[merge_point]["encoder_tokens"] < full["encoder_tokens"]
            assert by[merge_point]["encoder_flop_ideal"] > 1.0
        assert by["both"]["llm_rows"] <= by["vit"]["llm_rows"]  # the post rounds only remove rows
    image = {r["variant"]: r for r in mp["image"]["rows"]}
    assert image["post"]["llm_rows"] < image["full"]["llm_rows"] and image["both"]["llm_rows"] < image["full"]["llm_rows"]
    # Packed vs padded: the same tokens per image and layer, so the same FLOPs; fewer than the padded layout's rows.
    packed = {(r["batch"], r["variant"]): r for r in result["packed"]["rows"]}
    big = result["settings"]["packed_batches"][0]
    assert set(packed) == {(1, "padded"), (1, "packed"), (big, "full"), (big, "padded"), (big, "packed")}
    for batch in (1, big):
        assert packed[(batch, "packed")]["tokens_at_feature_layer"] == packed[(batch, "padded")]["tokens_at_feature_layer"]
        assert packed[(batch, "packed")]["flops"] == packed[(batch, "padded")]["flops"]
    pk = packed[(big, "packed")]
    assert len(set(pk["tokens_at_feature_layer"])) > 1  # calibrated thresholds: counts differ per image
    assert pk["alive_rows_per_layer_mean"] < pk["padded_rows_per_layer_mean"] and pk["flop_ideal"] > 1.0
    assert result["packed"]["calibration"]["thresholds_identical"]

    cal = result["calibration"]
    assert cal["plain_images_per_s"] > 0 and cal["calibrate_images_per_s"] > 0 and cal["checked_images_per_s"] > 0
    off = result["merge_off"]
    assert len(off["stock_times_s"]) == len(off["patched_times_s"]) == 1
    assert result["targets"] is None  # toy sizes: no target can be judged

    # The markdown report on stdout: a smoke test that names what ran and prints no figures.
    assert "smoke test, no figures" in stdout
    for section in ("packed vs padded", "encoder (8 rows)", "prefill (4 rows)", "merge points: 8 rows", "exact Eq. 10", "attention FLOPs", "calibration",
                    "merge-off"):
        assert section in stdout, section
    assert not re.search(r"\d+\.\d+\s*[x×]|\bmet\b|\| *yes *\||speedup \||ms\b", stdout), stdout
    assert "random weights" in stdout.lower()


def test_bench_full_report_keeps_figures_and_targets():
    """The markdown of a full-size run (no timing here: a result dict shaped like the full bench's)."""
    from dymu.tools.bench.report import markdown

    row = dict(batch=1, layers_run=23, variant="low", rule="r=21 per layer", tokens_at_feature_layer=93.0,
               median_s=1.7, speedup=1.58, flop_ideal=1.78, quotient=0.89)
    result = {"machine": {"cpu": "cpu", "cpu_cores": 2, "torch_threads": 2, "gpu": None, "torch": "t",
                          "transformers": "t"}, "date": "d", "elapsed_s": 1.0, "notes": [],
              "settings": {"plan": "full", "device": "cpu", "dtype": "float32", "runs": 5, "warmup": 1,
                           "clip": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        image_size=336, patch_size=14), "feature_layer": -2},
              "encoder": [row], "targets": bench.evaluate_targets({"encoder": [row]})}
    text = markdown(result)
    assert "1.58x" in text and "### Targets" in text and "| yes |" in text


def test_bench_refuses_bfloat16_on_a_cpu_without_it(monkeypatch, capsys):
    from dymu import loading

    monkeypatch.setattr(loading, "cpu_supports_bfloat16", lambda: False)
    assert main(["bench", "--quick", "--device", "cpu", "--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err
    assert "bfloat16 was asked for but this CPU cannot run bfloat16 matmuls" in err


def test_bench_rejects_bad_thresholds_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--thresholds", "low"])
    assert "PRESET=FILE" in capsys.readouterr().err


def test_bench_internvl_section_is_opt_in_and_runs(tmp_path, capsys):
    from dymu.tools.bench import OPT_IN, SECTIONS

    assert "internvl" in OPT_IN and "internvl" not in SECTIONS  # minutes at real dimensions: --only internvl
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--only", "internvl", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["internvl"]
    assert [r["variant"] for r in result["tower"]][0] == "full (stock tower)" and len(result["tower"]) == 4
    full = result["tower"][0]["units_kept"]
    assert all(r["units_kept"] < full and r["flop_ideal"] > 1 for r in result["tower"][1:])
    assert [r["variant"] for r in result["prefill"]] == ["full", "VTU low", "VTU mid", "VTU high"]
    assert all(r["n_un"] < r["positions"] for r in result["prefill"][1:])
