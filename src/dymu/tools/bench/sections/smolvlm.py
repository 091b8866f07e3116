"""Bench section `smolvlm` (opt-in): SmolVLM2-2.2B-shaped tower and prefill, random weights.

- tower: the SigLIP-style tower of SmolVLM2-2.2B (27 blocks, hidden 1152, MLP 4304, 16 heads, 384 px tiles
  of 14 px patches: 27x27 patches) and its pixel-shuffle connector (scale factor 3: 81 LLM tokens per tile)
  on one image as two tower inputs, a tile and the global view: the stock `get_image_features` vs unit-level
  DToMe (`towers/smolvlm_vit.py`) at the low / mid / high presets, each a fixed fraction of the batch's units
  merged per block (the calibration rule on a batch of one image), next to the FLOP-ideal from the units
  alive after every block;
- prefill: 2 decoder layers of SmolVLM2-2.2B's Llama decoder (hidden 2048, MLP 8192, 32 heads) over text
  + the image's 162 positions + text: stock vs VTU with the group maps the tower produced.
"""

from __future__ import annotations

import torch

from ..common import bench_prefill, fixed_fraction, preset_fractions, seeded
from ..flops import vit_layer_flops
from ..timing import Side, interleaved, median, paired_ratio

PHOTO = "darknet_dog_bicycle_truck.jpg"


def smolvlm_plan(quick: bool) -> dict:
    """Real SmolVLM2-2.2B widths (--quick: toy ones); text: positions before / after the image."""
    if quick:
        return dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                image_size=84, patch_size=14),
                    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, vocab_size=64), scale_factor=3, text_tokens=(12, 12))
    return dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14),
                text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=1024), scale_factor=3, text_tokens=(14, 50))


