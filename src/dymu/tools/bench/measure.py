"""Measuring for `dymu bench`: measured speed next to the FLOP ideal, for the encoder, the LLM prefill and calibration.

Token reduction is chosen for wall-clock time, and FLOP savings often do not show up on the clock.
So every ratio printed here is a measured one, with the ideal that FLOPs predict next to it:

- **encoder**: a CLIP ViT-L/14-336 tower (LLaVA-1.5's, read at layer -2), stock vs DToMe at the
  low / mid / high presets; FLOP-ideal speedup from the tokens each layer actually kept;
- **prefill**: Vicuna-7B-shaped decoder layers over 576 visual + 64 text positions, stock vs VTU at
  N_un = 93 / 208 / 392 unique visual rows, and the paper's exact Eq. 10 attention at one N_un;
- **attention FLOPs** in the form of the paper's Table 1, counted honestly, next to the paper's;
- **calibration** throughput (images/s) vs a plain encoder forward on the same batches;
- **merge-off overhead**: the patched tower with every threshold at +inf vs the stock tower;
- **onevision**: a Qwen2-7B-shaped prefill over one LLaVA-OneVision AnyRes image (~3,000 positions
  in the stock packed layout: base crop, unpadded canvas, newlines) plus text, stock vs VTU, with
  group maps made by dymu's OneVision wiring from a real photo (fixed r per layer, 729-token crops);
- **decode**: KV-cache bytes, peak memory and ms per generated token of stock vs VTU with the full
  cache vs VTU with the compact cache, 2 Qwen2-7B-shaped layers, a multi-image prompt, batch 1 and 8
  (decode.py).

Models are built from configs with random weights: speed does not depend on the weights. Timings
are medians of ``runs`` runs after ``warmup`` rounds; the sides being compared run interleaved
round-robin (A B C A B C ...) inside one process so that drift (thermal, other processes) hits
them alike. The markdown report goes to stdout, everything (raw times included) to ``--json``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import PRESET_NAMES, SECTIONS
from .flops import decoder_layer_flops, encoder_flops, table1
from .report import evaluate_targets, markdown
from .timing import Side, device_sync, interleaved, median, paired_ratio



# ---------------------------------------------------------------------------------------------
# Sizes: the real benchmark, its --quick smoke-test version, and the GPU variant.


@dataclass
class Plan:
    """Everything the benchmark runs (the notes in the report say in words what was done)."""

    name: str
    clip: dict  # CLIPVisionConfig kwargs
    feature_layer: int  # LLaVA-1.5 reads hidden_states[-2]
    batches: tuple[int, ...]
    # The large batch runs only the first `large_batch_layers` layers (None: all), with r scaled
    # so that the last layer run keeps the tokens of the preset: the CPU budget does not allow 8 x 23
    # CLIP-L layers x 4 variants x 6 rounds.
    large_batch_layers: int | None
    llama: dict  # LlamaConfig kwargs
    text_before: int
    text_after: int
    exact_preset: str  # the N_un at which the exact Eq. 10 path is timed
    exact_layers: int  # decoder layers the exact comparison runs (it is slow and memory hungry)
    exact_runs: int  # timed runs of the exact path itself (full and fast get `runs`)
    cal_images: int
    cal_batch: int
    cal_layers: int | None  # calibration and its plain forward run this many layers (None: to the feature layer)
    merge_off_runs: int  # the merge-off overhead is a few %: more runs than the others
    runs: int
    warmup: int
    # OneVision prefill: Qwen2 body kwargs, the SigLIP grid of the (small, map-making) tower, the
    # photo's size (w, h), text around the image, and the timed runs (a full 7B-layer prefill over
    # ~3,000 positions is slow on a CPU).
    onevision_qwen2: dict | None = None
    onevision_tower: dict | None = None
    onevision_image: tuple[int, int] = (640, 480)
    onevision_text: tuple[int, int] = (14, 20)
    onevision_runs: int = 3
    # Packed vs padded batches (calibrated mid thresholds, diverse images): encoder batches (all
    # layers to the feature layer), batch-1 runs (a <= 2% comparison: more rounds), calibration.
    packed_batches: tuple[int, ...] = (8,)
    packed_b1_runs: int = 7
    packed_cal_images: int = 32
    packed_cal_batch: int = 32
    packed_cal_layers: int | None = 8  # None: to the feature layer


def full_plan(device: torch.device) -> Plan:
    gpu = device.type == "cuda"
    return Plan(
        name="full",
        clip=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14),
        feature_layer=-2,
        batches=(1, 64) if gpu else (1, 8),
        large_batch_layers=None if gpu else 4,
        llama=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                   num_hidden_layers=32 if gpu else 2, vocab_size=32000 if gpu else 256,
                   max_position_embeddings=4096),
        text_before=35,
        text_after=29,
        exact_preset="low",
        exact_layers=4 if gpu else 1,
        exact_runs=5 if gpu else 1,
        cal_images=64 if gpu else 8,
        cal_batch=32 if gpu else 8,
        cal_layers=None if gpu else 4,
        merge_off_runs=10,
        runs=5,
        warmup=1,
        onevision_qwen2=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                             num_key_value_heads=4, num_hidden_layers=28 if gpu else 2,
                             vocab_size=152064 if gpu else 256, max_position_embeddings=32768),
        onevision_tower=dict(image_size=384, patch_size=14, num_hidden_layers=26),  # SigLIP-SO400M's grid and depth
        onevision_runs=5 if gpu else 3,
        packed_batches=(8, 32) if gpu else (8,),
        packed_b1_runs=7,
        packed_cal_images=64 if gpu else 32,
        packed_cal_batch=32,
        packed_cal_layers=None if gpu else 8,
    )


def quick_plan(device: torch.device) -> Plan:
    return Plan(
        name="quick",
        clip=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  image_size=112, patch_size=14),
        feature_layer=-2,
        batches=(1, 4),
        large_batch_layers=2,
        llama=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
                   num_hidden_layers=2, vocab_size=64, max_position_embeddings=512),
        text_before=6,
        text_after=6,
        exact_preset="low",
        exact_layers=1,
        exact_runs=1,
        cal_images=4,
        cal_batch=2,
        cal_layers=2,
        merge_off_runs=1,
        runs=1,
        warmup=1,
        onevision_qwen2=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, vocab_size=64, max_position_embeddings=4096),
        onevision_tower=dict(image_size=126, patch_size=14, num_hidden_layers=4),
        onevision_image=(300, 220),
        onevision_text=(6, 6),
        onevision_runs=1,
        packed_batches=(4,),
        packed_b1_runs=1,
        packed_cal_images=4,
        packed_cal_batch=4,
        packed_cal_layers=2,
    )


# ---------------------------------------------------------------------------------------------
# Machine description.


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


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Models and inputs.


def _seeded(seed: int):
    torch.manual_seed(seed)


def build_clip(plan: Plan, device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _seeded(0)
    config = CLIPVisionConfig(**plan.clip)
    config._attn_implementation = "sdpa"
    return CLIPVisionModel(config).to(device=device, dtype=dtype).eval()


def build_llama(plan: Plan, device, dtype):
    from transformers import LlamaConfig, LlamaModel

    _seeded(1)
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


# ---------------------------------------------------------------------------------------------
# Sections.


@torch.no_grad()
def bench_encoder(plan: Plan, tower, device, thresholds: dict, sync, log) -> tuple[list[dict], dict]:
    """Stock vs DToMe (low/mid/high) per batch size, interleaved round-robin.

    Returns the rows and the batch-1 group maps of the visual patches per fixed-r preset (the
    prefill uses them).
    """
    from ...towers.clip import CLIP
    from ...towers.encoder import apply_dtome, encode_with_tower, layers_to_run, remove_dtome

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


@torch.no_grad()
def bench_packed(plan: Plan, tower, sync, log) -> dict:
    """Packed vs padded batches with calibrated mid thresholds on diverse images (issue 17).

    Rows: full / padded / packed encoder at each of `plan.packed_batches` (all layers to the feature
    layer) with the FLOP-ideal from the tokens each image actually kept per layer (Σ n_i); batch-1
    padded vs packed; calibration throughput padded vs packed at `plan.packed_cal_batch`.
    """
    from ..calibration import calibrate, schedule_r, PRESETS
    from ...images import open_image
    from ...towers.clip import CLIP
    from ...towers.encoder import apply_dtome, encode_with_tower, layers_to_run, remove_dtome

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


def merge_off_result(stock: list[float], patched: list[float], batch: int) -> dict:
    stock_t, patched_t = median(stock), median(patched)
    return dict(batch=batch, stock_times_s=stock, patched_times_s=patched,
                stock_median_s=stock_t, patched_median_s=patched_t, overhead=patched_t / stock_t - 1,
                overhead_paired=paired_ratio(patched, stock) - 1)


def _group_maps_for_prefill(plan: Plan, tower, group_maps: dict, log) -> dict[str, torch.Tensor]:
    """Group maps of the visual positions (P,) for each preset: from the encoder's batch-1 DToMe run
    with fixed r when there was one, else from one fixed-r encode here."""
    from ...towers.clip import CLIP
    from ...towers.encoder import apply_dtome, encode_with_tower, layers_to_run, remove_dtome

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


def _prefill_inputs(text: tuple[int, int], model, visual_groups: torch.Tensor, seed: int):
    """(group_map (1, N), inputs_embeds (1, N, D)) for text + image + text, rows equal within groups."""
    from ...vtu import group_map_from_labels

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    labels = torch.cat([
        torch.full((text[0],), -1, dtype=torch.long),
        visual_groups.cpu().long(),
        torch.full((text[1],), -1, dtype=torch.long),
    ]).unsqueeze(0)
    group_map = group_map_from_labels(labels).to(device)
    gen = torch.Generator().manual_seed(seed)
    unique = torch.randn(int(group_map.max()) + 1, model.config.hidden_size, generator=gen) * 0.02
    embeds = unique[group_map[0].cpu()].unsqueeze(0).to(device=device, dtype=dtype)
    return group_map, embeds


@torch.no_grad()
def bench_prefill(plan: Plan, model, visual_maps: dict, sync, log, text: tuple[int, int] | None = None,
                  runs: int | None = None) -> list[dict]:
    from ...decoders.llama import apply_vtu, remove_vtu, rows_processed, set_groups

    cfg = model.config
    kv_hidden = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    text = text or (plan.text_before, plan.text_after)
    runs = runs or plan.runs
    # One embedding sequence per preset; the full side runs on the "mid" sequence (speed does not
    # depend on the values).
    inputs = {name: _prefill_inputs(text, model, visual_maps[name], seed=i) for i, name in enumerate(PRESET_NAMES)}
    full_embeds = inputs["mid"][1]
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
    sides += [Side(name, forward(name, inputs[name][1]), vtu_setup(name)) for name in PRESET_NAMES]
    log(f"prefill: {cfg.num_hidden_layers} decoder layers, {positions} positions, {plan.warmup} warm-up + "
        f"{runs} rounds of full, {', '.join(PRESET_NAMES)}")
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


def onevision_group_maps(plan: Plan, log) -> tuple[dict[str, torch.Tensor], dict]:
    """Group maps (one per preset) of one AnyRes image in the stock OneVision packed layout, made by
    dymu's own OneVision wiring: a small SigLIP tower with the real crop grid and depth (27x27 tokens,
    26 layers) merges with fixed r per layer, and `get_image_features` unmerges, packs (unpad,
    newlines, anyres_max_9) and follows the groups. Only the map is used; the features are not."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ...api import apply, remove
    from ...images import open_image, sample_images

    t = plan.onevision_tower
    _seeded(2)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                         vision_use_head=False, **t),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=64))
    size = t["image_size"]
    config.image_grid_pinpoints = [[size * h, size * w] for h in range(1, 7) for w in range(1, 7)]  # OV's 6x6 grid
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                image_grid_pinpoints=config.image_grid_pinpoints)
    photo = next(p for p in sample_images() if p.name == "darknet_dog_bicycle_truck.jpg")
    inputs = processor(images=[open_image(photo).resize(plan.onevision_image)], return_tensors="pt")
    grid = (size // t["patch_size"]) ** 2
    r = preset_r(grid, t["num_hidden_layers"])
    maps, info = {}, {"crops": int(inputs["pixel_values"].shape[1]), "tokens_per_crop": grid, "r": r,
                      "image_size": list(plan.onevision_image)}
    for name in PRESET_NAMES:
        apply(model, r=r[name], mode="tome")
        with torch.no_grad():
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        maps[name] = features.dymu_group_of_patch.cpu()
        info[f"kept_per_crop_{name}"] = model.model._dymu.last_encoded.num_tokens.tolist()
        remove(model)
    info["positions"] = int(len(maps["mid"]))
    log(f"onevision: {info['crops']} crops of {grid} tokens -> {info['positions']} packed positions; "
        + ", ".join(f"{n}: {int(m.max()) + 1} groups" for n, m in maps.items()))
    return maps, info


def build_qwen2(plan: Plan, device, dtype):
    from transformers import Qwen2Config, Qwen2Model

    _seeded(3)
    config = Qwen2Config(**plan.onevision_qwen2)
    config._attn_implementation = "sdpa"
    return Qwen2Model(config).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def bench_exact(plan: Plan, model, visual_maps: dict, sync, log) -> list[dict]:
    """Eager attention: full vs VTU fast vs VTU exact (Eq. 10) at one N_un, on `exact_layers` layers."""
    from ...decoders.llama import apply_vtu, remove_vtu, set_groups

    cfg = model.config
    name = plan.exact_preset
    group_map, embeds = _prefill_inputs((plan.text_before, plan.text_after), model, visual_maps[name], seed=7)
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


def bench_calibration(plan: Plan, tower, sync, log) -> dict:
    """`dymu.calibrate` (the mid preset's r per layer) vs a plain stock encoder forward on the same batches.

    Both sides start from the image files (decode + processor + encoder), so the comparison is what
    a user sees; calibration also merges (cheaper layers) and ranks all edges of the batch per layer
    (extra work). With `plan.cal_layers`, both run only that many layers (CPU time budget): the
    calibration overhead is per layer, so the ratio is that of the whole tower.
    """
    from ..calibration import calibrate
    from ...images import open_image, sample_images
    from ...towers.clip import CLIP
    from ...towers.encoder import encode_with_tower, layers_to_run, remove_dtome

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

    def calib():
        result["thresholds"] = calibrate(tower, images, r=r_mid, batch_size=plan.cal_batch,
                                         feature_layer=feature_layer, processor=processor, progress=False)

    log(f"calibration: {len(images)} images in batches of {plan.cal_batch}, {layers} layers, r = {r_mid}, "
        f"{plan.warmup} warm-up + {plan.runs} rounds of plain, calibrate")
    times = interleaved([Side("plain", plain), Side("calibrate", calib)], plan.runs, plan.warmup, sync)
    plain_t, cal_t = median(times["plain"]), median(times["calibrate"])
    th = result["thresholds"]
    return dict(images=len(images), batch_size=plan.cal_batch, layers=layers, r_per_layer=r_mid,
                tokens_kept_mean_at_last_layer=th.tokens_kept_mean[-1] if th.tokens_kept_mean else None,
                plain_times_s=times["plain"], calibrate_times_s=times["calibrate"],
                plain_images_per_s=len(images) / plain_t, calibrate_images_per_s=len(images) / cal_t,
                ratio=plain_t / cal_t, ratio_paired=paired_ratio(times["plain"], times["calibrate"]))


@torch.no_grad()
def bench_merge_off(plan: Plan, tower, sync, log) -> dict:
    """Stock tower vs the DToMe-patched tower with every threshold at +inf (no merge), batch 1, full depth.
    A few-% effect: `plan.merge_off_runs` rounds of A B, and the paired ratio reported next to the ratio
    of medians."""
    from ...towers.clip import CLIP
    from ...towers.encoder import apply_dtome, encode_with_tower, remove_dtome

    pixels = pixel_batch(tower, 1)
    run = lambda: encode_with_tower(tower, CLIP, pixels, plan.feature_layer, True)  # noqa: E731
    sides = [Side("stock", run, lambda: remove_dtome(tower)),
             Side("patched_inf", run, lambda: apply_dtome(tower, CLIP, thresholds=math.inf))]
    log(f"merge-off: batch 1, {plan.warmup} warm-up + {plan.merge_off_runs} rounds of stock, patched (+inf)")
    times = interleaved(sides, plan.merge_off_runs, plan.warmup, sync)
    remove_dtome(tower)
    return merge_off_result(times["stock"], times["patched_inf"], 1)


# ---------------------------------------------------------------------------------------------
# Entry points.


def run_bench(
    quick: bool = False,
    device: str | None = "cpu",
    dtype: str | None = None,
    thresholds: dict[str, str] | None = None,
    sections: tuple[str, ...] = SECTIONS,
    runs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the benchmark and return the result dict (what `--json` writes)."""
    from ...loading import resolve_device_dtype
    from ...thresholds import Thresholds

    log = log or (lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    dev, dt = resolve_device_dtype(device, dtype)
    plan = quick_plan(dev) if quick else full_plan(dev)
    if runs is not None:
        if runs < 1:
            raise ValueError(f"--runs must be at least 1, not {runs}")
        plan.runs, plan.merge_off_runs, plan.exact_runs = runs, 2 * runs, min(plan.exact_runs, runs)
        plan.onevision_runs = runs
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    sync = device_sync(dev)
    result: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(dev),
        "loadavg_before": _loadavg(),
        "settings": {"plan": plan.name, "device": str(dev), "dtype": str(dt).removeprefix("torch."),
                     "runs": plan.runs, "warmup": plan.warmup, "clip": plan.clip, "feature_layer": plan.feature_layer,
                     "batches": list(plan.batches), "large_batch_layers": plan.large_batch_layers,
                     "llama": plan.llama, "text_before": plan.text_before, "text_after": plan.text_after,
                     "exact_preset": plan.exact_preset, "exact_layers": plan.exact_layers,
                     "calibration_images": plan.cal_images, "calibration_batch": plan.cal_batch,
                     "onevision_qwen2": plan.onevision_qwen2, "onevision_text": list(plan.onevision_text),
                     "onevision_runs": plan.onevision_runs,
                     "packed_batches": list(plan.packed_batches), "packed_calibration_batch": plan.packed_cal_batch,
                     "sections": list(sections), "weights": "random (speed does not depend on the weights)"},
        "encoder": None, "prefill": None, "exact": None, "attention_flops": None,
        "calibration": None, "merge_off": None, "onevision": None, "packed": None, "decode": None, "targets": None,
        "notes": [],
    }
    notes = result["notes"]
    notes.append("All models have random weights: speed does not depend on the weights.")
    section_time = {}

    tower = None
    need_tower = {"encoder", "packed", "prefill", "exact", "calibration", "merge_off"} & set(sections)
    if need_tower:
        t0 = time.perf_counter()
        tower = build_clip(plan, dev, dt)
        section_time["build_encoder"] = time.perf_counter() - t0
        log(f"built CLIP tower ({sum(p.numel() for p in tower.parameters()) / 1e6:.0f}M parameters) in "
            f"{section_time['build_encoder']:.1f} s")

    chosen_thresholds = {}
    for name, path in (thresholds or {}).items():
        if name not in PRESET_NAMES:
            raise ValueError(f"--thresholds takes PRESET=FILE with PRESET one of {', '.join(PRESET_NAMES)}, not {name!r}")
        th = Thresholds.load(path)
        if tower is not None:
            th.check_compatible(tower)
        chosen_thresholds[name] = th
        notes.append(f"Encoder preset {name}: calibrated thresholds from {path} (on these random weights the "
                     "token counts are not those of the real encoder).")
    fixed = [n for n in PRESET_NAMES if n not in chosen_thresholds]
    if fixed and tower is not None:
        from ...towers.encoder import layers_to_run

        cfg = tower.config
        run_all = layers_to_run(len(tower.encoder.layers), plan.feature_layer)
        r = preset_r((cfg.image_size // cfg.patch_size) ** 2, run_all)
        notes.append("Encoder presets " + ", ".join(f"{n}: fixed r = {r[n]} merges per layer" for n in fixed)
                     + f" in all {run_all} layers run (plain ToMe-style top-r: no calibrated thresholds given).")

    group_maps: dict = {}
    if "encoder" in sections:
        t0 = time.perf_counter()
        result["encoder"], group_maps = bench_encoder(plan, tower, dev, chosen_thresholds, sync, log)
        section_time["encoder"] = time.perf_counter() - t0
        large = [b for b in plan.batches if b > 1]
        if plan.large_batch_layers and large:
            run_all = len(result["encoder"][0]["kept_per_layer"])
            notes.append(f"Encoder batch {large[0]}: only the first {plan.large_batch_layers} of the {run_all} layers "
                         f"are run (CPU time budget), with r scaled by {run_all}/{plan.large_batch_layers} so that the "
                         "preset's total merges happen in those layers (see the rule column; at most half the tokens can "
                         "merge per layer, so low ends with a few more tokens); its FLOP-ideal is for those layers.")
    if "packed" in sections:
        t0 = time.perf_counter()
        result["packed"] = bench_packed(plan, tower, sync, log)
        section_time["packed"] = time.perf_counter() - t0
    if {"prefill", "exact"} & set(sections):
        t0 = time.perf_counter()
        visual_maps = _group_maps_for_prefill(plan, tower, group_maps, log)
        llama = build_llama(plan, dev, dt)
        section_time["build_decoder"] = time.perf_counter() - t0
        log(f"built {plan.llama['num_hidden_layers']}-layer Llama body "
            f"({sum(p.numel() for p in llama.parameters()) / 1e6:.0f}M parameters) in {section_time['build_decoder']:.1f} s")
        patches = int(next(iter(visual_maps.values())).numel())
        notes.append(f"Prefill group maps: the {patches} visual positions grouped by a real DToMe merge "
                     "(fixed r, batch-1 encoder run above, on a shipped photo), so groups are the spatially "
                     "irregular ones DToMe makes; inputs_embeds rows are equal within groups. The decoder body "
                     "(LlamaModel, no lm_head, no KV cache) is timed on inputs_embeds.")
        if "prefill" in sections:
            t0 = time.perf_counter()
            result["prefill"] = bench_prefill(plan, llama, visual_maps, sync, log)
            section_time["prefill"] = time.perf_counter() - t0
        if "exact" in sections:
            t0 = time.perf_counter()
            result["exact"] = bench_exact(plan, llama, visual_maps, sync, log)
            section_time["exact"] = time.perf_counter() - t0
            notes.append(f"Exact Eq. 10 path timed at the smallest N_un ({plan.exact_preset}) only and on "
                         f"{plan.exact_layers} decoder layer(s): it materialises (H, d/2, U, U) product tensors and "
                         "per-frequency (B, H, N, N) temporaries, so it is slow and memory hungry; the smallest "
                         "N_un is its best case and already shows that it is slower than the gather path.")
        del llama
    if "flops" in sections:
        result["attention_flops"] = table1()
    if "calibration" in sections:
        t0 = time.perf_counter()
        result["calibration"] = bench_calibration(plan, tower, sync, log)
        section_time["calibration"] = time.perf_counter() - t0
    if "merge_off" in sections:
        t0 = time.perf_counter()
        result["merge_off"] = bench_merge_off(plan, tower, sync, log)
        section_time["merge_off"] = time.perf_counter() - t0
    if "onevision" in sections:
        t0 = time.perf_counter()
        maps, info = onevision_group_maps(plan, log)
        qwen2 = build_qwen2(plan, dev, dt)
        log(f"built {plan.onevision_qwen2['num_hidden_layers']}-layer Qwen2 body "
            f"({sum(p.numel() for p in qwen2.parameters()) / 1e6:.0f}M parameters)")
        rows = bench_prefill(plan, qwen2, maps, sync, log, text=plan.onevision_text, runs=plan.onevision_runs)
        result["onevision"] = {"image": info, "rows": rows}
        del qwen2
        section_time["onevision"] = time.perf_counter() - t0
        notes.append(f"OneVision prefill: group maps of one {info['image_size'][0]}x{info['image_size'][1]} photo in "
                     f"the stock OneVision layout ({info['crops']} crops of {info['tokens_per_crop']} tokens, "
                     "unpadded canvas, newlines, anyres_max_9), made by dymu's OneVision wiring on a small "
                     "random-weight SigLIP with the real grid and depth (fixed r per layer "
                     f"{', '.join(f'{k} {v}' for k, v in info['r'].items())}); newline tokens and bilinear mixes "
                     "are groups of their own.")
    if "decode" in sections:
        from .decode import bench_decode

        t0 = time.perf_counter()
        result["decode"] = bench_decode(quick, dev, dt, sync, log, runs)
        section_time["decode"] = time.perf_counter() - t0
        notes.append("Decode: group maps assign each image's positions at random to the preset's number of groups "
                     "(decode cost depends on the counts only); the batch-8 cache is the batch-1 prefill's, repeated "
                     "with the Cache API. Peak memory on CPU is resident memory (VmHWM), so it is noisy at the MB scale.")
    result["targets"] = None if quick else evaluate_targets(result)  # toy sizes: no target can be judged
    result["section_s"] = section_time
    result["loadavg_after"] = _loadavg()
    result["elapsed_s"] = time.perf_counter() - start
    return result


def cmd_bench(args) -> int:
    from .qwen import QWEN_SECTIONS, bench_qwen, qwen_markdown

    from ...files import atomic_write_text, check_output_file

    if args.json:  # before the minutes of measuring: a bad path must not lose them, nor make folders
        check_output_file(args.json, "--json", inputs=[path for _, path in args.thresholds or []])
    sections = tuple(args.only.split(",")) if args.only else SECTIONS
    qwen = [s for s in sections if s in QWEN_SECTIONS]  # opt-in: the Qwen2.5-VL rows
    sections = tuple(s for s in sections if s not in QWEN_SECTIONS)
    result = {}
    if sections:
        result = run_bench(quick=args.quick, device=args.device, dtype=args.dtype,
                           thresholds=dict(args.thresholds or []), sections=sections, runs=args.runs)
        print(markdown(result))
    if qwen:
        log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
        result["qwen"] = bench_qwen(quick=args.quick, device=args.device or "cpu", runs=args.runs, log=log)
        print(qwen_markdown(result["qwen"]))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0
