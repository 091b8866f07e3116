"""Prompt and image helpers the family adapters share: chat templates, placeholder rewriting for the
modes that change the visual token count, images and frames as a viewer shows them, per-call
budgets and focus regions."""

from __future__ import annotations

import math

import torch
from PIL import Image


def chat_text(processor, prompt: str, num_images: int, num_videos: int = 0) -> str:
    """The processor's chat template for one user turn, else LLaVA-1.5's plain format."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return "USER: " + "<image>\n" * num_images + prompt + " ASSISTANT:"


def prompt_texts(processor, prompts: list[str], images: list[list], chat_template: bool = True,
                 videos: list[list] | None = None) -> list[str]:
    """The prompt strings: the chat template with one image placeholder per image (``chat_template``),
    or the prompts as written, which must then hold the image token once per image."""
    token = getattr(processor, "image_token", None) or "<image>"
    videos = videos if videos is not None else [[] for _ in prompts]
    texts = []
    for prompt, ims, vs in zip(prompts, images, videos):
        have = prompt.count(token)
        if chat_template and have:
            raise ValueError(f"the prompt already contains the image token {token!r}: give only the question "
                             f"(dymu adds the chat template and one {token} per image), or pass the full prompt "
                             "as is with --raw-prompt (Python: chat_template=False)")
        if not chat_template and have != len(ims):
            raise ValueError(f"the raw prompt has {have} image token(s) {token!r} but {len(ims)} image(s) were given: "
                             f"put {token} once per image where the image goes")
        texts.append(chat_text(processor, prompt, len(ims), len(vs)) if chat_template else prompt)
    return texts


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


def viewed(item, prompt: int, index: int) -> Image.Image:
    """An image of a prompt (PIL or a path) as a viewer shows it (`dymu.images.as_viewed`)."""
    from ..images import as_viewed, open_image

    if isinstance(item, Image.Image):
        return as_viewed(item, f"image {index} of prompt {prompt}")
    return open_image(item)


def video_frames(item, prompt: int, index: int, num_frames: int) -> list[Image.Image]:
    """One video of a prompt as PIL frames: a list of frames (each shown as a viewer shows it), or a video
    file / folder of frames (`dymu.videos.load_video`)."""
    from ..videos import load_video

    if not isinstance(item, (list, tuple)):
        return load_video(item, num_frames)  # checks frames and sizes itself, naming the file
    frames = [viewed(f, prompt, index) for f in item]
    if not frames or len({f.size for f in frames}) > 1:
        raise ValueError(f"video {index} of prompt {prompt}: needs at least one frame and all frames of one size, "
                         f"got sizes {sorted({f.size for f in frames})}")
    return frames


def per_prompt(flat: list, images: list[list]) -> list[list]:
    """A flat per-image list cut back into one list per prompt."""
    out, k = [], 0
    for ims in images:
        out.append(flat[k : k + len(ims)])
        k += len(ims)
    return out


def flat_focus(focus, images) -> list | None:
    """``focus`` nested like ``images`` (one entry per image of each prompt) -> one entry per image."""
    if focus is None:
        return None
    if len(focus) != len(images) or any(f is not None and len(f) != len(ims) for f, ims in zip(focus, images)):
        raise ValueError("focus must be nested like images: one list per prompt, one entry (or None) per image")
    return [f for per_prompt, ims in zip(focus, images) for f in (per_prompt if per_prompt is not None else [None] * len(ims))]


def focused_images(image_processor, images: list[list], focus, fill) -> tuple[list[list], list[list]]:
    """(images as viewed, the same with the pixels outside each focus region filled), per prompt."""
    from ..focus import DEFAULT_FILL, apply_focus_all, check_focus_survives

    original = [[viewed(im, i, k) for k, im in enumerate(ims)] for i, ims in enumerate(images)]
    flat_original = [im for ims in original for im in ims]
    focus_of, fill = flat_focus(focus, original), DEFAULT_FILL if fill is None else fill
    filled = apply_focus_all(flat_original, focus_of, fill)
    check_focus_survives(image_processor, flat_original, filled, focus_of, fill)
    return original, per_prompt(filled, original)


def call_budget(tower, max_tokens, min_tokens):
    """The budget for one call on a CLIP / SigLIP tower: each bound given here replaces the one `dymu.apply` set."""
    from ..towers.budget import call_budget as budget_for_call, make_budget

    return budget_for_call(getattr(tower, "_dymu_state", None), max_tokens, min_tokens, make_budget)
