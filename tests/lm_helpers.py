"""Tiny random Llama / Mistral / Qwen2 causal LMs, saved and reloaded with from_pretrained (no hub)."""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

FAMILIES = ("llama", "mistral", "qwen2")
VOCAB = 128

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_config(family: str):
    """Llama with MHA; Mistral with GQA and a sliding window shorter than the test prompts; Qwen2
    with GQA, q/k/v bias and one full + two sliding-window layers (layer_types)."""
    if family == "llama":
        return LlamaConfig(**_COMMON, num_key_value_heads=4)
    if family == "mistral":
        return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=12)
    if family == "qwen2":
        return Qwen2Config(**_COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=12,
                           max_window_layers=1)
    raise ValueError(family)


def save_tiny(family: str, directory, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    # Random init of HF is small; scale weights up a little so attention is not near-uniform and a
    # wrong RoPE angle or group would show well above the tolerances.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory)


def load_tiny(directory, attn: str = "eager"):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def average_within_groups(group_map):
    """Forward hook for a stock attention module: replace its output by the mean over each group.

    This is paper Eq. 11 applied to the stock full-length attention (o_proj is linear, so averaging
    after o_proj equals averaging before it), written as a plain loop independent of dymu.vtu: the
    slow reference every VTU test compares against (Llama-family decoders and the Qwen VLs).
    """

    def hook(module, args, output):
        full = output[0] if isinstance(output, tuple) else output  # attention: (out, weights); other mixers: out
        out = full.clone()
        for b in range(group_map.shape[0]):
            for gid in group_map[b].unique():
                members = group_map[b] == gid
                out[b, members] = full[b, members].mean(0)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


@contextlib.contextmanager
def mixers_averaged_within_groups(layers, group_map):
    """The slow reference inside the block: every decoder layer's token mixer (attention, or a hybrid
    decoder's linear attention) runs at full length and its output is averaged over each group of
    ``group_map`` (`average_within_groups`)."""
    handles = [(getattr(layer, "self_attn", None) or layer.linear_attn).register_forward_hook(
               average_within_groups(group_map)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
