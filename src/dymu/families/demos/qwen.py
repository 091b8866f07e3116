"""Small Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 models with RANDOM weights and a real processor, built offline.

Every code path is the real one: the stock `*ForConditionalGeneration` classes at small dimensions
(Qwen2.5-VL with windowed and full-attention ViT blocks, Qwen3-VL with deepstack mergers, Qwen3.5 with
a hybrid decoder: Gated DeltaNet linear-attention layers around one gated full-attention layer), a real
byte-level BPE tokenizer trained here with the Qwen vision special tokens, the stock Qwen2-VL image
processor (PIL backend) and the family's stock processor class. There is no video processor (it
needs torchvision): `dymu.families.qwen_vl.qwen_inputs` builds video tensors and placeholders the way the
stock video processor and processor do.
"""

from __future__ import annotations

import torch

from ..qwen_processors import processor_class

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEMO_FAMILIES = (*QWEN_FAMILIES, "qwen3_5")  # `dymu demo --family`; Qwen3.5 is its own dymu family
IMAGE_MAX_PIXELS = 224 * 224  # 16x16 patches of 14 px = 64 units (LLM tokens) per square image
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|image_pad|>", "<|video_pad|>"]
_CORPUS = [
    "user What is in this image? assistant The image shows a dog, a bicycle and a truck on a street.",
    "A white page with one red circle. An eagle flying over a field. A chessboard of black and white squares.",
    "Describe the picture in detail. Count the objects. Read the text. What happens in this video?",
    "Vision language models turn images into tokens; merging similar tokens makes them cheaper.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer():
    from .tokenizer import demo_tokenizer

    return demo_tokenizer(
        _CORPUS, _SPECIALS, 384, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def _text_dims(vocab: int, tokenizer) -> dict:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("pad_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("bos_token_id", "<|im_start|>"))}
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **ids)


def qwen_config(family: str, tokenizer):
    """The tiny config of a family; image/video/vision-start token ids taken from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3VLConfig

    special = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = _text_dims(len(tokenizer), tokenizer)
    # head_dim 16: mrope sections (t, h, w) of 2 + 3 + 3 = 8 frequencies
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if family == "qwen2_vl":
        vision = dict(depth=4, embed_dim=64, hidden_size=text["hidden_size"], num_heads=4, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=vision, **special)
    if family == "qwen2_5_vl":
        # window_size 56 px = 2x2 units per window: 16 windows per 224 px image; blocks 1 and 3 full attention
        vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=text["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1, 3], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=vision, **special)
    if family == "qwen3_vl":
        vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=text["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[1, 2])
        text = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
        return Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen3_5":
        vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=text["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        # Hybrid decoder: Gated DeltaNet layers around one gated full-attention layer (the released models
        # have one in four). Partial rotary as released (a quarter there, half here): head_dim 32 rotates
        # 16 dims = 8 frequencies = the (t, h, w) mrope sections.
        text = dict(text, num_hidden_layers=4, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
                    rope_parameters=dict(rope, mrope_interleaved=True, partial_rotary_factor=0.5))
        return Qwen3_5Config(text_config=text, vision_config=vision, **special)
    raise ValueError(f"unknown Qwen VL family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")


def build_qwen_processor(family: str, tokenizer=None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tokenizer or build_qwen_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": IMAGE_MAX_PIXELS})
    return processor_class(family)(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_qwen_demo_model(family: str = "qwen2_5_vl", seed: int = 0):
    """(model, processor): the family's stock ForConditionalGeneration at small dims, random weights."""
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
                              Qwen3_5ForConditionalGeneration, Qwen3VLForConditionalGeneration)

    tokenizer = build_qwen_tokenizer()
    config = qwen_config(family, tokenizer)
    cls = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_5": Qwen3_5ForConditionalGeneration}[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    # HF's random init is tiny (std 0.02): scale q/k up so that attention is not near-uniform and a
    # wrong position or group shows far above the test tolerances.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "attn.qkv.weight")):
                p.mul_(4.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, build_qwen_processor(family, tokenizer)
