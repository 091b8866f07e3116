"""Gemma 3 prompts, processor and pixels (families/gemma3.py): the stock `Gemma3Processor` with its PIL
image processor (no torchvision), the chat template with one image marker per image, and
`gemma3_prompt_inputs`, what `dymu.generate` / `dymu.prompt_inputs` hand `model.generate`: the images
encoded once (timed), the stock prompt (256 placeholders per image at 896 px, token_type_ids for the
bidirectional image blocks) and the token counts of every image."""

from __future__ import annotations


import torch

from .base import PreparedInputs, timed
from .prompting import focused_images


def load_gemma3_processor(model_ref: str):
    """The stock processor of a Gemma 3 folder / hub id, with the PIL image processor where the saved one
    needs torchvision (or an unknown processor class loaded as a bare tokenizer)."""
    from transformers import AutoProcessor, AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    try:
        processor = AutoProcessor.from_pretrained(model_ref)
        if isinstance(getattr(processor, "image_processor", None), Gemma3ImageProcessorPil):
            return processor
    except (ImportError, AttributeError, ValueError, OSError, TypeError):
        processor = None
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    seq = getattr(processor, "image_seq_length", None) or _saved_seq_length(model_ref)
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil.from_pretrained(model_ref), tokenizer=tokenizer,
                           chat_template=getattr(processor, "chat_template", None) or tokenizer.chat_template,
                           image_seq_length=seq)


def _saved_seq_length(model_ref: str) -> int:
    import json
    from pathlib import Path

    path = Path(model_ref) / "processor_config.json"
    if path.is_file():
        return int(json.loads(path.read_text()).get("image_seq_length", 256))
    return 256


def chat_texts(processor, prompts: list[str], counts: list[int]) -> list[str]:
    """One user turn per prompt: its images (the processor expands each marker), then the question."""
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False) for prompt, n in zip(prompts, counts)]


def gemma3_pixels(processor, images, focus=None, fill=None) -> torch.Tensor:
    """Pixel values of PIL ``images`` (outside ``focus`` filled), or ``images`` itself when it is pixels."""
    if isinstance(images, torch.Tensor):
        if focus is not None:
            raise ValueError("focus is applied to the images before the processor: pass PIL images (with "
                             "processor=) instead of pixel values")
        return images
    if processor is None:
        raise ValueError("encoding PIL images with Gemma 3 needs processor= (its processor or image processor)")
    image_processor = getattr(processor, "image_processor", processor)
    _, filled = focused_images(image_processor, [list(images)], None if focus is None else [focus], fill)
    return image_processor(images=filled[0], return_tensors="pt")["pixel_values"]


def budget_set(settings, max_tokens=None, min_tokens=None):
    """The call's budget held on the patch state for the block (each bound given replaces `dymu.apply`'s)."""
    from ..towers.budget import call_budget, holding_budget
    from ..towers.qwen_rules import make_qwen_budget

    return holding_budget(settings, call_budget(settings, max_tokens, min_tokens, make_qwen_budget))


def _cut(flat: list, counts: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


@torch.no_grad()
def gemma3_prompt_inputs(model, processor, request) -> PreparedInputs:
    """Inputs for ``model.generate(**inputs)`` and the counts of every image: encoder tokens (tower rows
    kept: k² per kept unit), LLM rows (groups) and stock positions (mm_tokens_per_image)."""
    from .gemma3 import unit_grid

    device = next(model.parameters()).device
    settings = getattr(model.model, "_dymu", None)
    counts = [len(ims) for ims in request.images]
    original, filled = focused_images(processor.image_processor, request.images, request.focus, request.fill)
    processor.tokenizer.padding_side = "left"
    texts = chat_texts(processor, request.prompts, counts)
    flat = [im for ims in filled for im in ims]
    inputs = dict(processor(text=texts, images=filled if flat else None, return_tensors="pt", padding=True).to(device))
    pixels = inputs.pop("pixel_values", None)
    patches, side = unit_grid(model.config)
    stock = model.config.mm_tokens_per_image
    encoder_s, kept, without = 0.0, [stock] * len(flat), None
    if pixels is not None:
        with budget_set(settings, request.max_tokens, request.min_tokens):
            output, encoder_s = timed(device, lambda: model.model.get_image_features(pixels.to(model.dtype)))
            if settings is not None:
                kept = settings.last_encoded.kept_per_image.tolist()
                if settings.budget is not None or request.focus is not None:  # the counts without either
                    saved = settings.last_encoded, settings.last_features
                    previous, settings.budget = settings.budget, None
                    try:
                        plain = processor.image_processor(images=[im for ims in original for im in ims],
                                                          return_tensors="pt")["pixel_values"]
                        model.model.get_image_features(plain.to(device, model.dtype))
                        without = _cut(settings.last_encoded.kept_per_image.tolist(), counts)
                    finally:
                        settings.budget = previous
                        settings.last_encoded, settings.last_features = saved
        inputs["mm_encoder_outputs"] = {"image": output}
    rows = _cut(kept, counts)
    return PreparedInputs(inputs, llm_rows=rows, stock_positions=_cut([stock] * len(flat), counts),
                          encoder_tokens=[[k * side * side for k in r] for r in rows],
                          full_tokens=_cut([patches * patches] * len(flat), counts), encoder_s=encoder_s,
                          without=without)
