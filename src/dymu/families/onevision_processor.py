"""The LLaVA-OneVision processor without torchvision: transformers' video processors need it, so where
it is missing, the stock processor takes videos as lists of PIL frames, preprocessed the stock video
processor's way (`frames_to_pixels`)."""

from __future__ import annotations

import torch


def onevision_processor(tokenizer, crop: int, pinpoints, num_image_tokens: int, aspect: str, chat_template=None):
    """The stock `LlavaOnevisionProcessor`; without torchvision (which transformers' video processors
    need) the same processor whose videos are lists of PIL frames turned into pixels by
    `frames_to_pixels` (the stock video processor's steps: resize to the crop, rescale, CLIP mean/std)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.utils.import_utils import is_torchvision_available

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints)
    kwargs = dict(num_image_tokens=num_image_tokens, vision_feature_select_strategy="full",
                  vision_aspect_ratio=aspect, chat_template=chat_template)
    if is_torchvision_available():
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        video = LlavaOnevisionVideoProcessor(size={"height": crop, "width": crop})
        return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                       **kwargs)
    return _frames_processor_class()(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def load_onevision_processor(model_ref: str):
    """AutoProcessor, or (no torchvision) the frames-only processor from the saved parts."""
    import json
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(model_ref)
    from huggingface_hub import hf_hub_download

    folder = Path(model_ref)
    path = folder / "processor_config.json" if folder.is_dir() else Path(hf_hub_download(model_ref, "processor_config.json"))
    saved = json.loads(path.read_text())
    kwargs = {k: saved[k] for k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
              if k in saved}
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    image_processor = AutoImageProcessor.from_pretrained(model_ref)
    template = getattr(tokenizer, "chat_template", None) or saved.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    return _frames_processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                     **kwargs)


def frames_to_pixels(frames, crop: int) -> torch.Tensor:
    """(F, 3, crop, crop) pixels of a list of PIL frames, as LlavaOnevisionVideoProcessor makes them."""
    from transformers.image_utils import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        PILImageResampling,
    )
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    frame_processor = SiglipImageProcessorPil(size={"height": crop, "width": crop}, resample=PILImageResampling.BICUBIC,
                                              image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    return frame_processor(images=[f.convert("RGB") for f in frames], return_tensors="pt")["pixel_values"]


_FRAMES_CLASS = None


def _frames_processor_class():
    global _FRAMES_CLASS
    if _FRAMES_CLASS is None:
        from transformers import LlavaOnevisionProcessor

        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, vision_aspect_ratio="anyres_max_9",
                     **kwargs):
            LlavaOnevisionProcessor.__init__(self, image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                                             vision_feature_select_strategy=vision_feature_select_strategy,
                                             chat_template=chat_template, vision_aspect_ratio=vision_aspect_ratio,
                                             **kwargs)
            self.video_processor = None  # videos are handled by _process_videos below

        def _process_videos(self, videos, **kwargs):
            crop = self.image_processor.size["height"]
            pixels = torch.stack([frames_to_pixels(frames, crop) for frames in videos])
            processed = {"pixel_values_videos": pixels}
            return processed, [self.replace_video_token(processed, i) for i in range(len(videos))]

        # Named like the stock class so that a saved processor loads as the stock one where
        # torchvision is installed.
        _FRAMES_CLASS = type("LlavaOnevisionProcessor", (LlavaOnevisionProcessor,),
                             {"__init__": __init__, "_process_videos": _process_videos,
                              "__doc__": "LlavaOnevisionProcessor whose videos are lists of PIL frames (no torchvision)."})
    return _FRAMES_CLASS
