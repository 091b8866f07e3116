"""VTU for the text decoders of Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

In transformers 5.x the M-RoPE recomposition (the mrope sections, Qwen3-VL's interleaving) happens
inside the text model's rotary module: every decoder layer receives per-position (B, N, head_dim)
cos/sin tables in the rotate-half convention. So the shared VTU layer (decoders/vtu_layer.py) carries
over unchanged: every copy of a unique row is rotated by the cos/sin of its own 3-D (t, h, w)
position. Two per-family facts remain, registered here:
- Qwen2-VL / Qwen2.5-VL pass `sliding_window` to the attention function (as Qwen2 does);
- Qwen3-VL normalises every head of q and k (q_norm / k_norm, row-wise) before the rotary.
Qwen3-VL's deepstack inputs (added at the visual positions after the first decoder layers) must be
constant within each group: families/qwen_vl.py merges them with the same groups, and the debug check
`DYMU_CHECK_GROUP_ROWS=1` (decoders/vtu_layer.py) catches a violation.
"""

from __future__ import annotations

from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

from .registry import register_decoder

register_decoder(Qwen2VLDecoderLayer, lambda attn: {"sliding_window": attn.sliding_window},
                 models="Qwen2VLForConditionalGeneration")
register_decoder(Qwen2_5_VLDecoderLayer, lambda attn: {"sliding_window": attn.sliding_window},
                 models="Qwen2_5_VLForConditionalGeneration")
register_decoder(Qwen3VLTextDecoderLayer, lambda attn: {}, head_norms=True,
                 models="Qwen3VLForConditionalGeneration")
