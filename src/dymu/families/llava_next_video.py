"""DyMU in LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's AnyRes image path, plus
video frames that go through the tower one by one and the stock spatial pooling before the projector.

Images take the LLaVA-NeXT path of `dymu.families.llava_next` unchanged (its patched inner-model mixin,
the group map carried through the stock packing by a probe, the post rounds); only the video path is new:

1. All frames of all videos go through the DToMe tower as one batch, each frame merging on its own.
2. Every frame is virtually unmerged back to its full token grid *in the tower's space*: the stock
   `vision_resampler` (``spatial_pool_mode`` "average" or "max", kernel = stride = ``spatial_pool_stride``,
   2 in every released checkpoint) pools the tower's features, and the projector runs after it.
3. The pooler runs unchanged on those full grids, so the LLM sees exactly the stock layout (F·p² positions
   per video, no newline). The group map follows it exactly: the stock pooler is run once on a one-hot
   *probe* (the identity over a frame's side² tokens) instead of the features, which gives every pooled
   position's weight on every tower token (average: 1/s² on its s×s block; max: 1 on it). Summed over the
   tokens of each merged token, those weights say what a pooled position is made of: with average
   pooling, the multiset of merged tokens in its block (counts / s²); with max pooling, the set. Two pooled
   positions of one frame are one VTU group exactly when these are equal (the pooled rows are then the
   same weighted sum, the projector is row-wise). Overlapping windows would be read off the probe alike.
4. Pooled rows of one group are snapped to the group's first row (an average of the same four rows in
   another order may differ in the last bit), then the projector runs once per group.
5. ``merge_point`` "post" / "both": the post rounds of `anyres_groups.post_merge` on the projected pooled
   rows, one segment per frame (the LLM sees fewer rows; every position keeps its stock position).

``spatial_pool_mode="conv"`` (a learned Conv2d over the hidden channels) is refused: no released checkpoint
uses it, and its group map would need the window's taps in order rather than the block's content.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoModel,
)

from ..towers.encoder import encode_with_tower, family_of
from .anyres_groups import snap_to_groups
from .base import register_vlm_family
from .llava_next import _PATCHED, AnyResFamily, _DyMUAnyResModel
from .onevision_processor import frames_processor_class, load_frames_processor

POOL_MODES = ("average", "max")
_ROUNDING = 2.0 ** 32  # pooled weights are compared on this grid (sums of at most s² exact fractions)


def pool_weights(pooler: nn.Module, side: int) -> torch.Tensor:
    """(p², side²) float64: the stock pooler run on a one-hot probe, the weight of every tower token of a
    frame in every pooled position (average pooling: 1/s² on its block; max pooling: 1 on it)."""
    return pooler(torch.eye(side * side, dtype=torch.float64)[None])[0]  # average / max pooling: no weights


def pooled_groups(weights: torch.Tensor, group_of_patch: torch.Tensor, num_tokens: torch.Tensor,
                  max_pool: bool) -> torch.Tensor:
    """(frames, p²) group of every pooled position, unique within its frame: what it is made of (per merged
    token, the summed weight of its tokens; with max pooling, whether one is there), equal = one group.

    ``group_of_patch`` (frames, side²): every tower token's merged token; ``num_tokens`` (frames,)."""
    frames, width = group_of_patch.shape[0], int(num_tokens.max())
    onehot = torch.nn.functional.one_hot(group_of_patch.cpu(), width).double()  # (F, side², n)
    made_of = torch.einsum("pt,ftn->fpn", weights, onehot)  # (F, p², n)
    made_of = (made_of > 0).long() if max_pool else (made_of * _ROUNDING).round().long()
    frame = torch.arange(frames)[:, None, None].expand(-1, made_of.shape[1], 1)
    keys = torch.cat([frame, made_of], dim=2).flatten(0, 1)  # the frame first: groups never cross frames
    return torch.unique(keys, dim=0, return_inverse=True)[1].view(frames, -1)


