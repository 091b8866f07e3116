"""What several `dymu bench` sections share: the machine description, the models (random weights,
seeded), the inputs, and the decoder prefill timing (the prefill and OneVision sections)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from . import PRESET_NAMES
from .flops import decoder_layer_flops
from .plan import Plan
from .timing import Side, interleaved, median, paired_ratio


def machine(device: torch.device) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_isa": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "virtual_machine": "hypervisor" in flags,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None



def seeded(seed: int):
    torch.manual_seed(seed)


def build_clip(plan: Plan, device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    seeded(0)
    config = CLIPVisionConfig(**plan.clip)
    config._attn_implementation = "sdpa"
    return CLIPVisionModel(config).to(device=device, dtype=dtype).eval()


def build_llama(plan: Plan, device, dtype):
    from transformers import LlamaConfig, LlamaModel

    seeded(1)
    config = LlamaConfig(**plan.llama)
    config._attn_implementation = "sdpa"
    return LlamaModel(config).to(device=device, dtype=dtype).eval()


def pixel_batch(tower, count: int) -> torch.Tensor:
    from ...images import open_image, sample_images
    from ...towers.clip import CLIP

    paths = sample_images()
    processor = CLIP.default_processor(tower.config)
    images = [open_image(paths[i % len(paths)]) for i in range(count)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    param = next(tower.parameters())
    return pixels.to(device=param.device, dtype=param.dtype)


def diverse_images(count: int) -> list[Path]:
    """`count` different-looking images: the repo's test images when run from a checkout (blank,
    photos, text, noise...), else the few shipped sample images, cycled."""
    from ...images import IMAGE_SUFFIXES, sample_images

    folder = Path(__file__).resolve().parents[4] / "tests" / "data" / "images"
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    # Spread the picks over the sorted list (names group by source, so neighbours look alike).
    pool = found or sample_images()
    picks = [pool[(i * len(pool)) // count] for i in range(count)] if count <= len(pool) else pool
    return [picks[i % len(picks)] for i in range(count)]


def preset_r(patches: int, run_layers: int) -> dict[str, int]:
    """Fixed merges per layer for the presets: 21 / 16 / 8 for 576 patches over 23 layers."""
    from ..calibration import PRESETS

    return {name: round((patches - round(patches * PRESETS[name])) / run_layers) for name in PRESET_NAMES}


def build_qwen2(plan: Plan, device, dtype):
    from transformers import Qwen2Config, Qwen2Model

    seeded(3)
    config = Qwen2Config(**plan.onevision_qwen2)
    config._attn_implementation = "sdpa"
    return Qwen2Model(config).to(device=device, dtype=dtype).eval()


def prompt_group_map(text: tuple[int, int], units: int, visual_groups: torch.Tensor | None) -> torch.Tensor:
    """(1, N) group map of text + an image of ``units`` positions + text: the image's positions join their
    ``visual_groups`` (None: the stock model, every position its own group, as every text position)."""
    from ...vtu import group_map_from_labels

    labels = torch.full((1, text[0] + units + text[1]), -1, dtype=torch.long)
    if visual_groups is not None:
        labels[0, text[0]:text[0] + units] = visual_groups.cpu().long()
    return group_map_from_labels(labels)


def prefill_inputs(text: tuple[int, int], model, visual_groups: torch.Tensor, seed: int):
    """(group_map (1, N), inputs_embeds (1, N, D)) for text + image + text, rows equal within groups."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    group_map = prompt_group_map(text, len(visual_groups), visual_groups).to(device)
    gen = torch.Generator().manual_seed(seed)
    unique = torch.randn(int(group_map.max()) + 1, model.config.hidden_size, generator=gen) * 0.02
    embeds = unique[group_map[0].cpu()].unsqueeze(0).to(device=device, dtype=dtype)
    return group_map, embeds


