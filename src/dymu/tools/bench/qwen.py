"""`dymu bench --only qwen_vit,qwen_prefill`: the Qwen2.5-VL rows (random weights, real dimensions).

- qwen_vit: a Qwen2.5-VL-7B-shaped vision tower (hidden 1280, 32 blocks, windows of 112 px, full
  attention at blocks 7/15/23/31) on one 448x448 photo (1024 patches = 256 units): the stock tower
  vs unit-level DToMe (merge_point "vit") at the low / mid / high presets, each as a fixed fraction
  of the image's units merged per block (the calibration rule on a batch of one), next to the
  FLOP-ideal speedup from the units alive in every block.
- qwen_prefill: 2 decoder layers of Qwen2.5-VL-7B's text model (hidden 3584, 28 heads, 4 KV heads,
  MLP 18944) on a prompt of text + the image's 256 positions with M-RoPE (t, h, w) positions:
  stock vs VTU with the group maps the tower merges produced.
Opt-in sections (not in the default run): the full tower takes ~20 s per forward on a 2-core CPU.
"""

from __future__ import annotations

import math
import time

import torch

from .timing import Side, interleaved, median, paired_ratio

QWEN_SECTIONS = ("qwen_vit", "qwen_prefill")


def qwen_plan(quick: bool) -> dict:
    if quick:
        return dict(vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                                window_size=56, fullatt_block_indexes=[1, 3]), side=224,
                    text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=2, vocab_size=64), text_tokens=(12, 12), runs=1, warmup=1)
    return dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                            window_size=112, fullatt_block_indexes=[7, 15, 23, 31]), side=448,
                text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                          num_hidden_layers=2, vocab_size=1024), text_tokens=(14, 50), runs=2, warmup=1)


def _vision_block_flops(segments: list[int], n_mlp: int, hidden: int, mlp: int) -> float:
    """One Qwen2.5-VL vision block: q/k/v/o over the rows, attention within each segment (window or
    image), gated MLP (3 matrices) over the rows left after the merge."""
    rows = sum(segments)
    return 2 * rows * 4 * hidden * hidden + sum(4 * s * s * hidden for s in segments) + 2 * 3 * n_mlp * hidden * mlp


def _tower_flops(visual, encoded, grid) -> float:
    """FLOPs of the blocks from the units alive after each block. Window sizes: the stock windows,
    scaled by the fraction of units left (survivors keep their window; an even spread is assumed)."""
    from transformers.vision_utils import get_vision_window_index

    _, cu = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    windows = (cu[1:] - cu[:-1]).tolist()
    units0 = int(encoded.units_per_segment.sum())
    cfg = visual.config
    total, alive = 0.0, units0
    for index, after in enumerate(encoded.kept_per_step[0].tolist()):
        share = alive / units0
        segments = [4 * alive] if index in visual.fullatt_block_indexes else [w * share for w in windows]
        total += _vision_block_flops(segments, 4 * after, cfg.hidden_size, cfg.intermediate_size)
        alive = after
    return total


def _decoder_flops(rows: int, positions: int, cfg) -> float:
    hidden, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return cfg.num_hidden_layers * (2 * rows * (2 * hidden * hidden + 2 * hidden * kv) + 4 * positions ** 2 * hidden
                                    + 2 * rows * 3 * hidden * cfg.intermediate_size)


