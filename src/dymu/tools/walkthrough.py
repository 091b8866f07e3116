"""`dymu demo`: DyMU end to end on any family's tiny demo model (random weights, built offline) or on a
model you give (``--model``), through the family protocol alone, so every family gets the same walkthrough:

1. calibrate thresholds (preset mid) on the 6 bundled images, once per merge point the family offers
   (a tower merge and, where there is one, a merge after the stock steps that follow the tower);
2. the LLM rows every image gets with them, next to the stock positions (simplest to most cluttered);
3. generate with the stock model and with DyMU on one image and, where the family takes them, two
   images and a video (and the video with ``cross_frame``), timed the bench's way (a warm-up round,
   then interleaved rounds, medians).

Token counts and timings are real; with random weights the answers are noise.
"""

from __future__ import annotations

import math
import time

import torch

DEMO_PROMPT = "What is in this image?"
TIMED_RUNS = 3


def run_walkthrough(name: str = "llava", model_ref: str | None = None, save_model: str | None = None,
                    max_new_tokens: int = 12, out=print) -> dict:
    """`dymu demo --family NAME [--model REF]`. Returns what it printed, as data (used by the tests). A bar
    with the step and an ETA on a terminal (stderr)."""
    from .console import Steps

    with Steps(4, "demo", out) as steps:  # the right total is known once the family is
        return _walkthrough(name, model_ref, save_model, max_new_tokens, steps)


def _walkthrough(name, model_ref, save_model, max_new_tokens, steps) -> dict:
    from ..families import vlm_family_of
    from ..generation import load_vlm
    from ..images import open_image, sample_images
    from .demo import demo_image_paths, save_demo_model
    from .demo_models import DEMO_MODELS

    out = steps.say
    random_weights = model_ref is None
    steps.next("building the model" if random_weights else f"loading {model_ref}")
    if random_weights:
        demo = DEMO_MODELS[name]
        model, processor = demo.build()
        out(f"dymu demo: a small {demo.shape} with RANDOM weights, built offline.")
        out("Token counts and timings are real; the answers are noise.")
        if save_model:
            save_demo_model(model, processor, save_model)
            out(f"saved the demo model (weights, config, tokenizer, processor) to {save_model}, "
                f"and {len(sample_images())} sample images to {save_model}/images")
    else:
        model, processor = load_vlm(model_ref)
        out(f"dymu demo on {model_ref}")
    vlm = vlm_family_of(model)
    paths = demo_image_paths()
    images = [open_image(p) for p in paths]
    points = [p for p in vlm.merge_points if p != "both"] if vlm.supports("merge_point") else []
    points = points if len(points) > 1 else [None]  # one merge point: its default, not named
    cases = _cases(images, vlm.supports("video") and random_weights)
    steps.set_total(1 + len(points) + len(cases))

    counts, calibrated = {}, {}
    for point in points:
        steps.next("calibrating" + (f" (merge_point {point})" if point else ""))
        calibrated[point] = thresholds = _calibrate(model, processor, images, point, model_ref or f"dymu-demo-{name}", out)
        counts[point or "default"] = per_image = _llm_rows(model, vlm, processor, thresholds, paths, images)
        out("LLM rows per image with them, of the stock positions (simplest to most cluttered):")
        for path, (rows, stock) in zip(paths, per_image):
            out(f"  {path.name:34s} {rows:5d} / {stock:<5d} {'#' * math.ceil(40 * rows / max(stock, 1))}")

    runs = _timed(model, processor, calibrated[points[0]], cases, vlm.supports("cross_frame"), max_new_tokens, steps)
    out(f"\nprompt: {DEMO_PROMPT!r} on {paths[-1].name}" + ("; then 2 images; then 4 frames of it as a video"
                                                          if len(cases) > 1 else "")
        + (f" (thresholds of merge_point {points[0]})" if points[0] else "")
        + f"; times are medians of {TIMED_RUNS} interleaved runs after 1 warm-up round")
    out(f"  {'input':8s} {'mode':16s} {'LLM rows/stock':>15s} {'encoder':>9s} {'prefill':>9s} {'decode':>9s}  "
        + ("answer (random weights: noise)" if random_weights else "answer"))
    from .bench.timing import median

    for (case, mode), record in runs.items():
        timed = [r.report for r in record[1:]]  # record[0] is the warm-up
        rep = timed[0]
        ms = {k: median([getattr(t, k) for t in timed]) * 1e3 for k in ("encoder_s", "prefill_s", "decode_s")}
        rows = f"{sum(rep.llm_rows[0])}/{sum(rep.stock_positions[0])}"
        out(f"  {case:8s} {mode:16s} {rows:>15s} {ms['encoder_s']:7.1f}ms {ms['prefill_s']:7.1f}ms "
            f"{ms['decode_s']:7.1f}ms  {record[-1].answers[0]!r}")
    if random_weights:
        out("\nAt these toy dimensions the merge bookkeeping costs about what it saves; `dymu bench` measures "
            "the speedup at real model dimensions.")
    return {"counts": {point: dict(zip([p.name for p in paths], per_image)) for point, per_image in counts.items()},
            "results": {key: record[-1] for key, record in runs.items()}, "runs": runs,
            "thresholds": calibrated[points[0]]}


