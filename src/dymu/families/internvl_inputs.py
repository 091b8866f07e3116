"""InternVL prompt inputs (`dymu.prompt_inputs` / `dymu.generate`): the stock processor's prompt, the tiles
encoded once (timed), and the counts a report shows.

The processor expands every image to ``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` per tile + ``</img>``,
and every video to one such block per frame, in the order the text names them; the tiles' pixels follow
the same order. So each run of ``<IMG_CONTEXT>`` in the prompt is one image (its tiles one after the
other) or one video frame, which is how the counts are cut per image / video here and how modes without
VTU shorten each run to the tokens its tiles keep.
"""

from __future__ import annotations

import re

import torch

from .base import PreparedInputs, timed
from .internvl_processor import tile_images
from .prompting import focused_images, prompt_texts


def context_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int) -> list[list[int]]:
    """Per prompt, the lengths of its runs of ``token_id`` (padding excluded), in reading order."""
    runs = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        lengths, count = [], 0
        for t, m in zip(ids, mask):
            if m and t == token_id:
                count += 1
            elif count:
                lengths.append(count)
                count = 0
        runs.append(lengths + ([count] if count else []))
    return runs


def set_run_lengths(input_ids, attention_mask, token_id: int, pad_token_id: int, lengths: list[list[int]]):
    """A left-padded batch whose k-th run of ``token_id`` in prompt i is ``lengths[i][k]`` tokens long."""
    rows = []
    for ids, mask, want in zip(input_ids.tolist(), attention_mask.tolist(), lengths):
        ids = [t for t, m in zip(ids, mask) if m]
        new, k, i = [], 0, 0
        while i < len(ids):
            if ids[i] != token_id:
                new.append(ids[i])
                i += 1
                continue
            while i < len(ids) and ids[i] == token_id:
                i += 1
            new += [token_id] * want[k]
            k += 1
        rows.append(new)
    width = max(len(r) for r in rows)
    device = input_ids.device
    return (torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device))


def item_order(processor, text: str) -> list[str]:
    """"image" / "video" for every image and video token of a prompt text, in its order."""
    pattern = f"(?P<image>{re.escape(processor.image_token)})|(?P<video>{re.escape(processor.video_token)})"
    return [m.lastgroup for m in re.finditer(pattern, text)]


@torch.no_grad()
def internvl_inputs(model, processor, request) -> PreparedInputs:
    """The processor's prompt (placeholders shortened in modes without VTU), the tiles encoded once, and
    per image / video (images first, then videos, as the report lists them): encoder tokens = LLM rows =
    units kept over its tiles / frames, stock positions = its placeholders."""
    inner, config = model.model, model.config
    original, images = focused_images(processor.image_processor, request.images, request.focus, request.fill)
    texts = prompt_texts(processor, request.prompts, images, request.chat_template, request.videos)
    flat_images = [im for ims in images for im in ims]
    flat_videos = [v for vs in request.videos for v in vs]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=flat_images or None, videos=flat_videos or None, text=texts, return_tensors="pt",
                       padding=True)
    device = next(model.parameters()).device
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    seq = processor.image_seq_length
    runs = context_runs(input_ids, attention_mask, config.image_token_id)
    # Tiles of every run (an image: its tiles; a video frame: one), and the item each run belongs to.
    items, run_tiles = [], []  # items: per prompt, per image / video: its run indices (global)
    for text, prompt_runs, ims, vs in zip(texts, runs, images, request.videos):
        order, k, per_item = item_order(processor, text), 0, {"image": [], "video": []}
        frames = iter(len(v) for v in vs)
        for kind in order:
            take = 1 if kind == "image" else next(frames)
            per_item[kind].append(list(range(len(run_tiles) + k, len(run_tiles) + k + take)))
            k += take
        if k != len(prompt_runs):
            raise ValueError(f"prompt {len(items)} has {len(prompt_runs)} image blocks for {len(ims)} image(s) and "
                             f"{len(vs)} video(s): each image / video token must be expanded by the processor")
        items.append(per_item["image"] + per_item["video"])
        run_tiles += [n // seq for n in prompt_runs]
    stock_runs = [n * seq for n in run_tiles]
    mm_encoder_outputs, encoder_s, kept_runs = None, 0.0, list(stock_runs)
    patched = getattr(inner, "_dymu", None)
    if "pixel_values" in inputs:
        pixels = inputs["pixel_values"].to(device, model.dtype)
        if sum(run_tiles) != len(pixels):
            raise ValueError(f"the prompt holds {sum(run_tiles)} tiles but the processor made {len(pixels)}")
        budget = _call_budget(patched, request.max_tokens, request.min_tokens)
        previous = None if patched is None else patched.budget
        try:
            if patched is not None:
                patched.budget = budget
            features, encoder_s = timed(device, lambda: inner.get_image_features(pixels))
        finally:
            if patched is not None:
                patched.budget = previous
        mm_encoder_outputs = {"image": features}
        if patched is not None:
            kept_tiles, first = patched.last_encoded.kept_per_image.tolist(), 0
            for r, n in enumerate(run_tiles):
                kept_runs[r] = sum(kept_tiles[first:first + n])
                first += n
            if patched.direct:  # one placeholder per kept token
                cut, r = [], 0
                for prompt_runs in runs:
                    cut.append(kept_runs[r:r + len(prompt_runs)])
                    r += len(prompt_runs)
                input_ids, attention_mask = set_run_lengths(input_ids, attention_mask, config.image_token_id,
                                                            processor.tokenizer.pad_token_id, cut)
    rows = [[sum(kept_runs[r] for r in item) for item in prompt] for prompt in items]
    stock = [[sum(stock_runs[r] for r in item) for item in prompt] for prompt in items]
    without = None
    if patched is not None and (request.max_tokens is not None or request.min_tokens is not None
                                or request.focus is not None):
        without = _without(model, processor, original, patched, rows)
    return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                           "mm_encoder_outputs": mm_encoder_outputs}, llm_rows=rows, stock_positions=stock,
                          encoder_tokens=rows, full_tokens=stock, encoder_s=encoder_s, without=without)


def _call_budget(settings, max_tokens, min_tokens):
    """The budget for one call: each bound given here replaces the one `dymu.apply` set."""
    from ..towers.budget import call_budget
    from ..towers.qwen_rules import make_qwen_budget

    return call_budget(settings, max_tokens, min_tokens, make_qwen_budget)


def _without(model, processor, original, settings, rows) -> list[list[int]]:
    """LLM rows of every image without the call's budget and focus (the whole images, the apply-time
    budget); videos (never focused) as in the call."""
    from .internvl import encode_internvl

    flat = [im for ims in original for im in ims]
    processed = tile_images(processor, flat)
    encoded = encode_internvl(model.model, processed["pixel_values"].to(model.device, model.dtype), settings)[0]
    kept, tiles = encoded.kept_per_image.tolist(), [int(n) for n in processed["num_patches"]]
    per_image, first = [], 0
    for n in tiles:
        per_image.append(sum(kept[first:first + n]))
        first += n
    out, image = [], 0
    for prompt_rows, ims in zip(rows, original):
        out.append(per_image[image:image + len(ims)] + prompt_rows[len(ims):])
        image += len(ims)
    return out
