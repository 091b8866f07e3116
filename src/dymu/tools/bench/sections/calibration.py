"""Bench sections `calibration` (throughput vs a plain forward) and `merge_off` (the patched tower
with every threshold at +inf vs the stock tower)."""

from __future__ import annotations

import math

import torch

from ..common import pixel_batch, preset_r
from ..plan import Plan
from ..timing import Side, interleaved, median, paired_ratio


def bench_calibration(plan: Plan, tower, sync, log) -> dict:
    """`dymu.calibrate` (the mid preset's r per layer) vs a plain stock encoder forward on the same batches.

    Both sides start from the image files (decode + processor + encoder), so the comparison is what
    a user sees; calibration also merges (cheaper layers) and ranks all edges of the batch per layer
    (extra work). With `plan.cal_layers`, both run only that many layers (CPU time budget): the
    calibration overhead is per layer, so the ratio is that of the whole tower.
    """
    from ...calibration import calibrate
    from ....images import open_image, sample_images
    from ....towers.clip import CLIP
    from ....towers.encoder import encode_with_tower, layers_to_run, remove_dtome

    remove_dtome(tower)
    cfg = tower.config
    run_all = layers_to_run(len(tower.encoder.layers), plan.feature_layer)
    r_mid = preset_r((cfg.image_size // cfg.patch_size) ** 2, run_all)["mid"]
    feature_layer = plan.cal_layers if plan.cal_layers else plan.feature_layer
    layers = layers_to_run(len(tower.encoder.layers), feature_layer)
    paths = sample_images()
    images = [paths[i % len(paths)] for i in range(plan.cal_images)]
    processor = CLIP.default_processor(cfg)
    device = next(tower.parameters()).device
    result = {}

    def plain():
        with torch.no_grad():
            for i in range(0, len(images), plan.cal_batch):
                loaded = [open_image(p) for p in images[i:i + plan.cal_batch]]
                pixels = processor(images=loaded, return_tensors="pt")["pixel_values"].to(device)
                encode_with_tower(tower, CLIP, pixels, feature_layer, False)

    def calib(check_images: int):
        def run():
            result["thresholds"] = calibrate(tower, images, r=r_mid, batch_size=plan.cal_batch,
                                             feature_layer=feature_layer, processor=processor, progress=False,
                                             check_images=check_images,
                                             warn=lambda message: None)  # timing only: sample sizes are the plan's
        return run

    # The calibration loop alone (check_images=0), and with its default per-image check on every image
    # (one more pass that applies the thresholds per image, as inference does).
    log(f"calibration: {len(images)} images in batches of {plan.cal_batch}, {layers} layers, r = {r_mid}, "
        f"{plan.warmup} warm-up + {plan.runs} rounds of plain, calibrate (loop), calibrate + per-image check")
    times = interleaved([Side("plain", plain), Side("calibrate", calib(0)), Side("checked", calib(len(images)))],
                        plan.runs, plan.warmup, sync)
    plain_t, cal_t, checked_t = median(times["plain"]), median(times["calibrate"]), median(times["checked"])
    th = result["thresholds"]
    return dict(images=len(images), batch_size=plan.cal_batch, layers=layers, r_per_layer=r_mid,
                tokens_kept_mean_at_last_layer=th.tokens_kept_mean[-1] if th.tokens_kept_mean else None,
                plain_times_s=times["plain"], calibrate_times_s=times["calibrate"], checked_times_s=times["checked"],
                plain_images_per_s=len(images) / plain_t, calibrate_images_per_s=len(images) / cal_t,
                checked_images_per_s=len(images) / checked_t,
                ratio=plain_t / cal_t, ratio_paired=paired_ratio(times["plain"], times["calibrate"]),
                ratio_checked=plain_t / checked_t, ratio_checked_paired=paired_ratio(times["plain"], times["checked"]))



def merge_off_result(stock: list[float], patched: list[float], batch: int) -> dict:
    stock_t, patched_t = median(stock), median(patched)
    return dict(batch=batch, stock_times_s=stock, patched_times_s=patched,
                stock_median_s=stock_t, patched_median_s=patched_t, overhead=patched_t / stock_t - 1,
                overhead_paired=paired_ratio(patched, stock) - 1)



@torch.no_grad()
def bench_merge_off(plan: Plan, tower, sync, log) -> dict:
    """Stock tower vs the DToMe-patched tower with every threshold at +inf (no merge), batch 1, full depth.
    A few-% effect: `plan.merge_off_runs` rounds of A B, and the paired ratio reported next to the ratio
    of medians."""
    from ....towers.clip import CLIP
    from ....towers.encoder import apply_dtome, encode_with_tower, remove_dtome

    pixels = pixel_batch(tower, 1)
    run = lambda: encode_with_tower(tower, CLIP, pixels, plan.feature_layer, True)  # noqa: E731
    sides = [Side("stock", run, lambda: remove_dtome(tower)),
             Side("patched_inf", run, lambda: apply_dtome(tower, CLIP, thresholds=math.inf))]
    log(f"merge-off: batch 1, {plan.warmup} warm-up + {plan.merge_off_runs} rounds of stock, patched (+inf)")
    times = interleaved(sides, plan.merge_off_runs, plan.warmup, sync)
    remove_dtome(tower)
    return merge_off_result(times["stock"], times["patched_inf"], 1)




def run_calibration(ctx) -> None:
    with ctx.timed("calibration"):
        ctx.result["calibration"] = bench_calibration(ctx.plan, ctx.tower, ctx.sync, ctx.log)


def run_merge_off(ctx) -> None:
    with ctx.timed("merge_off"):
        ctx.result["merge_off"] = bench_merge_off(ctx.plan, ctx.tower, ctx.sync, ctx.log)
