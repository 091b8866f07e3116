"""Loading models and processors with `from_pretrained`, and checking the dtype/device asked for."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

from .hub import hub_unreachable  # noqa: F401  (imported from here too)

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadError(ValueError):
    """A model, processor or setting that cannot be used; the message names it and the problem."""


@functools.lru_cache(maxsize=None)
def cpu_supports_bfloat16() -> bool:
    """Whether a bfloat16 matmul runs on this CPU. Probed in a child process, because on CPUs
    without the instructions torch dies with SIGILL instead of raising."""
    probe = "import torch; a = torch.ones(4, 4, dtype=torch.bfloat16); (a @ a).sum().item()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
    return result.returncode == 0


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):  # meta runs nothing; tpu/xla/mps are untested here
        raise LoadError(f"device {device!r} is not one dymu runs on; use cpu, cuda or cuda:N.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"device {device!r} was asked for but no CUDA GPU is available.")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if device == "cpu" and dtype in ("bfloat16", "float16") and not cpu_supports_bfloat16():
        raise LoadError(f"{dtype} was asked for but this CPU cannot run {dtype} matmuls; use --dtype float32.")
    return torch.device(device), DTYPES[dtype]


def _config(model_ref: str):
    from transformers import AutoConfig

    path = Path(model_ref)
    if model_ref.startswith((".", "/", "~")) and not path.exists():
        raise LoadError(f"model folder {model_ref} does not exist.")
    if not path.exists() and (reason := hub_unreachable()):
        try:  # only the cache can serve a hub id now
            return AutoConfig.from_pretrained(model_ref, local_files_only=True)
        except (OSError, ValueError):
            raise LoadError(f"{model_ref} is not a local folder, not in the Hugging Face cache, and the Hub cannot "
                            f"be reached ({reason}).") from None
    try:
        return AutoConfig.from_pretrained(model_ref)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"cannot load a model config from {model_ref}: {first}") from None


def from_pretrained_checked(cls, model_ref: str, unused_prefix: str | None = None, **kwargs):
    """``cls.from_pretrained(model_ref, **kwargs)``, refusing a checkpoint that does not fill the model.

    transformers only logs missing weights (initialising them at random, e.g. a config declaring more
    layers than the weights hold) and unexpected ones (weights the model has no place for), and dymu
    silences its logs: a LoadError says it in one line instead. ``unused_prefix``: the model is one
    part of the checkpoint (the vision half of a CLIP / SigLIP dual encoder): checkpoint weights outside
    this prefix are the other part, left unused on purpose.
    """
    model, info = cls.from_pretrained(model_ref, output_loading_info=True, **kwargs)
    unexpected = [k for k in info.get("unexpected_keys") or () if unused_prefix is None or k.startswith(unused_prefix)]
    problems = []
    for kind, keys in (("missing from the checkpoint (they would be random)", info.get("missing_keys")),
                       ("in the checkpoint but not in the model", unexpected),
                       ("of the wrong shape", [k[0] if isinstance(k, tuple) else k
                                               for k in info.get("mismatched_keys") or ()])):
        keys = sorted(keys or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} weights {kind}: {shown}")
    if problems:
        raise LoadError(f"{model_ref}: the weights do not match the config: {'; '.join(problems)}.")
    return model


def load_vision_model(model_ref: str, device: torch.device, dtype: torch.dtype):
    """A bare vision model of a registered tower family (`dymu.towers`), or a VLM (whose vision tower is then
    used), plus its image processor. Returns (model, image_processor or None)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from .towers import registry

    config = _config(model_ref)
    tower_family, part = registry.family_for_model_type(config.model_type), None
    if tower_family is not None:
        cls = tower_family.tower_class
        if config.model_type != tower_family.model_types[0]:  # a dual encoder's checkpoint: its vision half
            part = "vision_model."
    elif hasattr(config, "vision_config") and hasattr(config, "text_config"):
        cls = AutoModelForImageTextToText
    else:
        names = "/".join(family.name for family in registry.FAMILIES)
        raise LoadError(f"{model_ref} is a {config.model_type!r} model, not a {names} vision model or a VLM with one.")
    model = from_pretrained_checked(cls, model_ref, unused_prefix=part, dtype=dtype).to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(model_ref)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: the tower family's default is used
    return model, processor
