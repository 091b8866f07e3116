"""The `dymu` lmms-eval model's arguments: its ``--model_args`` (checked before the model loads, so a typo
fails in a second naming the argument) and a task's generation kwargs. Imports neither lmms-eval nor torch."""

from __future__ import annotations

import math

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_FRAMES = 32  # frames per video, lmms-eval's usual max_frames_num for video models
MODEL_ARGS = ("pretrained", "thresholds", "mode", "r", "batch_size", "device", "dtype", "max_new_tokens", "max_tokens",
              "min_tokens", "max_frames_num", "order", "merge_point", "vtu_attention", "kv_cache", "tome_vtu",
              "cross_frame")
# generation kwargs of lmms-eval tasks that this model honours; others are ignored with a warning
_SAMPLING_KWARGS = ("temperature", "top_p", "top_k")


def refuse_unknown(unknown) -> None:
    if unknown:
        raise ValueError(f"dymu lmms-eval model: unknown model_args {', '.join(sorted(unknown))} (known: "
                         f"{', '.join(MODEL_ARGS)}).")


def settings_from_model_args(thresholds, mode: str, r, max_tokens, min_tokens, cross_frame, tome_vtu, order,
                             merge_point, vtu_attention, kv_cache):
    """The `dymu.settings.Settings` the model is patched with, from model_args as lmms-eval gives them
    (strings). Checked here, family-agnostic; a family's refusals come at apply, after the load. Unset:
    the thresholds file's defaults (token budget, order, merge point)."""
    from ..settings import Settings

    thresholds = load_thresholds(thresholds)
    options = {name: whole_arg(name, value, minimum)
               for name, value, minimum in (("max_tokens", max_tokens, 1), ("min_tokens", min_tokens, 0),
                                            ("r", r, 0)) if value is not None}
    options.update({name: boolean_arg(name, value) for name, value in (("cross_frame", cross_frame),
                                                                       ("tome_vtu", tome_vtu)) if value is not None})
    try:
        return Settings(mode=mode, thresholds=thresholds, order=order or None, merge_point=merge_point or None,
                        vtu_attention=vtu_attention, kv_cache=kv_cache, **options)
    except ValueError as err:
        raise ValueError(f"dymu lmms-eval model: {err}") from None


def load_thresholds(value):
    """``thresholds`` model arg: None, one number for every layer (``inf`` = no merge), a file, a
    folder holding thresholds.json or a Hub repo ``org/name[:file]`` (`Thresholds.from_ref`)."""
    from ..thresholds import Thresholds

    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return Thresholds.from_ref(value)
    if math.isnan(number) or (math.isfinite(number) and number < 0):
        raise ValueError(f"dymu lmms-eval model: thresholds must be a number >= 0 (a cosine similarity), inf (never "
                         f"merge), -inf (merge every edge), a file, a folder or a Hub repo, not {value!r}.")
    return number


def boolean_arg(name: str, value) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"dymu lmms-eval model: {name} must be true or false, not {value!r}.")


def whole_arg(name: str, value, minimum: int) -> int:
    text = str(value).strip()
    if text.isdigit() and int(text) >= minimum:
        return int(text)
    raise ValueError(f"dymu lmms-eval model: {name} must be a whole number >= {minimum}, not {value!r}.")


def positive_int_arg(name: str, value) -> int:
    if str(value).isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"dymu lmms-eval model: {name} must be a positive whole number, not {value!r}.")


def generation_kwargs(gen: dict, max_new_tokens: int) -> tuple[dict, list[str]]:
    """(kwargs for generate, names ignored) from a task's generation kwargs, `until` excluded."""
    gen = dict(gen)
    kwargs = {"max_new_tokens": int(gen.pop("max_new_tokens", None) or max_new_tokens)}
    # The task's do_sample wins; a task that gives only a temperature samples when it is > 0
    # (lmms-eval's own models' convention).
    temperature = gen.get("temperature") or 0
    kwargs["do_sample"] = bool(gen.pop("do_sample")) if "do_sample" in gen else float(temperature) > 0
    for name in _SAMPLING_KWARGS:
        value = gen.pop(name, None)
        if kwargs["do_sample"] and value is not None:
            kwargs[name] = value
    num_beams = int(gen.pop("num_beams", 1) or 1)
    if num_beams > 1:
        kwargs["num_beams"] = num_beams
    return kwargs, sorted(gen)
