"""`dymu bench`: measured speed next to the FLOP ideal.

measure.py runs the models (and holds `run_bench` and the command), timing.py times sides
interleaved, flops.py counts the ideal, report.py turns a result into markdown. This file stays
import-free so that the CLI can read the section names without loading torch.
"""

SECTIONS = ("encoder", "packed", "prefill", "exact", "flops", "calibration", "merge_off", "onevision", "decode")
OPT_IN = ("smolvlm", "internvl")  # sections run only when --only names them (minutes at real dimensions on a CPU)
PRESET_NAMES = ("low", "mid", "high")
