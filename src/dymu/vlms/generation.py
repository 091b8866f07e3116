"""`dymu.generate`: prompts + images -> answers and a per-call report, in any DyMU mode.

The encoder runs first (timed on its own), then `model.generate` with the encoded images passed
as `mm_encoder_outputs`, so prefill and decode are timed apart. Modes that change the number of
visual tokens the LLM sees (`dtome`, `tome` without VTU, `downsample`) need the prompt to hold one
placeholder per token; this module rewrites the stock prompt accordingly. `dymu` and `tome` keep
the stock prompt (virtual unmerge + VTU).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .llava import llava_mode


@dataclass
class Report:
    mode: str
    visual_tokens: list[list[int]]  # per prompt, per image: tokens kept
    full_tokens: int  # per image in the stock model
    encoder_s: float
    prefill_s: float
    decode_s: float
    new_tokens: int = 0
    image_size: int | None = None  # downsample: the side the images were resized to
    # With a token budget or focus regions: the tokens the same images keep without either (an
    # extra encoder pass, not timed), to show what the cost control saved. None otherwise.
    visual_tokens_without_budget_or_focus: list[list[int]] | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    answers: list[str]
    sequences: torch.Tensor
    report: Report
    scores: list = field(default_factory=list)  # per generated step: (B, vocab) logits, when asked


def load_vlm(model_ref: str, device: str | None = None, dtype: str | None = None):
    """(LlavaForConditionalGeneration, processor) from a hub id or a local folder."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..loading import LoadError, _config, resolve_device_dtype

    config = _config(model_ref)
    if config.model_type != "llava":
        raise LoadError(f"{model_ref} is a {config.model_type!r} model; dymu generate supports LLaVA "
                        "(LlavaForConditionalGeneration) models.")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    model = LlavaForConditionalGeneration.from_pretrained(model_ref, dtype=torch_dtype).to(torch_device).eval()
    processor = AutoProcessor.from_pretrained(model_ref)
    processor.tokenizer.padding_side = "left"
    return model, processor


