"""`dymu bench --only gemma3`: the Gemma 3 rows (random weights, Gemma-3-4B dimensions). Opt-in (not in the
default run): the stock tower takes about a minute per forward on a 2-core CPU.

- tower: Gemma 3's SigLIP at 896 px (27 blocks, width 1152, MLP 4304, 16 heads; 64x64 patches, no class
  token) on one photo, the stock tower vs unit-level DToMe (towers/unit_vit.py) on the 4x4 pooling units
  at the low / mid / high presets, each a fixed fraction of the image's 256 units merged per block (the
  calibration rule on a batch of one), next to the FLOP-ideal speedup from the units alive in every block;
  the stock connector (4x4 average pool, RMSNorm, projection) runs after both.
- prefill: 2 decoder layers of Gemma-3-4B's text model (hidden 2560, 8 heads of 256, 4 KV heads, MLP 10240),
  one sliding-window (1024) and one global layer, on text + the image's 256 positions: stock vs VTU with
  the group maps the tower merges produced. The text model alone runs the causal mask (the bidirectional
  image block of the full model changes no cost).
"""

from __future__ import annotations

import time

import torch

from ..common import fixed_fraction, preset_fractions, prompt_group_map
from ..timing import Side, interleaved, median, paired_ratio



def gemma3_plan(quick: bool) -> dict:
    if quick:
        return dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                image_size=256, patch_size=8), tokens=64,
                    text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, query_pre_attn_scalar=32, sliding_window=32),
                    text_tokens=(12, 12), runs=1, warmup=0, tower_runs=1)
    return dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=896, patch_size=14), tokens=256,
                text=dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=256, query_pre_attn_scalar=256, sliding_window=1024),
                text_tokens=(14, 50), runs=3, warmup=1, tower_runs=1)


def _tower_flops(kept: list[int], units: int, unit: int, hidden: int, mlp: int) -> float:
    """SigLIP blocks: q/k/v/o and attention over the rows entering the block, the MLP (2 matrices) over
    the rows left after its merge (``kept``: units alive after every block)."""
    total, alive = 0.0, units
    for after in kept:
        rows = alive * unit
        total += 2 * rows * 4 * hidden * hidden + 4 * rows * rows * hidden + 2 * 2 * after * unit * hidden * mlp
        alive = after
    return total


def _decoder_flops(rows: int, positions: int, cfg) -> float:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (2 * rows * (2 * cfg.hidden_size * q + 2 * cfg.hidden_size * kv)
                                    + 4 * positions ** 2 * q + 2 * rows * 3 * cfg.hidden_size * cfg.intermediate_size)


