"""`dymu bench --only decode`: KV-cache bytes, peak memory and decode speed of stock vs VTU with the
full-length cache vs VTU with the compact cache (`dymu.kv_cache`), real dimensions, random weights.

A Qwen2-7B-shaped decoder (2 layers: hidden 3584, 28 heads, 4 KV heads, MLP 18944) prefills a prompt
of several LLaVA-1.5 images (576 positions each) between two text spans, then decodes. Each image's
positions fall into the preset's number of groups (low / mid / high keep 93 / 208 / 392 of 576, the
paper's averages), assigned at random (the decode cost depends on the counts, not on which positions
share a group). Per variant:

- ``kv_bytes``: the cache per sequence after the prefill (every tensor, the compact cache's index
  tensors included), and the sequences whose cache fits in 8 GB for all 28 layers of Qwen2-7B;
- ``prefill_peak_bytes``: peak memory of the batch-1 prefill above what was held before it;
- ``peak_bytes`` and ``ms_per_token``: the decode of ``tokens`` new tokens at batch 1 and 8 (the
  batch-8 cache is the batch-1 one repeated with the Cache API, as `num_return_sequences` does);
  variants interleaved round-robin, medians.

Peak memory: the process's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs)
above its resident memory when the measured step starts; on CUDA the allocator's peak. ``formulations``
re-measures the two exact ways to score grouped positions (see `dymu.kv_cache`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch

from .timing import Side, interleaved, median

CACHE_BUDGET = 8e9  # bytes
FULL_DEPTH = 28  # Qwen2-7B's decoder layers: the 8 GB count is for the whole model


def decode_plan(quick: bool) -> dict:
    if quick:
        return dict(qwen2=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=2, vocab_size=64, max_position_embeddings=4096),
                    images=2, positions_per_image=64, text=(6, 6), batches=(1, 2), tokens=2, runs=1, warmup=1)
    return dict(qwen2=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                           num_hidden_layers=2, vocab_size=256, max_position_embeddings=32768),
                images=6, positions_per_image=576, text=(35, 29), batches=(1, 8), tokens=8, runs=3, warmup=1)


class PeakMemory:
    """Peak memory of a step above the memory held when it starts (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_bytes = 0

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        except OSError:
            self.start_bytes = None
            return
        self.start_bytes = self._status("VmRSS")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.start_bytes
        high = self._status("VmHWM")
        return None if high is None or self.start_bytes is None else high - self.start_bytes


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache (stock layers: keys and values; compact layers: everything)."""
    from ...kv_cache import CompactLayer

    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompactLayer):
            total += layer.nbytes()
        elif layer.is_initialized:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def prompt(plan: dict, kept: int | None, hidden: int, seed: int, device, dtype):
    """(group map (1, N), inputs_embeds (1, N, D) equal within groups) for text + images + text."""
    from ... import vtu

    gen = torch.Generator().manual_seed(seed)
    before, after = plan["text"]
    per_image = plan["positions_per_image"]
    parts = [torch.full((before,), -1)]
    for image in range(plan["images"]):
        if kept is None:
            parts.append(torch.full((per_image,), -1))
        else:  # every one of the kept groups takes at least one position
            parts.append(torch.randperm(per_image, generator=gen) % kept + image * per_image)
    parts.append(torch.full((after,), -1))
    group_map = vtu.group_map_from_labels(torch.cat(parts)[None])
    rows = torch.randn(int(group_map.max()) + 1, hidden, generator=gen) * 0.02
    return group_map.to(device), rows[group_map[0]][None].to(device=device, dtype=dtype)


def build_model(plan: dict, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    config = Qwen2Config(**plan["qwen2"])
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def bench_decode(quick: bool, device: torch.device, dtype: torch.dtype, sync, log, runs: int | None = None) -> dict:
    from transformers import DynamicCache

    from ... import compat
    from ...decoders.llama import apply_vtu, remove_vtu, vtu_groups
    from ..calibration import PRESETS

    plan = decode_plan(quick)
    runs = runs or plan["runs"]
    model = build_model(plan, device, dtype)
    cfg = model.config
    keyword = compat.cache_parameter(type(model))
    per_image = plan["positions_per_image"]
    kept = {name: max(1, round(per_image * PRESETS[name])) for name in ("low", "mid", "high")}
    variants = [("stock", None, None)] + [(f"VTU {name} {cache}", name, cache) for cache in ("full", "compact")
                                          for name in kept]
    memory = PeakMemory(device)
    log(f"decode: {cfg.num_hidden_layers} Qwen2-7B-shaped layers, {plan['images']} images x {per_image} positions "
        f"+ {sum(plan['text'])} text; prefill {len(variants)} variants at batch 1")

    def setup(cache_mode):
        if cache_mode is None:
            remove_vtu(model)
        else:
            apply_vtu(model, kv_cache=cache_mode)

    prefilled, rows = {}, []
    for index, (name, preset, cache_mode) in enumerate(variants):
        group_map, embeds = prompt(plan, None if preset is None else kept[preset], cfg.hidden_size, index,
                                   device, dtype)
        setup(cache_mode)
        cache = DynamicCache(config=cfg)
        memory.start()
        start = time.perf_counter()
        with vtu_groups(model, group_map) if cache_mode else contextlib.nullcontext():
            model(inputs_embeds=embeds, **{keyword: cache}, use_cache=True)
        sync()
        prefill_s, prefill_peak = time.perf_counter() - start, memory.peak()
        prefilled[name] = cache
        positions = embeds.shape[1]
        unique = int(group_map.max()) + 1
        text = sum(plan["text"])
        rows.append(dict(variant=name, preset=preset, kv_cache=cache_mode or "stock", positions=positions,
                         rows=unique, text=text, kv_bytes=cache_bytes(cache),
                         prefill_s=prefill_s, prefill_peak_bytes=prefill_peak))
        log(f"decode: prefill {name}: {positions} positions, {unique} rows, {prefill_s:.1f} s, "
            f"cache {rows[-1]['kv_bytes'] / 1e6:.1f} MB")
    stock_bytes = rows[0]["kv_bytes"]
    for row in rows:
        per_layer = row["kv_bytes"] / cfg.num_hidden_layers
        row["kv_ratio"] = row["kv_bytes"] / stock_bytes
        row["kv_ideal_ratio"] = (row["rows"]) / row["positions"]  # (text + U) / (text + N)
        row["sequences_in_8gb"] = math.floor(CACHE_BUDGET / (per_layer * FULL_DEPTH))

    timed = []
    for batch in plan["batches"]:
        live: dict = {}
        peaks: dict = {name: [] for name, _, _ in variants}

        def side(name, cache_mode, batch=batch, live=live, peaks=peaks):
            def prepare():
                setup(cache_mode)
                live.clear()
                cache = copy.deepcopy(prefilled[name])
                if batch > 1:
                    cache.batch_repeat_interleave(batch)
                live["cache"] = cache
                live["token"] = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
                memory.start()

            def decode():
                cache, token = live["cache"], live["token"]
                for _ in range(plan["tokens"]):
                    logits = model(input_ids=token, **{keyword: cache}, use_cache=True).logits
                    token = logits[:, -1:].argmax(-1)
                peaks[name].append(memory.peak())
            return Side(name, decode, prepare)

        log(f"decode: batch {batch}, {plan['tokens']} tokens per run, {plan['warmup']} warm-up + {runs} rounds of "
            f"{len(variants)} variants")
        times = interleaved([side(name, mode) for name, _, mode in variants], runs, plan["warmup"], sync)
        for row in rows:
            name = row["variant"]
            peak = [p for p in peaks[name][plan["warmup"]:] if p is not None]
            timed.append(dict(row, batch=batch, times_s=times[name],
                              ms_per_token=median(times[name]) / plan["tokens"] * 1e3,
                              peak_bytes=max(peak) if peak else None))
        live.clear()
    remove_vtu(model)
    formulations = bench_formulations(model, prefilled, plan, device, sync, runs)
    return {"rows": timed, "formulations": formulations,
            "settings": {"qwen2": plan["qwen2"], "images": plan["images"], "positions_per_image": per_image,
                         "text": list(plan["text"]), "kept_per_image": kept, "batches": list(plan["batches"]),
                         "tokens": plan["tokens"], "runs": runs, "warmup": plan["warmup"],
                         "threads": torch.get_num_threads(), "cache_budget_bytes": CACHE_BUDGET,
                         "full_depth": FULL_DEPTH}}


def decomposition_scores(query: torch.Tensor, layer, table: torch.Tensor) -> torch.Tensor:
    """The other exact formulation, for the measurement only: per frequency f, q·R(p)k = cos_f(p)·(q1k1 +
    q2k2)_f + sin_f(p)·(q2k1 − q1k2)_f with the products formed per group and expanded to the grouped
    positions with the shared position tables. query (B, Hq, 1, d); returns scores (B, Hq, P)."""
    b, hq, _, d = query.shape
    hkv, half = layer.group_values.shape[1], d // 2
    keys = layer.group_keys.view(b, hkv, -1, half, 2).repeat_interleave(hq // hkv, dim=1)
    k1, k2 = keys[..., 0], keys[..., 1]  # (B, Hq, G, d/2)
    q1, q2 = query[..., :half], query[..., half:]
    products = torch.cat([q1 * k1 + q2 * k2, q2 * k1 - q1 * k2], dim=-1)  # (B, Hq, G, d)
    gathered = products.gather(2, layer.group_of[:, None, :, None].expand(b, hq, -1, d))
    angles = torch.cat([table.real, table.imag], dim=-1)  # (B or 1, 1, P, d)
    return (gathered * angles).sum(-1)


def bench_formulations(model, prefilled: dict, plan: dict, device, sync, runs: int) -> list[dict]:
    """One layer, one decode step, the low preset: compact attention (rotated gathered keys, blocked)
    vs the score decomposition vs stock attention over the full cache, per batch size."""
    from ...decoders.llama import VTUState, _rotary_module

    cfg = model.config
    state = VTUState()
    state.rotary = _rotary_module(model, list(model.model.layers))
    out = []
    for batch in plan["batches"]:
        compact = copy.deepcopy(prefilled["VTU low compact"].layers[0])
        full = copy.deepcopy(prefilled["VTU low full"].layers[0])
        if batch > 1:
            compact.batch_repeat_interleave(batch)
            full.batch_repeat_interleave(batch)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        query = torch.randn(batch, cfg.num_attention_heads, 1, head_dim, device=device)
        table = state.rotation_table(compact.group_positions, query)
        columns = torch.tensor([compact.seen], device=device)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads

        def stock():
            q = query.view(batch, cfg.num_key_value_heads, rep, head_dim)
            probs = torch.softmax(q @ full.keys.transpose(-1, -2) * head_dim ** -0.5, dim=-1)
            return probs @ full.values

        def rotate():
            return compact.attend(query, columns, None, 0, head_dim ** -0.5, table, workspace=state.workspace)

        sides = [Side("stock attention, full cache", stock),
                 Side("compact: rotate gathered keys", rotate),
                 Side("compact scores: cos/sin decomposition", lambda: decomposition_scores(query, compact, table))]
        times = interleaved(sides, max(runs, 5), 1, sync)
        out += [dict(batch=batch, formulation=s.name, ms=median(times[s.name]) * 1e3) for s in sides]
    return out


def decode_markdown(result: dict) -> str:
    s = result["settings"]
    q = s["qwen2"]
    lines = [f"### Decode: {q['num_hidden_layers']} Qwen2-7B-shaped layers (hidden {q['hidden_size']}, "
             f"{q['num_attention_heads']} heads, {q['num_key_value_heads']} KV heads), {s['images']} images x "
             f"{s['positions_per_image']} positions + {sum(s['text'])} text, {s['tokens']} tokens per run", "",
             f"kv_bytes: cache per sequence after the prefill ({q['num_hidden_layers']} layers); ratio: vs stock "
             f"(ideal: (text + U) / (text + N)); in 8 GB: sequences whose cache fits for all {s['full_depth']} layers; "
             "peak: above the memory held at the start of the step.", "",
             "| batch | variant | rows / positions | kv_bytes (MB) | ratio (ideal) | in 8 GB | prefill peak (MB) | "
             "decode peak (MB) | ms / token |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def mb(value):
        return "-" if value is None else f"{value / 1e6:,.0f}"
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['variant']} | {r['rows']} / {r['positions']} | {r['kv_bytes'] / 1e6:.1f} | "
                     f"{r['kv_ratio']:.3f} ({r['kv_ideal_ratio']:.3f}) | {r['sequences_in_8gb']} | "
                     f"{mb(r['prefill_peak_bytes'])} | {mb(r['peak_bytes'])} | {r['ms_per_token']:.1f} |")
    lines += ["", "Scoring the grouped positions, one layer, one decode step (low preset):", "",
              "| batch | formulation | ms |", "|---:|---|---:|"]
    lines += [f"| {r['batch']} | {r['formulation']} | {r['ms']:.2f} |" for r in result["formulations"]]
    return "\n".join(lines)
