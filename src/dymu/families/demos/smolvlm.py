"""Small SmolVLM / Idefics3 models with RANDOM weights and a real processor, built offline.

Every code path is the real one: the stock `SmolVLMForConditionalGeneration` /
`Idefics3ForConditionalGeneration` at small dimensions (a SigLIP-style tower on 168 px tiles of
14 px patches, 12x12 patches per tile; a pixel-shuffle connector with scale factor 3, as
SmolVLM2-2.2B, so 3x3 patches make one LLM token and a tile 16; a Llama decoder), a real byte-level
BPE tokenizer trained here with the Idefics3 / SmolVLM special tokens (``<image>``,
``<fake_token_around_image>``, ``<global-img>``, the tile markers ``<row_i_col_j>``), the stock PIL
image processor (an image is resized to at most 336 px, cut into up to 2x2 tiles of 168 px, plus a
global view of 168 px) and the stock processor class (for images only where torchvision or num2words
is missing, `dymu.families.smolvlm_processor`).
"""

from __future__ import annotations

import torch

from ..smolvlm_processor import processor_class

DEMO_FAMILIES = ("smolvlm", "idefics3")
TILE, PATCH, SCALE = 168, 14, 3  # 12x12 patches per tile, 3x3 patches per LLM token: 16 LLM tokens per tile
LONGEST_EDGE = 2 * TILE  # up to 2x2 tiles and the global view
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
             "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
_CORPUS = [
    "User: What is in this image? Assistant: The image shows a dog, a bicycle and a truck on a street.",
    "A white page with one red circle. An eagle flying over a field. A chessboard of black and white squares.",
    "Describe the picture in detail. Count the objects. Read the text. Compare the two pictures.",
    "Vision language models turn images into tokens; merging similar tokens makes them cheaper.",
]
# SmolVLM's chat template (images only): "User:<image>question<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_smolvlm_tokenizer():
    """A real byte-level BPE tokenizer (vocab 448) trained offline, with the SmolVLM / Idefics3 special tokens."""
    from .tokenizer import demo_tokenizer

    return demo_tokenizer(
        _CORPUS, _SPECIALS, 448, unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})


def smolvlm_config(family: str, tokenizer):
    """The tiny config of ``family`` ("smolvlm" or "idefics3"); special token ids from ``tokenizer``."""
    from transformers import Idefics3Config, SmolVLMConfig

    if family not in DEMO_FAMILIES:
        raise ValueError(f"unknown SmolVLM demo family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  image_size=TILE, patch_size=PATCH)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("pad_token_id", "<|endoftext|>"), ("eos_token_id", "<end_of_utterance>"), ("bos_token_id", "<|im_start|>"))}
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                **ids)
    cls = SmolVLMConfig if family == "smolvlm" else Idefics3Config
    return cls(vision_config=vision, text_config=text, scale_factor=SCALE,
               image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=ids["pad_token_id"])


def build_smolvlm_processor(family: str, tokenizer=None):
    """The stock processor of ``family`` on the stock PIL image processor (tiles of 168 px, up to 2x2)."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tokenizer = tokenizer or build_smolvlm_tokenizer()
    image_class = SmolVLMImageProcessorPil if family == "smolvlm" else Idefics3ImageProcessorPil
    image_processor = image_class(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE})
    return processor_class(family)(image_processor=image_processor, tokenizer=tokenizer,
                                   image_seq_len=(TILE // PATCH // SCALE) ** 2, chat_template=CHAT_TEMPLATE)


def build_smolvlm_demo_model(family: str = "smolvlm", seed: int = 0):
    """(model, processor): the family's stock ForConditionalGeneration at small dims, random weights."""
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    tokenizer = build_smolvlm_tokenizer()
    config = smolvlm_config(family, tokenizer)
    torch.manual_seed(seed)
    cls = SmolVLMForConditionalGeneration if family == "smolvlm" else Idefics3ForConditionalGeneration
    model = cls(config).eval()
    # HF's random init is tiny (std 0.02): scale q/k up so that attention is not near-uniform and a
    # wrong position or group shows far above the test tolerances.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    return model, build_smolvlm_processor(family, tokenizer)
