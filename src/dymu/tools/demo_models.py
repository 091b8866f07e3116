"""The tiny random demo models, one entry per `dymu demo --family` name: what `dymu demo` (one walkthrough for
every family, tools/walkthrough.py), `dymu env --check` and the family contract suite
(tests/families/test_contract.py) build. A new family adds one entry here (its builder: random weights, a
real processor, built offline) and nothing else in tools."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class DemoModel:
    family: str  # the VLM family registry name (dymu.families) of the model it builds
    builder: str  # "module:function" building (model, processor); lazy, so `dymu --help` stays fast
    shape: str  # what it is, for `dymu demo`'s first line: "LLaVA-1.5-shaped model (...)"
    args: tuple = ()  # the builder's arguments

    def build(self):
        """(model, processor): the family's tiny model with random weights (seeded)."""
        module, name = self.builder.split(":")
        return getattr(import_module(module), name)(*self.args)


_ANYRES = "dymu.families.demos.llava:build_demo_anyres_model"
_QWEN = "dymu.families.demos.qwen:build_qwen_demo_model"

DEMO_MODELS = {
    "llava": DemoModel("llava", "dymu.families.demos.llava:build_demo_model",
                       "LLaVA-1.5-shaped model (CLIP ViT 224px/14, Llama decoder)"),
    "onevision": DemoModel("llava_onevision", _ANYRES, "LLaVA-OneVision-shaped model (SigLIP, Qwen2 decoder, "
                           "AnyRes crops of 126px/14, anyres_max_4, video)", ("onevision",)),
    "next": DemoModel("llava_next", _ANYRES, "LLaVA-NeXT-shaped model (CLIP, Llama decoder, AnyRes crops of 126px/14)",
                      ("next",)),
    "next_video": DemoModel("llava_next_video", _ANYRES, "LLaVA-NeXT-Video-shaped model (CLIP, Llama decoder, AnyRes "
                            "crops of 112px/14, video frames pooled 2x2)", ("next_video",)),
    "qwen2_vl": DemoModel("qwen_vl", _QWEN, "Qwen2-VL-shaped model (ViT on 2x2 units, M-RoPE decoder)", ("qwen2_vl",)),
    "qwen2_5_vl": DemoModel("qwen_vl", _QWEN, "Qwen2.5-VL-shaped model (windowed ViT on 2x2 units, M-RoPE decoder)",
                            ("qwen2_5_vl",)),
    "qwen3_vl": DemoModel("qwen_vl", _QWEN, "Qwen3-VL-shaped model (ViT on 2x2 units with deepstack, M-RoPE decoder)",
                          ("qwen3_vl",)),
    "qwen3_5": DemoModel("qwen3_5", _QWEN, "Qwen3.5-shaped model (ViT on 2x2 units, hybrid Gated DeltaNet / "
                         "attention decoder)", ("qwen3_5",)),
    "gemma3": DemoModel("gemma3", "dymu.families.demos.gemma3:build_gemma3_demo_model",
                        "Gemma 3-shaped model (SigLIP 256px/8, 4x4 average pooling into each LLM token, Gemma 3 decoder with "
                        "sliding-window and global layers)"),
    "smolvlm": DemoModel("smolvlm", "dymu.families.demos.smolvlm:build_smolvlm_demo_model",
                         "SmolVLM-shaped model (SigLIP on 168px image tiles + a global view, pixel shuffle 3x3, Llama decoder)",
                         ("smolvlm",)),
    "idefics3": DemoModel("smolvlm", "dymu.families.demos.smolvlm:build_smolvlm_demo_model",
                          "Idefics3-shaped model (SigLIP on 168px image tiles + a global view, pixel shuffle 3x3, Llama decoder)",
                          ("idefics3",)),
    "internvl": DemoModel("internvl", "dymu.families.demos.internvl:build_internvl_demo_model",
                          "InternVL3-shaped model (InternViT on 168px tiles + a thumbnail, pixel shuffle 2x2, Qwen2 "
                          "decoder, video)"),
}
