"""The `dymu bench` sections, one module each, and the registry the driver (`measure.run_bench`) runs
in order: section name (as --only takes it) -> `Section` (its runner, and whether it needs the CLIP tower).

A runner takes the `Context` and writes its result under its key of ``ctx.result`` (with its notes
and its seconds in ``ctx.result["section_s"]``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import OPT_IN, SECTIONS
from . import calibration, encoder, internvl, onevision, packed, prefill, smolvlm
from .context import Context


def _flops(ctx: Context) -> None:
    from ..flops import table1

    ctx.result["attention_flops"] = table1()


def _decode(ctx: Context) -> None:
    from ..decode import bench_decode

    with ctx.timed("decode"):
        ctx.result["decode"] = bench_decode(ctx.quick, ctx.device, ctx.dtype, ctx.sync, ctx.log, ctx.runs)
    ctx.notes.append("Decode: group maps assign each image's positions at random to the preset's number of groups "
                     "(decode cost depends on the counts only); the batch-8 cache is the batch-1 prefill's, repeated "
                     "with the Cache API. Peak memory on CPU is resident memory (VmHWM), so it is noisy at the MB scale.")


@dataclass(frozen=True)
class Section:
    run: Callable[[Context], None]
    needs_tower: bool = False  # the CLIP tower of the encoder sections


REGISTRY: dict[str, Section] = {
    "encoder": Section(encoder.run, needs_tower=True),
    "packed": Section(packed.run, needs_tower=True),
    "prefill": Section(prefill.run_prefill, needs_tower=True),
    "exact": Section(prefill.run_exact, needs_tower=True),
    "flops": Section(_flops),
    "calibration": Section(calibration.run_calibration, needs_tower=True),
    "merge_off": Section(calibration.run_merge_off, needs_tower=True),
    "onevision": Section(onevision.run),
    "decode": Section(_decode),
    "smolvlm": Section(smolvlm.run),
    "internvl": Section(internvl.run),
}
assert tuple(REGISTRY) == SECTIONS + OPT_IN, "bench/__init__.py's SECTIONS + OPT_IN name the registry's sections, in order"

__all__ = ["Context", "REGISTRY", "Section"]