@torch.no_grad()
def bench_gemma3(quick: bool = False, device: str = "cpu", runs: int | None = None, log=print) -> dict:
    from transformers import Gemma3Config, Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Model, Gemma3TextModel

    from .... import vtu
    from ....decoders.llama import apply_vtu, vtu_groups
    from ....families.gemma3 import encode_gemma3, unit_grid
    from ....images import open_image, sample_images

    plan = gemma3_plan(quick)
    runs = runs or plan["runs"]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    config = Gemma3Config(vision_config=dict(plan["vision"], vision_use_head=False),
                          text_config=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=1, num_key_value_heads=1, head_dim=64, vocab_size=64),
                          mm_tokens_per_image=plan["tokens"])
    config.vision_config._attn_implementation = "sdpa"
    vision = Gemma3Model(config).to(dev).eval()  # the tower and connector are timed; its 1-layer text model is not
    vision.language_model.to("meta")
    size = plan["vision"]["image_size"]
    processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    photo = open_image(sample_images()[-1])
    pixels = processor(images=[photo], return_tensors="pt")["pixel_values"].to(dev)
    patches, side = unit_grid(config)
    units, depth = plan["tokens"], plan["vision"]["num_hidden_layers"]
    log(f"gemma3 tower: {depth} blocks, width {plan['vision']['hidden_size']}, {size} px = {patches}x{patches} "
        f"patches, {units} units of {side}x{side}")

    presets = preset_fractions(depth)
    encoded: dict = {}

    def run_preset(name):
        def go():
            encoded[name] = encode_gemma3(vision, pixels, edge_chooser=fixed_fraction(presets[name], units))
            vision.multi_modal_projector(encoded[name].features)
        return go

    sides = [Side("full", lambda: vision.get_image_features(pixels))]
    sides += [Side(name, run_preset(name)) for name in presets]
    times = interleaved(sides, plan["tower_runs"], plan["warmup"], sync)
    vc = plan["vision"]
    full_flops = _tower_flops([units] * depth, units, side * side, vc["hidden_size"], vc["intermediate_size"])
    tower_rows = [dict(variant="full (stock tower)", units_kept=units, median_s=median(times["full"]),
                       speedup=1.0, flop_ideal=1.0)]
    for name in presets:
        kept = encoded[name].kept_per_block[0].tolist()
        tower_rows.append(dict(variant=f"DToMe {name}", units_kept=kept[-1], median_s=median(times[name]),
                               speedup=paired_ratio(times["full"], times[name]),
                               flop_ideal=full_flops / _tower_flops(kept, units, side * side, vc["hidden_size"],
                                                                    vc["intermediate_size"])))
    log("gemma3 tower: " + ", ".join(f"{r['variant']} {r['median_s']:.2f}s" for r in tower_rows))
    vision.to("meta")  # free the tower before the decoder is built

    tcfg = Gemma3TextConfig(**plan["text"], num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                            vocab_size=1024)
    tcfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = Gemma3TextModel(tcfg).to(dev).eval()
    before, after = plan["text_tokens"]
    n = before + units + after
    embeds = torch.randn(1, n, tcfg.hidden_size, device=dev)
    group_maps = {name: prompt_group_map((before, after), units, None if name == "full" else
                                         encoded[name].group_of_unit).to(dev) for name in ("full", *presets)}
    apply_vtu(model, kv_cache="full")
    sides, rows_of = [], {}
    for name, group_map in group_maps.items():
        groups = vtu.plan_groups(group_map)
        rows_embeds = vtu.expand(vtu.unique_rows(embeds, groups), groups)

        def run(group_map=group_map, rows_embeds=rows_embeds, name=name):
            with vtu_groups(model, None if name == "full" else group_map):
                model(inputs_embeds=rows_embeds, use_cache=False)
        rows_of[name] = groups.num_unique
        sides.append(Side(name, run))
    times = interleaved(sides, runs, plan["warmup"], sync)
    prefill_rows = [dict(variant="stock" if name == "full" else f"VTU {name}", rows=rows_of[name], positions=n,
                         median_s=median(times[name]), speedup=paired_ratio(times["full"], times[name]),
                         flop_ideal=_decoder_flops(n, n, tcfg) / _decoder_flops(rows_of[name], n, tcfg))
                    for name in group_maps]
    log("gemma3 prefill: " + ", ".join(f"{r['variant']} {r['median_s'] * 1e3:.0f}ms" for r in prefill_rows))
    return {"tower": tower_rows, "prefill": prefill_rows,
            "settings": {"vision": plan["vision"], "tokens": units, "text": plan["text"], "decoder_layers": 2,
                         "text_tokens": plan["text_tokens"], "runs": runs, "tower_runs": plan["tower_runs"],
                         "warmup": plan["warmup"], "device": str(dev), "threads": torch.get_num_threads(),
                         "started": time.strftime("%H:%M:%S")}}


def gemma3_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"### Gemma 3 SigLIP tower (unit-level DToMe on 4x4 pooling units), {s['vision']['image_size']} px, "
             f"{s['vision']['num_hidden_layers']} blocks, width {s['vision']['hidden_size']}", "",
             "| variant | LLM tokens kept | median s | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|"]
    for r in result["tower"]:
        lines.append(f"| {r['variant']} | {r['units_kept']} / {s['tokens']} | {r['median_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['flop_ideal']:.2f}x |")
    lines += ["", f"### Gemma-3-4B-shaped prefill ({s['decoder_layers']} decoder layers: sliding + global), VTU with "
                  "the tower's groups", "",
              "| variant | unique rows | positions | median ms | speedup | FLOP-ideal |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["prefill"]:
        lines.append(f"| {r['variant']} | {r['rows']} | {r['positions']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x | {r['flop_ideal']:.2f}x |")
    return "\n".join(lines)

