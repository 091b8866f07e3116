"""`dymu analyze` on LLaVA-NeXT / LLaVA-OneVision (AnyRes): the model's own image path.

Every image goes through what the model runs at inference, as `dymu generate` and `dymu encode` do:
all its crops through the tower (DToMe with merge points "vit" / "both"), the stock packing (unpad,
OneVision's anyres_max downsampling, newlines) and, with "post" / "both", the merge rounds on the
packed tokens. Each row then has the three counts every dymu tool shows, under one name each:
``encoder_tokens`` (tokens the tower kept, summed over the image's crops), ``llm_rows`` (distinct
rows the LLM runs: VTU groups) and ``stock_positions`` (the image's placeholders in the stock
prompt). As for the Qwen VLs, ``tokens`` is what the LLM runs (= llm_rows) and ``full_tokens`` the
image's own stock count (= stock_positions: it follows the image's size and shape). The merge map is
drawn on the base crop (the whole image at the crop size, the first positions of the packed layout)
with the groups the LLM sees there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .measure import WITHOUT_COLUMN, _Run

COUNT_COLUMNS = ("encoder_tokens", "llm_rows", "stock_positions")


def is_anyres(model) -> bool:
    """A VLM whose processor cuts an image into crops (LLaVA-NeXT / OneVision)."""
    from ...families import vlm_family_of

    return getattr(vlm_family_of(model), "crops_images", False)


@contextlib.contextmanager
def _patched(model, thresholds, budget_args: dict):
    """The model patched with ``thresholds`` for the block (then stock again); an already patched model is
    used as it is when no thresholds are given (and refused with thresholds: its patch cannot be restored)."""
    from ...api import apply, remove

    if getattr(model.model, "_dymu", None) is not None:
        if thresholds is not None:
            raise ValueError("this AnyRes model is already patched by dymu.apply: pass the stock model with "
                             "thresholds, or the patched model with thresholds=None")
        yield
        return
    apply(model, thresholds, **budget_args)
    try:
        yield
    finally:
        remove(model)


def anyres_run(model, thresholds, processor, max_tokens, min_tokens, focus, each) -> _Run:
    from ...families.llava_next import crops_per_image, encoder_tokens_per_item, unique_rows_per_item
    from ...thresholds import Thresholds
    from ...towers.encoder import budget_set

    if focus is not None:
        raise ValueError("focus regions (--focus / --focus-mask) in analyze are for LLaVA-1.5 and CLIP/SigLIP "
                         "towers, not the AnyRes models (LLaVA-NeXT / OneVision)")
    if processor is None:
        raise ValueError(f"analyzing a {type(model).__name__} needs its image processor (processor=...)")
    processor = getattr(processor, "image_processor", processor)
    if isinstance(thresholds, (str, Path)):
        thresholds = Thresholds.load(thresholds)
    budget = {k: v for k, v in (("max_tokens", max_tokens), ("min_tokens", min_tokens)) if v is not None}
    constrained = bool(budget) or any(getattr(thresholds, k, None) is not None for k in ("max_tokens", "min_tokens"))
    inner = model.model
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype

    def prepare(image, path):  # extra: the image's (1, 2) image_sizes
        out = processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_sizes"]

    def check(pixels):
        if pixels.ndim != 5:
            raise ValueError(f"the image processor makes pixel values of shape {tuple(pixels.shape)}; analyze of an "
                             "AnyRes model needs its AnyRes image processor (batch, crops, 3, H, W)")

    def features_of(pending):
        sizes = torch.cat([s for _, _, s in pending])
        counts = crops_per_image(inner, sizes)
        crops = torch.cat([p[0, :n] for (_, p, _), n in zip(pending, counts)])
        with torch.no_grad():
            features = inner.get_image_features(crops.to(device, dtype), sizes.to(device)).pooler_output
        return features, encoder_tokens_per_item(inner, counts), crops, counts

    def flush(pending):
        features, encoder, crops, counts = features_of(pending)
        rows = unique_rows_per_item(features)
        without = None
        if constrained:  # the same images without the budget: the llm_rows it saved
            with budget_set(inner.vision_tower, None):
                without = unique_rows_per_item(features_of(pending)[0])
        first = 0
        for k, ((row, _, _), f) in enumerate(zip(pending, features)):
            row.update(encoder_tokens=int(encoder[k]), llm_rows=int(rows[k]), stock_positions=len(f))
            row["tokens"], row["full_tokens"] = row["llm_rows"], row["stock_positions"]
            if without is not None:
                row[WITHOUT_COLUMN] = int(without[k])
            if each is not None:
                base = getattr(f, "dymu_group_of_patch", torch.arange(len(f)))[:side * side]
                each(row, crops[first].cpu(), base.cpu(), (side, side))
            first += counts[k]

    if thresholds is None and getattr(inner, "_dymu", None) is None:
        raise ValueError(f"analyzing a stock {type(model).__name__} needs thresholds")
    return _Run(prepare, check, flush, _patched(model, thresholds, budget), one_size=False)