def build(plan: dict, device, dtype):
    """(SmolVLMForConditionalGeneration at the plan's widths, the image processor of its tiles)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    seeded(4)
    config = SmolVLMConfig(vision_config=plan["vision"], text_config=dict(model_type="llama", **plan["text"]),
                           scale_factor=plan["scale_factor"], image_token_id=plan["text"]["vocab_size"] - 1)
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    model = SmolVLMForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    side = plan["vision"]["image_size"]
    processor = SmolVLMImageProcessorPil(do_image_splitting=False, max_image_size={"longest_edge": side},
                                         size={"longest_edge": side})
    return model, processor


def tower_flops(plan: dict, kept: list[list[int]] | None, tiles: int) -> float:
    """Blocks of the tower from the units alive after every block of every tile (None: the stock tower)."""
    v = plan["vision"]
    grid = (v["image_size"] // v["patch_size"]) ** 2
    unit = plan["scale_factor"] ** 2
    per_tile = kept if kept is not None else [[grid // unit] * v["num_hidden_layers"]] * tiles
    total = 0.0
    for counts in per_tile:
        n_in = grid
        for units in counts:
            total += vit_layer_flops(n_in, units * unit, v["hidden_size"], v["intermediate_size"])
            n_in = units * unit
    return total


@torch.no_grad()
def bench_smolvlm(quick: bool, device, dtype, sync, log, runs: int | None = None) -> dict:
    from ....images import open_image, sample_images
    from ....towers.smolvlm_vit import encode_tiles, real_tiles

    plan = smolvlm_plan(quick)
    runs = runs or (1 if quick else 3)
    model, processor = build(plan, device, dtype)
    inner, side = model.model, plan["vision"]["image_size"]
    photo = open_image(next(p for p in sample_images() if p.name == PHOTO))
    tile = photo.resize((2 * side, 2 * side)).crop((0, 0, side, side))  # a tile of a 2x2 split, and the global view
    out = processor(images=[[tile, photo]], return_tensors="pt")
    pixels, pixel_mask = out["pixel_values"].to(device, dtype), out["pixel_attention_mask"].to(device)
    tiles, patch_mask, _ = real_tiles(pixels, pixel_mask, plan["vision"]["patch_size"])
    depth = plan["vision"]["num_hidden_layers"]
    units = len(tiles) * int(patch_mask[0].numel()) // plan["scale_factor"] ** 2
    log(f"smolvlm: {depth} blocks, hidden {plan['vision']['hidden_size']}, 2 tiles of {side}px = {units} units "
        f"(LLM positions)")
    presets = preset_fractions(depth)
    encoded: dict = {}

    def run_preset(name):
        def go():
            encoded[name] = encode_tiles(inner, tiles, patch_mask, edge_chooser=fixed_fraction(presets[name], units))
        return go

    sides = [Side("full", lambda: inner.get_image_features(pixels, pixel_mask))]
    sides += [Side(name, run_preset(name)) for name in presets]
    times = interleaved(sides, runs, 1, sync)
    full_flops = tower_flops(plan, None, len(tiles))
    tower_rows = [dict(variant="full (stock tower + connector)", llm_rows=units, stock_positions=units,
                       median_s=median(times["full"]), speedup=1.0, flop_ideal=1.0)]
    for name in presets:
        kept = encoded[name].encoded.kept_per_block.tolist()
        tower_rows.append(dict(variant=f"DToMe {name}", llm_rows=sum(encoded[name].kept_per_tile),
                               stock_positions=units, median_s=median(times[name]),
                               speedup=paired_ratio(times["full"], times[name]),
                               flop_ideal=full_flops / tower_flops(plan, kept, len(tiles))))
    log("smolvlm tower: " + ", ".join(f"{r['variant']} {r['median_s']:.2f}s" for r in tower_rows))
    # (P,) labels of the image's positions, tile after tile: groups never cross tiles, so number them apart.
    maps = {name: torch.unique(e.encoded.group_of_unit.cpu(), return_inverse=True)[1] for name, e in encoded.items()}
    inner.vision_model.to("meta")  # free the tower before the prefill
    prefill_plan = _PrefillPlan(runs=runs, warmup=1, text_before=plan["text_tokens"][0],
                                text_after=plan["text_tokens"][1])
    rows = bench_prefill(prefill_plan, inner.text_model, maps, sync, log, text=plan["text_tokens"], runs=runs)
    for row in rows:
        row["llm_rows"] = row["n_un"] if row["n_un"] is not None else units
        row["stock_positions"] = units
    return {"tower": tower_rows, "prefill": rows,
            "settings": {"vision": plan["vision"], "text": plan["text"], "scale_factor": plan["scale_factor"],
                         "tiles": len(tiles), "text_tokens": list(plan["text_tokens"]), "runs": runs}}


class _PrefillPlan:
    """What `bench_prefill` reads of a plan."""

    def __init__(self, runs: int, warmup: int, text_before: int, text_after: int):
        self.runs, self.warmup, self.text_before, self.text_after = runs, warmup, text_before, text_after


def markdown(result: dict) -> str:
    """The two SmolVLM tables: tower + connector, then the decoder prefill."""
    s = result["settings"]
    v, t = s["vision"], s["text"]
    lines = [f"### SmolVLM2-2.2B-shaped tower + connector: {v['num_hidden_layers']} blocks, hidden {v['hidden_size']}, "
             f"{s['tiles']} tiles of {v['image_size']} px (a tile and the global view), units of "
             f"{s['scale_factor']}x{s['scale_factor']} patches, {s['runs']} runs", "",
             "| variant | LLM rows / stock positions | median s | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|"]
    for r in result["tower"]:
        lines.append(f"| {r['variant']} | {r['llm_rows']} / {r['stock_positions']} | {r['median_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['flop_ideal']:.2f}x |")
    lines += ["", f"### SmolVLM2-2.2B-shaped prefill: {t['num_hidden_layers']} Llama layers (hidden {t['hidden_size']}, "
                  f"MLP {t['intermediate_size']}), {s['text_tokens'][0]} + image + {s['text_tokens'][1]} text positions, "
                  "VTU with the tower's groups", "",
              "| variant | LLM rows / stock positions | rows per layer | median ms | speedup | FLOP-ideal |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["prefill"]:
        lines.append(f"| {r['variant']} | {r['llm_rows']} / {r['stock_positions']} | {r['rows_per_layer']} | "
                     f"{r['median_s'] * 1e3:.1f} | {r['speedup']:.2f}x | {r['flop_ideal']:.2f}x |")
    return "\n".join(lines)


def run(ctx) -> None:
    with ctx.timed("smolvlm"):
        ctx.result["smolvlm"] = bench_smolvlm(ctx.quick, ctx.device, ctx.dtype, ctx.sync, ctx.log, ctx.runs)
    ctx.notes.append("SmolVLM: one photo as a tile of its 2x2 split and its global view (2 tower inputs of 729 patches, "
                     "81 LLM positions each); presets as fixed fractions of the units merged per block (low / mid / "
                     "high keep ~93 / 208 / 392 of 576, LLaVA-1.5's fractions); tower FLOP-ideal from the units alive "
                     "after every block; prefill group maps are the tower's (random weights: the counts are not those "
                     "of the real model).")
