"""`dymu report` on lmms-eval results files (written here in lmms-eval's layout; the end-to-end
test in tests/integrations reads real ones)."""

import json

import pytest

from dymu.cli import main
from dymu.tools.report import ReportError, collect, markdown_table


def write_results(folder, name, model_args, results, throughput=None):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"results": results, "config": {"model": "dymu", "model_args": model_args}}
    if throughput is not None:
        data["throughput"] = throughput
    (folder / f"{name}_results.json").write_text(json.dumps(data))


def task(metric, value):
    return {"alias": "x", f"{metric},none": value, f"{metric}_stderr,none": 0.1, "other,none": -1.0}


@pytest.fixture
def runs(tmp_path):
    write_results(tmp_path / "a" / "m", "20260101_000000", "pretrained=m,mode=full,batch_size=8",
                  {"gqa": task("exact_match", 0.62), "pope": task("f1", 0.86)},
                  {"avg_visual_tokens/gqa": 576.0, "avg_images/gqa": 10.0, "avg_visual_tokens/pope": 576.0,
                   "avg_images/pope": 30.0, "avg_full_visual_tokens": 576.0})
    # the dymu configuration ran its tasks separately: one row, tokens weighted by images
    write_results(tmp_path / "b" / "m", "20260101_000001", "pretrained=m,thresholds=/x/llava15-mid.json,mode=dymu",
                  {"gqa": task("exact_match", 0.60)},
                  {"avg_visual_tokens/gqa": 200.0, "avg_images/gqa": 10.0, "avg_full_visual_tokens": 576.0})
    write_results(tmp_path / "b" / "m", "20260101_000002", "pretrained=m,thresholds=/x/llava15-mid.json,mode=dymu",
                  {"pope": task("f1", 0.85)},
                  {"avg_visual_tokens/pope": 100.0, "avg_images/pope": 30.0, "avg_full_visual_tokens": 576.0})
    write_results(tmp_path / "c", "20260101_000003", "pretrained=m,mode=tome,r=16", {"gqa": task("exact_match", 0.5)})
    return tmp_path


def test_rows_per_configuration_scores_and_weighted_tokens(runs):
    rows, shown = collect([runs / "c", runs / "b", runs / "a"])
    assert [r.label for r in rows] == ["full", "dymu (llava15-mid)", "tome (r=16)"]
    assert shown == {"gqa": "exact_match", "pope": "f1"}
    full, mid, tome = rows
    assert full.scores == {"gqa": 0.62, "pope": 0.86} and full.mean_tokens() == 576.0
    assert mid.scores == {"gqa": 0.60, "pope": 0.85}
    assert mid.mean_tokens() == pytest.approx((200 * 10 + 100 * 30) / 40)
    assert tome.mean_tokens() is None and tome.scores == {"gqa": 0.5}
    table = markdown_table(rows, shown)
    assert table.splitlines()[0] == "| run | gqa (exact_match) | pope (f1) | visual tokens / image | stock |"
    assert "| dymu (llava15-mid) | 0.6 | 0.85 | 125 | 576 |" in table
    assert "| tome (r=16) | 0.5 | - | - | - |" in table


def test_cli_metric_choice_and_errors(runs, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert main(["report", str(runs), "--metric", "pope=other", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pope (other)" in printed and out.read_text().strip() == printed.strip()
    assert main(["report", str(runs), "--metric", "pope=recall"]) == 1
    assert "task pope has no metric 'recall' (it has: f1, other)" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no lmms-eval \\*_results.json"):
        collect([tmp_path / "empty"])


def test_video_tokens_get_their_own_columns(tmp_path):
    write_results(tmp_path / "full", "20260101_000000", "pretrained=m,mode=full",
                  {"videomme": task("score", 0.5), "mme": task("score", 0.7)},
                  {"avg_visual_tokens/mme": 729.0, "avg_images/mme": 4.0, "avg_full_visual_tokens": 729.0,
                   "avg_video_tokens/videomme": 1568.0, "avg_videos/videomme": 2.0, "avg_full_video_tokens": 1568.0})
    write_results(tmp_path / "dymu", "20260101_000001", "pretrained=m,mode=dymu,thresholds=ov-mid.json",
                  {"videomme": task("score", 0.48)},
                  {"avg_video_tokens/videomme": 700.0, "avg_videos/videomme": 2.0, "avg_full_video_tokens": 1568.0})
    rows, shown = collect([tmp_path])
    table = markdown_table(rows, shown).splitlines()
    assert table[0] == ("| run | mme (score) | videomme (score) | visual tokens / image | stock | "
                        "visual tokens / video | stock / video |")
    assert table[2] == "| full | 0.7 | 0.5 | 729 | 729 | 1568 | 1568 |"
    assert table[3] == "| dymu (ov-mid) | - | 0.48 | - | - | 700 | 1568 |"
