"""`dymu report`: lmms-eval result folders -> one markdown table of score and visual tokens per mode.

Reads every `*_results.json` under the given folders (as `python -m lmms_eval --output_path`
writes them). A row is one dymu configuration, named from the run's model_args: the mode, plus the
thresholds file's name or r (`dymu (llava15-mid)`, `tome (r=16)`). Runs of the same configuration
over different tasks fill the same row (a later run of the same task replaces an earlier one). The
score of a task is its first metric unless `--metric TASK=METRIC` says otherwise; the token column
is the mean visual tokens per image the LLM saw over all the row's images (from the
`avg_visual_tokens/TASK` and `avg_images/TASK` entries that the dymu lmms-eval model logs), and
when any run has videos, the same per video (`avg_video_tokens/TASK`, `avg_videos/TASK`).
No lmms-eval import: plain JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MODE_ORDER = ("full", "dymu", "tome", "dtome", "downsample")


class ReportError(ValueError):
    """A result file or option that cannot be used; the message names it."""


@dataclass
class Row:
    label: str
    mode: str
    scores: dict[str, float] = field(default_factory=dict)  # task -> score
    # kind ("image" / "video") -> task -> (mean tokens per item, items)
    tokens: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    full_tokens: dict[str, float] = field(default_factory=dict)  # kind -> mean stock tokens per item

    def mean_tokens(self, kind: str = "image") -> float | None:
        per_task = self.tokens.get(kind, {}).values()
        items = sum(n for _, n in per_task)
        return sum(t * n for t, n in per_task) / items if items else None


# kind -> (the throughput keys the dymu lmms-eval model logs: mean tokens, count, mean stock tokens)
KINDS = {"image": ("avg_visual_tokens", "avg_images", "avg_full_visual_tokens"),
         "video": ("avg_video_tokens", "avg_videos", "avg_full_video_tokens")}


def parse_model_args(text: str) -> dict[str, str]:
    """lmms-eval's `key=value,key=value` model_args (values here hold no commas)."""
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def run_label(model_args: dict[str, str]) -> tuple[str, str]:
    mode = model_args.get("mode", "dymu")
    thresholds, r = model_args.get("thresholds"), model_args.get("r")
    if mode == "tome" and r:
        return f"tome (r={r})", mode
    if mode != "full" and thresholds:
        return f"{mode} ({Path(thresholds).stem})", mode
    return mode, mode


def task_score(task: str, metrics: dict, wanted: str | None, where: Path) -> tuple[str, float]:
    """(metric name, value) of one task's entry in results["results"]."""
    names = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    if wanted is not None:
        match = [k for k in names if k.split(",")[0] == wanted]
        if not match:
            raise ReportError(f"{where}: task {task} has no metric {wanted!r} (it has: "
                              f"{', '.join(sorted({k.split(',')[0] for k in names}))}).")
        return wanted, float(metrics[match[0]])
    if not names:
        raise ReportError(f"{where}: task {task} has no numeric metric.")
    return names[0].split(",")[0], float(metrics[names[0]])


def find_result_files(paths: list[str | Path]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(path.rglob("*_results.json"))
            if not found:
                raise ReportError(f"{path}: no lmms-eval *_results.json in this folder.")
            files += found
        else:
            raise ReportError(f"{path}: no such file or folder.")
    return sorted(files, key=lambda p: p.name)  # lmms-eval names them by date: later runs last


def collect(paths: list[str | Path], metrics: dict[str, str] | None = None) -> tuple[list[Row], dict[str, str]]:
    """Rows (in mode order) and the metric shown for each task."""
    metrics = metrics or {}
    rows: dict[str, Row] = {}
    shown: dict[str, str] = {}
    for path in find_result_files(paths):
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportError(f"{path}: not JSON ({err}).") from None
        if not isinstance(data, dict) or "results" not in data:
            raise ReportError(f"{path}: not an lmms-eval results file (no 'results').")
        config = data.get("config", {})
        label, mode = run_label(parse_model_args(str(config.get("model_args", ""))))
        row = rows.setdefault(label, Row(label, mode))
        throughput = data.get("throughput", {})
        for task, task_metrics in data["results"].items():
            name, value = task_score(task, task_metrics, metrics.get(task), path)
            shown[task] = name
            row.scores[task] = value
            for kind, (tokens_key, count_key, _) in KINDS.items():
                tokens, count = throughput.get(f"{tokens_key}/{task}"), throughput.get(f"{count_key}/{task}")
                if tokens is not None and count:
                    row.tokens.setdefault(kind, {})[task] = (float(tokens), float(count))
        for kind, (_, _, full_key) in KINDS.items():
            if full_key in throughput:
                row.full_tokens[kind] = float(throughput[full_key])
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    return sorted(rows.values(), key=lambda r: (order.get(r.mode, len(order)), r.label)), shown


def markdown_table(rows: list[Row], shown: dict[str, str]) -> str:
    tasks = sorted(shown)

    def number(v):
        return "-" if v is None else f"{v:.4g}"

    kinds = ["image"] + (["video"] if any(row.tokens.get("video") for row in rows) else [])
    head = ["run", *(f"{t} ({shown[t]})" for t in tasks)]
    for kind in kinds:
        head += [f"visual tokens / {kind}", "stock" if kind == "image" else f"stock / {kind}"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [row.label, *(number(row.scores.get(t)) for t in tasks)]
        for kind in kinds:
            cells += [number(row.mean_tokens(kind)), number(row.full_tokens.get(kind))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_report(args) -> int:
    metrics = {}
    for item in args.metric or []:
        if "=" not in item:
            raise ReportError(f"--metric expects TASK=METRIC, not {item!r}.")
        task, metric = item.split("=", 1)
        metrics[task] = metric
    rows, shown = collect(args.results, metrics)
    table = markdown_table(rows, shown)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)
    return 0
