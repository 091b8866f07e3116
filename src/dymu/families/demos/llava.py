"""The LLaVA demo models (`dymu demo`'s default, and LLaVA-NeXT, OneVision, NeXT-Video): small, with RANDOM
weights, built offline; tools/walkthrough.py runs the demo on them.

The LLaVA-1.5 model is LLaVA-1.5's architecture at small dimensions (CLIP ViT tower read at layer -2 without
the class token, 2-layer GELU projector, Llama decoder) with a real byte-level BPE tokenizer trained
here on a few sentences and the stock `LlavaProcessor`, so every code path is the real one. The
weights are random, so the answers are noise; token counts and timings are real.
"""

from __future__ import annotations

import torch

from .tokenizer import demo_tokenizer

_CORPUS = [
    "USER: What is in this image? ASSISTANT: The image shows a dog, a bicycle and a truck on a street.",
    "A white page with one red circle. An eagle flying over a field. A chessboard of black and white squares.",
    "Describe the picture in detail. Count the objects. Read the text. What colour is the sky?",
    "Vision language models turn images into tokens; merging similar tokens makes them cheaper.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'video' %}<video>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(video: bool = False):
    """A real byte-level BPE tokenizer (vocab 512) trained offline, with LLaVA's special tokens
    (and OneVision's ``<video>`` when ``video``)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"] + (["<video>"] if video else [])
    extra = {"image_token": "<image>", **({"video_token": "<video>"} if video else {})}
    return demo_tokenizer(_CORPUS, specials, 512, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>", extra_special_tokens=extra)


def build_demo_model(seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) at small dimensions with random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    image_size, patch = 224, 14  # a 16x16 grid: 256 visual tokens per image
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=128)
    text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model, processor


ANYRES_CROP, ANYRES_PATCH = 126, 14  # a 9x9 grid per crop: odd, like SigLIP's 27x27
# AnyRes pinpoints up to 3x3 crops. OneVision's anyres_max_9 becomes anyres_max_4 here, so that the
# tiny model's larger canvases (3x3 and 2x3 crops) take the bilinear downsampling path.
ANYRES_PINPOINTS = [[ANYRES_CROP * h, ANYRES_CROP * w] for h in (1, 2, 3) for w in (1, 2, 3)]
ONEVISION_ASPECT = "anyres_max_4"


NEXT_VIDEO_CROP = 112  # an 8x8 grid: the stock 2x2 video pooling (and its processor's "// 4") needs it even
DEMO_FAMILIES = ("llava", "onevision", "next", "next_video")


def build_demo_anyres_model(family: str, seed: int = 0):
    """(model, processor) shaped like LLaVA-OneVision (SigLIP read at -1 "full", Qwen2, anyres_max,
    video), LLaVA-NeXT (CLIP read at -2 "default", Llama) or LLaVA-NeXT-Video (NeXT's image path on
    112px crops, plus video frames average-pooled 2x2) at small dimensions, random weights.

    The processor is the stock `LlavaNextProcessor`, or for OneVision / NeXT-Video the stock one (without
    its video processor, videos as lists of PIL frames, when torchvision is missing:
    `dymu.families.onevision_processor`, `dymu.families.llava_next_video.next_video_processor`).
    """
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    if family not in DEMO_FAMILIES[1:]:
        raise ValueError(f"unknown demo family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")
    onevision, next_video = family == "onevision", family == "next_video"
    tokenizer = build_tokenizer(video=family != "next")
    crop = NEXT_VIDEO_CROP if next_video else ANYRES_CROP
    pinpoints = [[crop * h, crop * w] for h in (1, 2, 3) for w in (1, 2, 3)]
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  image_size=crop, patch_size=ANYRES_PATCH)
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    grid = (crop // ANYRES_PATCH) ** 2
    torch.manual_seed(seed)
    if onevision:
        from ..onevision_processor import onevision_processor

        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **vision), text_config=Qwen2Config(**text),
            image_token_index=image_token_id, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=ANYRES_PINPOINTS, vision_aspect_ratio=ONEVISION_ASPECT,
            vision_feature_layer=-1, vision_feature_select_strategy="full")
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        processor = onevision_processor(tokenizer, ANYRES_CROP, ANYRES_PINPOINTS, grid, ONEVISION_ASPECT,
                                        chat_template=CHAT_TEMPLATE)
    else:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        common = dict(vision_config=CLIPVisionConfig(projection_dim=64, **vision), text_config=LlamaConfig(**text),
                      image_token_index=image_token_id, image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=grid)
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop},
                                                     crop_size={"height": crop, "width": crop},
                                                     image_grid_pinpoints=pinpoints)
        kwargs = dict(image_processor=image_processor, tokenizer=tokenizer, patch_size=ANYRES_PATCH,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=CHAT_TEMPLATE)
        if next_video:
            from ..llava_next_video import next_video_processor

            config = LlavaNextVideoConfig(video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                          spatial_pool_mode="average", spatial_pool_stride=2,
                                          video_seq_length=grid // 4, **common)
            model = LlavaNextVideoForConditionalGeneration(config).eval()
            processor = next_video_processor(**kwargs)
        else:
            model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common)).eval()
            processor = LlavaNextProcessor(**kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor
