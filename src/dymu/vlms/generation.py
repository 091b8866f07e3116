"""`dymu.generate`: prompts + images -> answers and a per-call report, in any DyMU mode.

The encoder runs first (timed on its own), then `model.generate` with the encoded images passed
as `mm_encoder_outputs`, so prefill and decode are timed apart. Modes that change the number of
visual tokens the LLM sees (`dtome`, `tome` without VTU, `downsample`) need the prompt to hold one
placeholder per token; this module rewrites the stock prompt accordingly. `dymu` and `tome` keep
the stock prompt (virtual unmerge + VTU).
"""

from __future__ import annotations

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
    full_tokens: int | list[list[int]]  # per image in the stock model (Qwen VLs: per prompt, per image/video)
    encoder_s: float
    prefill_s: float
    decode_s: float
    new_tokens: int = 0
    image_size: int | None = None  # downsample: the side the images were resized to
    video_tokens_per_temporal_patch: list[list[int]] | None = None  # Qwen VLs: per video (2 frames per patch)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    answers: list[str]
    sequences: torch.Tensor
    report: Report
    scores: list = field(default_factory=list)  # per generated step: (B, vocab) logits, when asked


QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def load_vlm(model_ref: str, device: str | None = None, dtype: str | None = None):
    """(LlavaForConditionalGeneration or a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model, processor)
    from a hub id or a local folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    from ..loading import LoadError, _config, resolve_device_dtype

    config = _config(model_ref)
    if config.model_type not in ("llava", *QWEN_MODEL_TYPES):
        raise LoadError(f"{model_ref} is a {config.model_type!r} model; dymu generate supports LLaVA "
                        "(LlavaForConditionalGeneration) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL models.")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    if config.model_type in QWEN_MODEL_TYPES:
        from .qwen_vl import load_qwen_processor

        model = AutoModelForImageTextToText.from_pretrained(model_ref, dtype=torch_dtype).to(torch_device).eval()
        processor = load_qwen_processor(model_ref, config.model_type)
        processor.tokenizer.padding_side = "left"
        return model, processor
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


@torch.no_grad()
def generate(model, processor, prompts: list[str], images: list[list[Image.Image]], *, max_new_tokens: int = 32,
             output_scores: bool = False, **generate_kwargs) -> GenerationResult:
    """Answer ``prompts[i]`` about ``images[i]`` (a list per prompt, possibly empty), greedily by default.

    The model is a `LlavaForConditionalGeneration`, stock or patched by `dymu.apply` in any mode, or
    a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (then an item of ``images[i]`` may also be a list of
    frames: a video).
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    from .qwen_vl import SUPPORTED_QWEN_VLMS

    if isinstance(model, SUPPORTED_QWEN_VLMS):
        return _generate_qwen(model, processor, prompts, images, max_new_tokens, output_scores, generate_kwargs)
    mode = llava_mode(model)
    inner = model.model
    config = model.config
    device = next(model.parameters()).device
    flat = [im for per_prompt in images for im in per_prompt]
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
                    decode_s=sum(timer.times[1:]), new_tokens=new.shape[1], image_size=side)
    return GenerationResult(answers=[a.strip() for a in answers], sequences=out.sequences, report=report,
                            scores=list(out.scores) if output_scores else [])


def _generate_qwen(model, processor, prompts, media, max_new_tokens, output_scores, generate_kwargs) -> GenerationResult:
    """Qwen VLs keep the stock prompt in every supported mode (virtual unmerge): encode images and
    videos first (timed), then generate with them as `mm_encoder_outputs`."""
    from .qwen_vl import qwen_inputs

    device = next(model.parameters()).device
    texts = []
    for prompt, items in zip(prompts, media):
        content = [{"type": "video" if isinstance(m, (list, tuple)) else "image"} for m in items]
        texts.append(processor.apply_chat_template(
            [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
            add_generation_prompt=True, tokenize=False))
    processor.tokenizer.padding_side = "left"
    inputs = qwen_inputs(processor, texts, media).to(device)
    inner = model.model
    start = time.perf_counter()
    encoded, full = {}, {}
    for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if pixels in inputs:
            grid = inputs[f"{modality}_grid_thw"]
            encoded[modality] = getattr(inner, f"get_{modality}_features")(inputs.pop(pixels).to(model.dtype), grid)
            full[modality] = (grid.prod(-1) // inner.visual.spatial_merge_size**2).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    encoder_s = time.perf_counter() - start
    settings = getattr(inner, "_dymu", None)
    counts = {m: ([k for k, _ in settings.last_encoded[m].per_item(inputs[f"{m}_grid_thw"])]
                  if settings is not None else full[m]) for m in encoded}
    timer = _ForwardTimer(model)
    try:
        out = model.generate(**inputs, mm_encoder_outputs=encoded or None, max_new_tokens=max_new_tokens,
                             do_sample=generate_kwargs.pop("do_sample", False), return_dict_in_generate=True,
                             output_scores=output_scores, **generate_kwargs)
    finally:
        timer.close()
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    answers = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    # per prompt, per image/video in the prompt's order: tokens kept (images are encoded before videos)
    taken = {"image": 0, "video": 0}
    per_prompt, per_prompt_full = [], []
    for items in media:
        row, row_full = [], []
        for m in items:
            modality = "video" if isinstance(m, (list, tuple)) else "image"
            row.append(counts[modality][taken[modality]])
            row_full.append(full[modality][taken[modality]])
            taken[modality] += 1
        per_prompt.append(row)
        per_prompt_full.append(row_full)
    per_patch = None
    if "video" in encoded:
        grid = inputs["video_grid_thw"]
        segments = (settings.last_encoded["video"].kept_per_segment.tolist() if settings is not None else
                    [int(h * w) // 4 for t, h, w in grid.tolist() for _ in range(t)])
        per_patch, s = [], 0
        for t in grid[:, 0].tolist():
            per_patch.append(segments[s : s + t])
            s += t
    report = Report(mode=getattr(model, "_dymu_mode", "full"), visual_tokens=per_prompt, full_tokens=per_prompt_full,
                    encoder_s=encoder_s, prefill_s=timer.times[0] if timer.times else 0.0,
                    decode_s=sum(timer.times[1:]), new_tokens=new.shape[1], video_tokens_per_temporal_patch=per_patch)
    return GenerationResult(answers=[a.strip() for a in answers], sequences=out.sequences, report=report,
                            scores=list(out.scores) if output_scores else [])
