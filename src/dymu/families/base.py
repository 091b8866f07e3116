"""The VLM family adapter protocol and its registry.

One `VLMFamily` object per VLM family knows everything about that family that the rest of dymu
needs: how to recognise and load its models and processors, apply and remove the patch, encode,
build prompt inputs in every mode, and which modes and options it supports (or refuses, with the
reason). `dymu.apply`, `dymu.generate`, calibration, the CLI tools and the lmms-eval plugin reach a
family only through this object, in the spirit of transformers' `AttentionInterface`: a new family
is one adapter module that calls `register_vlm_family`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..patching import recorded_settings, restore_class, swap_class
from ..settings import KV_CACHE, MODES, OPTIONS, Settings

# Adapter modules shipped with dymu, imported on the first registry lookup (they import transformers'
# model code, which `import dymu` and `dymu --help` must not pay for).
BUILTIN_FAMILIES = ("llava", "llava_next", "llava_next_video", "qwen_vl", "qwen3_5", "gemma3", "smolvlm", "internvl")

# How refusals name the options and call-time features.
FEATURE_NAMES = {"r": "r (fixed merges per layer)", "order": "order (where merged tokens go)",
                 "tome_vtu": "mode 'tome' without VTU (tome_vtu=False)", "merge_point": "merge_point",
                 "cross_frame": "cross_frame", "budget": "a token budget (max_tokens / min_tokens)",
                 "focus": "focus regions (focus / fill)", "video": "video",
                 "raw_prompt": "a prompt as written (chat_template=False)"}
CALL_FEATURES = ("focus", "video", "raw_prompt")

_REGISTRY: dict[str, "VLMFamily"] = {}
_loaded = False


@dataclass
class PreparedInputs:
    """Inputs for ``model.generate(**inputs)`` and the counts a `dymu.generate` report shows. Counts are
    per prompt, per image (then per video, in the family's prompt order)."""

    inputs: dict  # input_ids, attention_mask, mm_encoder_outputs, and what else the family's generate needs
    llm_rows: list[list[int]]  # distinct rows the LLM runs (VTU groups; placeholders without VTU)
    stock_positions: list[list[int]]  # image placeholders in the stock prompt
    encoder_tokens: list[list[int]]  # tokens the vision tower kept (summed over crops / frames)
    full_tokens: list[list[int]]  # tokens the stock vision tower makes (summed over crops / frames)
    encoder_s: float
    image_size: int | None = None  # downsample: the side the images were resized to
    without: list[list[int]] | None = None  # llm rows without the call's budget / focus (an extra encode)
    report_extras: dict = field(default_factory=dict)  # family-specific report fields (declared in Report)


@dataclass
class Request:
    """One `dymu.generate` / `dymu.prompt_inputs` call, checked and with every video as PIL frames."""

    prompts: list[str]
    images: list[list]  # per prompt: PIL images or paths (a Qwen VL also takes a list of frames here)
    videos: list[list]  # per prompt: videos, each a list of PIL frames
    chat_template: bool = True
    max_tokens: int | None = None
    min_tokens: int | None = None
    focus: list | None = None
    fill: Any = None


class VLMFamily:
    """A VLM family adapter. Subclasses set the class attributes and implement the methods that raise
    NotImplementedError; `register_vlm_family` makes them known to dymu.

    ``modes`` maps every mode of `dymu.settings.MODES` to None (supported) or the reason it is refused;
    ``options`` does the same for the options of `dymu.settings.OPTIONS` and the call-time features
    ``focus``, ``video`` and ``raw_prompt`` (``chat_template=False``)."""

    name: str  # registry key, recorded in thresholds files and reports
    title: str  # for messages: "LLaVA-1.5"
    model_types: tuple[str, ...]  # the `config.model_type` values it loads
    modes: Mapping[str, str | None]
    options: Mapping[str, str | None]
    # Calibration: "tower" (a CLIP / SigLIP tower's DToMe up to the feature layer, `dymu.towers.encoder`)
    # or "units" (a native-resolution tower that merges whole LLM-token units, `dymu.towers.qwen_vit`).
    calibration = "tower"
    merge_points: tuple[str, ...] = ("vit",)  # with option merge_point: the points it takes
    post_rounds: int | None = None  # default merge rounds after the stock steps (merge_point post / both)
    calibration_unit = "images"  # what a calibration image counts as (AnyRes: every crop)
    crops_images = False  # the processor cuts an image into several tower inputs (`encoder_pixels`)
    # The KV caches a VTU prefill may leave (`dymu.settings.KV_CACHE`): None (supported) or why not. The
    # first supported one is what `kv_cache=None` (the default) means for this family.
    kv_caches: Mapping[str, str | None] = {"compact": None, "full": None}

    # -- what it is -----------------------------------------------------------------------------
    def model_classes(self) -> tuple[type, ...]:
        raise NotImplementedError

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes())

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The module thresholds files are checked against."""
        raise NotImplementedError

    def supports(self, feature: str) -> bool:
        table = self.modes if feature in MODES else self.options
        return feature in table and table[feature] is None

    def refuse_unsupported(self, feature: str, model: nn.Module) -> None:
        """A one-line ValueError with the declared reason, where ``feature`` (a mode or option) is refused."""
        table = self.modes if feature in MODES else self.options
        reason = table.get(feature, "this family does not declare it")
        if reason is not None:
            what = f"mode {feature!r}" if feature in MODES else FEATURE_NAMES.get(feature, feature)
            raise ValueError(f"{what} is not available for {type(model).__name__}: {reason}")

    def check(self, model: nn.Module, settings: Settings) -> None:
        """Refuse, with the declared reason, a mode, option or (with VTU) KV cache this family does not support."""
        self.refuse_unsupported(settings.mode, model)
        for option in settings.used_options():
            self.refuse_unsupported(option, model)
        reason = self.kv_caches.get(settings.kv_cache or self.default_kv_cache)
        if settings.uses_vtu and reason is not None:
            raise ValueError(f"kv_cache={settings.kv_cache!r} is not available for {type(model).__name__}: {reason}")

    @property
    def default_kv_cache(self) -> str:
        return next(k for k in KV_CACHE if self.kv_caches.get(k, "") is None)

    def with_defaults(self, settings: Settings) -> Settings:
        """``settings`` with this family's default for what was left unset (``kv_cache``)."""
        return settings if settings.kv_cache else settings.replace(kv_cache=self.default_kv_cache)

    # -- patching -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, settings: Settings) -> None:
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError

    def mode_of(self, model: nn.Module) -> str:
        settings = recorded_settings(model)
        return "full" if settings is None else settings.mode

    # -- loading --------------------------------------------------------------------------------
    def load_processor(self, model_ref: str, config) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_ref)

    # -- inputs ---------------------------------------------------------------------------------
    def check_videos(self, model: nn.Module, frames: list[list[list]]) -> None:
        """Refuse videos this family cannot take in one call (``frames``: per prompt, per video)."""

    def prepare(self, model: nn.Module, processor, request: Request) -> PreparedInputs:
        raise NotImplementedError

    def encode(self, model: nn.Module, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None,
               focus=None, fill=None, processor=None):
        """`dymu.encode` for this family's models: the vision side only, with the model's settings."""
        raise NotImplementedError

    def encode_records(self, model: nn.Module, processor, opened: list, skipped: list) -> tuple[list[dict], list[dict]]:
        """`dymu encode`'s records for a batch of opened images [(path, image)]: per image ``tokens``,
        ``full_tokens``, ``encoder_tokens``, ``llm_rows``, ``stock_positions`` and the family's group
        maps; (records, skipped + images the processor rejects)."""
        raise NotImplementedError

    def unit_thresholds(self, model: nn.Module, thresholds) -> tuple[list[float], str]:
        """Families with calibration "units": (threshold values, merge point), checked against the tower."""
        raise NotImplementedError(f"{self.title} merges no units")

    def unit_calibration(self, model: nn.Module, merge_point: str, rounds: int | None,
                         model_ref: str | None) -> tuple[int, dict]:
        """Families with calibration "units": (merge steps at ``merge_point``, the tower identity a
        thresholds file records)."""
        raise NotImplementedError(f"{self.title} merges no units")

    def unit_calibration_batch(self, model: nn.Module, image_processor, images: list, merge_point: str, steps: int,
                               chooser: Callable[[int], Callable]) -> torch.Tensor:
        """Families with calibration "units": encode one batch of PIL ``images`` with the edge chooser
        ``chooser(units of the batch)`` (batch-level Eq. 4) at every step; (images, steps) units alive."""
        raise NotImplementedError(f"{self.title} merges no units")

    def analyze_units(self, model: nn.Module, image_processor, thresholds) -> tuple[Callable, Callable]:
        """`dymu analyze` for calibration "units": (prepare(PIL image, path) -> (pixels, extra), encode(pending
        [(row, pixels, extra)]) -> per image (row fields, (3, H, W) pixels as the model sees them, the group
        of every unit, the unit grid (h, w))) with ``thresholds``."""
        raise NotImplementedError(f"{self.title} merges no units")

    def analyze_crops(self, model: nn.Module, image_processor) -> tuple[Callable, Callable, Callable]:
        """`dymu analyze` for families whose processor cuts an image into crops (``crops_images``), through the
        model's own image path, ``model`` patched by `dymu.apply` for the run: (prepare(PIL image, path) ->
        (pixels, extra), check(pixels) raising where ``image_processor`` is not the model's own, encode(pending
        [(row, pixels, extra)], budget=True) -> per image (row fields ``tokens``, ``full_tokens``,
        ``encoder_tokens``, ``llm_rows``, ``stock_positions``; the (3, H, W) pixels of the crop its merge map is
        drawn on, the group of every token of that crop, its grid (h, w))); ``budget=False``: the same images
        with the tower's token budget lifted. LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision."""
        raise NotImplementedError(f"{self.title} cuts no image into crops")

    def analyze_view(self, model: nn.Module, image_processor, image) -> torch.Tensor:
        """`dymu analyze`'s pictures: the (3, H, W) pixel values of one PIL ``image`` as ``image_processor``
        prepares it for the model. Default: its first view (an AnyRes model's base crop, a tiling processor's
        first tile); the Qwen VLs un-patchify theirs."""
        return first_view(image_processor, image)

    def encode_packed(self, model: nn.Module, image_processor, item) -> tuple[torch.Tensor, Any]:
        """One PIL image, or one video (a list of PIL frames), through the patched model's own image / video
        path: (the VTU group of every position of its placeholders in the stock prompt, the tower's
        `EncodedImages` of its crops / frames in order). LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision
        (video: the last two)."""
        raise NotImplementedError(f"{self.title} has no packed group map")

    def post_round_rows(self, model: nn.Module, processed, chooser: Callable[[int], Callable],
                        device: torch.device) -> torch.Tensor:
        """Calibration of the merge rounds after the stock steps (merge points "post" / "both") in a family with
        calibration "tower": (images, rounds) LLM rows of every image of one image-processor output after every
        round, the rounds' edges chosen by ``chooser(units entering the rounds)`` (batch-level Eq. 4).
        LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision."""
        raise NotImplementedError(f"{self.title} has no merge rounds after a CLIP / SigLIP tower")

    def encoder_pixels(self, model: nn.Module, processed) -> tuple[torch.Tensor, list[int]]:
        """What the vision tower sees for one image-processor output: (crops (C, 3, S, S), crops per image)."""
        pixels = processed["pixel_values"]
        return pixels, [1] * len(pixels)


