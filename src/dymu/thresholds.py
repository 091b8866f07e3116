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
      "images_seen": 5000, "skipped": [{"path": "...", "reason": "..."}],
      "target_tokens": 208.0, "reached_tokens": 207.6,   # visual tokens at the feature layer: asked / got
      "capped_layers": [],                 # layers whose r hit the at-most-half-per-layer cap
      "post_thresholds": null,             # LLaVA-NeXT / OneVision, merge_point "post" / "both": one per
      "post_r": null, "post_rows_kept_mean": []   # round after the stock packing, its r (fraction of the
    }                                      # units entering the rounds) and mean LLM rows per image after it

``encoder.merge_point``: where the thresholds merge. Qwen VLs: "vit" or "post" (``thresholds`` are then
per block or per round). CLIP/SigLIP towers of LLaVA-NeXT / OneVision: "vit" (``thresholds`` per layer),
"post" (the tower does not merge: ``thresholds`` all null; ``post_thresholds`` per round) or "both".
Files written before merge points existed have none and load as "vit".

On the Hugging Face Hub (or in a local folder) the file is ``thresholds.json`` at the repo's root:
`Thresholds.from_pretrained("org/name")`, `save_pretrained(folder)`, `push_to_hub("org/name")`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write_text
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
    from .towers.registry import tower_identity

    arch = {name: getattr(config, name, None) for name in _ARCHITECTURE_FIELDS}
    return tower_identity(arch, family=family.name, num_layers=len(tower.encoder.layers),
                          class_token=family.has_class_token, model_ref=model_ref, named=config,
                          patches_per_image=(config.image_size // config.patch_size) ** 2)


class ThresholdsError(ValueError):
    """A thresholds file that cannot be read or does not fit the encoder."""


def _threshold_to_json(value: float) -> float | str | None:
    """+inf (never merge) is null, -inf (merge every edge) the string "-inf": plain JSON has no infinities."""
    if value is None:
        return None
    if math.isnan(value):
        raise ThresholdsError("a threshold is NaN; use +inf for 'never merge' and -inf for 'merge every edge'.")
    return None if value == math.inf else "-inf" if value == -math.inf else value


def _threshold_from_json(value, path: Path, layer: int, key: str = "thresholds") -> float:
    if value is None:
        return math.inf
    if isinstance(value, str) and value.strip().lower() in ("-inf", "+inf", "inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ThresholdsError(f"thresholds file {path}: field '{key}[{layer}]' must be a finite number >= 0, "
                              f'null (never merge) or "-inf" (merge every edge), not {value!r}.')
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
    target_tokens: float | None = None  # calibration target: mean visual tokens at the feature layer
    reached_tokens: float | None = None  # what calibration reached on its images
    capped_layers: list[int] = field(default_factory=list)  # layers whose r was cut by the per-layer cap
    # The thresholds applied per image after calibration, as inference runs them (reached_tokens is the
    # calibration's batch-level merging): {"mean", "min", "max", "images", "measured_on", "counts"}, counts
    # naming what is counted: encoder tokens per image / per crop (a tower), LLM rows per image (units, post).
    per_image_tokens: dict | None = None
    # Default per-image token budget at the feature layer (class token not counted); None = none.
    # `dymu.apply(max_tokens=..., min_tokens=...)` and the CLI's --max-tokens/--min-tokens override it.
    max_tokens: int | None = None
    min_tokens: int | None = None
    # LLaVA-NeXT / OneVision, merge_point "post" / "both": the rounds after the stock packing.
    post_thresholds: list[float] | None = None
    post_r: list[float] | None = None
    post_rows_kept_mean: list[float] = field(default_factory=list)
    dymu_version: str = __version__
    format_version: int = FORMAT_VERSION

    # -- validation ---------------------------------------------------------------------------

    def validate(self, where: str = "thresholds") -> "Thresholds":
        """Check every field's type and range; raise ThresholdsError naming ``where`` and the field.

        A NaN or negative threshold, a wrong layer count or a `tokens_kept_mean` outside
        [1, patches] (which `--mode downsample` turns into an image size) never reaches a model.
        """

        def bad(field_name: str, problem: str):
            raise ThresholdsError(f"{where}: field {field_name!r} {problem}.")

        def whole(value, field_name: str, minimum: int):
            if not _is_int(value) or value < minimum:
                bad(field_name, f"must be a whole number >= {minimum}, not {value!r}")
            return value

        def numbers(values, field_name: str, length: int | None, low: float, high: float = math.inf,
                    allow_infinite: bool = False, per: str = "the encoder has {} layers"):
            if not isinstance(values, list):
                bad(field_name, f"must be a list, not {type(values).__name__}")
            if length is not None and len(values) != length:
                bad(field_name, f"has {len(values)} entries but {per.format(length)}")
            for i, v in enumerate(values):
                if allow_infinite and (v is None or (isinstance(v, float) and math.isinf(v))):
                    continue  # null / +inf: never merge; -inf: merge every edge (up to the cap)
                if not _is_number(v) or not math.isfinite(v) or not low <= v <= high:
                    limits = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
                    infinite = ', null (never merge) or "-inf" (merge every edge)' if allow_infinite else ""
                    bad(f"{field_name}[{i}]", f"must be a finite number {limits}{infinite}, not {v!r}")

        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            bad("format_version", f"is {self.format_version!r}; this dymu reads version {FORMAT_VERSION}")
        enc = self.encoder
        if not isinstance(enc, dict):
            bad("encoder", f"must be an object, not {type(enc).__name__}")
        for key, kind in (("model", str), ("family", str), ("config_hash", str), ("class_token", bool)):
            if not isinstance(enc.get(key), kind):
                bad(f"encoder.{key}", f"must be a {kind.__name__}, not {enc.get(key)!r}")
        layers = whole(enc.get("num_layers"), "encoder.num_layers", 1)
        merge_point = enc.get("merge_point")
        if merge_point is not None and enc.get("patches_per_image") is None:  # units: their count varies per image
            if merge_point not in ("vit", "post"):
                bad("encoder.merge_point", f"is {merge_point!r}; a file without patches_per_image (units) merges "
                                           "at 'vit' or 'post'")
            patches = math.inf
        else:
            if merge_point not in (None, "vit", "post", "both"):
                bad("encoder.merge_point", f"is {merge_point!r}; dymu knows 'vit', 'post' and 'both'")
            patches = whole(enc.get("patches_per_image"), "encoder.patches_per_image", 1)
            if (merge_point in ("post", "both")) != (self.post_thresholds is not None):
                bad("post_thresholds", f"must be {'a list' if merge_point in ('post', 'both') else 'null'} with "
                                       f"encoder.merge_point {merge_point or 'vit'!r}")
        if self.post_thresholds is not None:
            numbers(self.post_thresholds, "post_thresholds", None, 0.0, allow_infinite=True)
            if not self.post_thresholds:
                bad("post_thresholds", "must hold one threshold per post round (at least one)")
            if self.post_r is not None:
                numbers(self.post_r, "post_r", len(self.post_thresholds), 0.0, 1.0,
                        per="post_thresholds has {} rounds")
        numbers(self.post_rows_kept_mean, "post_rows_kept_mean", None, 0.0)
        if not _is_int(self.feature_layer) or not -layers - 1 <= self.feature_layer <= layers:
            bad("feature_layer", f"must be a layer index between {-layers - 1} and {layers}, not {self.feature_layer!r}")
        if self.feature_layer in (0, -layers - 1):  # hidden_states[0]: the embeddings, before any layer merges
            bad("feature_layer", f"is {self.feature_layer}, the embeddings before the first layer: no layer would "
                                 "run or merge (LLaVA-1.5 reads -2, OneVision -1)")
        if not isinstance(self.schedule, str):
            bad("schedule", f"must be a string, not {self.schedule!r}")
        numbers(self.thresholds, "thresholds", layers, 0.0, allow_infinite=True)
        if self.order not in ORDERS:
            bad("order", f"is {self.order!r}; dymu knows {', '.join(ORDERS)}")
        if self.r is not None:
            numbers(self.r, "r", layers, 0.0, float(patches))
        numbers(self.tokens_kept_mean, "tokens_kept_mean", None, 1.0, float(patches))
        if len(self.tokens_kept_mean) > layers:
            bad("tokens_kept_mean", f"has {len(self.tokens_kept_mean)} entries but the encoder has {layers} layers")
        numbers(self.tokens_kept_std, "tokens_kept_std", None, 0.0, float(patches))
        if len(self.tokens_kept_std) != len(self.tokens_kept_mean):
            bad("tokens_kept_std", f"has {len(self.tokens_kept_std)} entries but tokens_kept_mean has "
                                   f"{len(self.tokens_kept_mean)}")
        whole(self.images_seen, "images_seen", 0)
        for name in ("max_tokens", "min_tokens"):  # the default token budget (None: none)
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                bad(name, f"must be a whole number >= 1 or null, not {value!r}")
        if not isinstance(self.skipped, list) or not all(
                isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("reason"), str)
                for s in self.skipped):
            bad("skipped", "must be a list of {'path': str, 'reason': str}")
        if self.per_image_tokens is not None:
            stats = self.per_image_tokens
            if not isinstance(stats, dict) or not all(
                    isinstance(stats.get(k), (int, float)) and not isinstance(stats.get(k), bool) and stats[k] >= 0
                    for k in ("mean", "min", "max", "images")) or not isinstance(stats.get("measured_on"), str) \
                    or not isinstance(stats.get("counts", ""), str):
                bad("per_image_tokens", "must be null or {'mean', 'min', 'max', 'images': numbers >= 0, "
                                        "'measured_on': str, optionally 'counts': str}")
        if not isinstance(self.dymu_version, str):
            bad("dymu_version", f"must be a string, not {self.dymu_version!r}")
        return self

    def check_compatible(self, tower: nn.Module) -> None:
        """Raise ThresholdsError (one sentence) when this file is for another encoder."""
        from .towers.encoder import family_of

        self.validate()

        family = family_of(tower)
        found = encoder_identity(tower, family)
        want = self.encoder
        where = f"thresholds for {want.get('model') or 'an unnamed encoder'}"
        if found["family"] != want["family"]:  # first: another family's file may lack the fields below
            raise ThresholdsError(f"{where} are for a {want.get('family')} encoder, not {found['family']}.")
        if found["num_layers"] != want["num_layers"]:
            raise ThresholdsError(
                f"{where} have {want['num_layers']} layers but this vision tower has {found['num_layers']}."
            )
        if found["patches_per_image"] != want["patches_per_image"]:
            raise ThresholdsError(
                f"{where} expect {want['patches_per_image']} patches per image "
                f"but this vision tower makes {found['patches_per_image']}."
            )
        if found["config_hash"] != want["config_hash"]:
            raise ThresholdsError(
                f"{where} were calibrated on a differently shaped {want['family']} encoder "
                f"(config hash {want['config_hash']} vs {found['config_hash']})."
            )

    # -- files --------------------------------------------------------------------------------

    def to_json(self) -> dict:
        data = asdict(self)
        data["thresholds"] = [_threshold_to_json(t) for t in self.thresholds]
        if self.post_thresholds is not None:
            data["post_thresholds"] = [_threshold_to_json(t) for t in self.post_thresholds]
        return data

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (a temporary file in the same folder, then os.replace)."""
        path = Path(path)
        self.validate(f"thresholds to write to {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
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
        if "feature_layer" not in data:
            raise ThresholdsError(f"thresholds file {path}: field 'feature_layer' is missing.")
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("thresholds", "post_thresholds"):
            if isinstance(data.get(key), list):
                data[key] = [_threshold_from_json(t, path, i, key) for i, t in enumerate(data[key])]
        return cls(**data).validate(f"thresholds file {path}")


    # -- the Hugging Face Hub (a repo or a local folder holding FILENAME) ---------------------------

    FILENAME = "thresholds.json"

    @classmethod
    def from_pretrained(cls, ref: str | Path, filename: str | None = None, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> "Thresholds":
        """Load ``filename`` (default thresholds.json) from a local folder or a Hub repo id, the way models load."""
        filename = filename or cls.FILENAME
        folder = Path(ref)
        if folder.is_dir():
            return cls.load(folder / filename)
        if str(ref).startswith((".", "/", "~")) or str(ref).count("/") > 1:
            raise ThresholdsError(f"thresholds folder {ref} does not exist.")
        from huggingface_hub import hf_hub_download

        from .hub import hub_unreachable

        offline = local_files_only or hub_unreachable() is not None
        try:
            path = hf_hub_download(str(ref), filename, revision=revision, cache_dir=cache_dir,
                                   local_files_only=offline, token=token)
        except Exception as err:  # huggingface_hub raises several types: one line, whichever
            reason = hub_unreachable()
            where = (f"it is not in the Hugging Face cache and the Hub cannot be reached ({reason})" if offline and reason
                     else "it is not in the Hugging Face cache (local_files_only)" if offline
                     else str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            raise ThresholdsError(f"cannot load {filename} from {ref}: {where}") from None
        return cls.load(path)

    @classmethod
    def from_ref(cls, text: str) -> "Thresholds":
        """What the CLI's --thresholds takes: a JSON file, a local folder, or a Hub repo ``org/name[:file]``."""
        if Path(text).is_file() or (text.endswith(".json") and ":" not in text):
            return cls.load(text)  # a missing .json is a missing file, not a Hub repo
        ref, _, filename = text.partition(":") if not Path(text).exists() else (text, "", "")
        return cls.from_pretrained(ref, filename or None)

    def save_pretrained(self, folder: str | Path, filename: str | None = None) -> Path:
        """Write ``folder/thresholds.json`` (what `from_pretrained` and `push_to_hub` read and upload)."""
        return self.save(Path(folder) / (filename or self.FILENAME))

    def push_to_hub(self, repo_id: str, filename: str | None = None, *, commit_message: str | None = None,
                    private: bool | None = None, token: str | bool | None = None) -> str:
        """Upload as ``filename`` (default thresholds.json) to a Hub model repo, creating it if needed.
        Returns the file's URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(tmp, filename)
            info = api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id,
                                   commit_message=commit_message or f"dymu thresholds for {self.encoder.get('model')}")
        return str(info)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



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
    except Exception as err:  # torch raises several types, with several lines, for foreign or corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if len(first) > 160:  # torch's first line can be long: cut at a word, and say so
            first = first[:160].rsplit(" ", 1)[0] + " …"
        raise ThresholdsError(f"checkpoint {path} is not a torch checkpoint that loads weights-only "
                              f"(torch says: {first}).") from None
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
