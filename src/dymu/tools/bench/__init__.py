"""`dymu bench`: measured speed next to the FLOP ideal.

measure.py runs the models (and holds `run_bench` and the command), timing.py times sides
interleaved, flops.py counts the ideal, report.py turns a result into markdown. This file stays
import-free so that the CLI can read the section names without loading torch.
"""

SECTIONS = ("encoder", "packed", "prefill", "exact", "flops", "calibration", "merge_off", "onevision", "decode",
            "internvl")
OPT_IN = ("internvl",)  # run only when --only names them (InternVL3-8B dimensions: minutes on a CPU)
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in OPT_IN)
PRESET_NAMES = ("low", "mid", "high")