@torch.no_grad()
def bench_qwen(quick: bool = False, device: str = "cpu", runs: int | None = None, log=print) -> dict:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLTextModel,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ... import merge as M
    from ... import vtu
    from ...decoders.llama import apply_vtu, vtu_groups
    from ...images import open_image, sample_images
    from ...towers.qwen_vit import encode_qwen
    from ..calibration import PRESETS, schedule_r

    plan = qwen_plan(quick)
    runs = runs or plan["runs"]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    vcfg = Qwen2_5_VLVisionConfig(**plan["vision"])
    vcfg._attn_implementation = "sdpa"
    visual = Qwen2_5_VisionTransformerPretrainedModel(vcfg).to(dev).eval()
    side = plan["side"]
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": side * side, "longest_edge": side * side})
    photo = open_image(sample_images()[-1]).resize((side, side))
    inputs = processor(images=[photo], return_tensors="pt")
    pixels, grid = inputs["pixel_values"].to(dev), inputs["image_grid_thw"].to(dev)
    units = int(grid.prod(-1).sum()) // 4
    depth = len(visual.blocks)
    log(f"qwen_vit: {depth} blocks, hidden {vcfg.hidden_size}, {side}x{side} image = {4 * units} patches, {units} units")

    def fixed_fraction(fractions):
        def choose(step, matches):
            return M.top_edges_of_batch(matches, round(fractions[step] * units))[0]
        return choose

    presets = {name: schedule_r(1.0 - PRESETS[name], depth, depth) for name in ("low", "mid", "high")}
    encoded: dict = {}

    def run_preset(name):
        def go():
            encoded[name] = encode_qwen(visual, pixels, grid, [math.inf] * depth, "vit",
                                        edge_chooser=fixed_fraction(presets[name]))
        return go

    sides = [Side("full", lambda: visual(pixels, grid_thw=grid))]
    sides += [Side(name, run_preset(name)) for name in presets]
    times = interleaved(sides, runs, plan["warmup"], sync)
    full_encoded = encode_qwen(visual, pixels, grid, [math.inf] * depth, "vit")
    full_flops = _tower_flops(visual, full_encoded, grid)
    vit_rows = [dict(variant="full (stock tower)", units_kept=units, median_s=median(times["full"]),
                     speedup=1.0, flop_ideal=1.0)]
    for name in presets:
        kept = int(encoded[name].kept_per_segment.sum())
        vit_rows.append(dict(variant=f"DToMe {name} (vit)", units_kept=kept, median_s=median(times[name]),
                             speedup=paired_ratio(times["full"], times[name]),
                             flop_ideal=full_flops / _tower_flops(visual, encoded[name], grid)))
    log("qwen_vit: " + ", ".join(f"{r['variant']} {r['median_s']:.2f}s" for r in vit_rows))
    visual.to("meta")  # free the tower before the decoder is built

    # Prefill: text + the image's positions, Qwen2.5-VL-7B text dims, VTU with the tower's groups.
    tcfg = Qwen2_5_VLTextConfig(**plan["text"], rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                  "mrope_section": _mrope_section(plan["text"])})
    tcfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = Qwen2_5_VLTextModel(tcfg).to(dev).eval()
    before, after = plan["text_tokens"]
    n = before + units + after
    h, w = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    vis_t = torch.zeros(units, dtype=torch.long)
    vis_h = torch.arange(h).repeat_interleave(w) + before
    vis_w = torch.arange(w).repeat(h) + before
    text_a = torch.arange(before)
    text_b = torch.arange(after) + before + max(h, w)
    position_ids = torch.stack([torch.cat([text_a, vis_t + before, text_b]), torch.cat([text_a, vis_h, text_b]),
                                torch.cat([text_a, vis_w, text_b])])[:, None, :].to(dev)  # (3, 1, N)
    embeds = torch.randn(1, n, tcfg.hidden_size, device=dev)
    prefill_rows = []
    stock_times: list = []
    group_maps = {}
    for name in ("full", *presets):
        labels = torch.full((1, n), -1, dtype=torch.long)
        if name != "full":
            labels[0, before:before + units] = encoded[name].group_of_unit.cpu()
        group_maps[name] = vtu.group_map_from_labels(labels).to(dev)
    apply_vtu(model)
    sides, inputs_for = [], {}
    for name, group_map in group_maps.items():
        rows_embeds = vtu.expand(vtu.unique_rows(embeds, vtu.plan_groups(group_map)), vtu.plan_groups(group_map))

        def run(group_map=group_map, rows_embeds=rows_embeds):
            with vtu_groups(model, None if name == "full" else group_map):
                model(inputs_embeds=rows_embeds, position_ids=position_ids)
        inputs_for[name] = vtu.plan_groups(group_map).num_unique
        sides.append(Side(name, run))
    times = interleaved(sides, runs, plan["warmup"], sync)
    stock_times = times["full"]
    for name in group_maps:
        rows = inputs_for[name]
        prefill_rows.append(dict(variant="stock" if name == "full" else f"VTU {name}", rows=rows, positions=n,
                                 median_s=median(times[name]), speedup=paired_ratio(stock_times, times[name]),
                                 flop_ideal=_decoder_flops(n, n, tcfg) / _decoder_flops(rows, n, tcfg)))
    log("qwen_prefill: " + ", ".join(f"{r['variant']} {r['median_s'] * 1e3:.0f}ms" for r in prefill_rows))
    return {"qwen_vit": vit_rows, "qwen_prefill": prefill_rows,
            "settings": {"vision": plan["vision"], "image": f"{side}x{side}", "text": plan["text"],
                         "text_tokens": plan["text_tokens"], "runs": runs, "warmup": plan["warmup"],
                         "device": str(dev), "threads": torch.get_num_threads(), "started": time.strftime("%H:%M:%S")}}


def _mrope_section(text: dict) -> list[int]:
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # frequencies per head
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]  # 7B: head_dim 128 -> [16, 24, 24]


def qwen_markdown(result: dict) -> str:
    lines = [f"### Qwen2.5-VL vision tower (unit-level DToMe), {result['settings']['image']} image, "
             f"{result['settings']['vision']['depth']} blocks, hidden {result['settings']['vision']['hidden_size']}",
             "", "| variant | units kept | median s | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|"]
    for r in result["qwen_vit"]:
        lines.append(f"| {r['variant']} | {r['units_kept']} | {r['median_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['flop_ideal']:.2f}x |")
    lines += ["", f"### Qwen2.5-VL-7B-shaped prefill ({result['settings']['text']['num_hidden_layers']} decoder layers), "
                  "VTU with the tower's groups", "",
              "| variant | unique rows | positions | median ms | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["qwen_prefill"]:
        lines.append(f"| {r['variant']} | {r['rows']} | {r['positions']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x | {r['flop_ideal']:.2f}x |")
    return "\n".join(lines)