def first_view(image_processor, image) -> torch.Tensor:
    """(3, H, W) pixel values of the first view ``image_processor`` makes of one PIL ``image`` (its only one,
    an AnyRes model's base crop, a tiling processor's first tile)."""
    pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    return pixels[0] if pixels.ndim == 4 else pixels


def remove_inner_patch(inner: nn.Module, language_model: nn.Module) -> None:
    """Undo a family's patch of its inner model: the stock inner class, no VTU decoder layers."""
    from ..decoders.llama import remove_vtu

    restore_class(inner)
    remove_vtu(language_model)


def install_inner_patch(inner: nn.Module, language_model: nn.Module, patched: Callable[[type], type], state, *,
                        vtu: bool, vtu_attention: str, kv_cache: str) -> None:
    """The changing step of a family's `apply`, once every check has passed: the stock model again, then
    (with ``vtu``) the VTU decoder layers and the inner model swapped to ``patched(its stock class)`` holding
    ``state`` (the stock class is read after the undo: a model patched before must not be patched twice)."""
    from ..decoders.llama import apply_vtu

    remove_inner_patch(inner, language_model)
    if vtu:
        apply_vtu(language_model, vtu_attention=vtu_attention, kv_cache=kv_cache)
    swap_class(inner, patched(type(inner)), state)


def stock_processor(model_ref: str):
    """``AutoProcessor.from_pretrained(model_ref)`` when it loads a full processor; None where it cannot
    (its video processor needs torchvision, a dependency is missing, a folder saved by a demo) or where an
    unknown processor class loads as a bare tokenizer: the caller then loads its images-only class."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_ref)
    except (ImportError, AttributeError, ValueError, OSError, TypeError):
        return None
    return processor if hasattr(processor, "image_processor") else None


def check_mode_arguments(title: str, modes, mode: str, thresholds, r, tome_vtu: bool = True,
                         needs_thresholds: tuple[str, ...] = ("dymu", "dtome"), r_means: str = "unit merges per block") -> None:
    """The argument rules the apply functions of the families that merge units share, one line each:
    a known mode, r with mode tome only, thresholds where the mode needs them, tome_vtu=False with tome only."""
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r} for {title}; choose one of {', '.join(modes)}")
    if mode == "tome" and r is None:
        raise ValueError(f"mode 'tome' needs r ({r_means}: one number or one per block)")
    if mode != "tome" and r is not None:
        raise ValueError(f"r is for mode 'tome'; mode {mode!r} takes thresholds")
    if mode in needs_thresholds and thresholds is None:
        raise ValueError(f"mode {mode!r} needs thresholds (dymu calibrate makes them)")
    if not tome_vtu and mode != "tome":
        raise ValueError(f"tome_vtu=False is a setting of mode 'tome', not {mode!r}")


def register_vlm_family(family: VLMFamily) -> VLMFamily:
    """Make ``family`` known to dymu (every entry point dispatches through the registry)."""
    missing = [m for m in MODES if m not in family.modes]
    missing += [o for o in (*OPTIONS, *CALL_FEATURES) if o not in family.options]
    if missing:
        raise ValueError(f"family {family.name!r} declares neither support nor a reason for: {', '.join(missing)}")
    _REGISTRY[family.name] = family
    return family


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_FAMILIES:
            importlib.import_module(f"{__package__}.{name}")


def vlm_families() -> list[VLMFamily]:
    """Every registered family: the built-in ones in `BUILTIN_FAMILIES` order (whichever adapter module was
    imported first: the README's table must not depend on it), then the others as registered."""
    _load_builtin()
    order = {f"{__package__}.{name}": k for k, name in enumerate(BUILTIN_FAMILIES)}
    return sorted(_REGISTRY.values(), key=lambda family: order.get(type(family).__module__, len(order)))


def get_vlm_family(name: str) -> VLMFamily:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def vlm_family_of(model: nn.Module) -> VLMFamily | None:
    """The adapter of ``model``'s class, or None."""
    for family in vlm_families():
        if family.matches(model):
            return family
    return None


def vlm_family_for(model_type: str) -> VLMFamily | None:
    """The adapter that loads models whose `config.model_type` is ``model_type``, or None."""
    for family in vlm_families():
        if model_type in family.model_types:
            return family
    return None


def supported_vlm_names() -> list[str]:
    return [c.__name__ for family in vlm_families() for c in family.model_classes()]


def family_model_types() -> list[str]:
    return [t for family in vlm_families() for t in family.model_types]


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    """(work(), seconds), synchronising CUDA so the time is the work's."""
    import time

    start = time.perf_counter()
    out = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def feature_matrix() -> str:
    """The markdown table of every registered family's modes and options (README, docs/families.md):
    "yes", or "no" with the declared reason as a footnote number."""
    features = [*MODES, *OPTIONS, *CALL_FEATURES]
    reasons: list[str] = []
    rows = []
    # Built-in families in BUILTIN_FAMILIES order whatever imported first (a test importing one adapter module
    # registers it early), then the others in registration order.
    builtin = {f"{__package__}.{name}": i for i, name in enumerate(BUILTIN_FAMILIES)}
    ordered = sorted(vlm_families(), key=lambda f: builtin.get(type(f).__module__, len(builtin)))
    for family in ordered:
        cells = []
        for feature in (*features, "kv_cache='compact'"):
            reason = family.kv_caches["compact"] if feature.startswith("kv_cache") else \
                (family.modes if feature in MODES else family.options)[feature]
            if reason is None:
                cells.append("yes")
                continue
            if reason not in reasons:
                reasons.append(reason)
            cells.append(f"no [{reasons.index(reason) + 1}]")
        rows.append(f"| {family.title} | " + " | ".join(cells) + " |")
    header = "| family | " + " | ".join(f"`{f}`" for f in (*features, "kv_cache='compact'")) + " |"
    lines = [header, "|---" * (len(features) + 2) + "|", *rows, ""]
    lines += [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines)