def _cases(images: list, video: bool) -> list[tuple]:
    """(name, prompts, images per prompt, videos per prompt): the cluttered scene; with ``video`` also two
    images and a 4-frame video panning over the scene."""
    scene = images[-1]
    cases = [("image", [DEMO_PROMPT], [[scene]], None)]
    if video:
        cases.append(("2 images", ["Compare the two pictures."], [[images[0], scene]], None))
        frames = [scene.resize((224, 168)).crop((4 * k, 0, 4 * k + 196, 168)) for k in range(4)]
        cases.append(("video", ["What happens in the video?"], [[]], [[frames]]))
    return cases


def _calibrate(model, processor, images, point, model_ref, out):
    from .calibration import calibrate, target_report

    start = time.perf_counter()
    thresholds = calibrate(model, images, preset="mid", batch_size=len(images), progress=False,
                           processor=getattr(processor, "image_processor", processor), merge_point=point,
                           model_ref=model_ref, warn=lambda message: None)  # 6 images are too few: said here
    where = f"[merge_point {point}] " if point else ""
    out(f"\n{where}calibrated thresholds (preset mid) on {len(images)} bundled images in "
        f"{time.perf_counter() - start:.1f}s (a demo: real calibrations use hundreds): {target_report(thresholds)[0]}")
    return thresholds


def _llm_rows(model, vlm, processor, thresholds, paths, images) -> list[tuple[int, int]]:
    """(LLM rows, stock positions) per image with ``thresholds`` applied (mode dymu), by the family's
    own per-image records (what `dymu encode` writes)."""
    from ..api import apply, remove

    apply(model, thresholds)
    try:
        with torch.no_grad():
            records, _ = vlm.encode_records(model, getattr(processor, "image_processor", processor),
                                            [(str(p), im) for p, im in zip(paths, images)], [])
    finally:
        remove(model)
    return [(r["llm_rows"], r["stock_positions"]) for r in records]


def _timed(model, processor, thresholds, cases, cross_frame: bool, max_new_tokens: int, steps) -> dict:
    """Full and dymu (and, on a video, dymu with cross_frame) interleaved round-robin per case, the
    bench's way (shared code); min_new_tokens: every side decodes the same number of tokens."""
    from ..api import apply
    from ..generation import generate
    from .bench.timing import Side, interleaved

    runs: dict[tuple[str, str], list] = {}

    def side(name, prompts, ims, videos, mode: str, **options):
        label = mode + (", cross_frame" if options else "")
        record = runs.setdefault((name, label), [])
        return Side(label, setup=lambda: apply(model, thresholds, mode=mode, **options),
                    run=lambda: record.append(generate(model, processor, prompts, ims, videos=videos,
                                                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)))

    with torch.no_grad():
        for case in cases:
            steps.next(f"timing: {case[0]}")
            sides = [side(*case, "full"), side(*case, "dymu")]
            if cross_frame and case[3]:
                sides.append(side(*case, "dymu", cross_frame=True))
            interleaved(sides, runs=TIMED_RUNS, warmup=1, sync=lambda: None)
    apply(model, None, mode="full")
    return runs
