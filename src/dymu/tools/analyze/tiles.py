"""`dymu analyze` on a VLM that cuts every image into tiles of a fixed size and merges units within each
tile (InternVL): every image's tiles through the model's own image path, as `dymu generate` and `dymu encode`
run them. Each row has the three counts: ``encoder_tokens`` = ``llm_rows`` (units kept, summed over the image's
tiles: one LLM token per unit) and ``stock_positions`` (the image's placeholders); ``tokens`` / ``full_tokens``
are the same two. The merge map is drawn on the image's last tile (the thumbnail; the only tile of a small
image), one cell per unit."""

from __future__ import annotations

from pathlib import Path

import torch


def tiles_run(family, model, thresholds, processor, max_tokens, min_tokens, focus, each):
    """`dymu analyze` on InternVL: every image's tiles through the model's own image path (patched with
    ``thresholds`` for the run); per image the LLM rows (= encoder tokens: kept units over its tiles) and
    stock positions; the merge map drawn on its thumbnail (its only tile when it has one), per 2x2 unit."""
    from ...families.internvl_processor import tile_images
    from ...thresholds import Thresholds
    from ...towers.internvit import unit_side
    from .anyres import _patched
    from .measure import WITHOUT_COLUMN, _Run

    if focus is not None:
        raise ValueError("focus regions in dymu analyze are for LLaVA-1.5 and CLIP / SigLIP towers; InternVL applies "
                         "them in dymu generate / dymu encode / dymu.generate")
    if processor is None:
        raise ValueError(f"analyzing a {type(model).__name__} needs its image processor (processor=...)")
    image_processor = getattr(processor, "image_processor", processor)
    if isinstance(thresholds, (str, Path)):
        thresholds = Thresholds.load(thresholds)
    if thresholds is None and getattr(model.model, "_dymu", None) is None:
        raise ValueError(f"analyzing a stock {type(model).__name__} needs thresholds")
    budget = {k: v for k, v in (("max_tokens", max_tokens), ("min_tokens", min_tokens)) if v is not None}
    side = unit_side(model.config)

    def prepare(image, path):  # extra: the image's tile count
        out = tile_images(image_processor, [image])
        return out["pixel_values"], int(out["num_patches"][0])

    def check(pixels):
        if pixels.ndim != 4:
            raise ValueError(f"the image processor makes pixel values of shape {tuple(pixels.shape)}; InternVL "
                             "needs its tiling image processor (tiles, 3, H, W)")

    def flush(pending):
        tiles = torch.cat([p for _, p, _ in pending]).to(model.device, model.dtype)
        encoded = family.encode(model, tiles)
        without = None
        if budget or getattr(model.model._dymu, "budget", None) is not None:
            settings = model.model._dymu
            kept_budget, settings.budget = settings.budget, None
            try:
                without = family.encode(model, tiles).kept_per_image.tolist()
            finally:
                settings.budget = kept_budget
        kept, units, groups, first = encoded.kept_per_image.tolist(), encoded.units_per_image.tolist(), \
            encoded.groups_per_image(), 0
        for row, pixels, n in pending:
            rows = sum(kept[first:first + n])
            row.update(encoder_tokens=rows, llm_rows=rows, stock_positions=sum(units[first:first + n]))
            row["tokens"], row["full_tokens"] = row["llm_rows"], row["stock_positions"]
            if without is not None:
                row[WITHOUT_COLUMN] = sum(without[first:first + n])
            if each is not None:
                grid = pixels.shape[-1] // model.config.vision_config.patch_size[1] // side
                each(row, pixels[n - 1].cpu(), groups[first + n - 1].cpu(), (grid, grid))
            first += n

    return _Run(prepare, check, flush, _patched(model, thresholds, budget), one_size=False)

