"""`dymu calibrate` and `dymu thresholds import`: thresholds for a model's vision tower, single process or torchrun (the parser is in `dymu.cli`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..token_order import DEFAULT_ORDER
from .console import loading


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
    loading(args.model)
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
    from ..files import check_output_file
    from ..images import print_skipped, resolve_images
    from ..loading import load_vision_model, resolve_device_dtype
    from .calibration import calibrate, target_report

    # before any work: a bad --out must not lose the run, nor overwrite an image list or the model
    out = check_output_file(args.out, "--out", inputs=[*args.images, args.model])
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    images = resolve_images(args.images, args.image_root)
    model, processor = load_vision_model(args.model, device, dtype)
    args.checkpoint_path = out.with_name(out.name + ".partial")  # named by main() on Ctrl-C
    from ..families import vlm_family_of

    warn = lambda message: print(f"dymu calibrate: warning: {message}", file=sys.stderr, flush=True)  # noqa: E731
    family = vlm_family_of(model)
    if family is not None and family.calibration == "units":  # units per image vary: presets, --r are fractions
        for given, option, why in ((args.target_tokens, "--target-tokens", "images keep their native size: use "
                                    "--preset or --r (fractions of each image's units)"),
                                   (args.order, "--order", "it merges whole units in its own layout"),
                                   (args.rounds if args.merge_point in (None, "vit") else None, "--rounds",
                                    "rounds are for --merge-point post")):
            if given is not None:
                raise ValueError(f"{option} does not apply to a {family.title}: {why}")
        thresholds = calibrate(model, images, preset=args.preset, r=args.r, schedule=args.schedule or "constant",
                               batch_size=args.batch_size, max_images=args.max_images, processor=processor,
                               checkpoint=args.checkpoint_path, checkpoint_every=args.checkpoint_every,
                               progress=not args.quiet, model_ref=args.model, out=out, warn=warn,
                               merge_point=args.merge_point, rounds=args.rounds)
        if args.max_tokens is not None and rank == 0:  # the file's default budget (in LLM tokens per image)
            thresholds.max_tokens = None if args.max_tokens == float("inf") else args.max_tokens
            thresholds.save(out)
        if rank == 0:
            kept = thresholds.tokens_kept_mean[-1] if thresholds.tokens_kept_mean else float("nan")
            print(f"calibrated on {thresholds.images_seen} images (merge_point {thresholds.encoder['merge_point']}): "
                  f"{kept:.1f} units "
                  f"(LLM tokens) kept on average per image; wrote {out}")
            print_skipped(thresholds.skipped)
        return 0
    thresholds = calibrate(
        model,
        images,
        preset=args.preset,
        target_tokens=args.target_tokens,
        r=args.r,
        schedule=args.schedule or "constant",
        batch_size=args.batch_size,
        max_images=args.max_images,
        processor=processor,
        checkpoint=args.checkpoint_path,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
        model_ref=args.model,
        order=args.order or DEFAULT_ORDER,
        out=out,  # written before the checkpoint is removed
        warn=warn,
        merge_point=args.merge_point,
        rounds=args.rounds,
    )
    if args.max_tokens is not None and rank == 0:
        from .calibration import clip_fraction

        limit = None if args.max_tokens == float("inf") else args.max_tokens
        thresholds.max_tokens = limit
        if limit is not None:
            over, total = clip_fraction(model, thresholds, images[: args.max_images] if args.max_images else images,
                                        limit, processor=processor, batch_size=args.batch_size)
            print(f"max_tokens={limit} would clip {over} of {total} calibration images ({100 * over / max(total, 1):.1f}%)"
                  " (they keep more tokens with these thresholds alone); recorded as the file's default budget")
        thresholds.save(out)  # calibrate() wrote it before the budget was known: again, with it (atomic)
    if rank == 0:
        unit = family.calibration_unit if family is not None else "images"
        line, _ = target_report(thresholds)
        if thresholds.post_thresholds is not None:
            line += (f"; post rounds: {thresholds.post_rows_kept_mean[-1]:.1f} LLM rows per image on average "
                     f"({len(thresholds.post_thresholds)} rounds, merge_point {thresholds.encoder['merge_point']})")
        print(f"calibrated on {thresholds.images_seen} {unit}: {line} at layer {thresholds.feature_layer} "
              f"(of {thresholds.encoder['patches_per_image']} patches); wrote {out}")
        print_skipped(thresholds.skipped)
    return 0


def cmd_thresholds_import(args) -> int:
    from ..api import default_feature_layer, vision_tower_of
    from ..files import check_output_file
    from ..loading import load_vision_model, resolve_device_dtype
    from ..thresholds import Thresholds, encoder_identity, read_paper_thresholds

    check_output_file(args.out, "--out", inputs=[args.file, args.model])
    values = read_paper_thresholds(args.file)
    loading(args.model)
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
    thresholds.validate(f"checkpoint {args.file}")  # NaN or negative thresholds are refused here
    thresholds.save(args.out)
    print(f"imported {layers} thresholds from {args.file}; wrote {args.out}")
    return 0
