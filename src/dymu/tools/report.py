"""`dymu report`: lmms-eval result folders -> one markdown table of score and visual tokens per mode.

Reads every `*_results.json` under the given folders (as `python -m lmms_eval --output_path`
writes them). A row is one dymu configuration: every model_arg that can change a result (the model,
mode, thresholds by content hash, r, token budget, merge point, order, frames, cross_frame, dtype,
max_new_tokens; not batch_size or device). Its label is the mode plus the thresholds file's name or r
(`dymu (llava15-mid)`, `tome (r=16)`), plus whatever else tells it apart from the other rows
(`dymu (llava15-mid, max_tokens=64)`). Runs of the same configuration over different tasks fill the
same row; a later run of the same task replaces an earlier one, with a warning when the two disagree. A
run whose model was passed to lmms-eval as an object (no model_args) is a row of its own, labelled
as unknown rather than guessed. The
score of a task is its first metric unless `--metric TASK=METRIC` says otherwise; the token column
is the mean visual tokens per image the LLM saw over all the row's images (from the
`avg_visual_tokens/TASK` and `avg_images/TASK` entries that the dymu lmms-eval model logs), and
when any run has videos, the same per video (`avg_video_tokens/TASK`, `avg_videos/TASK`).
No lmms-eval import: plain JSON.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

MODE_ORDER = ("full", "dymu", "tome", "dtome", "downsample")


class ReportError(ValueError):
    """A result file or option that cannot be used; the message names it."""


class ReportWarning(UserWarning):
    """Two runs of one configuration disagree on a task."""


def _number(value, where: Path, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: throughput.{name} must be a number, not {value!r}.")
    return float(value)


@dataclass
class Row:
    label: str
    mode: str
    key: tuple = ()  # run_key: the configuration
    sources: dict[str, Path] = field(default_factory=dict)  # task -> the results file its score came from
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


def parse_model_args(value) -> dict[str, str] | None:
    """lmms-eval's `key=value,key=value` model_args (values here hold no commas), or a dict; None when
    the run recorded none (a model passed to lmms-eval as an object: its configuration is unknown)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()} or None
    text = str(value or "").strip()
    if not text:
        return None
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


# model_args that do not change a result: batching is invariant (tested), the device only places it.
_NOT_CONFIGURATION = {"batch_size", "max_batch_size", "device"}


def _thresholds_identity(value: str, where: Path) -> str:
    """A thresholds model_arg as what it holds: the sha256 of the file (as written, or relative to the
    results file's folder), else the value itself (a number, a Hub repo, a file no longer there)."""
    import hashlib

    for path in (Path(value), where.parent / value):
        if path.is_file():
            return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return value


def run_key(model_args: dict[str, str] | None, where: Path) -> tuple:
    """Everything in a run's model_args that can change its results, as a hashable key."""
    if model_args is None:
        return (("unknown", str(where)),)
    key = {k: v for k, v in model_args.items() if k not in _NOT_CONFIGURATION}
    key.setdefault("mode", "dymu")
    if key.get("thresholds"):
        key["thresholds"] = _thresholds_identity(key["thresholds"], where)
    return tuple(sorted(key.items()))


def run_label(model_args: dict[str, str] | None) -> tuple[str, str]:
    if model_args is None:
        return "unknown (model passed as an object: no model_args)", "unknown"
    mode = model_args.get("mode", "dymu")
    thresholds, r = model_args.get("thresholds"), model_args.get("r")
    if mode == "tome" and r:
        return f"tome (r={r})", mode
    if mode != "full" and thresholds:
        return f"{mode} ({Path(thresholds).stem})", mode
    return mode, mode


def _distinct_labels(rows: list["Row"]) -> None:
    """Rows whose labels collide get the model_args that tell them apart appended (model=..., max_tokens=...)."""
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for row in same for k, _ in row.key})
        differing = [k for k in keys if len({dict(row.key).get(k) for row in same}) > 1]
        for row in same:
            args = dict(row.key)
            extra = ", ".join(f"{k}={args.get(k, '-')}" for k in differing)
            row.label = f"{row.label[:-1]}, {extra})" if row.label.endswith(")") else f"{row.label} ({extra})"


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
    rows: dict[tuple, Row] = {}
    shown: dict[str, str] = {}
    for path in find_result_files(paths):
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportError(f"{path}: not JSON ({err}).") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise ReportError(f"{path}: not an lmms-eval results file (no 'results' object).")
        config = data.get("config", {})
        throughput = data.get("throughput", {})
        if not isinstance(config, dict) or not isinstance(throughput, dict):
            raise ReportError(f"{path}: 'config' and 'throughput' must be objects.")
        model_args = parse_model_args(config.get("model_args"))
        key = run_key(model_args, path)
        label, mode = run_label(model_args)
        row = rows.setdefault(key, Row(label, mode, key))
        for task, task_metrics in data["results"].items():
            if not isinstance(task_metrics, dict):
                raise ReportError(f"{path}: results.{task} must be an object of metrics.")
            name, value = task_score(task, task_metrics, metrics.get(task), path)
            shown[task] = name
            if task in row.scores and row.scores[task] != value:
                warnings.warn(f"dymu report: {row.sources[task]} and {path} ran the same configuration "
                              f"({row.label}) on {task} with different scores ({row.scores[task]:.4g} vs {value:.4g}); "
                              "showing the later one", ReportWarning, stacklevel=2)
            row.scores[task], row.sources[task] = value, path
            for kind, (tokens_key, count_key, _) in KINDS.items():
                tokens, count = throughput.get(f"{tokens_key}/{task}"), throughput.get(f"{count_key}/{task}")
                if tokens is not None and count:
                    row.tokens.setdefault(kind, {})[task] = (_number(tokens, path, f"{tokens_key}/{task}"),
                                                            _number(count, path, f"{count_key}/{task}"))
        for kind, (_, _, full_key) in KINDS.items():
            if full_key in throughput:
                row.full_tokens[kind] = _number(throughput[full_key], path, full_key)
    _distinct_labels(list(rows.values()))
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
    from ..files import atomic_write_text, check_output_file

    if args.out:  # never over a results file it reads (a table beside them is fine)
        check_output_file(args.out, "--out", inputs=find_result_files(args.results))
    metrics = {}
    for item in args.metric or []:
        if "=" not in item:
            raise ReportError(f"--metric expects TASK=METRIC, not {item!r}.")
        task, metric = item.split("=", 1)
        metrics[task] = metric
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        rows, shown = collect(args.results, metrics)
    from .console import warning_line

    for warning in caught:  # one line each, not Python's two-line warning format
        print(warning_line("report", warning.message), file=sys.stderr)
    table = markdown_table(rows, shown)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    print(table)
    return 0
