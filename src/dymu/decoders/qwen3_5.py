"""VTU for the hybrid text decoder of Qwen3.5: Gated DeltaNet linear-attention layers and gated
full-attention layers (``config.layer_types``), both in the one `Qwen3_5DecoderLayer` class.

- Full attention: the shared VTU layer (decoders/vtu_layer.py) with two per-family facts: per-head q/k
  RMSNorms (as Qwen3-VL), and an output gate (q_proj makes a (query, gate) pair per head; the output
  is multiplied by sigmoid(gate) before o_proj). Partial rotary (a fraction of each head rotated) is
  the family's own apply_rotary_pos_emb, which the shared layer calls.
- Gated DeltaNet: a `RowWiseMixer` (decoders/mixers.py). in_proj_qkv / in_proj_z / in_proj_b /
  in_proj_a run on the unique rows; the causal short convolution, the delta-rule recurrence (stock
  kernels or the stock torch fallback) and the gated RMSNorm of its output (which depends on each
  position's recurrence output) run at full length in the stock forward; out_proj runs on the group
  means. The recurrent and convolution states the prefill leaves in the cache are the stock ones for
  that input, and decode steps are stock.

What VTU saves here: every projection and the MLP of all layers, and the attention layers' q/k/v/o.
What it cannot save: the linear-attention layers' convolution and recurrence still run over every
position (the state after a position depends on all positions before it), nor their memory, which is
a fixed-size state per layer anyway.

kv_cache="compact" is refused: the full-attention layers rotate only part of each head (the compact
cache rotates whole heads), and the linear-attention layers' state is already one fixed-size state
per layer, which has nothing to compact.
"""

from __future__ import annotations

from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5GatedDeltaNet

from .registry import register_decoder
from .mixers import RowWiseMixer

GATED_DELTANET = RowWiseMixer("linear_attn", (Qwen3_5GatedDeltaNet,),
                              row_wise=("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"), averaged="out_proj")
NO_COMPACT = ("its attention layers rotate part of each head (partial rotary), which the compact cache does not, "
              "and its linear-attention layers keep one fixed-size state each")

register_decoder(Qwen3_5DecoderLayer, lambda attn: {}, head_norms=True, output_gate=True,
                 models="Qwen3_5ForConditionalGeneration", mixers=(GATED_DELTANET,), compact=NO_COMPACT)
