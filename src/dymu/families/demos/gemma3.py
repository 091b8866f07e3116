"""A small Gemma 3 (`Gemma3ForConditionalGeneration`) with RANDOM weights and a real `Gemma3Processor`,
built offline, and its `dymu demo --family gemma3` walkthrough.

Every code path is the real one at small dimensions: a SigLIP tower of 32x32 patches whose connector
average-pools 4x4 patches (the released models' pooling block) into each of 64 LLM tokens, and a Gemma 3
text decoder with one sliding-window layer (window 48, shorter than an image block) and one global layer, with
their own RoPE bases. The tokenizer is a byte-level BPE trained here with Gemma 3's chat and image
special tokens; the image processor is the stock PIL one.
"""

from __future__ import annotations

import torch

IMAGE_SIZE, PATCH, TOKENS = 256, 8, 64  # 32x32 patches, 8x8 LLM tokens of 4x4 patches
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
             "<end_of_image>", "<image_soft_token>"]
_CORPUS = [
    "user What is in this image? model The image shows a dog, a bicycle and a truck on a street.",
    "A white page with one red circle. An eagle flying over a field. A chessboard of black and white squares.",
    "Describe the picture in detail. Count the objects. Read the text. Compare the two pictures.",
    "Vision language models turn images into tokens; merging similar tokens makes them cheaper.",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3_tokenizer():
    from .tokenizer import demo_tokenizer

    return demo_tokenizer(
        _CORPUS, _SPECIALS, 384, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
        chat_template=CHAT_TEMPLATE)


def build_gemma3_processor(tokenizer=None):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = tokenizer or build_gemma3_tokenizer()
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                           image_seq_length=TOKENS)


def gemma3_config(tokenizer, vision_layers: int = 4):
    from transformers import Gemma3Config

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("pad_token_id", "<pad>"), ("eos_token_id", "<eos>"), ("bos_token_id", "<bos>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=48, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=4096, **ids)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
                        boi_token_id=tokenizer.convert_tokens_to_ids("<start_of_image>"),
                        eoi_token_id=tokenizer.convert_tokens_to_ids("<end_of_image>"))


def build_gemma3_demo_model(seed: int = 0):
    """(model, processor): a Gemma3ForConditionalGeneration at small dims, random weights."""
    from transformers import Gemma3ForConditionalGeneration

    tokenizer = build_gemma3_tokenizer()
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(gemma3_config(tokenizer)).eval()
    with torch.no_grad():
        # HF's random init is tiny (std 0.02): scale q/k up so that attention is not near-uniform and a
        # wrong position or group shows far above the test tolerances; the projection starts at zero.
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    return model, build_gemma3_processor(tokenizer)
