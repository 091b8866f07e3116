"""The `dymu` command line. Each command is a `cmd_*` function; errors become one line and exit 1."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .token_order import DEFAULT_ORDER, ORDERS
from .tools.bench import SECTIONS
from .tools.console import loading  # noqa: F401  (commands import it from here too)
from .version import __version__


class Parser(argparse.ArgumentParser):
    """Every dymu parser: no abbreviations (``--out`` never silently means ``--out-dir``), and the
    subcommand parsers are of this class too (argparse gives subparsers their parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_common(p, top: bool = False) -> None:
    """--debug and --quiet, accepted before and after the subcommand. On a subcommand their default is
    SUPPRESS, so one given before it (``dymu --debug encode ...``) is not reset by the subcommand's parser."""
    default = False if top else argparse.SUPPRESS
    p.add_argument("--debug", action="store_true", default=default,
                   help="show full tracebacks (and Python's own warnings and logs) instead of one-line errors")
    p.add_argument("--quiet", action="store_true", default=default,
                   help="no progress bars or 'loading ...' lines on stderr (results, warnings and errors still print)")


def add_hidden_alias(p, name: str, dest: str, **kwargs) -> None:
    """An old spelling kept so that existing commands still run; not shown in --help or the docs."""
    p.add_argument(name, dest=dest, help=argparse.SUPPRESS, **kwargs)


IMAGES_HELP = ("any mix of image files, folders (searched recursively), globs ('photos/*.jpg', 'data/**/*.png') "
               "and JSON lists of {'image': path}; several after one --images, or repeat it")


def add_images(p, help_extra: str = "") -> None:
    """The one --images option of every command (resolved by `dymu.images.resolve_images`)."""
    p.add_argument("--images", nargs="+", action="extend", required=True, metavar="PATH",
                   help=IMAGES_HELP + help_extra)
    p.add_argument("--image-root", metavar="DIR", help="folder the JSON lists' paths are relative to (default: each JSON's folder)")


def _parse_r(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--r expects numbers separated by commas, not {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--r expects finite numbers >= 0 (merges per layer), not {text!r}")
    return values


def _whole(minimum: int):
    """An argparse type: a whole number >= minimum (0 never silently means "all")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value

    parse.__name__ = "whole number"
    return parse


positive_int, nonnegative_int = _whole(1), _whole(0)


def _frames(text: str) -> int:
    from .images import MAX_FRAMES

    value = positive_int(text)
    if value > MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"at most {MAX_FRAMES} frames per video, not {value}")
    return value


def _parse_max_tokens(text: str):
    if text.strip().lower() in ("none", "inf", "off"):
        return float("inf")  # switches off a thresholds file's default budget
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-tokens expects a whole number >= 1 (or 'none'), not {text!r}")
    return value


def _parse_min_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--min-tokens expects a whole number >= 0 (0: none), not {text!r}")
    return value


def _parse_focus_box(text: str):
    from .focus import parse_box  # numpy + PIL only: `dymu --help` stays fast

    try:
        return parse_box(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_budget_args(p) -> None:
    p.add_argument("--max-tokens", type=_parse_max_tokens, metavar="K",
                   help="token budget: at most K visual tokens per image at the feature layer (extra merges of "
                        "its best remaining edges in the last layers); 'none' switches off the thresholds file's")
    p.add_argument("--min-tokens", type=_parse_min_tokens, metavar="K",
                   help="an image stops merging before it drops under K tokens (0: none)")


def add_focus_args(p, masks_help: str, repeat_mask: bool = False) -> None:
    p.add_argument("--focus", action="append", type=_parse_focus_box, metavar="x0,y0,x1,y1",
                   help="focus box in pixels of the image (repeat for several: their union); outside it the image is "
                        "filled flat before the processor, so DToMe merges it into few tokens")
    p.add_argument("--focus-mask", metavar="PATH", help=masks_help, action="append" if repeat_mask else "store")
    p.add_argument("--fill", metavar="COLOUR", help="colour outside the focus region: white (default), black, mean (the image's "
                                  "mean colour), #rrggbb or a colour name")


def cmd_demo(args) -> int:
    from .tools.walkthrough import run_walkthrough

    if args.model and args.family:
        raise ValueError("give --family (a random-weight demo model) or --model (yours), not both")
    if args.model and args.save_model:
        raise ValueError("--save-model saves the random-weight demo model; --model is already saved")
    run_walkthrough(args.family or "llava", args.model, save_model=args.save_model, max_new_tokens=args.max_new_tokens)
    return 0


def _lazy(module: str, name: str):
    """A command handler imported only when its command runs (keeps `dymu --help` fast)."""

    def run(args) -> int:
        from importlib import import_module

        return getattr(import_module(module), name)(args)

    return run


def add_analyze(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="tokens kept vs image complexity, min/median/max grids and merge maps for folders of images",
        description="Run the DToMe encoder over folders of images and write OUT/tokens.csv, "
        "OUT/complexity_vs_tokens.png (JPEG quality-75 bytes per pixel vs tokens, Spearman rho), "
        "OUT/min_median_max.png and OUT/merge_maps/NAME.png. Needs matplotlib (dymu's viz extra: pip install 'matplotlib>=3.9').",
    )
    p.add_argument("--model", required=True, metavar="ID_OR_DIR", help="VLM (LLaVA or Qwen VL) or CLIP/SigLIP vision model: hub id or "
                                                  "local folder")
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
    p.set_defaults(func=_lazy("dymu.tools.analyze", "cmd_analyze"))


JSON_HELP = "write {what} as JSON to FILE (written atomically, checked before any work); '-' prints it to stdout"


def add_device_args(p, dtype_help: str = "default: bfloat16 on cuda, float32 on cpu") -> None:
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=dtype_help)


THRESHOLDS_HELP = ("thresholds: a JSON file from `dymu calibrate`, a folder holding thresholds.json, or a Hugging "
                   "Face Hub repo ORG/NAME[:FILE] (default FILE: thresholds.json)")


def _parse_thresholds(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--thresholds expects PRESET=FILE (PRESET: low, mid or high), not {text!r}")
    name, path = text.split("=", 1)
    return name, path


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
    p.add_argument("--thresholds", action="append", type=_parse_thresholds, metavar="PRESET=FILE",
                   help="use calibrated thresholds for an encoder preset (low, mid or high) instead of its "
                        "fixed r per layer; repeatable")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}; opt-in: "
                   "qwen_vit,qwen_prefill (Qwen2.5-VL-7B-shaped tower and prefill), qwen3_5 (Qwen3.5 tower and a "
                   "linear + full attention prefill), gemma3 (Gemma-3-4B-shaped tower and prefill), smolvlm "
                   "(SmolVLM2-2.2B-shaped tower and prefill), internvl (InternVL3-8B-shaped tower on a tile and its "
                   "thumbnail, 2 decoder layers)")
    p.add_argument("--runs", type=positive_int, metavar="N", help="timed runs per side (default 5, merge-off twice that; --quick 1)")
    add_common(p)
    p.set_defaults(func=_lazy("dymu.tools.bench.measure", "cmd_bench"))


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
    p.set_defaults(func=_lazy("dymu.tools.report", "cmd_report"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dymu",
        description="Dynamic Merging and Virtual Unmerging for Hugging Face vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="DyMU end to end on a small random-weight model of any family (or --model) with "
                                    "bundled images")
    p.add_argument("--family", choices=["llava", "onevision", "next", "next_video", "qwen2_vl",
                                        "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "smolvlm", "idefics3",
                                        "internvl"],
                   help="the random-weight demo model's shape (default llava): LLaVA-1.5, LLaVA-OneVision, LLaVA-NeXT, "
                        "LLaVA-NeXT-Video, a Qwen VL, Qwen3.5 (hybrid linear-attention decoder), Gemma 3, SmolVLM or Idefics3 "
                        "(image tiles, pixel shuffle), InternVL 3 (tiles, pixel shuffle)")
    p.add_argument("--model", metavar="ID_OR_DIR", help="a hub id or folder of any supported VLM instead of the demo model")
    p.add_argument("--save-model", metavar="DIR", help="also save the demo model (weights, config, tokenizer, "
                                                       "processor) to this folder, and its sample images to DIR/images")
    p.add_argument("--max-new-tokens", type=positive_int, default=12, metavar="N",
                   help="tokens to generate per answer (default: %(default)s)")
    add_common(p)
    p.set_defaults(func=cmd_demo)

    def model_args(p, thresholds_required):
        p.add_argument("--model", required=True, metavar="ID_OR_DIR",
                       help="LLaVA, LLaVA-NeXT, LLaVA-OneVision or Qwen2-VL / Qwen2.5-VL / Qwen3-VL: hub id or local folder")
        p.add_argument("--thresholds", required=thresholds_required, metavar="TH", help=THRESHOLDS_HELP)
        add_device_args(p)
        add_common(p)

    p = sub.add_parser("generate", help="answer a prompt about images (or a video) with a DyMU-patched VLM",
                       description="Answer --prompt about the --images (all in one prompt, in the order given).")
    model_args(p, thresholds_required=False)
    p.add_argument("--images", nargs="+", action="extend", metavar="PATH", help=IMAGES_HELP)
    add_hidden_alias(p, "--image", dest="images", nargs="+", action="extend")  # the one-image spelling
    p.add_argument("--image-root", metavar="DIR", help="folder the JSON lists' paths are relative to (default: each JSON's folder)")
    p.add_argument("--video", action="append", metavar="PATH", help="OneVision or a Qwen VL: a folder of frame images, or a video "
                                                    "file (needs PyAV, dymu's video extra: pip install 'av>=12,<16'); repeatable")
    p.add_argument("--frames", type=_frames, default=8, metavar="N",
                   help="frames taken evenly from each --video (default 8, at most 256; decoded at most 1024 px a side)")
    p.add_argument("--cross-frame", action="store_true",
                   help="Qwen VLs, videos: let units also merge with their twins in the neighbouring temporal patch "
                        "(blocks alternate across and within frames); default: within each temporal patch")
    p.add_argument("--prompt", required=True,
                   help="the question only: dymu wraps it in the model's chat template and puts one image "
                        "placeholder per image before it (e.g. 'What is in this image?'). A prompt that already "
                        "contains the image token is refused unless --raw-prompt is given")
    p.add_argument("--raw-prompt", action="store_true",
                   help="use --prompt exactly as written (no chat template): it must hold the processor's image "
                        "token (LLaVA-1.5: <image>) once per image, e.g. 'USER: <image>\nWhat is this? ASSISTANT:'")
    p.add_argument("--mode", default="dymu", choices=["full", "dymu", "dtome", "tome", "downsample"],
                   help="full (stock), dymu (DToMe + VTU, default), dtome (merged tokens fed directly), tome (fixed "
                        "--r + VTU) or downsample (smaller images); LLaVA-NeXT / OneVision: full, dymu or tome; "
                        "Qwen VLs: all but downsample")
    p.add_argument("--r", type=nonnegative_int, metavar="R", help="merges per image and layer for --mode tome")
    p.add_argument("--no-vtu", action="store_true", help="--mode tome without VTU (merged tokens fed directly)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help=JSON_HELP.format(what="the answer and the report (token counts, "
                                                                          "timings)"))
    add_budget_args(p)
    add_focus_args(p, "focus mask image (white = keep, same size as the image): once for every image or once "
                      "per --image, in order", repeat_mask=True)
    p.set_defaults(func=_lazy("dymu.tools.generate_command", "cmd_generate"))

    p = sub.add_parser("encode", help="write per-image token counts, sizes and group maps as JSON")
    model_args(p, thresholds_required=True)
    add_images(p)
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per encoder call (default: %(default)s); the counts do not depend on it")
    p.add_argument("--json", required=True, metavar="FILE",
                   help=JSON_HELP.format(what="per image: tokens kept, sizes, group map, tokens kept after every layer"))
    add_budget_args(p)
    p.set_defaults(func=_lazy("dymu.tools.encode_command", "cmd_encode"))

    p = sub.add_parser(
        "calibrate", help="find per-layer merge thresholds on a set of images (paper Eq. 4)",
        description="Find one merge threshold per encoder layer on a set of images (paper Eq. 4) and write them "
        "with the target and the visual tokens reached. The thresholds depend on the images and on the batch: "
        "the merge edges of a whole batch are ranked together, so use images like the ones the model will see "
        "(a few hundred; fewer than 16 warns) and batches of 8 or more (smaller warns). At most half of a "
        "layer's tokens can merge in that layer, so very low targets or back-loaded schedules may not be "
        "reached: the command says so, and which layers hit that cap.")
    p.add_argument("--model", required=True, metavar="ID_OR_DIR", help="VLM or CLIP/SigLIP vision model: hub id or local folder")
    add_images(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--preset", choices=["low", "mid", "high"],
                        help="keep 93/576, 208/576 or 392/576 of the patches (the paper's variants); default mid")
    target.add_argument("--target-tokens", type=float, metavar="N", help="average visual tokens to keep at the feature layer")
    target.add_argument("--r", type=_parse_r, metavar="R[,R2,...]",
                        help="merges per image and layer: one value (with --schedule: the average per layer, "
                             "spread by the schedule) or one value per layer that runs before the feature layer")
    p.add_argument("--schedule", choices=["constant", "linear", "reverse-linear"],
                   help="how the merges are spread over the layers: constant (default), linear (more early) or "
                        "reverse-linear (more late)")
    p.add_argument("--order", choices=ORDERS,
                   help="where tokens go after a merge, recorded in the file and used by apply: interleaved "
                        "(keep their order), ab (A survivors then B, the paper's calibration and CLIP layout), "
                        "ab-score (A survivors by score then B, the paper's SigLIP inference); "
                        f"default {DEFAULT_ORDER}")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per batch (default: %(default)s); the thresholds depend on it, use 8 or more")
    p.add_argument("--max-images", type=positive_int, metavar="N", help="calibrate on at most this many of the images")
    p.add_argument("--checkpoint-every", type=positive_int, default=5, metavar="N",
                   help="batches between progress checkpoints (default: %(default)s); the same command resumes")
    p.add_argument("--check-images", type=nonnegative_int, default=512, metavar="N",  # calibration.PER_IMAGE_CHECK
                   help="after calibrating, apply the thresholds per image, as inference does, to N of the images "
                        "(an even spread) and report what they keep (default: %(default)s; 0: skip that pass)")
    p.add_argument("--merge-point", choices=["vit", "post", "both"],
                   help="where to merge (default vit, the paper: in the vision tower). post: after the stock steps "
                        "that follow the tower (Qwen VLs: the PatchMerger; LLaVA-NeXT / OneVision: the AnyRes packing "
                        "and video pooling), saves LLM compute only; both (LLaVA-NeXT / OneVision): the tower, then "
                        "post rounds")
    p.add_argument("--rounds", type=positive_int, metavar="N",
                   help="--merge-point post / both: merge rounds (default 3 for Qwen VLs, 5 for LLaVA-NeXT / OneVision)")
    add_device_args(p)
    add_common(p)
    p.add_argument("--out", required=True, metavar="FILE", help="thresholds JSON file to write")
    p.add_argument("--max-tokens", type=_parse_max_tokens, metavar="K",
                   help="also report the fraction of calibration images a budget of K tokens would clip, and "
                        "record K as the file's default budget")
    p.set_defaults(func=_lazy("dymu.tools.calibrate_command", "cmd_calibrate"))

    p = sub.add_parser("thresholds", help="thresholds files")
    add_common(p)
    tsub = p.add_subparsers(dest="thresholds_command", metavar="ACTION", required=True)
    q = tsub.add_parser("import", help="convert the paper's threshold checkpoint to a dymu thresholds file")
    q.add_argument("file", metavar="CHECKPOINT", help="torch checkpoint from the paper's code")
    q.add_argument("--model", required=True, metavar="ID_OR_DIR", help="the encoder the thresholds are for (id or folder)")
    q.add_argument("--out", required=True, metavar="FILE", help="thresholds JSON file to write")
    add_common(q)
    q.set_defaults(func=_lazy("dymu.tools.calibrate_command", "cmd_thresholds_import"))

    add_analyze(sub)
    add_bench(sub)
    add_report(sub)
    add_env(sub)
    return parser


def add_env(subparsers) -> None:
    p = subparsers.add_parser(
        "env", help="versions, device and attention implementations; --check: a self-test of every family",
        description="Print dymu's, torch's, transformers', lmms-eval's and PyAV's versions (and whether each is "
                    "inside the range dymu supports), the device, dtype and attention implementations. --check "
                    "also runs a self-test on tiny random models of every supported family on this device and "
                    "dtype (merge off = stock for 8 generated tokens, batch invariance), one PASS/FAIL line each; "
                    "exit status 1 on any failure.")
    p.add_argument("--check", action="store_true", help="run the self-test (under a minute on a CPU)")
    add_device_args(p)
    p.add_argument("--attn-implementation", choices=["eager", "sdpa", "flash_attention_2", "flash_attention_3"],
                   help="the attention implementation the self-test's models use (default: transformers' choice)")
    add_common(p)
    p.set_defaults(func=cmd_env)


def cmd_env(args) -> int:
    from .tools import env

    for line in env.version_lines():
        print(line)
    for line in env.device_lines(args.device, args.dtype):
        print(line)
    if not args.check:
        return 0
    results = env.run_checks(args.device, args.dtype, args.attn_implementation)
    failed = [r.family for r in results if not r.ok]
    print(f"self-test: {len(results) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


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
