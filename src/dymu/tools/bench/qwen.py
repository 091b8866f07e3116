"""`dymu bench --only qwen_vit,qwen_prefill` (the Qwen2.5-VL rows) and `--only qwen3_5` (the Qwen3.5 rows):
random weights, real dimensions.

- qwen_vit: a Qwen2.5-VL-7B-shaped vision tower (hidden 1280, 32 blocks, windows of 112 px, full
  attention at blocks 7/15/23/31) on one 448x448 photo (1024 patches = 256 units): the stock tower
  vs unit-level DToMe (merge_point "vit") at the low / mid / high presets, each as a fixed fraction
  of the image's units merged per block (the calibration rule on a batch of one), next to the
  FLOP-ideal speedup from the units alive in every block.
- qwen_prefill: 2 decoder layers of Qwen2.5-VL-7B's text model (hidden 3584, 28 heads, 4 KV heads,
  MLP 18944) on a prompt of text + the image's 256 positions with M-RoPE (t, h, w) positions:
  stock vs VTU with the group maps the tower merges produced.
- qwen3_5: the same two at transformers' `Qwen3_5Config` dimensions: the 27-block tower (hidden 1152,
  16-px patches) and 2 decoder layers, one Gated DeltaNet (linear attention) and one gated full-attention
  layer (hidden 4096). VTU runs the DeltaNet's projections on the unique rows and its convolution and
  recurrence at full length (decoders/qwen3_5.py), which the FLOP-ideal counts.
Opt-in sections (not in the default run): the full tower takes ~20 s per forward on a 2-core CPU.
"""

from __future__ import annotations

import math
import time

import torch

from .common import fixed_fraction, preset_fractions, prompt_group_map
from .timing import Side, interleaved, median, paired_ratio



def qwen_plan(quick: bool, model: str = "qwen2_5_vl") -> dict:
    if quick:
        vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128)
        text = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, vocab_size=64)
        if model == "qwen3_5":
            text.update(head_dim=32, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32)
        else:
            vision.update(window_size=56, fullatt_block_indexes=[1, 3])
        return dict(model=model, vision=vision, side=224, text=text, text_tokens=(12, 12), runs=1, warmup=1)
    if model == "qwen3_5":  # transformers' Qwen3_5Config defaults: the 27-block tower, a hidden-4096 decoder
        return dict(model=model, vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                             out_hidden_size=4096, patch_size=16), side=448,
                    text=dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=16, num_key_value_heads=4,
                              head_dim=256, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                              linear_num_value_heads=32, linear_num_key_heads=16, linear_key_head_dim=128,
                              linear_value_head_dim=128, vocab_size=1024),
                    text_tokens=(14, 50), runs=2, warmup=1)
    return dict(model=model, vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                         out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
                side=448, text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                    num_key_value_heads=4, num_hidden_layers=2, vocab_size=1024),
                text_tokens=(14, 50), runs=2, warmup=1)


def _vision_block_flops(segments: list[int], n_mlp: int, hidden: int, mlp: int) -> float:
    """One Qwen2.5-VL vision block: q/k/v/o over the rows, attention within each segment (window or
    image), gated MLP (3 matrices) over the rows left after the merge."""
    rows = sum(segments)
    return 2 * rows * 4 * hidden * hidden + sum(4 * s * s * hidden for s in segments) + 2 * 3 * n_mlp * hidden * mlp


def _tower_flops(visual, encoded, grid) -> float:
    """FLOPs of the blocks from the units alive after each block. Window sizes (Qwen2.5-VL): the stock
    windows, scaled by the fraction of units left (survivors keep their window; an even spread is assumed)."""
    windows, full = [], range(len(visual.blocks))
    if getattr(visual, "window_size", None):
        from transformers.vision_utils import get_vision_window_index

        _, cu = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        windows, full = (cu[1:] - cu[:-1]).tolist(), visual.fullatt_block_indexes
    units0 = int(encoded.units_per_segment.sum())
    cfg = visual.config
    total, alive = 0.0, units0
    for index, after in enumerate(encoded.kept_per_step[0].tolist()):
        share = alive / units0
        segments = [4 * alive] if index in full else [w * share for w in windows]
        total += _vision_block_flops(segments, 4 * after, cfg.hidden_size, cfg.intermediate_size)
        alive = after
    return total


def _decoder_flops(rows: int, positions: int, cfg) -> float:
    """Row-wise work (projections, MLP) on ``rows``, token mixing on ``positions``, per layer type:
    attention (q with Qwen3.5's output gate, k, v, o; QK^T and PV over the positions) and Gated DeltaNet
    (its projections on the rows; the short convolution and the delta-rule recurrence, about 4 multiply-adds
    per key x value entry of the state per head and position, on the positions)."""
    hidden, mlp = cfg.hidden_size, 2 * rows * 3 * cfg.hidden_size * cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    gate = 2 if getattr(cfg, "layer_types", None) else 1  # Qwen3.5's q_proj also makes the output gate
    total = 0.0
    for kind in getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers:
        if kind == "linear_attention":
            keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
            values = cfg.linear_num_value_heads * cfg.linear_value_head_dim
            projections = hidden * (2 * keys + 2 * values + 2 * cfg.linear_num_value_heads) + values * hidden
            state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
            total += 2 * rows * projections + 2 * positions * (4 * state + (2 * keys + values) * 4) + mlp
        else:
            total += 2 * rows * (hidden * (gate * q + 2 * kv) + q * hidden) + 4 * positions ** 2 * q + mlp
    return total


