"""The thresholds file: human-readable JSON (never pickle), validated against the encoder it is for.

Layout (format_version 1):
    {
      "format_version": 1,
      "dymu_version": "0.1.0",
      "encoder": {"model": "...", "family": "CLIP", "config_hash": "...", "num_layers": 24,
                  "patches_per_image": 576, "class_token": true},
      "feature_layer": -2, "schedule": "constant",
      "r": [21.0, ...] | null,             # target merges per image and layer (calibration input)
      "thresholds": [0.91, ..., null],     # per layer; null = never merges, "-inf" = merges every edge
      "order": "ab",                       # merge order (dymu.token_order); missing = "interleaved"
      "max_tokens": null, "min_tokens": null,  # default per-image token budget (dymu.apply overrides)
      "tokens_kept_mean": [...], "tokens_kept_std": [...],   # after each computed layer
      "images_seen": 5000, "skipped": [{"path": "...", "reason": "..."}]
    }
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .token_order import ORDERS
from .version import __version__

FORMAT_VERSION = 1

# The vision-config fields that define what a threshold means: the architecture, not the weights.
_ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
)


def encoder_identity(tower: nn.Module, family, model_ref: str | None = None) -> dict:
    """What a thresholds file records about the encoder it was calibrated on."""
    config = tower.config
    arch = {name: getattr(config, name, None) for name in _ARCHITECTURE_FIELDS}
    config_hash = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    patches = (config.image_size // config.patch_size) ** 2
    return {
        "model": model_ref or getattr(config, "_name_or_path", "") or "",
        "family": family.name,
        "config_hash": config_hash,
        "num_layers": len(tower.encoder.layers),
        "patches_per_image": patches,
        "class_token": family.has_class_token,
    }


class ThresholdsError(ValueError):
    """A thresholds file that cannot be read or does not fit the encoder."""


def _threshold_to_json(value: float) -> float | str | None:
    """+inf (never merge) is null, -inf (merge every edge) the string "-inf": plain JSON has no infinities."""
    if math.isnan(value):
        raise ThresholdsError("a threshold is NaN; use +inf for 'never merge' and -inf for 'merge every edge'.")
    return None if value == math.inf else "-inf" if value == -math.inf else value


def _threshold_from_json(value, path: Path, layer: int) -> float:
    if value is None:
        return math.inf
    if isinstance(value, str) and value.strip().lower() in ("-inf", "+inf", "inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ThresholdsError(f"thresholds file {path}: layer {layer} threshold {value!r} is not a number, "
                              'null (never merge) or "-inf" (merge every edge).')
    return float(value)


@dataclass
class Thresholds:
    thresholds: list[float]  # per layer of the tower; math.inf = no merge
    encoder: dict
    feature_layer: int
    schedule: str = "constant"
    r: list[float] | None = None
    tokens_kept_mean: list[float] = field(default_factory=list)
    tokens_kept_std: list[float] = field(default_factory=list)
    images_seen: int = 0
    skipped: list[dict] = field(default_factory=list)
    # Where tokens go after a merge (dymu.token_order). Files written before the setting existed
    # were made in the only order there was then: interleaved.
    order: str = "interleaved"
    # Default per-image token budget at the feature layer (class token not counted); None = none.
    # `dymu.apply(max_tokens=..., min_tokens=...)` and the CLI's --max-tokens/--min-tokens override it.
    max_tokens: int | None = None
    min_tokens: int | None = None
    dymu_version: str = __version__
    format_version: int = FORMAT_VERSION

    # -- validation ---------------------------------------------------------------------------

    def check_compatible(self, tower: nn.Module) -> None:
        """Raise ThresholdsError (one sentence) when this file is for another encoder."""
        from .towers.encoder import family_of

        family = family_of(tower)
        found = encoder_identity(tower, family)
        want = self.encoder
        where = f"thresholds for {want.get('model') or 'an unnamed encoder'}"
        if found["num_layers"] != want["num_layers"]:
            raise ThresholdsError(
                f"{where} have {want['num_layers']} layers but this vision tower has {found['num_layers']}."
            )
        if found["patches_per_image"] != want["patches_per_image"]:
            raise ThresholdsError(
                f"{where} expect {want['patches_per_image']} patches per image "
                f"but this vision tower makes {found['patches_per_image']}."
            )
        if found["family"] != want["family"]:
            raise ThresholdsError(f"{where} are for a {want['family']} encoder, not {found['family']}.")
        if found["config_hash"] != want["config_hash"]:
            raise ThresholdsError(
                f"{where} were calibrated on a differently shaped {want['family']} encoder "
                f"(config hash {want['config_hash']} vs {found['config_hash']})."
            )

    # -- files --------------------------------------------------------------------------------

    def to_json(self) -> dict:
        data = asdict(self)
        data["thresholds"] = [_threshold_to_json(t) for t in self.thresholds]
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)  # never leave a half-written file behind
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Thresholds":
        path = Path(path)
        if not path.is_file():
            raise ThresholdsError(f"thresholds file {path} does not exist.")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ThresholdsError(f"thresholds file {path} is not dymu JSON ({err}); "
                                  "for the paper's checkpoints use `dymu thresholds import`.") from None
        if not isinstance(data, dict) or "thresholds" not in data or "encoder" not in data:
            raise ThresholdsError(f"thresholds file {path} lacks the 'thresholds' and 'encoder' entries.")
        if data.get("format_version") != FORMAT_VERSION:
            raise ThresholdsError(
                f"thresholds file {path} has format_version {data.get('format_version')!r}; "
                f"this dymu reads version {FORMAT_VERSION}."
            )
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        data["thresholds"] = [_threshold_from_json(t, path, i) for i, t in enumerate(data["thresholds"])]
        if data.setdefault("order", "interleaved") not in ORDERS:
            raise ThresholdsError(f"thresholds file {path} has order {data['order']!r}; "
                                  f"dymu knows {', '.join(ORDERS)}.")
        for name in ("max_tokens", "min_tokens"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ThresholdsError(f"thresholds file {path}: {name} {value!r} is not a whole number >= 1 or null.")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Import of the paper's published thresholds (torch checkpoints with a `threshold` buffer per block).

_THRESHOLD_KEY = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers)\.(\d+)\.threshold$")


def read_paper_thresholds(path: str | Path) -> list[float]:
    """Per-layer thresholds from a checkpoint of the paper's code, loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdsError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise ThresholdsError(f"checkpoint {path} cannot be read as a weights-only torch file ({err}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ThresholdsError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict.")
    found: dict[int, float] = {}
    for key, value in state.items():
        m = _THRESHOLD_KEY.search(key)
        if m and isinstance(value, torch.Tensor) and value.numel() == 1:
            found[int(m.group(1))] = float(value.double().item())
    if not found:
        raise ThresholdsError(f"checkpoint {path} has no '<blocks>.<i>.threshold' entries.")
    if sorted(found) != list(range(len(found))):
        raise ThresholdsError(f"checkpoint {path} has thresholds for layers {sorted(found)}, not 0..{len(found) - 1}.")
    return [found[i] for i in range(len(found))]
