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


def test_rows_are_keyed_on_every_setting_that_changes_a_result(tmp_path):
    """A budget sweep, two models in mode full, and thresholds files of one name but different content
    stay separate rows, labelled by what tells them apart; batch_size and device do not split a row."""
    th_a, th_b = tmp_path / "a" / "mid.json", tmp_path / "b" / "mid.json"
    for path, value in ((th_a, 0.9), (th_b, 0.8)):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"thresholds": [value]}))
    runs = [
        ("pretrained=llava-7b,mode=full,batch_size=8", 0.60),
        ("pretrained=llava-13b,mode=full,batch_size=8", 0.66),
        ("pretrained=llava-7b,mode=full,batch_size=1,device=cuda:1", 0.60),  # same configuration as the first
        (f"pretrained=llava-7b,mode=dymu,thresholds={th_a}", 0.58),
        (f"pretrained=llava-7b,mode=dymu,thresholds={th_a},max_tokens=64", 0.52),
        (f"pretrained=llava-7b,mode=dymu,thresholds={th_b}", 0.57),
    ]
    for i, (args, score) in enumerate(runs):
        write_results(tmp_path / "runs", f"2026010{i}_000000", args, {"gqa": task("exact_match", score)})
    rows, _ = collect([tmp_path / "runs"])
    labels = {r.label: r.scores["gqa"] for r in rows}
    assert len(rows) == 5
    assert labels["full (pretrained=llava-7b)"] == 0.60 and labels["full (pretrained=llava-13b)"] == 0.66
    budget = [label for label in labels if "max_tokens=64" in label]
    assert len(budget) == 1 and labels[budget[0]] == 0.52
    assert sum("dymu (mid" in label for label in labels) == 3  # the two files named mid.json stay apart


def test_a_model_passed_as_an_object_is_not_labelled_dymu(tmp_path):
    write_results(tmp_path, "20260101_000000", "", {"gqa": task("exact_match", 0.5)},
                  {"avg_visual_tokens/gqa": 576.0, "avg_images/gqa": 2.0})
    write_results(tmp_path, "20260101_000001", {"pretrained": "m", "mode": "full"}, {"gqa": task("exact_match", 0.6)})
    rows, _ = collect([tmp_path])
    assert [r.label for r in rows] == ["full", "unknown (model passed as an object: no model_args)"]


def test_two_runs_of_one_configuration_that_disagree_warn(tmp_path, capsys):
    for i, score in enumerate((0.5, 0.7)):
        write_results(tmp_path, f"2026010{i}_000000", "pretrained=m,mode=full", {"gqa": task("exact_match", score)})
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    [warning] = captured.err.strip().splitlines()
    assert "ran the same configuration (full) on gqa with different scores (0.5 vs 0.7)" in warning
    assert "| full | 0.7 |" in captured.out


@pytest.mark.parametrize("data, problem", [
    ({"results": []}, "no 'results' object"),
    ({"results": {"gqa": 3}}, "results.gqa must be an object of metrics"),
    ({"results": {"gqa": {"exact_match,none": 1.0}}, "throughput": {"avg_visual_tokens/gqa": "many",
                                                                  "avg_images/gqa": 2}},
     "throughput.avg_visual_tokens/gqa must be a number"),
    ({"results": {}, "config": "x"}, "'config' and 'throughput' must be objects"),
])
def test_malformed_fields_name_the_file(tmp_path, data, problem):
    path = tmp_path / "20260101_000000_results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=problem) as err:
        collect([tmp_path])
    assert str(path) in str(err.value)
