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
    return load_frames_processor(model_ref, _frames_processor_class())


def load_frames_processor(model_ref: str, frames_class: type):
    """AutoProcessor where torchvision is installed, else ``frames_class`` (a frames-only processor of
    `frames_processor_class`) from the saved parts: tokenizer, image processor, the stock processor's own
    init arguments from processor_config.json, the chat template."""
    import inspect
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
    parts = ("self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs")
    accepted = [k for k in inspect.signature(frames_class.__mro__[1].__init__).parameters if k not in parts]
    kwargs = {k: saved[k] for k in accepted if k in saved}
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    image_processor = AutoImageProcessor.from_pretrained(model_ref)
    template = getattr(tokenizer, "chat_template", None) or saved.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    return frames_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **kwargs)


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


_FRAMES_CLASSES: dict[str, type] = {}


def frames_processor_class(stock_name: str, to_pixels) -> type:
    """The stock processor class ``stock_name`` (from transformers) whose videos are lists of PIL frames,
    each video turned into (F, 3, S, S) pixels by ``to_pixels(frames, image_processor)``; no video processor."""
    if stock_name not in _FRAMES_CLASSES:
        import inspect

        import transformers
        from transformers.processing_utils import ProcessorMixin

        stock = getattr(transformers, stock_name)

        class _WithoutVideoProcessor(ProcessorMixin):
            # Sits between the stock class and ProcessorMixin: the stock __init__ hands its parts on by
            # position, in its own order; drop the video processor (no parts but the image processor and
            # the tokenizer are checked and saved).
            def __init__(self, *parts, **kwargs):
                named = dict(zip(stock.get_attributes(), parts))
                named.pop("video_processor", None)
                ProcessorMixin.__init__(self, **named, **kwargs)

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            stock.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)
            self.video_processor = None  # videos are handled by _process_videos below

        # The stock signature without the video processor: ProcessorMixin reads its parts and the
        # arguments save_pretrained writes from it.
        signature = inspect.signature(stock.__init__)
        __init__.__signature__ = signature.replace(
            parameters=[p for name, p in signature.parameters.items() if name != "video_processor"])

        def _process_videos(self, videos, **kwargs):
            pixels = torch.stack([to_pixels(frames, self.image_processor) for frames in videos])
            processed = {"pixel_values_videos": pixels}
            return processed, [self.replace_video_token(processed, i) for i in range(len(videos))]

        # Named like the stock class so that a saved processor loads as the stock one where
        # torchvision is installed.
        _FRAMES_CLASSES[stock_name] = type(stock_name, (stock, _WithoutVideoProcessor), {
            "__init__": __init__, "_process_videos": _process_videos,
            "__doc__": f"{stock_name} whose videos are lists of PIL frames (no torchvision)."})
    return _FRAMES_CLASSES[stock_name]


def _frames_processor_class():
    return frames_processor_class("LlavaOnevisionProcessor",
                                  lambda frames, images: frames_to_pixels(frames, images.size["height"]))