class _DyMUNextVideoModel(_DyMUAnyResModel):
    """Mixed in before LlavaNextVideoModel: the image path of LLaVA-NeXT, the video path above."""

    def get_video_features(self, pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs) -> BaseModelOutputWithPooling:
        batch, frames = pixel_values_videos.shape[:2]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        layer, drop_cls = self._feature_choice(vision_feature_layer, vision_feature_select_strategy)
        tower = self.vision_tower
        encoded = encode_with_tower(tower, family_of(tower), pixel_values_videos.flatten(0, 1), layer, drop_cls)
        self._dymu.last_encoded, self._dymu.last_crops = encoded, [frames] * batch
        # Virtual unmerge before the pooling (it runs on the tower's features), then the stock pooler.
        grids = torch.stack([tokens[group] for tokens, group in zip(encoded.tokens, encoded.group_of_patch)])
        pooled = self.vision_resampler(grids)  # (B·F, p², D_vision), stock
        weights = pool_weights(self.vision_resampler, side)
        group = pooled_groups(weights, encoded.group_of_patch, encoded.num_tokens,
                              isinstance(self.vision_resampler.pool, nn.MaxPool2d)).to(pooled.device)
        per_frame = pooled.shape[1]
        items = []
        for v in range(batch):
            rows = pooled[v * frames:(v + 1) * frames].flatten(0, 1)
            labels = torch.unique(group[v * frames:(v + 1) * frames].flatten(), return_inverse=True)[1]
            rows = snap_to_groups(rows, labels, f"video {v}")
            first = torch.full((int(labels.max()) + 1,), len(labels), dtype=torch.long, device=labels.device)
            first = first.scatter_reduce(0, labels, torch.arange(len(labels), device=labels.device), reduce="amin")
            projected = self.multi_modal_projector(rows[first])[labels]  # row-wise: once per group
            segment = torch.arange(len(labels), device=labels.device) // per_frame  # the frame
            items.append((projected, labels, segment))
        out = self._groups_or_post_merge(items)
        features = torch.stack(out)  # (B, F·p², D), the stock layout
        features.dymu_group_of_patch = torch.stack([rows.dymu_group_of_patch for rows in out])
        self._dymu.last_videos = features
        return BaseModelOutputWithPooling(pooler_output=features)


class DyMULlavaNextVideoModel(_DyMUNextVideoModel, LlavaNextVideoModel):
    pass


_PATCHED[LlavaNextVideoModel] = DyMULlavaNextVideoModel  # what `llava_next.apply_vlm` swaps the inner model to


# ---------------------------------------------------------------------------------------------
# The processor without torchvision, and the family adapter.


def video_frames_to_pixels(frames, image_processor) -> torch.Tensor:
    """(F, 3, S, S) pixels of a list of PIL frames as `LlavaNextVideoVideoProcessor` makes them: the shortest
    edge resized to S (bicubic), a centre crop of S x S, rescale, CLIP mean / std; S = the image crop size."""
    from transformers.image_utils import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        PILImageResampling,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    crop = image_processor.crop_size["height"]
    frame_processor = CLIPImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                            resample=PILImageResampling.BICUBIC, image_mean=OPENAI_CLIP_MEAN,
                                            image_std=OPENAI_CLIP_STD)
    return frame_processor(images=[f.convert("RGB") for f in frames], return_tensors="pt")["pixel_values"]


def frames_processor() -> type:
    """`LlavaNextVideoProcessor` whose videos are lists of PIL frames (transformers' video processors need
    torchvision)."""
    return frames_processor_class("LlavaNextVideoProcessor", video_frames_to_pixels)


def next_video_processor(image_processor, tokenizer, **kwargs):
    """The stock `LlavaNextVideoProcessor`; without torchvision the same processor with videos as lists of
    PIL frames (`video_frames_to_pixels`). ``kwargs``: the stock processor's (patch_size, ...)."""
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import LlavaNextVideoProcessor
        from transformers.models.llava_next_video.video_processing_llava_next_video import (
            LlavaNextVideoVideoProcessor,
        )

        crop = image_processor.crop_size["height"]
        video = LlavaNextVideoVideoProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
        return LlavaNextVideoProcessor(video_processor=video, image_processor=image_processor, tokenizer=tokenizer,
                                       **kwargs)
    return frames_processor()(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


class NextVideoFamily(AnyResFamily):
    """LLaVA-NeXT-Video: the AnyRes adapter (images as LLaVA-NeXT), video frames pooled before the LLM."""

    def apply(self, model, settings):
        pool = model.config.spatial_pool_mode
        if pool not in POOL_MODES:
            raise ValueError(f"{type(model).__name__} with spatial_pool_mode {pool!r} is not supported: DyMU carries "
                             f"the group map through {' or '.join(POOL_MODES)} pooling only")
        super().apply(model, settings)

    def load_processor(self, model_ref, config):
        return load_frames_processor(model_ref, frames_processor())

    def video_pixels(self, model, image_processor, frames):
        return video_frames_to_pixels(frames, image_processor)


register_vlm_family(NextVideoFamily("llava_next_video", "LLaVA-NeXT-Video", LlavaNextVideoForConditionalGeneration,
                                    ("llava_next_video",), video=None))
