"""`dymu demo`: the walkthrough on a family's random-weight demo model or on the user's own (the parser is in
`dymu.cli`)."""

from __future__ import annotations


def cmd_demo(args) -> int:
    from .walkthrough import run_walkthrough

    if args.model and args.family:
        raise ValueError("give --family (a random-weight demo model) or --model (yours), not both")
    if args.model and args.save_model:
        raise ValueError("--save-model saves the random-weight demo model; --model is already saved")
    run_walkthrough(args.family or "llava", args.model, save_model=args.save_model, max_new_tokens=args.max_new_tokens)
    return 0
