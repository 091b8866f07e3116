"""The tiny random demo models, one entry per `dymu demo --family` name: what `dymu demo`, `dymu env
--check` and the family contract suite (tests/families/test_contract.py) build. A new family adds one
entry here (its builder: random weights, a real processor, built offline) and nothing else in tools."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable


@dataclass(frozen=True)
class DemoModel:
    family: str  # the VLM family registry name (dymu.families) of the model it builds
    builder: str  # "module:function" building (model, processor); lazy, so `dymu --help` stays fast
    args: tuple = ()  # the builder's arguments
    walkthrough: str = "dymu.tools.demo:run_demo"  # what `dymu demo --family NAME` runs

    def build(self):
        """(model, processor): the family's tiny model with random weights (seeded)."""
        return _resolve(self.builder)(*self.args)

    def run(self) -> Callable:
        return _resolve(self.walkthrough)


def _resolve(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(import_module(module), name)


_UNITS = "dymu.tools.demo_qwen:run_qwen_demo"  # the walkthrough of towers that merge units (merge points, video)

DEMO_MODELS = {
    "llava": DemoModel("llava", "dymu.tools.demo:build_demo_model"),
    "onevision": DemoModel("llava_onevision", "dymu.tools.demo:build_demo_anyres_model", ("onevision",)),
    "next": DemoModel("llava_next", "dymu.tools.demo:build_demo_anyres_model", ("next",)),
    "next_video": DemoModel("llava_next_video", "dymu.tools.demo:build_demo_anyres_model", ("next_video",)),
    "qwen2_vl": DemoModel("qwen_vl", "dymu.tools.demo_qwen:build_qwen_demo_model", ("qwen2_vl",), _UNITS),
    "qwen2_5_vl": DemoModel("qwen_vl", "dymu.tools.demo_qwen:build_qwen_demo_model", ("qwen2_5_vl",), _UNITS),
    "qwen3_vl": DemoModel("qwen_vl", "dymu.tools.demo_qwen:build_qwen_demo_model", ("qwen3_vl",), _UNITS),
    "qwen3_5": DemoModel("qwen3_5", "dymu.tools.demo_qwen:build_qwen_demo_model", ("qwen3_5",), _UNITS),
    "gemma3": DemoModel("gemma3", "dymu.tools.demo_gemma3:build_gemma3_demo_model", (),
                        "dymu.tools.demo_gemma3:run_gemma3_demo"),
}
