"""The InternVL processor without torchvision: transformers' `InternVLVideoProcessor` needs it, so where it
is missing, the stock `InternVLProcessor` takes videos as lists of PIL frames, each frame made into one
tile the way the stock video processor does (resized to the tile, bicubic, rescaled, normalised)."""

from __future__ import annotations

from .onevision_processor import frames_processor_class, load_frames_processor


def frames_to_tiles(frames, image_processor):
    """(F, 3, S, S) pixels of a video's PIL frames: one tile per frame, by the image processor without its
    dynamic tiling (the stock video processor resizes each frame to the tile with the same resampling,
    mean and std as InternVL's image processor in the released configs)."""
    return image_processor(images=[f.convert("RGB") for f in frames], crop_to_patches=False,
                           return_tensors="pt")["pixel_values"]


def tile_images(processor, images: list):
    """The image processor's output for PIL ``images`` cut into tiles plus a thumbnail, as `InternVLProcessor`
    asks it (its images_kwargs default ``crop_to_patches=True``; the released image processors' own default is
    False): ``pixel_values`` (T, 3, S, S) and ``num_patches`` (tiles per image). ``processor``: the processor or
    its image processor."""
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor(images=images, crop_to_patches=True, return_tensors="pt")


def _frames_class():
    return frames_processor_class("InternVLProcessor", frames_to_tiles)


def internvl_processor(image_processor, tokenizer, image_seq_length: int, chat_template=None):
    """The stock `InternVLProcessor` with a video processor matching ``image_processor`` (tile size, mean,
    std); without torchvision, the same processor whose videos are lists of PIL frames (`frames_to_tiles`)."""
    from transformers.utils.import_utils import is_torchvision_available

    kwargs = dict(image_seq_length=image_seq_length, chat_template=chat_template)
    if is_torchvision_available():
        from transformers import InternVLProcessor
        from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

        video = InternVLVideoProcessor(size=dict(image_processor.size), image_mean=image_processor.image_mean,
                                       image_std=image_processor.image_std)
        return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, **kwargs)
    return _frames_class()(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def load_internvl_processor(model_ref: str):
    """AutoProcessor, or (no torchvision) the frames-only processor from the saved parts."""
    return load_frames_processor(model_ref, _frames_class())
