"""Bench section `encoder`: a CLIP ViT tower, stock vs DToMe at the low / mid / high presets."""

from __future__ import annotations

import torch

from .. import PRESET_NAMES
from ..common import pixel_batch, preset_r
from ..flops import encoder_flops
from ..plan import Plan
from ..timing import Side, interleaved, median, paired_ratio


@torch.no_grad()
def bench_encoder(plan: Plan, tower, device, thresholds: dict, sync, log) -> tuple[list[dict], dict]:
    """Stock vs DToMe (low/mid/high) per batch size, interleaved round-robin.

    Returns the rows and the batch-1 group maps of the visual patches per fixed-r preset (the
    prefill uses them).
    """
    from ....towers.clip import CLIP
    from ....towers.encoder import apply_dtome, encode_with_tower, layers_to_run, remove_dtome

    cfg = tower.config
    layers = len(tower.encoder.layers)
    run_all = layers_to_run(layers, plan.feature_layer)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    r_presets = preset_r(patches, run_all)
    rows, group_maps = [], {}
    for batch in plan.batches:
        pixels = pixel_batch(tower, batch)
        run = run_all
        if batch > 1 and plan.large_batch_layers:
            run = min(plan.large_batch_layers, run_all)
        feature_layer = plan.feature_layer if run == run_all else run
        results: dict[str, object] = {}

        def rule_for(name, run=run):
            if name in thresholds and run == run_all:
                return "thresholds", thresholds[name]
            # Fewer layers: the preset's total merges spread over them (at most half per layer).
            return "r", min(round(r_presets[name] * run_all / run), patches // 2)

        def side(name, setup, batch=batch, pixels=pixels, feature_layer=feature_layer, results=results):
            def run_once():
                results[name] = encode_with_tower(tower, CLIP, pixels, feature_layer, True)
            return Side(name, run_once, setup)

        def dtome_setup(name):
            kind, value = rule_for(name)
            if kind == "r":
                return lambda: apply_dtome(tower, CLIP, r=value)
            return lambda: apply_dtome(tower, CLIP, thresholds=value.thresholds, order=value.order)

        sides = [side("full", lambda: remove_dtome(tower))] + [side(name, dtome_setup(name)) for name in PRESET_NAMES]
        log(f"encoder: batch {batch}, {run} layers, {plan.warmup} warm-up + {plan.runs} rounds of "
            f"{', '.join(s.name for s in sides)}")
        times = interleaved(sides, plan.runs, plan.warmup, sync)
        remove_dtome(tower)
        full_t = median(times["full"])
        full_flops = None
        for s in sides:
            enc = results[s.name]
            kept = enc.kept_per_layer.float().mean(0).tolist()  # tokens (class token included) per layer
            flops = encoder_flops(kept, patches + 1, cfg.hidden_size, cfg.intermediate_size,
                                  3 * cfg.patch_size ** 2)
            if s.name == "full":
                full_flops = flops
            kind, value = ("none", None) if s.name == "full" else rule_for(s.name)
            t = median(times[s.name])
            rows.append(dict(
                batch=batch, variant=s.name, layers_run=run,
                rule=("stock" if kind == "none" else
                      f"r={value} per layer" if kind == "r" else "calibrated thresholds"),
                tokens_at_feature_layer=float(enc.num_tokens.float().mean()),
                kept_per_layer=kept, flops_per_image=flops, times_s=times[s.name], median_s=t,
                speedup=full_t / t, speedup_paired=paired_ratio(times["full"], times[s.name]),
            ))
            if s.name != "full" and batch == 1 and kind == "r":
                group_maps[s.name] = enc.group_of_patch[0].clone()
        for row in rows[-len(PRESET_NAMES) - 1:]:
            row["flop_ideal"] = full_flops / row["flops_per_image"]
            row["quotient"] = row["speedup"] / row["flop_ideal"]
    return rows, group_maps




def run(ctx) -> None:
    plan = ctx.plan
    with ctx.timed("encoder"):
        ctx.result["encoder"], ctx.shared["group_maps"] = bench_encoder(plan, ctx.tower, ctx.device, ctx.thresholds,
                                                                        ctx.sync, ctx.log)
    large = [b for b in plan.batches if b > 1]
    if plan.large_batch_layers and large:
        run_all = len(ctx.result["encoder"][0]["kept_per_layer"])
        ctx.notes.append(f"Encoder batch {large[0]}: only the first {plan.large_batch_layers} of the {run_all} layers "
                         f"are run (CPU time budget), with r scaled by {run_all}/{plan.large_batch_layers} so that the "
                         "preset's total merges happen in those layers (see the rule column; at most half the tokens "
                         "can merge per layer, so low ends with a few more tokens); its FLOP-ideal is for those layers.")
