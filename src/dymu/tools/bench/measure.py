"""Measuring for `dymu bench`: measured speed next to the FLOP ideal, for the encoder, the LLM prefill and calibration.

Token reduction is chosen for wall-clock time, and FLOP savings often do not show up on the clock.
So every ratio printed here is a measured one, with the ideal that FLOPs predict next to it:

- **encoder**: a CLIP ViT-L/14-336 tower (LLaVA-1.5's, read at layer -2), stock vs DToMe at the
  low / mid / high presets; FLOP-ideal speedup from the tokens each layer actually kept;
- **prefill**: Vicuna-7B-shaped decoder layers over 576 visual + 64 text positions, stock vs VTU at
  N_un = 93 / 208 / 392 unique visual rows, and the paper's exact Eq. 10 attention at one N_un;
- **attention FLOPs** in the form of the paper's Table 1, counted honestly, next to the paper's;
- **calibration** throughput (images/s) vs a plain encoder forward on the same batches;
- **merge-off overhead**: the patched tower with every threshold at +inf vs the stock tower;
- **onevision**: a Qwen2-7B-shaped prefill over one LLaVA-OneVision AnyRes image (~3,000 positions
  in the stock packed layout: base crop, unpadded canvas, newlines) plus text, stock vs VTU, with
  group maps made by dymu's OneVision wiring from a real photo (fixed r per layer, 729-token crops);
  and a downsampled large photo and an 8-frame video at merge points full / vit / post / both
  (calibrated mid thresholds; encoder tokens, LLM rows per layer, stock positions);
- **decode**: KV-cache bytes, peak memory and ms per generated token of stock vs VTU with the full
  cache vs VTU with the compact cache, 2 Qwen2-7B-shaped layers, a multi-image prompt, batch 1 and 8
  (decode.py).

Models are built from configs with random weights: speed does not depend on the weights. Timings
are medians of ``runs`` runs after ``warmup`` rounds; the sides being compared run interleaved
round-robin (A B C A B C ...) inside one process so that drift (thermal, other processes) hits
them alike. The markdown report goes to stdout, everything (raw times included) to ``--json``.

Layout: this file is the driver (`run_bench`, the command); every section lives in its own module of
sections/ and is registered in `sections.REGISTRY`, which the driver runs in order; plan.py holds the
sizes, common.py what sections share (models, inputs, the prefill timing).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import Callable

from . import OPT_IN, PRESET_NAMES, SECTIONS, STANDALONE
from .common import build_clip, loadavg, machine, preset_r
from .plan import full_plan, quick_plan
from .report import evaluate_targets, markdown
from .sections import REGISTRY, Context
from .timing import device_sync


# ---------------------------------------------------------------------------------------------
# Entry points.


def run_bench(
    quick: bool = False,
    device: str | None = "cpu",
    dtype: str | None = None,
    thresholds: dict[str, str] | None = None,
    sections: tuple[str, ...] = SECTIONS,
    runs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the benchmark's ``sections`` (in the registry's order) and return the result dict (what `--json`
    writes). A bar with the current section and an ETA on a terminal (not under --quiet)."""
    from ..console import Steps

    chosen = [name for name in REGISTRY if name in sections]
    steps = Steps(len(chosen) + any(REGISTRY[name].needs_tower for name in chosen), "bench")
    log = log or (lambda msg: steps.say(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr))
    with steps:
        return _run_bench(quick, device, dtype, thresholds, sections, runs, log, steps)


