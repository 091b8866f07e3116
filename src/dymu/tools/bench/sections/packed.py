"""Bench section `packed`: packed vs padded batches with calibrated mid thresholds on diverse images."""

from __future__ import annotations

import math
import time

import torch

from ..common import diverse_images
from ..flops import encoder_flops
from ..plan import Plan
from ..timing import Side, interleaved, median, paired_ratio


@torch.no_grad()
def bench_packed(plan: Plan, tower, sync, log) -> dict:
    """Packed vs padded batches with calibrated mid thresholds on diverse images.

    Rows: full / padded / packed encoder at each of `plan.packed_batches` (all layers to the feature
    layer) with the FLOP-ideal from the tokens each image actually kept per layer (Σ n_i); batch-1
    padded vs packed; calibration throughput padded vs packed at `plan.packed_cal_batch`.
    """
    from ...calibration import calibrate, schedule_r, PRESETS
    from ....images import open_image
    from ....towers.clip import CLIP
    from ....towers.encoder import apply_dtome, encode_with_tower, layers_to_run, remove_dtome

    remove_dtome(tower)
    cfg = tower.config
    run = layers_to_run(len(tower.encoder.layers), plan.feature_layer)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    processor = CLIP.default_processor(cfg)
    param = next(tower.parameters())

    def pixels_of(paths):
        pixels = processor(images=[open_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        return pixels.to(device=param.device, dtype=param.dtype)

    batch_images = diverse_images(max(plan.packed_batches))
    t0 = time.perf_counter()
    mid = calibrate(tower, batch_images, preset="mid", batch_size=len(batch_images), feature_layer=plan.feature_layer,
                    processor=processor, progress=False)
    log(f"packed: mid thresholds calibrated on {len(batch_images)} images in {time.perf_counter() - t0:.0f} s")

    def flops_of(enc) -> float:  # Σ over images of each image's own FLOPs (its tokens per layer)
        return sum(encoder_flops(k, patches + 1, cfg.hidden_size, cfg.intermediate_size, 3 * cfg.patch_size ** 2)
                   for k in enc.kept_per_layer.tolist())

    def sides_for(pixels, names, results):
        def encode_side(name, packed):
            def setup():
                if packed is None:
                    remove_dtome(tower)
                else:
                    apply_dtome(tower, CLIP, thresholds=mid.thresholds, order=mid.order, packed=packed)

            def run_once():
                results[name] = encode_with_tower(tower, CLIP, pixels, plan.feature_layer, True)
            return Side(name, run_once, setup)
        return [encode_side(n, {"full": None, "padded": False, "packed": True}[n]) for n in names]

    rows = []
    for batch in (1,) + tuple(plan.packed_batches):
        pixels = pixels_of(batch_images[:batch])
        results: dict = {}
        names = ("padded", "packed") if batch == 1 else ("full", "padded", "packed")
        runs = plan.packed_b1_runs if batch == 1 else plan.runs
        log(f"packed: batch {batch}, {run} layers, {plan.warmup} warm-up + {runs} rounds of {', '.join(names)}")
        times = interleaved(sides_for(pixels, names, results), runs, plan.warmup, sync)
        remove_dtome(tower)
        full_flops = batch * encoder_flops([patches + 1] * run, patches + 1, cfg.hidden_size, cfg.intermediate_size,
                                           3 * cfg.patch_size ** 2)
        base = "full" if "full" in names else "padded"
        for name in names:
            enc = results[name]
            kept = enc.kept_per_layer
            padded_rows = kept.max(0).values * batch  # what the padded layout computes per layer
            rows.append(dict(
                batch=batch, variant=name, layers_run=run,
                rule="stock" if name == "full" else "calibrated mid thresholds",
                tokens_at_feature_layer=[int(v) for v in enc.num_tokens.tolist()],
                alive_rows_per_layer_mean=float(kept.sum(0).float().mean()),
                padded_rows_per_layer_mean=float(padded_rows.float().mean()),
                flops=full_flops if name == "full" else flops_of(enc),
                times_s=times[name], median_s=median(times[name]),
                speedup_vs=base, speedup=median(times[base]) / median(times[name]),
                speedup_paired=paired_ratio(times[base], times[name]),
            ))
        for row in rows[-len(names):]:
            row["flop_ideal"] = full_flops / row["flops"] if base == "full" else math.nan
            row["quotient"] = row["speedup"] / row["flop_ideal"] if base == "full" else math.nan

    # Calibration throughput: padded vs packed, the same images and batches.
    cal_layer = plan.packed_cal_layers if plan.packed_cal_layers else plan.feature_layer
    cal_run = layers_to_run(len(tower.encoder.layers), cal_layer)
    # The mid preset's total merges spread over the layers run, so token counts diverge as at full depth.
    # One r per layer that runs (calibrate's rule): the layers past cal_layer never run.
    r = schedule_r(patches - round(patches * PRESETS["mid"]), cal_run, len(tower.encoder.layers))[:cal_run]
    cal_images = diverse_images(plan.packed_cal_images)
    got = {}

    def cal_side(packed):
        def run_once():
            got[packed] = calibrate(tower, cal_images, r=r, batch_size=plan.packed_cal_batch, feature_layer=cal_layer,
                                    processor=processor, progress=False, packed=packed)
        return Side("packed" if packed else "padded", run_once)

    log(f"packed: calibration of {len(cal_images)} images in batches of {plan.packed_cal_batch}, {cal_run} layers, "
        f"{plan.warmup} warm-up + {plan.runs} rounds of padded, packed")
    times = interleaved([cal_side(False), cal_side(True)], plan.runs, plan.warmup, sync)
    same = got[False].thresholds == got[True].thresholds
    calibration = dict(images=len(cal_images), batch_size=plan.packed_cal_batch, layers=cal_run,
                       r_per_layer=r[0], padded_times_s=times["padded"], packed_times_s=times["packed"],
                       padded_images_per_s=len(cal_images) / median(times["padded"]),
                       packed_images_per_s=len(cal_images) / median(times["packed"]),
                       ratio=median(times["padded"]) / median(times["packed"]),
                       ratio_paired=paired_ratio(times["padded"], times["packed"]),
                       thresholds_identical=same,
                       max_threshold_difference=max(abs(a - b) for a, b in zip(got[False].thresholds, got[True].thresholds)
                                                    if math.isfinite(a) or math.isfinite(b)) if not same else 0.0,
                       tokens_kept_mean=got[True].tokens_kept_mean[-1])
    return dict(rows=rows, calibration=calibration, images=[p.name for p in batch_images],
                cal_images=[p.name for p in cal_images], mid_tokens_kept_mean=mid.tokens_kept_mean[-1])




def run(ctx) -> None:
    with ctx.timed("packed"):
        ctx.result["packed"] = bench_packed(ctx.plan, ctx.tower, ctx.sync, ctx.log)
