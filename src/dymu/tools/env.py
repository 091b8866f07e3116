"""`dymu env`: the versions, device and attention implementations dymu runs on, and (``--check``) a
self-test of every supported VLM family on the user's own device and dtype.

The self-test builds each family's tiny random demo model (no download) and checks three oracles:
- merge off: thresholds +inf, so every visual position is a group of its own, and `dymu.generate`
  must give the stock model's greedy tokens and logits at every step (8 new tokens: the prefill
  through VTU, then decode steps that read the compact KV cache the VTU prefill wrote);
- with real merges, a prompt alone and inside a batch of two gives the same answer and token count
  (batch invariance);
- with real merges, the compact KV cache gives the tokens and logits of the full-length one.
Paste its output into an issue report: it says which part of a user's stack (GPU, bf16, flash
attention, a transformers release) breaks dymu.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass

from .. import compat
from ..version import __version__

# package distribution name -> what the line calls it
PACKAGES = {"torch": "torch", "transformers": "transformers", "huggingface_hub": "huggingface_hub",
            "lmms-eval": "lmms-eval", "filelock": "filelock", "av": "PyAV (av)"}
NEW_TOKENS = 8


def version_lines() -> list[str]:
    lines = [f"dymu {__version__}", f"python {platform.python_version()}"]
    for dist, label in PACKAGES.items():
        version = compat.installed_version(dist)
        status = {True: "ok", False: "OUTSIDE the supported range", None: "no range declared"}[compat.in_range(dist)]
        if version is None:
            status = "not installed"
        lines.append(f"{label:<16} {version or '-':<14} supported {compat.supported(dist):<36} {status}")
    return lines


def device_lines(device: str, dtype: str | None) -> list[str]:
    import torch
    from transformers.utils import import_utils

    from ..loading import resolve_device_dtype

    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    if torch_device.type == "cuda":
        name = torch.cuda.get_device_name(torch_device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    attention = ["eager", "sdpa"]
    for impl, available in (("flash_attention_2", "is_flash_attn_2_available"),
                            ("flash_attention_3", "is_flash_attn_3_available")):
        check = getattr(import_utils, available, None)
        if check is not None and check():
            attention.append(impl)
    return [f"device           {torch_device} ({name})", f"dtype            {str(torch_dtype).removeprefix('torch.')}",
            f"attention        {', '.join(attention)}"]


@dataclass
class CheckResult:
    family: str
    ok: bool
    detail: str
    seconds: float


def _families():
    """demo name -> builder of (model, processor): every tiny random demo model (`dymu.tools.demo_models`)."""
    from .demo_models import DEMO_MODELS

    return {name: demo.build for name, demo in DEMO_MODELS.items()}


def _tolerance(dtype) -> float:
    import torch

    return 1e-4 if dtype == torch.float32 else 5e-2


def check_family(name: str, build, device, dtype, attn_implementation: str | None = None) -> CheckResult:
    """The three oracles on one family (see the module docstring); never raises for a failed check."""
    import torch
    from PIL import Image

    import dymu

    from ..images import sample_images

    start = time.perf_counter()
    try:
        stock, processor = build()
        if attn_implementation:
            stock.set_attn_implementation(attn_implementation)
        stock = stock.to(device=device, dtype=dtype)
        stock.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
        images = [Image.open(p).convert("RGB") for p in sample_images()[:2]]
        prompts = ["What is in this image?", "Describe it."]
        run = dict(max_new_tokens=NEW_TOKENS, output_scores=True)
        with torch.no_grad():
            reference = dymu.generate(stock, processor, prompts[:1], [images[:1]], **run)
            model = dymu.apply(copy.deepcopy(stock), math.inf)
            merge_off = dymu.generate(model, processor, prompts[:1], [images[:1]], **run)
            if not torch.equal(merge_off.sequences, reference.sequences):
                return CheckResult(name, False, "merge off: generated tokens differ from stock", time.perf_counter() - start)
            worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(merge_off.scores, reference.scores))
            if not worst <= _tolerance(dtype):
                return CheckResult(name, False, f"merge off: logits differ from stock by {worst:.2e}",
                                   time.perf_counter() - start)
            dymu.apply(model, -math.inf)  # real merges: every edge up to the per-step cap
            alone = dymu.generate(model, processor, prompts[:1], [images[:1]], max_new_tokens=NEW_TOKENS)
            batch = dymu.generate(model, processor, prompts, [images[:1], images[1:]], max_new_tokens=NEW_TOKENS)
            if alone.answers[0] != batch.answers[0] or alone.report.visual_tokens[0] != batch.report.visual_tokens[0]:
                return CheckResult(name, False, "batch invariance: a prompt alone and in a batch differ",
                                   time.perf_counter() - start)
            cache_note = "compact KV cache refused by the family (stock cache)"
            if dymu.families.vlm_family_of(stock).kv_caches.get("compact") is None:
                dymu.apply(model, -math.inf, kv_cache="compact")
                merged = dymu.generate(model, processor, prompts[:1], [images[:1]], **run)
                dymu.apply(model, -math.inf, kv_cache="full")
                full_cache = dymu.generate(model, processor, prompts[:1], [images[:1]], **run)
                cache_worst = max((a.float() - b.float()).abs().max().item()
                                  for a, b in zip(merged.scores, full_cache.scores))
                if not torch.equal(merged.sequences, full_cache.sequences) or not cache_worst <= _tolerance(dtype):
                    return CheckResult(name, False, f"compact KV cache: tokens or logits differ from the full cache "
                                                    f"(max |dlogit| {cache_worst:.2e})", time.perf_counter() - start)
                cache_note = f"compact KV cache = full (max |dlogit| {cache_worst:.1e})"
        tokens = alone.report.visual_tokens[0][0]
        return CheckResult(name, True, f"merge off = stock ({NEW_TOKENS} tokens, max |dlogit| {worst:.1e}); "
                                       f"batch invariant (-inf thresholds: {tokens} visual tokens kept); "
                                       f"{cache_note}", time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a self-test reports every failure as a FAIL line
        return CheckResult(name, False, f"{type(err).__name__}: {err}".splitlines()[0], time.perf_counter() - start)


def run_checks(device: str | None = None, dtype: str | None = None, attn_implementation: str | None = None,
               families: dict | None = None, out=print) -> list[CheckResult]:
    from ..loading import resolve_device_dtype

    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    results = []
    for name, build in (families or _families()).items():
        result = check_family(name, build, torch_device, torch_dtype, attn_implementation)
        out(f"{'PASS' if result.ok else 'FAIL'} {name:<16} {result.detail} [{result.seconds:.1f} s]")
        results.append(result)
    return results
