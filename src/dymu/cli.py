"""The `dymu` command line. Each command is a `cmd_*` function; errors become one line and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .token_order import DEFAULT_ORDER, ORDERS
from .tools.bench import SECTIONS
from .version import __version__


def _parse_r(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--r expects numbers separated by commas, not {text!r}") from None


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
    p.add_argument("--fill", help="colour outside the focus region: white (default), black, mean (the image's "
                                  "mean colour), #rrggbb or a colour name")


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1) join the process group: gloo on CPU, nccl on GPU."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.distributed.get_rank()
    return 0


def cmd_calibrate(args) -> int:
    rank = _init_distributed()
    import torch

    try:
        code = _calibrate(args, rank)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # leave together: an early exit can abort a peer mid-teardown
        return code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _calibrate(args, rank: int) -> int:
    from .tools.calibration import calibrate
    from .images import find_images, print_skipped
    from .loading import load_vision_model, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    images = find_images(args.images, args.image_root)
    if not images:
        raise ValueError(f"{args.images}: no images found")
    model, processor = load_vision_model(args.model, device, dtype)
    out = Path(args.out)
    thresholds = calibrate(
        model,
        images,
        preset=args.preset,
        target_tokens=args.target_tokens,
        r=args.r,
        schedule=args.schedule,
        batch_size=args.batch_size,
        max_images=args.max_images,
        processor=processor,
        checkpoint=out.with_name(out.name + ".partial"),
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
        model_ref=args.model,
        order=args.order,
    )
    if args.max_tokens is not None and rank == 0:
        from .tools.calibration import clip_fraction

        limit = None if args.max_tokens == float("inf") else args.max_tokens
        thresholds.max_tokens = limit
        if limit is not None:
            over, total = clip_fraction(model, thresholds, images[: args.max_images] if args.max_images else images,
                                        limit, processor=processor, batch_size=args.batch_size)
            print(f"max_tokens={limit} would clip {over} of {total} calibration images ({100 * over / max(total, 1):.1f}%)"
                  " (they keep more tokens with these thresholds alone); recorded as the file's default budget")
    if rank == 0:
        thresholds.save(out)
        kept = thresholds.tokens_kept_mean[-1] if thresholds.tokens_kept_mean else float("nan")
        print(f"calibrated on {thresholds.images_seen} images: {kept:.1f} visual tokens kept on average "
              f"at layer {thresholds.feature_layer} of {thresholds.encoder['patches_per_image']}; wrote {out}")
        print_skipped(thresholds.skipped)
    return 0


def cmd_thresholds_import(args) -> int:
    from .api import vision_tower_of, default_feature_layer
    from .loading import load_vision_model, resolve_device_dtype
    from .thresholds import Thresholds, encoder_identity, read_paper_thresholds

    values = read_paper_thresholds(args.file)
    model, _ = load_vision_model(args.model, *resolve_device_dtype("cpu", "float32"))
    tower, family = vision_tower_of(model)
    layers = len(tower.encoder.layers)
    if len(values) != layers:
        raise ValueError(f"{args.file} has thresholds for {len(values)} layers but {args.model} has {layers}.")
    thresholds = Thresholds(
        thresholds=values,
        encoder=encoder_identity(tower, family, args.model),
        feature_layer=default_feature_layer(model, family)[0],
        schedule=f"imported from {Path(args.file).name}",
        # The layout the paper's code uses at inference: class token => A survivors by slot (its
        # CLIP path), none => A survivors by score (its batch-1 SigLIP path). README, "Fidelity".
        order="ab" if family.has_class_token else "ab-score",
    )
    thresholds.save(args.out)
    print(f"imported {layers} thresholds from {args.file}; wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .tools.demo import run_demo

    run_demo(args.model, save_model=args.save_model, max_new_tokens=args.max_new_tokens)
    return 0


def _load_patched_vlm(args):
    """The LLaVA model of --model, patched for --mode with --thresholds / --r."""
    from .api import apply
    from .vlms.generation import load_vlm
    from .thresholds import Thresholds

    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    if args.mode in ("dymu", "dtome", "downsample") and thresholds is None:
        raise ValueError(f"mode {args.mode!r} needs --thresholds FILE (make one with `dymu calibrate`)")
    if args.mode == "tome" and args.r is None:
        raise ValueError("mode 'tome' needs --r (merges per layer)")
    model, processor = load_vlm(args.model, args.device, args.dtype)
    apply(model, thresholds, r=args.r, mode=args.mode, tome_vtu=not getattr(args, "no_vtu", False),
          max_tokens=args.max_tokens, min_tokens=args.min_tokens)
    return model, processor


def _generate_focus(args, count: int):
    """Per image: --focus boxes (each image), or --focus-mask (one for all images, or one per --image)."""
    if args.focus and args.focus_mask:
        raise ValueError("give --focus boxes or --focus-mask, not both")
    if args.focus:
        return [list(args.focus)] * count
    if not args.focus_mask:
        return None
    from .images import open_image

    masks = [open_image(m) for m in args.focus_mask]
    if len(masks) not in (1, count):
        raise ValueError(f"--focus-mask is given {len(masks)} times for {count} images: give one, or one per --image")
    return masks * count if len(masks) == 1 else masks


def cmd_generate(args) -> int:
    from .vlms.generation import generate
    from .images import open_image

    images = [open_image(p) for p in args.image]  # fail fast, naming the file, before loading a model
    focus = _generate_focus(args, len(images))
    if focus is not None:  # check boxes and mask sizes before loading a model
        from .focus import apply_focus_all

        apply_focus_all(images, focus, args.fill or "white")
    model, processor = _load_patched_vlm(args)
    result = generate(model, processor, [args.prompt], [images], max_new_tokens=args.max_new_tokens,
                      focus=None if focus is None else [focus], fill=args.fill)
    rep = result.report
    if args.json:
        print(json.dumps({"answer": result.answers[0], "images": args.image, **rep.to_json()}, indent=1))
        return 0
    print(result.answers[0])
    tokens = ", ".join(f"{n}/{rep.full_tokens}" for n in rep.visual_tokens[0])
    if rep.visual_tokens_without_budget_or_focus is not None:
        tokens += " (without budget/focus: " + ", ".join(map(str, rep.visual_tokens_without_budget_or_focus[0])) + ")"
    print(f"[mode {rep.mode}] visual tokens per image: {tokens}; encoder {rep.encoder_s * 1e3:.1f} ms, "
          f"prefill {rep.prefill_s * 1e3:.1f} ms, decode {rep.decode_s * 1e3:.1f} ms ({rep.new_tokens} tokens)",
          file=sys.stderr)
    return 0


def cmd_encode(args) -> int:
    import torch

    from .api import apply, encode, vision_tower_of
    from .images import find_images, open_images, print_skipped
    from .loading import load_vision_model, resolve_device_dtype
    from .thresholds import Thresholds

    paths = []
    for item in args.images:
        paths += find_images(item) if Path(item).is_dir() or item.endswith(".json") else [Path(item)]
    thresholds = Thresholds.load(args.thresholds)
    model, processor = load_vision_model(args.model, *resolve_device_dtype(args.device, args.dtype))
    apply(model, thresholds, max_tokens=args.max_tokens, min_tokens=args.min_tokens)  # DToMe only: no LLM
    tower, family = vision_tower_of(model)
    processor = processor or family.default_processor(tower.config)
    records, skipped = [], []
    for start in range(0, len(paths), args.batch_size):
        opened, bad = open_images(paths[start : start + args.batch_size])
        skipped += bad
        if not opened:
            continue
        batch, images = zip(*opened)
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            encoded = encode(model, pixels.to(next(model.parameters()).device, next(model.parameters()).dtype))
        for p, i in zip(batch, range(len(encoded))):
            one = encoded.image(i)
            records.append({"path": str(p), "tokens": len(one["tokens"]), "full_tokens": encoded.group_of_patch.shape[1],
                            "sizes": one["sizes"].tolist(), "group_of_patch": one["group_of_patch"].tolist()})
    Path(args.json).write_text(json.dumps({"model": args.model, "thresholds": args.thresholds, "images": records,
                                           "skipped": skipped}) + "\n")
    for r in records:
        print(f"{r['tokens']:5d}/{r['full_tokens']}  {r['path']}")
    print_skipped(skipped, file=sys.stderr)
    if not records:
        raise ValueError("no readable images")
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
        "OUT/min_median_max.png and OUT/merge_maps/NAME.png. Needs matplotlib: pip install 'dymu[viz]'.",
    )
    p.add_argument("--model", required=True, help="VLM or CLIP/SigLIP vision model: hub id or local folder")
    p.add_argument("--thresholds", required=True, help="thresholds JSON from `dymu calibrate`")
    p.add_argument("--images", required=True, action="append",
                   help="folder (searched recursively) or JSON list of {'image': path}; repeat for several "
                        "folders, each gets its own colour")
    p.add_argument("--image-root", help="folder the JSON lists' paths are relative to (default: each JSON's folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-images", type=int, help="at most this many images per folder")
    p.add_argument("--merge-maps", type=int, metavar="N", help="merge maps for at most N images per folder "
                                                               "(default: all; 0: none)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_budget_args(p)
    add_focus_args(p, "focus mask (white = keep) for every image, or a folder of masks named like the images; "
                      "merge maps then show the image with the region outlined, and the map without and with it")
    p.set_defaults(func=_lazy("dymu.tools.analyze", "cmd_analyze"))


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
        "merge-off overhead. Markdown to stdout, everything to --json. The full run takes under 10 minutes on a "
        "2-core CPU; --quick (tiny sizes, 1 run) well under a minute.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 run: a smoke test")
    p.add_argument("--json", metavar="OUT", help="write every measurement to this JSON file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--thresholds", action="append", type=_parse_thresholds, metavar="PRESET=FILE",
                   help="use calibrated thresholds for an encoder preset (low, mid or high) instead of its "
                        "fixed r per layer; repeatable")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--runs", type=int, help="timed runs per side (default 5, merge-off twice that; --quick 1)")
    p.set_defaults(func=_lazy("dymu.tools.bench.measure", "cmd_bench"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dymu",
        description="Dynamic Merging and Virtual Unmerging for Hugging Face vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="DyMU end to end on a small random-weight LLaVA (or --model) with bundled images")
    p.add_argument("--model", help="a LLaVA hub id or folder instead of the random-weight demo model")
    p.add_argument("--save-model", help="also save the demo model (weights, config, tokenizer, processor) here")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(func=cmd_demo)

    def model_args(p, thresholds_required):
        p.add_argument("--model", required=True, help="LLaVA hub id or local folder")
        p.add_argument("--thresholds", required=thresholds_required, help="thresholds JSON from `dymu calibrate`")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("generate", help="answer a prompt about images with a DyMU-patched LLaVA")
    model_args(p, thresholds_required=False)
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="dymu", choices=["full", "dymu", "dtome", "tome", "downsample"])
    p.add_argument("--r", type=int, help="merges per layer for --mode tome")
    p.add_argument("--no-vtu", action="store_true", help="--mode tome without VTU (merged tokens fed directly)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the answer and the report as JSON")
    add_budget_args(p)
    add_focus_args(p, "focus mask image (white = keep, same size as the image): once for every image or once "
                      "per --image, in order", repeat_mask=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("encode", help="write per-image token counts, sizes and group maps as JSON")
    model_args(p, thresholds_required=True)
    p.add_argument("--images", nargs="+", required=True, help="folders, JSON lists or image files")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", required=True, help="output JSON file")
    add_budget_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("calibrate", help="find per-layer merge thresholds on a set of images (paper Eq. 4)")
    p.add_argument("--model", required=True, help="VLM or CLIP/SigLIP vision model: hub id or local folder")
    p.add_argument("--images", required=True, help="folder (searched recursively) or JSON list of {'image': path}")
    p.add_argument("--image-root", help="folder the JSON list's paths are relative to (default: the JSON's folder)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--preset", choices=["low", "mid", "high"],
                        help="keep 93/576, 208/576 or 392/576 of the patches (the paper's variants); default mid")
    target.add_argument("--target-tokens", type=float, help="average visual tokens to keep at the feature layer")
    target.add_argument("--r", type=_parse_r, help="merges per image and layer: one value or one per layer")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "reverse-linear"])
    p.add_argument("--order", default=DEFAULT_ORDER, choices=ORDERS,
                   help="where tokens go after a merge, recorded in the file and used by apply: interleaved "
                        "(keep their order), ab (A survivors then B, the paper's calibration and CLIP layout), "
                        f"ab-score (A survivors by score then B, the paper's SigLIP inference); default {DEFAULT_ORDER}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int)
    p.add_argument("--checkpoint-every", type=int, default=5, help="batches between progress checkpoints")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="thresholds JSON file to write")
    p.add_argument("--max-tokens", type=_parse_max_tokens, metavar="K",
                   help="also report the fraction of calibration images a budget of K tokens would clip, and "
                        "record K as the file's default budget")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("thresholds", help="thresholds files")
    tsub = p.add_subparsers(dest="thresholds_command", metavar="ACTION", required=True)
    q = tsub.add_parser("import", help="convert the paper's threshold checkpoint to a dymu thresholds file")
    q.add_argument("file", help="torch checkpoint from the paper's code")
    q.add_argument("--model", required=True, help="the encoder the thresholds are for (id or folder)")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_thresholds_import)

    add_analyze(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if not args.debug:  # our own progress bar and one-line errors only
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dymu: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"dymu {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
