"""The `dymu` command line: one parser per command and the dispatch. Each command's body is a `cmd_*`
function in `dymu.tools.*_command` (or its tool's package), imported only when the command runs, so that
`dymu --help` loads no torch; errors become one line and exit 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_options import (
    IMAGES_HELP,  # noqa: F401  (tests and callers read the shared --images help from here)
    JSON_HELP,
    REFUSED,
    THRESHOLDS_HELP,
    VLM_HELP,
    VLM_OR_TOWER_HELP,
    WHAT_FAMILIES_OFFER,
    Parser,
    add_budget_args,
    add_common,
    add_device_args,
    add_focus_args,
    add_hidden_alias,
    add_image_root,
    add_images,
    lazy,
    nonnegative_int,
    parse_frames,
    parse_max_tokens,
    parse_preset_thresholds,
    parse_r,
    positive_int,
)
from .settings import MERGE_POINTS, MODES
from .token_order import DEFAULT_ORDER, ORDERS
from .tools.bench import SECTIONS
from .tools.demo_models import DEMO_MODELS
from .version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dymu",
        description="Dynamic Merging and Virtual Unmerging for Hugging Face vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_demo, add_generate, add_encode, add_calibrate, add_thresholds, add_analyze, add_bench, add_report,
                add_env):
        add(sub)
    return parser


def add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="DyMU end to end on a small random-weight model of any family (or --model) "
                                           "with bundled images")
    p.add_argument("--family", choices=list(DEMO_MODELS),
                   help="which random-weight demo model to build (default llava): one per supported model shape, "
                        "built offline; the demo's first line says what it is")
    p.add_argument("--model", metavar="ID_OR_DIR", help="a hub id or folder of any supported VLM instead of the demo model")
    p.add_argument("--save-model", metavar="DIR", help="also save the demo model (weights, config, tokenizer, "
                                                       "processor) to this folder, and its sample images to DIR/images")
    p.add_argument("--max-new-tokens", type=positive_int, default=12, metavar="N",
                   help="tokens to generate per answer (default: %(default)s)")
    add_common(p)
    p.set_defaults(func=lazy("dymu.tools.demo_command", "cmd_demo"))


def add_model_args(p, thresholds_required: bool, model_help: str = VLM_HELP) -> None:
    p.add_argument("--model", required=True, metavar="ID_OR_DIR", help=model_help)
    p.add_argument("--thresholds", required=thresholds_required, metavar="TH", help=THRESHOLDS_HELP)
    add_device_args(p)
    add_common(p)


def add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer a prompt about images (or a video) with a DyMU-patched VLM",
                              description="Answer --prompt about the --images (all in one prompt, in the order given). "
                                          "A mode or option the model's family does not offer is refused with the "
                                          f"family's reason ({WHAT_FAMILIES_OFFER}).")
    add_model_args(p, thresholds_required=False)
    p.add_argument("--images", nargs="+", action="extend", metavar="PATH", help=IMAGES_HELP)
    add_hidden_alias(p, "--image", dest="images", nargs="+", action="extend")  # the one-image spelling
    add_image_root(p)
    p.add_argument("--video", action="append", metavar="PATH",
                   help="a video file (needs PyAV, dymu's video extra: pip install 'av>=12,<16') or a folder of frame "
                        f"images; repeatable; {REFUSED}")
    p.add_argument("--frames", type=parse_frames, default=8, metavar="N",
                   help="frames taken evenly from each --video (default 8, at most 256; decoded at most 1024 px a side)")
    p.add_argument("--cross-frame", action="store_true",
                   help="videos: let tokens also merge with their twins in the neighbouring frame (or temporal patch, "
                        "where the tower groups frames), blocks alternating across and within frames; default: within "
                        f"each frame; {REFUSED}")
    p.add_argument("--prompt", required=True,
                   help="the question only: dymu wraps it in the model's chat template and puts one image "
                        "placeholder per image before it (e.g. 'What is in this image?'). A prompt that already "
                        "contains the image token is refused unless --raw-prompt is given")
    p.add_argument("--raw-prompt", action="store_true",
                   help="use --prompt exactly as written (no chat template): it must hold the processor's image "
                        "token once per image, e.g. 'USER: <image>\nWhat is this? ASSISTANT:' for LLaVA-1.5; "
                        f"{REFUSED}")
    p.add_argument("--mode", default="dymu", choices=MODES,
                   help="full (stock), dymu (DToMe + VTU, default), dtome (merged tokens fed directly), tome (fixed "
                        "--r + VTU) or downsample (smaller images); a family that does not offer a mode refuses it, "
                        "with its reason")
    p.add_argument("--r", type=nonnegative_int, metavar="R", help="merges per image and layer for --mode tome")
    p.add_argument("--no-vtu", action="store_true", help="--mode tome without VTU (merged tokens fed directly)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help=JSON_HELP.format(what="the answer and the report (token counts, "
                                                                          "timings)"))
    add_budget_args(p)
    add_focus_args(p, "focus mask image (white = keep, same size as the image): once for every image or once "
                      "per --image, in order", repeat_mask=True)
    p.set_defaults(func=lazy("dymu.tools.generate_command", "cmd_generate"))


def add_encode(subparsers) -> None:
    p = subparsers.add_parser("encode", help="write per-image token counts, sizes and group maps as JSON")
    add_model_args(p, thresholds_required=True, model_help=VLM_OR_TOWER_HELP)
    add_images(p)
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per encoder call (default: %(default)s); the counts do not depend on it")
    p.add_argument("--json", required=True, metavar="FILE",
                   help=JSON_HELP.format(what="per image: tokens kept, sizes, group map, tokens kept after every layer"))
    add_budget_args(p)
    p.set_defaults(func=lazy("dymu.tools.encode_command", "cmd_encode"))


def add_calibrate(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="find per-layer merge thresholds on a set of images (paper Eq. 4)",
        description="Find one merge threshold per encoder layer on a set of images (paper Eq. 4) and write them "
        "with the target and the visual tokens reached. The thresholds depend on the images and on the batch: "
        "the merge edges of a whole batch are ranked together, so use images like the ones the model will see "
        "(a few hundred; fewer than 16 warns) and batches of 8 or more (smaller warns). At most half of a "
        "layer's tokens can merge in that layer, so very low targets or back-loaded schedules may not be "
        "reached: the command says so, and which layers hit that cap. An option the model's family does not "
        f"offer is refused with the family's reason ({WHAT_FAMILIES_OFFER}).")
    p.add_argument("--model", required=True, metavar="ID_OR_DIR", help=VLM_OR_TOWER_HELP)
    add_images(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--preset", choices=["low", "mid", "high"],
                        help="keep 93/576, 208/576 or 392/576 of the patches (the paper's variants); default mid")
    target.add_argument("--target-tokens", type=float, metavar="N", help="average visual tokens to keep at the feature layer")
    target.add_argument("--r", type=parse_r, metavar="R[,R2,...]",
                        help="merges per image and layer: one value (with --schedule: the average per layer, "
                             "spread by the schedule) or one value per layer that runs before the feature layer")
    p.add_argument("--schedule", choices=["constant", "linear", "reverse-linear"],
                   help="how the merges are spread over the layers: constant (default), linear (more early) or "
                        "reverse-linear (more late)")
    p.add_argument("--order", choices=ORDERS,
                   help="where tokens go after a merge, recorded in the file and used by apply: interleaved "
                        "(keep their order), ab (A survivors then B, the paper's calibration and CLIP layout), "
                        "ab-score (A survivors by score then B, the paper's SigLIP inference); "
                        f"default {DEFAULT_ORDER}; {REFUSED}")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per batch (default: %(default)s); the thresholds depend on it, use 8 or more")
    p.add_argument("--max-images", type=positive_int, metavar="N", help="calibrate on at most this many of the images")
    p.add_argument("--checkpoint-every", type=positive_int, default=5, metavar="N",
                   help="batches between progress checkpoints (default: %(default)s); the same command resumes")
    p.add_argument("--check-images", type=nonnegative_int, default=512, metavar="N",  # calibration.PER_IMAGE_CHECK
                   help="after calibrating, apply the thresholds per image, as inference does, to N of the images "
                        "(an even spread) and report what they keep (default: %(default)s; 0: skip that pass)")
    p.add_argument("--merge-point", choices=MERGE_POINTS,
                   help="where to merge (default vit, the paper: in the vision tower). post: after the stock steps "
                        "that follow the tower (the family's own, e.g. a patch merger, AnyRes packing or video "
                        "pooling), saves LLM compute only; both: the tower, then post rounds; a family that does "
                        "not offer a merge point refuses it, with its reason")
    p.add_argument("--rounds", type=positive_int, metavar="N",
                   help="--merge-point post / both: merge rounds (default: the family's default)")
    add_device_args(p)
    add_common(p)
    p.add_argument("--out", required=True, metavar="FILE", help="thresholds JSON file to write")
    p.add_argument("--max-tokens", type=parse_max_tokens, metavar="K",
                   help="also report the fraction of calibration images a budget of K tokens would clip, and "
                        "record K as the file's default budget")
    p.set_defaults(func=lazy("dymu.tools.calibrate_command", "cmd_calibrate"))


def add_thresholds(subparsers) -> None:
    p = subparsers.add_parser("thresholds", help="thresholds files")
    add_common(p)
    tsub = p.add_subparsers(dest="thresholds_command", metavar="ACTION", required=True)
    q = tsub.add_parser("import", help="convert the paper's threshold checkpoint to a dymu thresholds file")
    q.add_argument("file", metavar="CHECKPOINT", help="torch checkpoint from the paper's code")
    q.add_argument("--model", required=True, metavar="ID_OR_DIR", help="the encoder the thresholds are for (id or folder)")
    q.add_argument("--out", required=True, metavar="FILE", help="thresholds JSON file to write")
    add_common(q)
    q.set_defaults(func=lazy("dymu.tools.calibrate_command", "cmd_thresholds_import"))


def add_analyze(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="tokens kept vs image complexity, min/median/max grids and merge maps for folders of images",
        description="Run the DToMe encoder over folders of images and write OUT/tokens.csv, "
        "OUT/complexity_vs_tokens.png (JPEG quality-75 bytes per pixel vs tokens, Spearman rho), "
        "OUT/min_median_max.png and OUT/merge_maps/NAME.png. Needs matplotlib (dymu's viz extra: pip install 'matplotlib>=3.9').",
    )
    p.add_argument("--model", required=True, metavar="ID_OR_DIR", help=VLM_OR_TOWER_HELP)
    p.add_argument("--thresholds", required=True, metavar="TH", help=THRESHOLDS_HELP)
    add_images(p, "; each one (folder, glob, list or file) is a group with its own colour")
    p.add_argument("--out-dir", dest="out", metavar="DIR",
                   help="folder to write tokens.csv, the plots and merge_maps/ into (created if missing); required")
    add_hidden_alias(p, "--out", dest="out")  # the spelling before --out-dir
    p.set_defaults(required_options=[("out", "--out-dir")], command_parser=p)
    p.add_argument("--max-images", type=positive_int, metavar="N", help="at most this many images per group")
    p.add_argument("--merge-maps", type=nonnegative_int, metavar="N", help="merge maps for at most N images per folder "
                                                               "(default: all; 0: none)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per encoder call (default: %(default)s); the counts do not depend on it")
    add_device_args(p)
    add_common(p)
    add_budget_args(p)
    add_focus_args(p, "focus mask (white = keep) for every image, or a folder of masks named like the images; "
                      "merge maps then show the image with the region outlined, and the map without and with it")
    p.set_defaults(func=lazy("dymu.tools.analyze", "cmd_analyze"))


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measured speed vs the FLOP ideal: encoder (DToMe), prefill (VTU), attention FLOPs, calibration",
        description="Benchmark DToMe and VTU on real model dimensions with random weights (speed does not "
        "depend on the weights): CLIP ViT-L/14-336 encoder full vs DToMe low/mid/high, Vicuna-7B-shaped decoder "
        "prefill full vs VTU, the paper's Table 1 attention FLOPs counted honestly, calibration throughput, "
        "merge-off overhead, and a LLaVA-OneVision-shaped prefill (Qwen2-7B layers over one AnyRes image). Markdown "
        "to stdout, everything to --json. The full run takes under 10 minutes on a 2-core CPU without the onevision "
        "section, which adds several minutes (a 7B-layer prefill over ~3,000 positions); --quick (tiny sizes, 1 run) "
        "well under a minute.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: tiny sizes, 1 run; says which sections ran and prints no figures")
    p.add_argument("--json", metavar="FILE", help=JSON_HELP.format(what="every measurement, raw times included"))
    add_device_args(p, dtype_help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--thresholds", action="append", type=parse_preset_thresholds, metavar="PRESET=FILE",
                   help="use calibrated thresholds for an encoder preset (low, mid or high) instead of its "
                        "fixed r per layer; repeatable")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}; opt-in: "
                   "qwen_vit,qwen_prefill (Qwen2.5-VL-7B-shaped tower and prefill), qwen3_5 (Qwen3.5 tower and a "
                   "linear + full attention prefill), gemma3 (Gemma-3-4B-shaped tower and prefill), smolvlm "
                   "(SmolVLM2-2.2B-shaped tower and prefill), internvl (InternVL3-8B-shaped tower on a tile and its "
                   "thumbnail, 2 decoder layers)")
    p.add_argument("--runs", type=positive_int, metavar="N", help="timed runs per side (default 5, merge-off twice that; --quick 1)")
    add_common(p)
    p.set_defaults(func=lazy("dymu.tools.bench.measure", "cmd_bench"))


def add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="lmms-eval result folders -> a markdown table of score and visual tokens per mode",
        description="Read every *_results.json under the given folders (python -m lmms_eval --model dymu "
        "--output_path ...) and print one markdown row per dymu configuration (mode + thresholds file or r): "
        "each task's score and the mean visual tokens per image the LLM saw.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="lmms-eval output folders or *_results.json files")
    p.add_argument("--metric", action="append", metavar="TASK=METRIC",
                   help="the metric to show for TASK (default: its first); repeatable")
    p.add_argument("--out", metavar="FILE", help="also write the table to this markdown file")
    add_common(p)
    p.set_defaults(func=lazy("dymu.tools.report", "cmd_report"))


def add_env(subparsers) -> None:
    p = subparsers.add_parser(
        "env", help="versions, device and attention implementations; --families: what each family offers; "
                    "--check: a self-test of every family",
        description="Print dymu's, torch's, transformers', lmms-eval's and PyAV's versions (and whether each is "
                    "inside the range dymu supports), the device, dtype and attention implementations. --families "
                    "also prints every supported family's modes and options (yes, or no with the family's reason). "
                    "--check also runs a self-test on tiny random models of every supported family on this device "
                    "and dtype (merge off = stock for 8 generated tokens, batch invariance), one PASS/FAIL line "
                    "each; exit status 1 on any failure.")
    p.add_argument("--families", action="store_true",
                   help="print the families matrix: each family's modes and options, with the reason for each it "
                        "refuses (the README's table)")
    p.add_argument("--check", action="store_true", help="run the self-test (under a minute on a CPU)")
    add_device_args(p)
    p.add_argument("--attn-implementation", choices=["eager", "sdpa", "flash_attention_2", "flash_attention_3"],
                   help="the attention implementation the self-test's models use (default: transformers' choice)")
    add_common(p)
    p.set_defaults(func=lazy("dymu.tools.env_command", "cmd_env"))


# ---------------------------------------------------------------------------------------------
# Dispatch


def main(argv: list[str] | None = None) -> int:
    args = None
    try:  # Ctrl-C at any moment (parsing, imports, work) ends with one line, never a traceback
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        for dest, option in getattr(args, "required_options", ()):  # required, but with a hidden old spelling
            if getattr(args, dest, None) is None:
                args.command_parser.error(f"the following arguments are required: {option}")
        from .tools import console

        console.QUIET = args.quiet
        if not args.debug:  # our own progress bar and one-line errors only
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        with console.one_line_warnings(command_name(args), raw=args.debug):
            return args.func(args)
    except KeyboardInterrupt:
        if args is not None and getattr(args, "debug", False):
            raise
        checkpoint = getattr(args, "checkpoint_path", None)
        resume = (f"; progress is saved in {checkpoint}: the same command resumes"
                  if checkpoint is not None and Path(checkpoint).exists() else "")
        print(f"dymu{' ' + args.command if getattr(args, 'command', None) else ''}: interrupted{resume}",
              file=sys.stderr)
        return 130
    except Exception as err:  # one clear line unless --debug
        if args is None or args.debug:
            raise
        print(f"dymu {command_name(args)}: error: {one_line(err)}", file=sys.stderr)
        return 1


def command_name(args) -> str:
    """The command as typed: `calibrate`, `thresholds import`."""
    return " ".join(filter(None, [getattr(args, "command", None), getattr(args, "thresholds_command", None)]))


def one_line(err: BaseException) -> str:
    """The first line of an error's message, or its type when it has none (e.g. MemoryError())."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines[0].endswith(":") and len(lines) > 1:  # "...from one of:" + a list: keep the list on the line
        return " ".join(lines)[:400]
    return lines[0]


if __name__ == "__main__":
    sys.exit(main())
