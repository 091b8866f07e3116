"""Bench sections `prefill` and `exact`: Vicuna-7B-shaped decoder layers, stock vs VTU at three N_un,
and the paper's exact Eq. 10 attention at one N_un."""

from __future__ import annotations

import torch

from .. import PRESET_NAMES
from ..common import bench_prefill, build_llama, pixel_batch, prefill_inputs, preset_r
from ..plan import Plan
from ..timing import Side, interleaved, median


def _group_maps_for_prefill(plan: Plan, tower, group_maps: dict, log) -> dict[str, torch.Tensor]:
    """Group maps of the visual positions (P,) for each preset: from the encoder's batch-1 DToMe run
    with fixed r when there was one, else from one fixed-r encode here."""
    from ....towers.clip import CLIP
    from ....towers.encoder import apply_dtome, encode_with_tower, layers_to_run, remove_dtome

    cfg = tower.config
    patches = (cfg.image_size // cfg.patch_size) ** 2
    r_presets = preset_r(patches, layers_to_run(len(tower.encoder.layers), plan.feature_layer))
    out = {}
    pixels = None
    for name in PRESET_NAMES:
        if name in group_maps:
            out[name] = group_maps[name]
            continue
        if pixels is None:
            pixels = pixel_batch(tower, 1)
        apply_dtome(tower, CLIP, r=r_presets[name])
        with torch.no_grad():
            out[name] = encode_with_tower(tower, CLIP, pixels, plan.feature_layer, True).group_of_patch[0]
        remove_dtome(tower)
        log(f"prefill: group map for {name} from one fixed-r DToMe encode")
    return out



@torch.no_grad()
def bench_exact(plan: Plan, model, visual_maps: dict, sync, log) -> list[dict]:
    """Eager attention: full vs VTU fast vs VTU exact (Eq. 10) at one N_un, on `exact_layers` layers."""
    from ....decoders.llama import apply_vtu, remove_vtu, set_groups

    cfg = model.config
    name = plan.exact_preset
    group_map, embeds = prefill_inputs((plan.text_before, plan.text_after), model, visual_maps[name], seed=7)
    layers_before = cfg.num_hidden_layers
    impl_before = cfg._attn_implementation
    model.set_attn_implementation("eager")
    cfg.num_hidden_layers = min(plan.exact_layers, layers_before)  # LlamaModel runs layers[:num_hidden_layers]
    try:
        def vtu(mode):
            def setup():
                apply_vtu(model, vtu_attention=mode)
                set_groups(model, group_map)
            return setup

        run = lambda: model(inputs_embeds=embeds, use_cache=False)  # noqa: E731
        reduced = plan.exact_runs < plan.runs
        sides = [Side("full", run, lambda: remove_vtu(model)), Side("fast", run, vtu("fast")),
                 Side("exact", run, vtu("exact"), runs=plan.exact_runs, warmup=not reduced)]
        log(f"exact Eq. 10: eager, {cfg.num_hidden_layers} layer(s), N_un = {int(visual_maps[name].max()) + 1}, "
            f"{plan.warmup} warm-up + {plan.runs} rounds of full, fast"
            + (f"; exact: {plan.exact_runs} run(s), no warm-up" if reduced else ", exact"))
        times = interleaved(sides, plan.runs, plan.warmup, sync)
        remove_vtu(model)
    finally:
        cfg.num_hidden_layers = layers_before
        model.set_attn_implementation(impl_before)
    n_un = int(visual_maps[name].max()) + 1
    positions = embeds.shape[1]
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    unique = n_un + plan.text_before + plan.text_after
    # Eq. 10 as implemented (vtu.eq10_scores): two (H, d/2, U, U) product tensors plus, per frequency,
    # several (B, H, N, N) temporaries.
    eq10_bytes = 2 * heads * (head_dim // 2) * unique * unique * embeds.element_size()
    full_t = median(times["full"])
    fast_t = median(times["fast"])
    return [dict(variant=s.name, n_un=None if s.name == "full" else n_un, layers=min(plan.exact_layers, layers_before),
                 attention="eager", runs=len(times[s.name]), times_s=times[s.name], median_s=median(times[s.name]),
                 speedup_vs_full=full_t / median(times[s.name]),
                 time_vs_fast=median(times[s.name]) / fast_t,
                 eq10_product_tensors_bytes=eq10_bytes if s.name == "exact" else None,
                 positions=positions)
            for s in sides]




def _decoder(ctx):
    """(Llama body, visual group maps per preset), built once for the prefill and exact sections."""
    if "llama" not in ctx.shared:
        plan = ctx.plan
        with ctx.timed("build_decoder"):
            visual_maps = _group_maps_for_prefill(plan, ctx.tower, ctx.shared.get("group_maps", {}), ctx.log)
            llama = build_llama(plan, ctx.device, ctx.dtype)
        ctx.log(f"built {plan.llama['num_hidden_layers']}-layer Llama body "
                f"({sum(p.numel() for p in llama.parameters()) / 1e6:.0f}M parameters) in "
                f"{ctx.result['section_s']['build_decoder']:.1f} s")
        patches = int(next(iter(visual_maps.values())).numel())
        ctx.notes.append(f"Prefill group maps: the {patches} visual positions grouped by a real DToMe merge "
                         "(fixed r, batch-1 encoder run above, on a shipped photo), so groups are the spatially "
                         "irregular ones DToMe makes; inputs_embeds rows are equal within groups. The decoder body "
                         "(LlamaModel, no lm_head, no KV cache) is timed on inputs_embeds.")
        ctx.shared["llama"] = (llama, visual_maps)
    return ctx.shared["llama"]


def _release(ctx, done: str) -> None:
    """Drop the Llama body once no later section asked for needs it."""
    if done == "exact" or "exact" not in ctx.sections:
        ctx.shared.pop("llama", None)


def run_prefill(ctx) -> None:
    llama, visual_maps = _decoder(ctx)
    with ctx.timed("prefill"):
        ctx.result["prefill"] = bench_prefill(ctx.plan, llama, visual_maps, ctx.sync, ctx.log)
    _release(ctx, "prefill")


def run_exact(ctx) -> None:
    plan = ctx.plan
    llama, visual_maps = _decoder(ctx)
    with ctx.timed("exact"):
        ctx.result["exact"] = bench_exact(plan, llama, visual_maps, ctx.sync, ctx.log)
    ctx.notes.append(f"Exact Eq. 10 path timed at the smallest N_un ({plan.exact_preset}) only and on "
                     f"{plan.exact_layers} decoder layer(s): it materialises (H, d/2, U, U) product tensors and "
                     "per-frequency (B, H, N, N) temporaries, so it is slow and memory hungry; the smallest "
                     "N_un is its best case and already shows that it is slower than the gather path.")
    _release(ctx, "exact")
