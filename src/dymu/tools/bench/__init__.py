"""`dymu bench`: measured speed next to the FLOP ideal.

measure.py runs the models (and holds `run_bench` and the command), timing.py times sides
interleaved, flops.py counts the ideal, report.py turns a result into markdown. This file stays
import-free so that the CLI can read the section names without loading torch.
"""

SECTIONS = ("encoder", "packed", "prefill", "exact", "flops", "calibration", "merge_off", "onevision", "decode")
OPT_IN = ("smolvlm", "internvl")  # sections run only when --only names them (minutes at real dimensions on a CPU)
# Opt-in sections that build their own models outside the driver's plan: result key -> (the --only names
# that run it, "module:function" of its runner (quick, device, runs, log) -> dict, and of its markdown).
STANDALONE = {
    "qwen": (("qwen_vit", "qwen_prefill"), "qwen:bench_qwen", "qwen:qwen_markdown"),
    "qwen3_5": (("qwen3_5",), "qwen:bench_qwen3_5", "qwen:qwen3_5_markdown"),
    "gemma3": (("gemma3",), "sections.gemma3:bench_gemma3", "sections.gemma3:gemma3_markdown"),
}
PRESET_NAMES = ("low", "mid", "high")