def _run_bench(quick, device, dtype, thresholds, sections, runs, log, steps) -> dict:
    from ...loading import resolve_device_dtype
    from ...thresholds import Thresholds

    start = time.perf_counter()
    dev, dt = resolve_device_dtype(device, dtype)
    plan = quick_plan(dev) if quick else full_plan(dev)
    if runs is not None:
        if runs < 1:
            raise ValueError(f"--runs must be at least 1, not {runs}")
        plan.runs, plan.merge_off_runs, plan.exact_runs = runs, 2 * runs, min(plan.exact_runs, runs)
        plan.onevision_runs = runs
    unknown = set(sections) - set(SECTIONS + OPT_IN)
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS + OPT_IN)}")
    result: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(dev),
        "loadavg_before": loadavg(),
        "settings": {"plan": plan.name, "device": str(dev), "dtype": str(dt).removeprefix("torch."),
                     "runs": plan.runs, "warmup": plan.warmup, "clip": plan.clip, "feature_layer": plan.feature_layer,
                     "batches": list(plan.batches), "large_batch_layers": plan.large_batch_layers,
                     "llama": plan.llama, "text_before": plan.text_before, "text_after": plan.text_after,
                     "exact_preset": plan.exact_preset, "exact_layers": plan.exact_layers,
                     "calibration_images": plan.cal_images, "calibration_batch": plan.cal_batch,
                     "onevision_qwen2": plan.onevision_qwen2, "onevision_text": list(plan.onevision_text),
                     "onevision_runs": plan.onevision_runs,
                     "onevision_large_image": list(plan.onevision_large_image),
                     "onevision_frames": plan.onevision_frames,
                     "packed_batches": list(plan.packed_batches), "packed_calibration_batch": plan.packed_cal_batch,
                     "sections": list(sections), "weights": "random (speed does not depend on the weights)"},
        "encoder": None, "prefill": None, "exact": None, "attention_flops": None,
        "calibration": None, "merge_off": None, "onevision": None, "packed": None, "decode": None, "targets": None,
        "notes": ["All models have random weights: speed does not depend on the weights."],
        "section_s": {},
    }
    ctx = Context(plan=plan, device=dev, dtype=dt, sync=device_sync(dev), log=log, quick=quick, runs=runs,
                  sections=tuple(sections), result=result)
    if any(REGISTRY[name].needs_tower for name in sections):
        steps.next("building the CLIP tower")
        with ctx.timed("build_encoder"):
            ctx.tower = build_clip(plan, dev, dt)
        log(f"built CLIP tower ({sum(p.numel() for p in ctx.tower.parameters()) / 1e6:.0f}M parameters) in "
            f"{result['section_s']['build_encoder']:.1f} s")
    _encoder_thresholds(ctx, thresholds or {}, Thresholds)
    for name, section in REGISTRY.items():
        if name in sections:
            steps.next(name)
            section.run(ctx)
    result["targets"] = None if quick else evaluate_targets(result)  # toy sizes: no target can be judged
    result["loadavg_after"] = loadavg()
    result["elapsed_s"] = time.perf_counter() - start
    return result


def _encoder_thresholds(ctx: Context, thresholds: dict[str, str], Thresholds) -> None:
    """--thresholds PRESET=FILE: calibrated thresholds for the encoder presets (the others: fixed r), with notes."""
    for name, path in thresholds.items():
        if name not in PRESET_NAMES:
            raise ValueError(f"--thresholds takes PRESET=FILE with PRESET one of {', '.join(PRESET_NAMES)}, not {name!r}")
        th = Thresholds.load(path)
        if ctx.tower is not None:
            th.check_compatible(ctx.tower)
        ctx.thresholds[name] = th
        ctx.notes.append(f"Encoder preset {name}: calibrated thresholds from {path} (on these random weights the "
                         "token counts are not those of the real encoder).")
    fixed = [n for n in PRESET_NAMES if n not in ctx.thresholds]
    if fixed and ctx.tower is not None:
        from ...towers.encoder import layers_to_run

        cfg = ctx.tower.config
        run_all = layers_to_run(len(ctx.tower.encoder.layers), ctx.plan.feature_layer)
        r = preset_r((cfg.image_size // cfg.patch_size) ** 2, run_all)
        ctx.notes.append("Encoder presets " + ", ".join(f"{n}: fixed r = {r[n]} merges per layer" for n in fixed)
                         + f" in all {run_all} layers run (plain ToMe-style top-r: no calibrated thresholds given).")


def _named(ref: str):
    """A function of this package by "module:function" (the module relative to tools/bench)."""
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def cmd_bench(args) -> int:
    from ...files import STDOUT, check_json_output, write_json

    if args.json:  # before the minutes of measuring: a bad path must not lose them, nor make folders
        check_json_output(args.json, "--json", inputs=[path for _, path in args.thresholds or []])
    report = sys.stderr if args.json == STDOUT else sys.stdout  # `--json -`: the JSON alone on stdout
    sections = tuple(args.only.split(",")) if args.only else SECTIONS
    standalone = [key for key, (names, _, _) in STANDALONE.items() if set(names) & set(sections)]
    sections = tuple(s for s in sections if not any(s in names for names, _, _ in STANDALONE.values()))
    result = {}
    if sections:
        result = run_bench(quick=args.quick, device=args.device, dtype=args.dtype,
                           thresholds=dict(args.thresholds or []), sections=sections, runs=args.runs)
        print(markdown(result), file=report)
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    for key in standalone:
        _, runner, to_markdown = STANDALONE[key]
        result[key] = _named(runner)(quick=args.quick, device=args.device or "cpu", runs=args.runs, log=log)
        print(_named(to_markdown)(result[key]), file=report)
    if args.json:
        write_json(args.json, result, indent=1, default=str)
        if args.json != STDOUT:
            print(f"\nwrote {args.json}")
    return 0
