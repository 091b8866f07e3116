"""The pieces every `dymu` parser is built from: the parser class, the options several commands share
(--images, --device / --dtype, token budgets, focus regions, --debug / --quiet), their help texts and the
argument types that check values at parse time. Imports nothing heavy: `dymu --help` builds every parser."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """Every dymu parser: no abbreviations (``--out`` never silently means ``--out-dir``), and the
    subcommand parsers are of this class too (argparse gives subparsers their parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def lazy(module: str, name: str):
    """A command handler imported only when its command runs (keeps `dymu --help` fast)."""

    def run(args) -> int:
        from importlib import import_module

        return getattr(import_module(module), name)(args)

    return run


# ---------------------------------------------------------------------------------------------
# Help texts shared by several options

IMAGES_HELP = ("any mix of image files, folders (searched recursively), globs ('photos/*.jpg', 'data/**/*.png') "
               "and JSON lists of {'image': path}; several after one --images, or repeat it")
JSON_HELP = "write {what} as JSON to FILE (written atomically, checked before any work); '-' prints it to stdout"
THRESHOLDS_HELP = ("thresholds: a JSON file from `dymu calibrate`, a folder holding thresholds.json, or a Hugging "
                   "Face Hub repo ORG/NAME[:FILE] (default FILE: thresholds.json)")
# Which family offers which mode and option is declared by the families themselves, not listed in the help.
WHAT_FAMILIES_OFFER = "what each family offers: `dymu env --families` or the README's families matrix"
REFUSED = "a family that does not offer it refuses it, with its reason"
FAMILIES_LISTED = "`dymu env --families` lists them and what each offers"
VLM_HELP = f"a VLM of any supported family ({FAMILIES_LISTED}): hub id or local folder"
VLM_OR_TOWER_HELP = f"a VLM of any supported family ({FAMILIES_LISTED}) or a CLIP/SigLIP vision model: hub id or local folder"


# ---------------------------------------------------------------------------------------------
# Options shared by several commands


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


def add_image_root(p) -> None:
    p.add_argument("--image-root", metavar="DIR", help="folder the JSON lists' paths are relative to (default: each JSON's folder)")


def add_images(p, help_extra: str = "") -> None:
    """The one --images option of every command (resolved by `dymu.images.resolve_images`)."""
    p.add_argument("--images", nargs="+", action="extend", required=True, metavar="PATH",
                   help=IMAGES_HELP + help_extra)
    add_image_root(p)


def add_device_args(p, dtype_help: str = "default: bfloat16 on cuda, float32 on cpu") -> None:
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=dtype_help)


def add_budget_args(p) -> None:
    p.add_argument("--max-tokens", type=parse_max_tokens, metavar="K",
                   help="token budget: at most K visual tokens per image at the feature layer (extra merges of "
                        "its best remaining edges in the last layers); 'none' switches off the thresholds file's")
    p.add_argument("--min-tokens", type=parse_min_tokens, metavar="K",
                   help="an image stops merging before it drops under K tokens (0: none)")


def add_focus_args(p, masks_help: str, repeat_mask: bool = False) -> None:
    p.add_argument("--focus", action="append", type=parse_focus_box, metavar="x0,y0,x1,y1",
                   help="focus box in pixels of the image (repeat for several: their union); outside it the image is "
                        "filled flat before the processor, so DToMe merges it into few tokens")
    p.add_argument("--focus-mask", metavar="PATH", help=masks_help, action="append" if repeat_mask else "store")
    p.add_argument("--fill", metavar="COLOUR", help="colour outside the focus region: white (default), black, mean (the image's "
                                  "mean colour), #rrggbb or a colour name")


# ---------------------------------------------------------------------------------------------
# Argument types: a bad value is a usage error naming the option, before anything loads


def whole(minimum: int):
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


positive_int, nonnegative_int = whole(1), whole(0)


def parse_r(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--r expects numbers separated by commas, not {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--r expects finite numbers >= 0 (merges per layer), not {text!r}")
    return values


def parse_frames(text: str) -> int:
    from .videos import MAX_FRAMES

    value = positive_int(text)
    if value > MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"at most {MAX_FRAMES} frames per video, not {value}")
    return value


def parse_max_tokens(text: str):
    if text.strip().lower() in ("none", "inf", "off"):
        return float("inf")  # switches off a thresholds file's default budget
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-tokens expects a whole number >= 1 (or 'none'), not {text!r}")
    return value


def parse_min_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--min-tokens expects a whole number >= 0 (0: none), not {text!r}")
    return value


def parse_focus_box(text: str):
    from .focus import parse_box  # numpy + PIL only: `dymu --help` stays fast

    try:
        return parse_box(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_preset_thresholds(text: str) -> tuple[str, str]:
    """`dymu bench --thresholds PRESET=FILE`."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--thresholds expects PRESET=FILE (PRESET: low, mid or high), not {text!r}")
    name, path = text.split("=", 1)
    return name, path