@torch.no_grad()
def bench_prefill(plan: Plan, model, visual_maps: dict, sync, log, text: tuple[int, int] | None = None,
                  runs: int | None = None, names: tuple[str, ...] = PRESET_NAMES) -> list[dict]:
    """Decoder prefill over text + visual positions + text: the stock body ("full") vs VTU with each
    of ``names``' group map of the visual positions (``visual_maps[name]``: (P,) labels 0..U-1, one
    visual layout for all), interleaved round-robin; rows per layer from the VTU row counter."""
    from ...decoders.llama import apply_vtu, remove_vtu, rows_processed, set_groups

    cfg = model.config
    kv_hidden = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    text = text or (plan.text_before, plan.text_after)
    runs = runs or plan.runs
    # One embedding sequence per variant; the full side runs on the "mid" one (or the first: speed does
    # not depend on the values).
    inputs = {name: prefill_inputs(text, model, visual_maps[name], seed=i) for i, name in enumerate(names)}
    full_embeds = inputs["mid" if "mid" in names else names[0]][1]
    positions = full_embeds.shape[1]

    def full_setup():
        remove_vtu(model)

    def vtu_setup(name):
        def setup():
            apply_vtu(model, vtu_attention="fast")
            set_groups(model, inputs[name][0])
        return setup

    rows_seen = {}

    def forward(name, embeds):
        def run():
            model(inputs_embeds=embeds, use_cache=False)
            if name != "full":  # rows the MLP really ran on, from the VTU row counter (a dict read)
                rows_seen[name] = rows_processed(model)["mlp"] // cfg.num_hidden_layers
        return run

    sides = [Side("full", forward("full", full_embeds), full_setup)]
    sides += [Side(name, forward(name, inputs[name][1]), vtu_setup(name)) for name in names]
    log(f"prefill: {cfg.num_hidden_layers} decoder layers, {positions} positions, {plan.warmup} warm-up + "
        f"{runs} rounds of full, {', '.join(names)}")
    times = interleaved(sides, runs, plan.warmup, sync)
    remove_vtu(model)

    out = []
    full_flops = cfg.num_hidden_layers * decoder_layer_flops(positions, positions, cfg.hidden_size,
                                                               cfg.intermediate_size, kv_hidden)
    full_t = median(times["full"])
    for side in sides:
        rows = positions if side.name == "full" else rows_seen[side.name]
        n_un = (int(visual_maps[side.name].max()) + 1) if side.name != "full" else None
        flops = cfg.num_hidden_layers * decoder_layer_flops(rows, positions, cfg.hidden_size,
                                                              cfg.intermediate_size, kv_hidden)
        t = median(times[side.name])
        out.append(dict(variant="full" if side.name == "full" else f"VTU {side.name}", n_un=n_un,
                        rows_per_layer=rows, positions=positions, layers=cfg.num_hidden_layers,
                        attention="sdpa", vtu_attention=None if side.name == "full" else "fast",
                        flops=flops, times_s=times[side.name], median_s=t, speedup=full_t / t,
                        speedup_paired=paired_ratio(times["full"], times[side.name]),
                        flop_ideal=full_flops / flops, quotient=(full_t / t) / (full_flops / flops)))
    return out




def preset_fractions(steps: int) -> dict[str, list[float]]:
    """Per preset (low / mid / high), the fraction of the units merged at each of ``steps`` merge steps:
    the calibration presets' token fractions, spread evenly (the towers that merge units)."""
    from ..calibration import PRESETS, schedule_r

    return {name: schedule_r(1.0 - PRESETS[name], steps, steps) for name in PRESET_NAMES}


def fixed_fraction(fractions: list[float], units: int):
    """An edge chooser merging round(fractions[step] · units) edges of the batch at every step: the
    calibration rule (batch-level top-k) on one image, so a preset's counts are fixed and comparable."""
    from ... import merge as M

    def choose(step, matches):
        return M.top_edges_of_batch(matches, round(fractions[step] * units))[0]
    return choose
