"""A small InternVL 3 / 3.5 model with RANDOM weights and a real processor, built offline.

Every code path is the real one: the stock `InternVLForConditionalGeneration` at small dimensions
(an InternViT tower with a class token and layer scale, read at ``vision_feature_layer`` -1 without the
class token; the pixel-shuffle connector that fuses 2x2 patches into one LLM token; a Qwen2 decoder as
InternVL 3, or Qwen3 as InternVL 3.5), a real byte-level BPE tokenizer trained here with InternVL's
``<img>``, ``<IMG_CONTEXT>``, ``</img>`` and ``<video>`` tokens, the stock GotOcr2 image processor (PIL
backend: dynamic tiles plus a thumbnail) and the stock `InternVLProcessor` (without its video processor,
which needs torchvision: videos are lists of PIL frames, `dymu.families.internvl.internvl_processor`).
"""

from __future__ import annotations

import torch

TILE, PATCH = 168, 14  # a 12x12 patch grid per tile: 6x6 = 36 units (LLM tokens) after the pixel shuffle
MAX_TILES = 4  # tiles per image (plus a thumbnail when there are several)
TEXT_MODELS = ("qwen2", "qwen3")  # InternVL 3 (Qwen2.5 decoder: model_type qwen2), InternVL 3.5 (Qwen3)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
_CORPUS = [
    "user What is in this image? assistant The image shows a dog, a bicycle and a truck on a street.",
    "A white page with one red circle. An eagle flying over a field. A chessboard of black and white squares.",
    "Describe the picture in detail. Count the objects. Read the text. What happens in this video? Frame1: Frame2:",
    "Vision language models turn images into tokens; merging similar tokens makes them cheaper.",
]
# InternVL's chat template: one <IMG_CONTEXT> per image and <video> per video, which the processor expands
# to <img> + image_seq_length context tokens per tile + </img> ("Frame1: <img>...</img>" per frame).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'video' %}<video>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_internvl_tokenizer():
    """A real byte-level BPE tokenizer (vocab 384) with InternVL's image and video tokens."""
    from .tokenizer import demo_tokenizer

    return demo_tokenizer(
        _CORPUS, _SPECIALS, 384, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def internvl_config(tokenizer, text_model: str = "qwen2"):
    """The tiny InternVL config (tile 168 px, patch 14, pixel shuffle 0.5) over a Qwen2 or Qwen3 decoder."""
    from transformers import InternVLConfig

    if text_model not in TEXT_MODELS:
        raise ValueError(f"unknown InternVL text model {text_model!r}; choose one of {', '.join(TEXT_MODELS)}")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("pad_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("bos_token_id", "<|im_start|>"))}
    text = dict(model_type=text_model, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                **ids, **({"head_dim": 16} if text_model == "qwen3" else {}))
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  image_size=TILE, patch_size=PATCH, use_mean_pooling=True, norm_type="layer_norm")
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                          image_seq_length=(TILE // PATCH) ** 2 // 4, downsample_ratio=0.5,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")


def build_internvl_processor(tokenizer=None):
    """The stock InternVL processor (GotOcr2 PIL image processor: up to MAX_TILES tiles plus a thumbnail)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..internvl_processor import internvl_processor

    tokenizer = tokenizer or build_internvl_tokenizer()
    image_processor = GotOcr2ImageProcessorPil(
        # crop_to_patches False as released: InternVLProcessor asks for the tiles (its images_kwargs default)
        size={"height": TILE, "width": TILE}, crop_to_patches=False, min_patches=1, max_patches=MAX_TILES,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # InternVL's (ImageNet) mean / std
    return internvl_processor(image_processor, tokenizer, image_seq_length=(TILE // PATCH) ** 2 // 4,
                              chat_template=CHAT_TEMPLATE)


def build_internvl_demo_model(text_model: str = "qwen2", seed: int = 0):
    """(InternVLForConditionalGeneration, InternVLProcessor) at small dimensions with random weights."""
    from transformers import InternVLForConditionalGeneration

    tokenizer = build_internvl_tokenizer()
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(internvl_config(tokenizer, text_model)).eval()
    # HF's random init is tiny (std 0.02, layer scale 0.1, zero class token and position table): scale q/k
    # up and draw the layer scales, class token and positions, so that attention is not near-uniform and
    # a wrong position, group or tile shows far above the test tolerances.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith(("lambda_1", "lambda_2")):
                p.uniform_(0.5, 1.0)
            elif name.endswith(("cls_token", "position_embeddings")):
                p.normal_(0.0, 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, build_internvl_processor(tokenizer)
