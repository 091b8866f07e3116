"""What VTU knows about each decoder-layer class it patches: one `DecoderFacts` record per stock class,
registered with one line per family (decoders/qwen_vl.py, qwen3.py, qwen3_5.py, gemma3.py). The VTU layer
(decoders/vtu_layer.py) and its checks (decoders/llama.py) read these facts instead of testing layer types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer


@dataclass(frozen=True)
class DecoderFacts:
    # What the stock attention forward passes to the attention function on top of the common arguments.
    # (Qwen2's per-layer sliding/full mask is already chosen by Qwen2Model and arrives as the layer's mask.)
    attention_kwargs: Callable
    # Per-head q_norm / k_norm (Qwen3): row-wise, so they run on the unique rows.
    head_norms: bool = False
    # q_proj makes a (query, gate) pair per head and the output is multiplied by sigmoid(gate) before
    # o_proj (Qwen3.5): the gate is row-wise and constant in a group, so it scales the averaged output.
    output_gate: bool = False
    # A norm after each sub-block's output before the residual add, and one before the MLP (Gemma 2 / 3:
    # post_attention_layernorm, pre_/post_feedforward_layernorm). Every norm is row-wise: on the unique rows.
    sandwich_norms: bool = False
    # Token mixers other than self-attention (`dymu.decoders.mixers.RowWiseMixer`, Qwen3.5's Gated DeltaNet).
    mixers: tuple = ()
    # Why kv_cache="compact" cannot serve the layer (None: it can).
    no_compact: str | None = None


DECODERS: dict[type, DecoderFacts] = {
    LlamaDecoderLayer: DecoderFacts(lambda attn: {}),
    MistralDecoderLayer: DecoderFacts(lambda attn: {"sliding_window": getattr(attn.config, "sliding_window", None)}),
    Qwen2DecoderLayer: DecoderFacts(lambda attn: {"sliding_window": attn.sliding_window}),
}
SUPPORTED_MODELS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


def register_decoder(stock: type, attention_kwargs, head_norms: bool = False, models: str | None = None, *,
                     output_gate: bool = False, mixers: tuple = (), compact: str | None = None,
                     sandwich_norms: bool = False) -> None:
    """Make VTU support another decoder-layer class, with its `DecoderFacts` (``compact``: why
    kv_cache="compact" cannot serve it); ``models``: the causal-LM class name the error messages list."""
    DECODERS[stock] = DecoderFacts(attention_kwargs, head_norms=head_norms, output_gate=output_gate,
                                   sandwich_norms=sandwich_norms, mixers=tuple(mixers), no_compact=compact)
    if models and models not in SUPPORTED_MODELS:
        SUPPORTED_MODELS.append(models)


def supported_decoders() -> tuple[str, ...]:
    return tuple(cls.__name__ for cls in DECODERS)
