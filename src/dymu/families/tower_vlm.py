"""What the families built on a CLIP / SigLIP tower (`dymu.towers.encoder`) share: where the tower
is, how a thresholds file or plain values become the tower's thresholds, the token budget, and the
feature layer the VLM reads."""

from __future__ import annotations

import torch
from torch import nn

from ..settings import Settings
from ..towers.encoder import TowerFamily, encode_with_tower, family_of, make_budget
from .base import VLMFamily


def threshold_values(thresholds, tower: nn.Module):
    """Accept a Thresholds object (validated against the tower), a list, a tensor or one number."""
    if hasattr(thresholds, "check_compatible"):
        thresholds.check_compatible(tower)
        return thresholds.thresholds
    return thresholds


def default_feature_layer(model: nn.Module, family: TowerFamily) -> tuple[int, bool]:
    """(feature layer, drop class token) as the VLM reads them, else LLaVA-1.5 / LLaVA-OV defaults."""
    config = getattr(model, "config", None)
    layer = getattr(config, "vision_feature_layer", None)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if isinstance(layer, int) and strategy in ("default", "full"):
        return layer, strategy == "default"
    return (-2, True) if family.has_class_token else (-1, False)


def settings_budget(settings: Settings):
    """The token budget: the settings' bounds where given, else the `Thresholds` file's defaults."""
    return make_budget(settings.file_default("max_tokens"), settings.file_default("min_tokens"))


class TowerVLMFamily(VLMFamily):
    """A VLM whose vision tower is a CLIP / SigLIP at ``model.model.vision_tower``."""

    def vision_tower(self, model):
        return model.model.vision_tower

    def tower_thresholds(self, model, settings: Settings):
        """The tower's threshold values (checked against it), or the settings' as given for ``tome``."""
        if settings.thresholds is None or settings.mode == "tome":
            return settings.thresholds
        return threshold_values(settings.thresholds, self.vision_tower(model))

    @staticmethod
    def budget(settings: Settings):
        return settings_budget(settings)

    def encode_records(self, model, processor, opened, skipped):
        """`dymu encode`'s per-image records for a batch of opened images: (records, skipped)."""
        tower = self.vision_tower(model)
        return tower_records(model, tower, family_of(tower), processor, opened, skipped,
                             lambda processed: self.encoder_pixels(model, processed),
                             lambda processed, pixels: self.encode_counted(model, processed, pixels))

    def encode_counted(self, model, processed, pixels) -> tuple:
        """One processor output through the model's image path, once: (the tower's `EncodedImages` of
        ``pixels``, its crops / images in order; (LLM rows, stock positions) per image)."""
        raise NotImplementedError

    def encode(self, model, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None, focus=None,
               fill=None, processor=None):
        if grid_thw is not None:
            raise ValueError(f"grid_thw is for VLMs with native-resolution towers, not {type(model).__name__}")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim != 4:
            raise ValueError(f"dymu.encode takes the tower's crops (N, 3, H, W), not pixel values of shape "
                             f"{tuple(pixel_values.shape)}: pass PIL images with processor= (the processor's padded "
                             f"crops are then dropped as the model drops them)")
        tower = self.vision_tower(model)
        return encode_tower_images(model, tower, family_of(tower), pixel_values, feature_layer, drop_class_token, focus,
                                   fill, processor, lambda processed: self._tower_pixels(model, processed))

    def _tower_pixels(self, model, processed) -> torch.Tensor:
        # The model's own processor makes crops (batch, crops, 3, H, W): what the tower sees is the family's
        # choice (padding crops dropped). The tower's own processor (the default) makes whole images.
        pixels = processed["pixel_values"]
        return self.encoder_pixels(model, processed)[0] if pixels.ndim == 5 else pixels


def encode_tower_images(model, tower, family: TowerFamily, pixel_values, feature_layer, drop_class_token, focus, fill,
                        processor, encoder_pixels=None):
    """`dymu.encode` with a CLIP / SigLIP tower: pixel values, or PIL images (with focus regions) that
    ``processor`` (default: the tower family's stock one) turns into them; ``encoder_pixels`` (default: the
    processor's ``pixel_values``) picks what the tower sees of the processor's output (a VLM's crops)."""
    default_layer, default_drop = default_feature_layer(model, family)
    feature_layer = default_layer if feature_layer is None else feature_layer
    drop_class_token = default_drop if drop_class_token is None else drop_class_token
    if not isinstance(pixel_values, torch.Tensor):
        from ..focus import DEFAULT_FILL, apply_focus_all, check_focus_survives

        fill = DEFAULT_FILL if fill is None else fill
        images = apply_focus_all(list(pixel_values), focus, fill)
        processor = processor or family.default_processor(tower.config)
        check_focus_survives(processor, list(pixel_values), images, focus, fill)
        processed = processor(images=images, return_tensors="pt")
        pixel_values = processed["pixel_values"] if encoder_pixels is None else encoder_pixels(processed)
    elif focus is not None:
        raise ValueError("focus is applied to the images before the processor: pass PIL images (with processor=) "
                         "instead of pixel values, or fill them yourself with dymu.focus.apply_focus")
    param = next(tower.parameters())
    pixel_values = pixel_values.to(param.device)
    return encode_with_tower(tower, family, pixel_values, feature_layer, drop_class_token)


@torch.no_grad()
def tower_records(model, tower, family: TowerFamily, processor, opened, skipped, encoder_pixels, encode_counted=None):
    """Per image of ``opened`` [(path, image)]: tokens kept, stock tokens, and per crop the sizes, the
    group of every patch and the tokens kept after every layer; with ``encode_counted`` (a VLM's own
    image path, run instead of the bare tower), the LLM rows and stock positions too. (records,
    skipped + images the processor rejects)."""
    from ..images import pixel_values_of

    processor = processor or family.default_processor(tower.config)
    parts = []  # per processor output: (processed, pixels, crops per image)

    def to_pixels(processed):
        pixels, crops = encoder_pixels(processed)
        parts.append((processed, pixels, crops))
        return pixels

    items, pixels, skipped = pixel_values_of(processor, opened, skipped, to_pixels)
    if pixels is None:
        return [], skipped
    device, dtype = next(tower.parameters()).device, next(tower.parameters()).dtype
    records, item = [], iter(items)
    for processed, pixels, crops in parts:
        pixels = pixels.to(device, dtype)
        if encode_counted is None:
            encoded, rows = encode_tower_images(model, tower, family, pixels, None, None, None, None, None), None
        else:
            encoded, rows = encode_counted(processed, pixels)
        first = 0
        for i, n in enumerate(crops):
            per_crop = [{"tokens": len(one["tokens"]), "sizes": one["sizes"].tolist(),
                         "group_of_patch": one["group_of_patch"].tolist(),
                         "kept_per_layer": one["kept_per_layer"].tolist()}
                        for one in (encoded.image(first + k) for k in range(n))]
            first += n
            tokens = sum(c["tokens"] for c in per_crop)
            record = {"path": str(next(item)), "tokens": tokens, "full_tokens": n * encoded.group_of_patch.shape[1],
                      "encoder_tokens": tokens}
            if rows is not None:
                record.update(llm_rows=rows[0][i], stock_positions=rows[1][i])
            record.update(per_crop[0] if n == 1 else {"crops": per_crop})
            records.append(record)
    return records, skipped
