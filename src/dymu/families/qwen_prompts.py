"""Prompts + images / videos -> what `model.generate` takes for a Qwen VL in any dymu mode, plus the
token counts of every image / video (`qwen_prompt_inputs`; dymu.generate and dymu.prompt_inputs use it).

Images and videos are encoded first (timed), with focus regions filled before the processor and the
call's token budget. With VTU (``dymu``, ``tome``) the prompt keeps the stock placeholder count; without
(``dtome``, ``tome`` with ``tome_vtu=False``) it keeps one placeholder per kept token, at its
representative unit (families/qwen_positions.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .qwen_positions import keep_mask, shorten_prompt
from .qwen_processors import qwen_inputs
from ..towers.budget import call_budget, holding_budget
from ..towers.qwen_rules import make_qwen_budget


@dataclass
class QwenPrepared:
    inputs: dict  # input_ids, attention_mask, mm_token_type_ids, grids, mm_encoder_outputs: for model.generate
    kept: list[list[int]]  # per prompt, per image / video in the prompt's order: tokens the LLM runs (groups)
    stock: list[list[int]]  # placeholders in the stock prompt (units)
    encoder: list[list[int]]  # tokens the vision tower kept (units for merge_point "post" and the stock model)
    encoder_s: float
    per_patch: list[list[int]] | None = None  # per video: tokens kept per temporal patch
    without: list[list[int]] | None = None  # budget or focus given: the tokens kept without either


def budget_set(model, max_tokens=None, min_tokens=None):
    """The call's budget held on the patch state for the block (each bound given replaces `dymu.apply`'s)."""
    settings = getattr(model.model, "_dymu", None)
    return holding_budget(settings, call_budget(settings, max_tokens, min_tokens, make_qwen_budget))


def chat_texts(processor, prompts: list[str], media: list[list]) -> list[str]:
    texts = []
    for prompt, items in zip(prompts, media):
        content = [{"type": "video" if isinstance(m, (list, tuple)) else "image"} for m in items]
        texts.append(processor.apply_chat_template(
            [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
            add_generation_prompt=True, tokenize=False))
    return texts


def focused_media(processor, media: list[list], focus, fill) -> list[list]:
    """``media`` with the pixels outside each image's focus region filled (`dymu.focus`); ``focus`` nested
    like ``media`` (entries past a prompt's focus list: none)."""
    from ..focus import DEFAULT_FILL, apply_focus_all, check_focus_survives

    if focus is None:
        return media
    if len(focus) != len(media):
        raise ValueError("focus must be nested like images: one list per prompt, one entry (or None) per image")
    fill = DEFAULT_FILL if fill is None else fill
    out = []
    for per_prompt, items in zip(focus, media):
        per_prompt = list(per_prompt or [])
        if len(per_prompt) > len(items):
            raise ValueError(f"focus has {len(per_prompt)} entries for a prompt with {len(items)} images/videos")
        per_prompt += [None] * (len(items) - len(per_prompt))
        if any(f is not None and isinstance(m, (list, tuple)) for f, m in zip(per_prompt, items)):
            raise ValueError("focus regions are for images, not videos: give None for a video")
        images = [m for m in items if not isinstance(m, (list, tuple))]
        regions = [f for f, m in zip(per_prompt, items) if not isinstance(m, (list, tuple))]
        filled = apply_focus_all(images, regions, fill)
        check_focus_survives(processor.image_processor, images, filled, regions, fill)
        filled = iter(filled)
        out.append([m if isinstance(m, (list, tuple)) else next(filled) for m in items])
    return out


def _encode_all(model, inputs) -> tuple[dict, dict]:
    """Encoder outputs per modality (pixels popped from ``inputs``), and the stock units per item."""
    inner = model.model
    encoded, full = {}, {}
    for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if pixels in inputs:
            grid = inputs[f"{modality}_grid_thw"]
            encoded[modality] = getattr(inner, f"get_{modality}_features")(inputs.pop(pixels).to(model.dtype), grid)
            full[modality] = (grid.prod(-1) // inner.visual.spatial_merge_size**2).tolist()
    return encoded, full


def _kept_counts(model, inputs, encoded: dict, full: dict) -> dict:
    settings = getattr(model.model, "_dymu", None)
    return {m: ([k for k, _ in settings.last_encoded[m].per_item()]
                if settings is not None else full[m]) for m in encoded}


def _per_prompt(media: list[list], by_modality: dict) -> list[list[int]]:
    """Per prompt, per image / video in the prompt's order (images are numbered apart from videos)."""
    taken, out = {"image": 0, "video": 0}, []
    for items in media:
        row = []
        for m in items:
            modality = "video" if isinstance(m, (list, tuple)) else "image"
            row.append(by_modality[modality][taken[modality]])
            taken[modality] += 1
        out.append(row)
    return out


@torch.no_grad()
def qwen_prompt_inputs(model, processor, prompts: list[str], media: list[list], *, max_tokens=None, min_tokens=None,
                       focus=None, fill=None) -> QwenPrepared:
    """``media[i]``: prompt i's PIL images and videos (lists of PIL frames) in the prompt's order."""
    device = next(model.parameters()).device
    settings = getattr(model.model, "_dymu", None)
    processor.tokenizer.padding_side = "left"
    texts = chat_texts(processor, prompts, media)
    inputs = dict(qwen_inputs(processor, texts, focused_media(processor, media, focus, fill)).to(device))
    start = time.perf_counter()
    with budget_set(model, max_tokens, min_tokens):
        encoded, full = _encode_all(model, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        encoder_s = time.perf_counter() - start
        counts = _kept_counts(model, inputs, encoded, full)
        if settings is not None and settings.direct and encoded:
            inputs.update(_shortened(model, inputs, encoded, processor.tokenizer.pad_token_id))
        per_patch = _per_patch(settings, inputs, encoded)
        without = None
        if settings is not None and encoded and (settings.budget is not None or focus is not None):
            saved = dict(settings.last_encoded)  # this call's, for reports
            with _no_budget(settings):
                plain = dict(qwen_inputs(processor, texts, media).to(device))
                plain_encoded, plain_full = _encode_all(model, plain)
                without = _per_prompt(media, _kept_counts(model, plain, plain_encoded, plain_full))
            settings.last_encoded.clear()
            settings.last_encoded.update(saved)
    in_tower = counts if settings is not None and settings.merge_point == "vit" else full
    return QwenPrepared(inputs={**inputs, "mm_encoder_outputs": encoded or None}, kept=_per_prompt(media, counts),
                        stock=_per_prompt(media, full), encoder=_per_prompt(media, in_tower), encoder_s=encoder_s,
                        per_patch=per_patch, without=without)


@contextlib.contextmanager
def _no_budget(settings):
    previous, settings.budget = settings.budget, None
    try:
        yield
    finally:
        settings.budget = previous


def _shortened(model, inputs: dict, encoded: dict, pad_token_id: int) -> dict:
    """The prompt with one placeholder per kept token (no VTU)."""
    config = model.config
    tokens = {m: getattr(config, f"{m}_token_id") for m in encoded}
    kept = {m: [rows.dymu_kept_units for rows in out.pooler_output] for m, out in encoded.items()}
    grids = {m: inputs[f"{m}_grid_thw"] for m in encoded}
    keep = keep_mask(inputs["input_ids"], inputs["attention_mask"], tokens, kept, grids)
    names = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs]
    return shorten_prompt({k: inputs[k] for k in names}, keep, pad_token_id)


def _per_patch(settings, inputs: dict, encoded: dict) -> list[list[int]] | None:
    if "video" not in encoded:
        return None
    grid = inputs["video_grid_thw"]
    segments = (settings.last_encoded["video"].kept_per_segment.tolist() if settings is not None else
                [int(h * w) // 4 for t, h, w in grid.tolist() for _ in range(t)])
    out, s = [], 0
    for t in grid[:, 0].tolist():
        out.append(segments[s : s + t])
        s += t
    return out
