"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (dymu.families.demos.qwen), saved and reloaded, and prompts."""

from __future__ import annotations

import torch

from dymu.families.demos.qwen import QWEN_FAMILIES, build_qwen_demo_model  # noqa: F401
from dymu.families.qwen_processors import load_qwen_processor


def save_qwen(family: str, folder) -> None:
    model, processor = build_qwen_demo_model(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def load_qwen(family: str, folder, attn: str = "eager"):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()
    processor = load_qwen_processor(str(folder), family)
    processor.tokenizer.padding_side = "left"
    return model, processor


def chat(processor, prompt: str, parts: list[str]) -> str:
    """One user turn: ``parts`` is a list of "image" / "video" in prompt order."""
    content = [{"type": p} for p in parts] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def image_prompts(processor, prompts: list[tuple[str, list]]):
    """A left-padded batch: ``prompts`` = [(text, [PIL images])]."""
    texts = [chat(processor, text, ["image"] * len(ims)) for text, ims in prompts]
    images = [im for _, ims in prompts for im in ims]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True)
