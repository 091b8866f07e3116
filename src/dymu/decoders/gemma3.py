"""VTU for the Gemma 3 text decoder (`Gemma3DecoderLayer`, the language model of
`Gemma3ForConditionalGeneration`).

The shared VTU layer (decoders/vtu_layer.py) with three declared facts of this family:
- *sandwich norms*: the attention output is normalised (``post_attention_layernorm``) before its
  residual add, and the MLP sits between ``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm``; all of them are row-wise, so they run on the unique rows;
- per-head q/k RMSNorms (``q_norm`` / ``k_norm``), row-wise, before the rotary;
- the attention function gets the layer's ``sliding_window`` (None on the global layers), as stock.
Interleaved sliding-window and global layers take their own stock mask and their own RoPE table
(different bases) from the text model, per layer type, and the bidirectional mask over the tokens of
one image (token_type_ids) is the stock one: VTU runs attention at full length with every copy of a
merged token at its own position, under that mask.

kv_cache="compact" is refused (`NO_COMPACT`): the compact cache re-rotates cached keys with the text
model's one rotary table, while Gemma 3 rotates its sliding-window and global layers with tables of
different bases.
"""

from __future__ import annotations

from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

from .registry import register_decoder

NO_COMPACT = ("its sliding-window and global layers rotate with RoPE tables of different bases, and the compact "
              "cache re-rotates cached keys with one table")

register_decoder(Gemma3DecoderLayer, lambda attn: {"sliding_window": attn.sliding_window}, head_norms=True,
                 models="Gemma3ForConditionalGeneration", compact=NO_COMPACT, sandwich_norms=True)
