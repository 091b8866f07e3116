"""The `dymu` command line. Each command is a `cmd_*` function; errors become one line and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .tools.bench import SECTIONS
from .version import __version__


def _parse_r(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--r expects numbers separated by commas, not {text!r}") from None


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
    from .vlms.qwen_vl import SUPPORTED_QWEN_VLMS

    if isinstance(model, SUPPORTED_QWEN_VLMS):  # units per image vary: fractions, no checkpoint/torchrun
        if args.target_tokens is not None:
            raise ValueError("--target-tokens does not apply to Qwen VLs (images keep their native size): "
                             "use --preset or --r (fractions of each image's units)")
        thresholds = calibrate(model, images, preset=args.preset, r=args.r, schedule=args.schedule,
                               batch_size=args.batch_size, max_images=args.max_images, processor=processor,
                               progress=not args.quiet, model_ref=args.model,
                               qwen={"merge_point": args.merge_point, "rounds": args.rounds or 3})
        thresholds.save(out)
        kept = thresholds.tokens_kept_mean[-1] if thresholds.tokens_kept_mean else float("nan")
        print(f"calibrated on {thresholds.images_seen} images (merge_point {args.merge_point}): {kept:.1f} units "
              f"(LLM tokens) kept on average per image; wrote {out}")
        print_skipped(thresholds.skipped)
        return 0
    if args.merge_point != "vit" or args.rounds is not None:
        raise ValueError("--merge-point and --rounds are for Qwen VLs only")
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
    )
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
    )
    thresholds.save(args.out)
    print(f"imported {layers} thresholds from {args.file}; wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    if args.family != "llava":
        from .tools.demo_qwen import run_qwen_demo

        if args.model:
            raise ValueError("--model is for the LLaVA demo; the Qwen demos build their own random-weight model")
        run_qwen_demo(args.family, save_model=args.save_model, max_new_tokens=args.max_new_tokens)
        return 0
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
    apply(model, thresholds, r=args.r, mode=args.mode, tome_vtu=not getattr(args, "no_vtu", False))
    return model, processor


def _video_frames(folder: str) -> list:
    """A video as a folder of frame images, in file-name order."""
    from .images import find_images, open_image

    if not Path(folder).is_dir():
        raise ValueError(f"--video {folder}: not a folder of frame images")
    frames = [open_image(p) for p in sorted(find_images(folder))]
    if not frames:
        raise ValueError(f"--video {folder}: no frame images found")
    return frames


def cmd_generate(args) -> int:
    from .vlms.generation import generate
    from .images import open_image

    images = [open_image(p) for p in args.image or []]  # fail fast, naming the file, before loading a model
    videos = [_video_frames(folder) for folder in args.video or []]
    if not images and not videos:
        raise ValueError("give at least one --image or --video")
    model, processor = _load_patched_vlm(args)
    from .vlms.qwen_vl import SUPPORTED_QWEN_VLMS

    if videos and not isinstance(model, SUPPORTED_QWEN_VLMS):
        raise ValueError("--video is supported for Qwen VLs only")
    result = generate(model, processor, [args.prompt], [images + videos], max_new_tokens=args.max_new_tokens)
    rep = result.report
    if args.json:
        print(json.dumps({"answer": result.answers[0], "images": args.image, **rep.to_json()}, indent=1))
        return 0
    print(result.answers[0])
    full = rep.full_tokens[0] if isinstance(rep.full_tokens, list) else [rep.full_tokens] * len(rep.visual_tokens[0])
    tokens = ", ".join(f"{n}/{f}" for n, f in zip(rep.visual_tokens[0], full))
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
    apply(model, thresholds)  # DToMe only: encode never runs the language model
    from .vlms.qwen_vl import SUPPORTED_QWEN_VLMS

    if isinstance(model, SUPPORTED_QWEN_VLMS):
        return _encode_qwen(args, model, processor, paths)
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


def _encode_qwen(args, model, processor, paths) -> int:
    """dymu encode for a Qwen VL: per image, LLM tokens kept of the stock units and the group of every unit."""
    from .api import encode
    from .images import open_images, print_skipped

    records, skipped = [], []
    device = next(model.parameters()).device
    for start in range(0, len(paths), args.batch_size):
        opened, bad = open_images(paths[start : start + args.batch_size])
        skipped += bad
        if not opened:
            continue
        batch, images = zip(*opened)
        inputs = processor(images=list(images), return_tensors="pt")
        grid = inputs["image_grid_thw"]
        encoded = encode(model, inputs["pixel_values"].to(device, model.dtype), grid_thw=grid.to(device))
        groups = encoded.group_of_unit.split((grid.prod(-1) // 4).tolist())
        for p, (kept, units), g, thw in zip(batch, encoded.per_item(grid), groups, grid.tolist()):
            records.append({"path": str(p), "tokens": kept, "full_tokens": units, "grid_thw": thw,
                            "group_of_unit": (g - g.min()).tolist()})
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
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}; opt-in: "
                   "qwen_vit,qwen_prefill (Qwen2.5-VL-7B-shaped tower and prefill)")
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

    p = sub.add_parser("demo", help="DyMU end to end on a small random-weight LLaVA or Qwen VL (or --model) with "
                                    "bundled images")
    p.add_argument("--model", help="a LLaVA hub id or folder instead of the random-weight demo model")
    p.add_argument("--family", default="llava", choices=["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"],
                   help="which small random-weight VLM to build (default llava)")
    p.add_argument("--save-model", help="also save the demo model (weights, config, tokenizer, processor) here")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(func=cmd_demo)

    def model_args(p, thresholds_required):
        p.add_argument("--model", required=True, help="LLaVA or Qwen2-VL / Qwen2.5-VL / Qwen3-VL hub id or local folder")
        p.add_argument("--thresholds", required=thresholds_required, help="thresholds JSON from `dymu calibrate`")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("generate", help="answer a prompt about images with a DyMU-patched LLaVA")
    model_args(p, thresholds_required=False)
    p.add_argument("--image", action="append", help="image file (repeat for several)")
    p.add_argument("--video", action="append", help="Qwen VLs: a folder of video frames, in file-name order "
                                                   "(repeat for several; videos follow the images in the prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="dymu", choices=["full", "dymu", "dtome", "tome", "downsample"],
                   help="Qwen VLs: full or dymu")
    p.add_argument("--r", type=int, help="merges per layer for --mode tome")
    p.add_argument("--no-vtu", action="store_true", help="--mode tome without VTU (merged tokens fed directly)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the answer and the report as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("encode", help="write per-image token counts, sizes and group maps as JSON")
    model_args(p, thresholds_required=True)
    p.add_argument("--images", nargs="+", required=True, help="folders, JSON lists or image files")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", required=True, help="output JSON file")
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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int)
    p.add_argument("--checkpoint-every", type=int, default=5, help="batches between progress checkpoints")
    p.add_argument("--merge-point", default="vit", choices=["vit", "post"],
                   help="Qwen VLs: merge 2x2 units in every ViT block (vit, the paper) or after the PatchMerger "
                        "(post: stock ViT, saves LLM compute only)")
    p.add_argument("--rounds", type=int, help="Qwen VLs, --merge-point post: merge rounds (default 3)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="thresholds JSON file to write")
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
