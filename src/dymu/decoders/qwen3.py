"""VTU for the Qwen3 text decoder (InternVL 3.5's language model): the shared VTU layer (decoders/vtu_layer.py)
with Qwen3's per-head q/k RMSNorms (row-wise, so they run on the unique rows) and its per-layer
``sliding_window``, which the stock attention passes to the attention function as Qwen2 does."""

from __future__ import annotations

from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from .registry import register_decoder

register_decoder(Qwen3DecoderLayer, lambda attn: {"sliding_window": attn.sliding_window}, head_norms=True,
                 models="Qwen3ForCausalLM")