@torch.no_grad()
def bench_qwen(quick: bool = False, device: str = "cpu", runs: int | None = None, log=print) -> dict:
    """Sections qwen_vit and qwen_prefill: the Qwen2.5-VL-7B-shaped rows."""
    result = bench_unit_vl(qwen_plan(quick), device, runs, log)
    return {"qwen_vit": result["vit"], "qwen_prefill": result["prefill"], "settings": result["settings"]}


def _parts(model: str):
    """(vision config, vision model, text config, text model) classes of a Qwen VL family."""
    if model == "qwen3_5":
        from transformers import Qwen3_5TextConfig, Qwen3_5VisionConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextModel, Qwen3_5VisionModel

        return Qwen3_5VisionConfig, Qwen3_5VisionModel, Qwen3_5TextConfig, Qwen3_5TextModel
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLTextModel,
    )

    return Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel


@torch.no_grad()
def bench_unit_vl(plan: dict, device: str = "cpu", runs: int | None = None, log=print) -> dict:
    """The tower rows (stock vs unit-level DToMe at the presets) and the prefill rows (stock vs VTU with
    the tower's group maps) of one Qwen VL family's ``plan`` (`qwen_plan`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ... import vtu
    from ...decoders.llama import apply_vtu, vtu_groups
    from ...images import open_image, sample_images
    from ...towers.qwen_vit import encode_qwen

    VisionConfig, VisionModel, TextConfig, TextModel = _parts(plan["model"])
    section = "qwen3_5" if plan["model"] == "qwen3_5" else "qwen_vit"
    runs = runs or plan["runs"]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    vcfg = VisionConfig(**plan["vision"])
    vcfg._attn_implementation = "sdpa"
    visual = VisionModel(vcfg).to(dev).eval()
    side = plan["side"]
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": side * side, "longest_edge": side * side},
                                         patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size)
    photo = open_image(sample_images()[-1]).resize((side, side))
    inputs = processor(images=[photo], return_tensors="pt")
    pixels, grid = inputs["pixel_values"].to(dev), inputs["image_grid_thw"].to(dev)
    units = int(grid.prod(-1).sum()) // 4
    depth = len(visual.blocks)
    log(f"{section}: {depth} blocks, hidden {vcfg.hidden_size}, {side}x{side} image = {4 * units} patches, {units} units")

    presets = preset_fractions(depth)
    encoded: dict = {}

    def run_preset(name):
        def go():
            encoded[name] = encode_qwen(visual, pixels, grid, [math.inf] * depth, "vit",
                                        edge_chooser=fixed_fraction(presets[name], units))
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
    log(f"{section}: " + ", ".join(f"{r['variant']} {r['median_s']:.2f}s" for r in vit_rows))
    visual.to("meta")  # free the tower before the decoder is built

    # Prefill: text + the image's positions, VTU with the tower's groups.
    rope = ({} if plan["model"] == "qwen3_5" else  # Qwen3.5's config brings its own (partial, interleaved M-RoPE)
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(plan["text"])}))
    tcfg = TextConfig(**plan["text"], **rope)
    tcfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = TextModel(tcfg).to(dev).eval()
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
    group_maps = {name: prompt_group_map((before, after), units, None if name == "full" else
                                         encoded[name].group_of_unit).to(dev) for name in ("full", *presets)}
    apply_vtu(model, kv_cache="full" if plan["model"] == "qwen3_5" else "compact")  # Qwen3.5 refuses compact
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
    log(f"{section} prefill: " + ", ".join(f"{r['variant']} {r['median_s'] * 1e3:.0f}ms" for r in prefill_rows))
    return {"vit": vit_rows, "prefill": prefill_rows,
            "settings": {"vision": plan["vision"], "image": f"{side}x{side}", "text": plan["text"],
                         "text_tokens": plan["text_tokens"], "runs": runs, "warmup": plan["warmup"],
                         "device": str(dev), "threads": torch.get_num_threads(), "started": time.strftime("%H:%M:%S")}}


def _mrope_section(text: dict) -> list[int]:
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # frequencies per head
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]  # 7B: head_dim 128 -> [16, 24, 24]


def qwen_markdown(result: dict, title: str = "Qwen2.5-VL", vit: str = "qwen_vit", prefill: str = "qwen_prefill") -> str:
    settings = result["settings"]
    lines = [f"### {title} vision tower (unit-level DToMe), {settings['image']} image, "
             f"{settings['vision']['depth']} blocks, hidden {settings['vision']['hidden_size']}",
             "", "| variant | units kept | median s | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|"]
    for r in result[vit]:
        lines.append(f"| {r['variant']} | {r['units_kept']} | {r['median_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['flop_ideal']:.2f}x |")
    layers = ", ".join(settings["text"].get("layer_types", [])) or f"{settings['text']['num_hidden_layers']} decoder"
    lines += ["", f"### {title}-shaped prefill ({layers} layers, hidden {settings['text']['hidden_size']}), "
                  "VTU with the tower's groups", "",
              "| variant | unique rows | positions | median ms | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|---:|"]
    for r in result[prefill]:
        lines.append(f"| {r['variant']} | {r['rows']} | {r['positions']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x | {r['flop_ideal']:.2f}x |")
    return "\n".join(lines)


@torch.no_grad()
def bench_qwen3_5(quick: bool = False, device: str = "cpu", runs: int | None = None, log=print) -> dict:
    """Section qwen3_5: the tower and a linear-attention + full-attention prefill at transformers'
    Qwen3_5Config dimensions."""
    return bench_unit_vl(qwen_plan(quick, "qwen3_5"), device, runs, log)


def qwen3_5_markdown(result: dict) -> str:
    return qwen_markdown(result, "Qwen3.5", "vit", "prefill")
