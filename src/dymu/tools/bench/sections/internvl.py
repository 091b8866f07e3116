"""Bench section `internvl` (opt-in: `dymu bench --only internvl`): InternVL3-8B dimensions, random weights.

- tower rows: an InternViT-300M-shaped tower (24 blocks, width 1024, 448-px tiles of 32x32 patches, class
  token, layer scale) on one 448-px tile of the photo plus the thumbnail of the whole photo (2 tower inputs),
  through the projector: the stock `get_image_features` vs dymu's unit-level merging (mode tome: a fixed r
  unit merges per block and tile at the low / mid / high presets), next to the tower's FLOP-ideal;
- prefill rows: 2 Qwen2.5-7B-shaped decoder layers (hidden 3584) over a one-image prompt (text, the 2 tiles'
  512 placeholders, text): stock vs VTU with each preset's group map, next to the FLOP-ideal.

Everything is dymu's own InternVL wiring (`dymu.families.internvl`) on the stock transformers model.
"""

from __future__ import annotations

import torch

from .. import PRESET_NAMES
from ..common import bench_prefill, preset_r, seeded
from ..flops import vit_layer_flops
from ..timing import Side, interleaved, median, paired_ratio

PHOTO = "darknet_dog_bicycle_truck.jpg"


def internvl_plan(quick: bool) -> dict:
    """Real: InternVL3-8B's tower and 2 decoder layers; quick: toy sizes (a smoke test)."""
    if quick:
        return dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                image_size=112, patch_size=14),
                    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2),
                    text_around=(8, 8), runs=1, warmup=0)
    return dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=448, patch_size=14),
                text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
                          num_key_value_heads=4),
                text_around=(14, 20), runs=3, warmup=1)


