"""`dymu generate`: answers about images and videos with a report (the parser is in `dymu.cli`)."""

from __future__ import annotations

import sys

from .console import loading


def _load_patched_vlm(args):
    """The VLM of --model, patched for --mode with --thresholds / --r (the settings checked before the load)."""
    from ..api import apply_settings
    from ..generation import load_vlm
    from ..settings import Settings

    settings = Settings(mode=args.mode, thresholds=args.thresholds or None, r=args.r,
                        tome_vtu=not getattr(args, "no_vtu", False), max_tokens=args.max_tokens,
                        min_tokens=args.min_tokens, cross_frame=getattr(args, "cross_frame", False))
    if args.mode in ("dymu", "dtome", "downsample") and settings.thresholds is None:
        raise ValueError(f"mode {args.mode!r} needs --thresholds FILE (make one with `dymu calibrate`)")
    if args.mode == "tome" and args.r is None:
        raise ValueError("mode 'tome' needs --r (merges per layer)")
    model, processor = load_vlm(args.model, args.device, args.dtype)
    apply_settings(model, settings)
    return model, processor


def _generate_focus(args, count: int):
    """Per image: --focus boxes (each image), or --focus-mask (one for all images, or one per --image)."""
    if args.focus and args.focus_mask:
        raise ValueError("give --focus boxes or --focus-mask, not both")
    if args.focus:
        return [list(args.focus)] * count
    if not args.focus_mask:
        return None
    from ..images import open_image

    masks = [open_image(m) for m in args.focus_mask]
    if len(masks) not in (1, count):
        raise ValueError(f"--focus-mask is given {len(masks)} times for {count} images: give one, or one per --image")
    return masks * count if len(masks) == 1 else masks


def cmd_generate(args) -> int:
    loading(args.model)  # before the imports: they are part of the silence
    from ..generation import generate
    from ..images import open_image, resolve_images
    from ..videos import load_video

    if not args.images and not args.video:
        raise ValueError("give at least one --images or --video")
    if args.json is not None:  # before the model loads: a bad path must not lose the run
        from ..files import check_json_output

        check_json_output(args.json, "--json", inputs=[*(args.images or []), *(args.video or []), args.model])
    paths = resolve_images(args.images, args.image_root) if args.images else []
    images = [open_image(p) for p in paths]  # fail fast, naming the file, before loading a model
    focus = _generate_focus(args, len(images))
    if focus is not None:  # check boxes and mask sizes before loading a model
        from ..focus import apply_focus_all

        apply_focus_all(images, focus, args.fill or "white")
    videos = [load_video(v, args.frames) for v in args.video or []]
    model, processor = _load_patched_vlm(args)
    result = generate(model, processor, [args.prompt], [images], videos=[videos], max_new_tokens=args.max_new_tokens,
                      chat_template=not args.raw_prompt, focus=None if focus is None else [focus], fill=args.fill)
    rep = result.report
    if args.json is not None:  # a file (written atomically), or stdout for `--json -`
        from ..files import STDOUT, write_json

        write_json(args.json, {"answer": result.answers[0], "images": [str(p) for p in paths], "videos": args.video,
                               **rep.to_json()}, indent=1)
        if args.json == STDOUT:
            return 0
    print(result.answers[0])
    print(f"[mode {rep.mode}] {count_summary(rep)}; one cold run "
          f"(not a benchmark: see `dymu bench`): encoder {rep.encoder_s * 1e3:.1f} ms, prefill "
          f"{rep.prefill_s * 1e3:.1f} ms, decode {rep.decode_s * 1e3:.1f} ms ({rep.new_tokens} tokens)", file=sys.stderr)
    return 0


def count_summary(rep) -> str:
    """Per image (then video) of the first prompt, the three counts under the names every tool uses:
    encoder_tokens (the tower kept), llm_rows (distinct rows the LLM runs), stock_positions (placeholders)."""
    encoder = rep.encoder_tokens[0] if rep.encoder_tokens else [None] * len(rep.llm_rows[0])
    items = [f"encoder_tokens {e if e is not None else '-'}, llm_rows {r}, stock_positions {p}"
             for e, r, p in zip(encoder, rep.llm_rows[0], rep.stock_positions[0])]
    text = "per image/video: " + "; ".join(items)
    if rep.visual_tokens_without_budget_or_focus is not None:
        text += " (llm_rows without budget/focus: " + ", ".join(map(str, rep.visual_tokens_without_budget_or_focus[0])) + ")"
    return text