def chat_text(processor, prompt: str, num_images: int) -> str:
    """The processor's chat template for one user turn, else LLaVA-1.5's plain format."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return "USER: " + "<image>\n" * num_images + prompt + " ASSISTANT:"


def set_placeholder_counts(input_ids, attention_mask, image_token_id, pad_token_id, stock: int, counts: list[int]):
    """Rewrite a left-padded batch so that image k has ``counts[k]`` placeholders instead of ``stock``.

    Images are numbered in reading order over the batch (the order the model fills them in).
    """
    rows, k = [], 0
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        new, i = [], 0
        while i < len(ids):
            if ids[i] != image_token_id:
                new.append(ids[i])
                i += 1
                continue
            new += [image_token_id] * counts[k]
            i += stock
            k += 1
        rows.append(new)
    width = max(len(r) for r in rows)
    new_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=input_ids.device)
    new_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=input_ids.device)
    return new_ids, new_mask


def downsample_side(tokens: float) -> int:
    """Patch-grid side for the downsample baseline: the square grid closest to ``tokens`` tokens."""
    return max(1, round(math.sqrt(tokens)))


class _ForwardTimer:
    """Times every forward of the model: the first of a generate call is the prefill."""

    def __init__(self, model):
        self.times: list[float] = []
        self._t0 = 0.0
        self._sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *args):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *args):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self.handles:
            h.remove()


def _call_budget(tower, max_tokens, min_tokens):
    """The budget for one call: each bound given here replaces the one `dymu.apply` set."""
    from ..towers.encoder import make_budget

    state = getattr(tower, "_dymu_state", None)
    if max_tokens is None and min_tokens is None:
        return None if state is None else state.budget
    if state is None:
        raise ValueError("max_tokens/min_tokens need a merging mode (dymu, dtome or tome), not the stock model")
    current = state.budget
    return make_budget(max_tokens if max_tokens is not None else getattr(current, "max_tokens", None),
                       min_tokens if min_tokens is not None else getattr(current, "min_tokens", None))


def _flat_focus(focus, images) -> list | None:
    """``focus`` nested like ``images`` (one entry per image of each prompt) -> one entry per image."""
    if focus is None:
        return None
    if len(focus) != len(images) or any(f is not None and len(f) != len(ims) for f, ims in zip(focus, images)):
        raise ValueError("focus must be nested like images: one list per prompt, one entry (or None) per image")
    return [f for per_prompt, ims in zip(focus, images) for f in (per_prompt if per_prompt is not None else [None] * len(ims))]


@torch.no_grad()
def generate(model, processor, prompts: list[str], images: list[list[Image.Image]], *, max_new_tokens: int = 32,
             output_scores: bool = False, max_tokens: int | None = None, min_tokens: int | None = None,
             focus: list[list] | None = None, fill=None, **generate_kwargs) -> GenerationResult:
    """Answer ``prompts[i]`` about ``images[i]`` (a list per prompt, possibly empty), greedily by default.

    The model is a `LlavaForConditionalGeneration`, stock or patched by `dymu.apply` in any mode.
    ``max_tokens`` / ``min_tokens``: a token budget per image for this call (replacing the one
    `dymu.apply` set). ``focus``: nested like ``images``, one entry per image (None: whole image): a
    box (x0, y0, x1, y1) in the image's pixels, a list of boxes, a mask image or a boolean array;
    outside it the pixels become ``fill`` (default white; "mean" or a colour) before the processor
    (`dymu.focus`). With either, the report also gives the tokens kept without them.
    """
    from ..focus import DEFAULT_FILL, apply_focus_all
    from ..towers.encoder import budget_set, encode_with_tower, family_of

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    mode = llava_mode(model)
    inner = model.model
    config = model.config
    device = next(model.parameters()).device
    tower = inner.vision_tower
    budget = _call_budget(tower, max_tokens, min_tokens)
    original = [im for per_prompt in images for im in per_prompt]
    flat = apply_focus_all(original, _flat_focus(focus, images), DEFAULT_FILL if fill is None else fill)
    merging = hasattr(tower, "_dymu_state")
    constrained = bool(original) and merging and (budget is not None or focus is not None)
    texts = [chat_text(processor, p, len(ims)) for p, ims in zip(prompts, images)]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    stock = config.image_seq_length if flat else 0

    mm_encoder_outputs, counts, side = None, [], None
    start = time.perf_counter()
    if flat:
        pixel_values = inputs["pixel_values"]
        kwargs = {}
        if mode == "downsample":
            side = downsample_side(model._dymu_downsample_tokens) * inner.vision_tower.config.patch_size
            small = copy.deepcopy(processor.image_processor)
            small.size, small.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
            pixel_values = small(images=flat, return_tensors="pt")["pixel_values"]
            kwargs["interpolate_pos_encoding"] = True
        with budget_set(tower, budget) if merging else contextlib.nullcontext():
            features = inner.get_image_features(pixel_values.to(device, model.dtype), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        mm_encoder_outputs = {"image": features}
        placeholders = [len(f) for f in features.pooler_output]  # per image, as the LLM will see it
        encoded = getattr(getattr(inner, "_dymu", None), "last_encoded", None)
        counts = encoded.num_tokens.tolist() if encoded is not None else placeholders
        if any(n != stock for n in placeholders):
            input_ids, attention_mask = set_placeholder_counts(
                input_ids, attention_mask, config.image_token_id, processor.tokenizer.pad_token_id, stock,
                placeholders)
    encoder_s = time.perf_counter() - start
    without = None
    if constrained:  # the same images, whole and without a budget (not timed)
        plain = processor.image_processor(images=original, return_tensors="pt")["pixel_values"]
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        with budget_set(tower, None):
            plain_counts = encode_with_tower(tower, family_of(tower), plain.to(device, model.dtype), layer,
                                             strategy == "default").num_tokens.tolist()
        without, k = [], 0
        for ims in images:
            without.append(plain_counts[k : k + len(ims)])
            k += len(ims)

    timer = _ForwardTimer(model)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=mm_encoder_outputs,
                             max_new_tokens=max_new_tokens, do_sample=generate_kwargs.pop("do_sample", False),
                             return_dict_in_generate=True, output_scores=output_scores, **generate_kwargs)
    finally:
        timer.close()
    new = out.sequences[:, input_ids.shape[1]:]
    answers = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    per_prompt, k = [], 0
    for ims in images:
        per_prompt.append(counts[k : k + len(ims)])
        k += len(ims)
    report = Report(mode=mode, visual_tokens=per_prompt, full_tokens=config.image_seq_length,
                    encoder_s=encoder_s, prefill_s=timer.times[0] if timer.times else 0.0,
                    decode_s=sum(timer.times[1:]), new_tokens=new.shape[1], image_size=side,
                    visual_tokens_without_budget_or_focus=without)
    return GenerationResult(answers=[a.strip() for a in answers], sequences=out.sequences, report=report,
                            scores=list(out.scores) if output_scores else [])