def build_model(plan: dict, device, dtype):
    """(InternVLForConditionalGeneration, tile pixels (2, 3, S, S)): random weights, a small vocabulary."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ....images import open_image, sample_images

    seeded(5)
    config = InternVLConfig(vision_config=plan["vision"], text_config=dict(plan["text"], vocab_size=1024),
                            image_token_id=1000, image_seq_length=(plan["vision"]["image_size"] // 14) ** 2 // 4)
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    model = InternVLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    size = plan["vision"]["image_size"]
    photo = open_image(next(p for p in sample_images() if p.name == PHOTO))
    tile = photo.resize((2 * size, size)).crop((0, 0, size, size))  # the left tile of a 2-tile layout
    processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False)
    pixels = processor(images=[tile, photo], return_tensors="pt")["pixel_values"]  # tile + thumbnail
    return model, pixels.to(device=device, dtype=dtype)


def _tower_flops(cfg, kept: list[list[int]], units: int) -> float:
    """Tower FLOPs (patch embedding, blocks, class token included) over the units kept after every block."""
    hidden, mlp, patch_in = cfg.hidden_size, cfg.intermediate_size, 3 * cfg.patch_size[0] ** 2
    total = 0.0
    for per_block in kept:
        total += 2 * 4 * units * patch_in * hidden
        n_in = units
        for n_out in per_block:
            total += vit_layer_flops(4 * n_in + 1, 4 * n_out + 1, hidden, mlp)
            n_in = n_out
    return total


@torch.no_grad()
def bench_internvl(plan: dict, device, dtype, sync, log, runs: int | None = None) -> dict:
    from ....families.internvl import InternVLSettings, encode_internvl

    runs = runs or plan["runs"]
    model, pixels = build_model(plan, device, dtype)
    inner, vcfg = model.model, model.config.vision_config
    depth = vcfg.num_hidden_layers
    units = (vcfg.image_size[0] // vcfg.patch_size[0]) ** 2 // 4
    r = preset_r(units, depth)  # unit merges per block and tile
    log(f"internvl: InternViT {depth} blocks, width {vcfg.hidden_size}, {len(pixels)} tiles of {units} units; "
        f"r per block {r}")
    encoded = {}

    def merged(name):
        settings = InternVLSettings(mode="tome", thresholds=None, r=[r[name]] * depth)

        def go():
            encoded[name] = encode_internvl(inner, pixels, settings)[0]
        return go

    sides = [Side("full", lambda: inner.get_image_features(pixels))]
    sides += [Side(name, merged(name)) for name in PRESET_NAMES]
    times = interleaved(sides, runs, plan["warmup"], sync)
    full_flops = _tower_flops(vcfg, [[units] * depth] * len(pixels), units)
    tower_rows = [dict(variant="full (stock tower)", units_kept=units * len(pixels), median_s=median(times["full"]),
                       speedup=1.0, flop_ideal=1.0)]
    maps = {}
    for name in PRESET_NAMES:
        e = encoded[name]
        flops = _tower_flops(vcfg, e.kept_per_block.tolist(), units)
        tower_rows.append(dict(variant=f"DToMe {name} (r {r[name]})", units_kept=int(e.kept_per_image.sum()),
                               median_s=median(times[name]), speedup=paired_ratio(times["full"], times[name]),
                               flop_ideal=full_flops / flops))
        groups = e.groups_per_item()  # labels unique over the two tiles, as the prompt's placeholders run
        offsets = [0] + torch.tensor([int(g.max()) + 1 for g in groups[:-1]]).cumsum(0).tolist()
        maps[name] = torch.cat([g + o for g, o in zip(groups, offsets)]).cpu()
    log("internvl tower: " + ", ".join(f"{row['variant']} {row['median_s']:.2f}s" for row in tower_rows))

    class _Plan:  # what bench_prefill reads of a plan
        text_before, text_after = plan["text_around"]
        warmup = plan["warmup"]

    _Plan.runs = runs
    prefill_rows = bench_prefill(_Plan, inner.language_model, maps, sync, log, text=plan["text_around"], runs=runs)
    for row in prefill_rows:
        row["stock_positions"] = units * len(pixels)
    del model
    return {"tower": tower_rows, "prefill": prefill_rows, "tiles": len(pixels), "units_per_tile": units, "r": r,
            "runs": runs, "warmup": plan["warmup"]}


def run(ctx) -> None:
    plan = internvl_plan(ctx.quick)
    with ctx.timed("internvl"):
        ctx.result["internvl"] = bench_internvl(plan, ctx.device, ctx.dtype, ctx.sync, ctx.log, ctx.runs)
    v, t = plan["vision"], plan["text"]
    ctx.notes.append(f"InternVL: an InternViT ({v['num_hidden_layers']} blocks, width {v['hidden_size']}, "
                     f"{v['image_size']}-px tiles) on one tile of the photo plus its thumbnail, and "
                     f"{t['num_hidden_layers']} Qwen2 decoder layers (hidden {t['hidden_size']}) over text + the 2 "
                     "tiles' placeholders + text; presets are a fixed r of unit merges per block and tile (mode "
                     "tome), whose group maps the prefill rows use.")


def internvl_markdown(iv: dict) -> str:
    lines = [f"### InternVL (InternVL3-8B-shaped tower, {iv['tiles']} tiles of {iv['units_per_tile']} units; "
             f"2 decoder layers; medians of {iv['runs']} runs after {iv['warmup']} warm-up, this section's own "
             "count)", "",
             "| tower | units kept | time (ms) | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|"]
    for row in iv["tower"]:
        lines.append(f"| {row['variant']} | {row['units_kept']} | {row['median_s'] * 1e3:,.0f} | "
                     f"{row['speedup']:.2f}x | {row['flop_ideal']:.2f}x |")
    lines += ["", "| prefill | LLM rows / stock | time (ms) | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|"]
    for row in iv["prefill"]:
        rows = row["n_un"] if row["n_un"] is not None else row["stock_positions"]
        lines.append(f"| {row['variant']} | {rows} / {row['stock_positions']} | {row['median_s'] * 1e3:,.0f} | "
                     f"{row['speedup_paired']:.2f}x | {row['flop_ideal']:.2f}x |")
    return "\n".join(lines)
