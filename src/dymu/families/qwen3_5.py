"""DyMU in Qwen3.5 (`Qwen3_5ForConditionalGeneration`): the Qwen VL adapter (families/qwen_vl.py) on a
Qwen3-VL-style vision tower and a hybrid text decoder.

Vision: `Qwen3_5VisionModel` is Qwen3-VL's tower without the deepstack mergers (patch embedding, a
learned position table resampled to the grid, 2-D rotary, blocks, a 2x2 PatchMerger), so the unit-level
DToMe of towers/qwen_vit.py runs on it unchanged (merge_point "vit" or "post", budgets, cross_frame,
calibration "units"). Prompt side: the stock Qwen3-VL processor (loaded without torchvision as for the
Qwen VLs), M-RoPE positions per video temporal patch as Qwen3-VL (the kept tokens of ``dtome`` at their
representative units, families/qwen_positions.py).

Text: most layers are Gated DeltaNet linear attention, the rest gated full attention
(``config.text_config.layer_types``); VTU covers both (decoders/qwen3_5.py). Row-wise work runs on the
unique rows; the attention runs at full length with every copy at its own M-RoPE position, and the
DeltaNet's short convolution and delta-rule recurrence run over the full-length sequence; each mixer's
output is averaged over its group (Eq. 11). What VTU saves: every projection and MLP row of a merged
group's copies, in every layer. What it cannot: the recurrence still steps through every position (its
state after a position depends on all positions before it), so the linear-attention layers' sequence
work is that of the stock prompt length.

KV cache: ``kv_cache="full"`` (the default for this family): the stock hybrid `DynamicCache` (keys and
values at full length in the attention layers, one convolution and one recurrent state per
linear-attention layer), exactly as the stock model leaves it after a prefill whose mixer outputs are
group-averaged; decode steps are stock. ``"compact"`` is refused: the attention layers rotate only part
of each head, which the compact cache's rotation does not do, and the linear-attention layers' state is
one fixed-size state per layer, with nothing to compact.
"""

from __future__ import annotations

from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
)

from ..decoders.qwen3_5 import NO_COMPACT
from ..patching import PatchedClasses
from .base import register_vlm_family
from .qwen_vl import DyMUQwenVLModel, QwenVLFamily


class DyMUQwen3_5Model(DyMUQwenVLModel):
    """Mixed in before the stock Qwen3_5Model of one instance."""

    _dymu_split_temporal = True  # Qwen3.5's get_rope_index positions a video per temporal patch


_swapped_class = PatchedClasses(__name__, "DyMU", DyMUQwen3_5Model, lambda: [Qwen3_5Model])


def __getattr__(name: str):  # pickle finds the swapped model class here (dymu/patching.py)
    return _swapped_class.resolve(name)


class Qwen3_5Family(QwenVLFamily):
    name, title = "qwen3_5", "Qwen3.5"
    model_types = ("qwen3_5",)
    kv_caches = {"full": None, "compact": NO_COMPACT}
    swapped = _swapped_class

    def model_classes(self):
        return (Qwen3_5ForConditionalGeneration,)


register_vlm_family(Qwen3_5Family())
