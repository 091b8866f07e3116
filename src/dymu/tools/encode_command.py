"""`dymu encode`: the vision side only, per image: tokens kept and the group maps, to --json (the parser is in `dymu.cli`)."""

from __future__ import annotations

import sys

from .console import loading


def cmd_encode(args) -> int:
    loading(args.model)
    from functools import partial

    from ..api import apply, vision_tower_of
    from ..families import vlm_family_of
    from ..families.tower_vlm import tower_records
    from ..files import check_json_output
    from ..images import open_images, resolve_images
    from ..loading import load_vision_model, resolve_device_dtype
    from ..thresholds import Thresholds

    # before any work: the results are written at the end, and never over an input
    check_json_output(args.json, "--json", inputs=[*args.images, args.thresholds, args.model])
    paths = resolve_images(args.images, args.image_root)
    thresholds = Thresholds.from_ref(args.thresholds)
    model, processor = load_vision_model(args.model, *resolve_device_dtype(args.device, args.dtype))
    apply(model, thresholds, max_tokens=args.max_tokens, min_tokens=args.min_tokens)  # the LLM is not run
    family = vlm_family_of(model)
    if family is not None:
        encode_records = partial(family.encode_records, model, processor)
    else:  # a bare CLIP / SigLIP vision model
        tower, tower_family = vision_tower_of(model)
        encode_records = partial(tower_records, model, tower, tower_family, processor,
                                 encoder_pixels=lambda processed: (processed["pixel_values"], [1] * len(processed["pixel_values"])))
    from .console import progress

    records, skipped = [], []
    with progress(len(paths), "encoding", quiet=args.quiet) as bar:
        for start in range(0, len(paths), args.batch_size):
            opened, bad = open_images(paths[start : start + args.batch_size])
            batch_records, skipped = encode_records(opened, skipped + bad)
            records += batch_records
            bar.update(min(args.batch_size, len(paths) - start))
    return _write_encoded(args, records, skipped)


def _write_encoded(args, records: list[dict], skipped: list[dict]) -> int:
    """`dymu encode`'s output: the --json file (written atomically; `-`: stdout), one line per image (on
    stderr when the JSON goes to stdout), the skipped files."""
    from ..files import STDOUT, write_json
    from ..images import print_skipped

    write_json(args.json, {"model": args.model, "thresholds": args.thresholds, "images": records, "skipped": skipped})
    lines = sys.stderr if args.json == STDOUT else sys.stdout
    for r in records:
        rows = f"  LLM rows {r['llm_rows']}/{r['stock_positions']}" if "llm_rows" in r else ""
        print(f"{r['tokens']:5d}/{r['full_tokens']}  {r['path']}{rows}", file=lines)
    print_skipped(skipped, file=sys.stderr)
    if not records:
        raise ValueError("no readable images")
    return 0
