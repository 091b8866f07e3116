"""`dymu.generate`: prompts + images -> answers and a per-call report, in any DyMU mode.

The encoder runs first (timed on its own), then `model.generate` with the encoded images passed
as `mm_encoder_outputs`, so prefill and decode are timed apart. Modes that change the number of
visual tokens the LLM sees (`dtome`, `tome` without VTU, `downsample`) need the prompt to hold one
placeholder per token; this module rewrites the stock prompt accordingly. `dymu` and `tome` keep
the stock prompt (virtual unmerge + VTU). `prompt_inputs` builds those inputs for a plain
`model.generate(**inputs)` in any mode.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .images import DEFAULT_FRAMES
from .locks import model_lock
from .families.llava import llava_mode

VLM_TYPES = {  # model_type -> transformers class name
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


@dataclass
class Report:
    mode: str
    # Per prompt, per image (then per video): distinct visual rows the LLM runs. LLaVA-1.5 and the Qwen
    # VLs: the tokens kept; AnyRes / video: the VTU groups of the packed (unpadded, newline, pooled) layout.
    visual_tokens: list[list[int]]
    # Tokens per image (LLaVA-1.5) or per crop / frame (AnyRes) in the stock encoder; Qwen VLs: per
    # prompt, per image / video (native resolution: every image has its own count).
    full_tokens: int | list[list[int]]
    encoder_s: float
    prefill_s: float
    decode_s: float
    new_tokens: int = 0
    image_size: int | None = None  # downsample: the side the images were resized to
    # Per prompt, per image (then per video): placeholders in the stock prompt (AnyRes: after packing).
    stock_tokens: list[list[int]] = field(default_factory=list)
    video_tokens_per_temporal_patch: list[list[int]] | None = None  # Qwen VLs: per video (2 frames per patch)
    # With a token budget or focus regions: the tokens the same images keep without either (an
    # extra encoder pass, not timed), to show what the cost control saved. None otherwise.
    visual_tokens_without_budget_or_focus: list[list[int]] | None = None
    # The three counts every tool shows, per prompt, per image (then per video), one name each:
    # tokens the vision tower kept (summed over an image's crops / a video's frames), distinct rows the
    # LLM runs (VTU groups), and placeholder positions in the stock prompt. (visual_tokens and
    # stock_tokens above are llm_rows and stock_positions under their older names.)
    encoder_tokens: list[list[int]] = field(default_factory=list)
    llm_rows: list[list[int]] = field(default_factory=list)
    stock_positions: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        self.llm_rows = self.llm_rows or self.visual_tokens
        self.stock_positions = self.stock_positions or self.stock_tokens

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    answers: list[str]
    sequences: torch.Tensor
    report: Report
    scores: list = field(default_factory=list)  # per generated step: (B, vocab) logits, when asked


QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def load(model_id_or_dir: str, device: str | None = None, dtype: str | None = None):
    """``(model, processor)`` of any supported VLM, from a Hub id or a local folder: `dymu.load`.

    The processor works with or without torchvision (the stock OneVision and Qwen VL video processors
    need it; without it dymu's frame-list processors stand in). ``device``: "cpu", "cuda" or "cuda:N"
    (default: cuda when available); ``dtype``: "float32", "bfloat16" or "float16" (default: bfloat16
    on cuda, float32 on cpu). The model is in eval mode; the tokenizer pads on the left, as batched
    generation needs. Errors are one line (`dymu.loading.LoadError`).
    """
    return load_vlm(str(model_id_or_dir), device, dtype)


def load_vlm(model_ref: str, device: str | None = None, dtype: str | None = None):
    """(model, processor) of a LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision or a Qwen2-VL / Qwen2.5-VL /
    Qwen3-VL, from a hub id or a local folder."""
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .loading import LoadError, _config, resolve_device_dtype

    config = _config(model_ref)
    if config.model_type not in (*VLM_TYPES, *QWEN_MODEL_TYPES):
        raise LoadError(f"{model_ref} is a {config.model_type!r} model; dymu generate supports LLaVA "
                        f"({', '.join(VLM_TYPES.values())}) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL models.")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    if config.model_type in QWEN_MODEL_TYPES:
        from .families.qwen_vl import load_qwen_processor

        model = AutoModelForImageTextToText.from_pretrained(model_ref, dtype=torch_dtype).to(torch_device).eval()
        load_processor = lambda: load_qwen_processor(model_ref, config.model_type)  # noqa: E731
    else:
        cls = getattr(transformers, VLM_TYPES[config.model_type])
        model = cls.from_pretrained(model_ref, dtype=torch_dtype).to(torch_device).eval()
        if config.model_type == "llava_onevision":
            from .families.llava_next import load_onevision_processor

            load_processor = lambda: load_onevision_processor(model_ref)  # noqa: E731
        else:
            load_processor = lambda: AutoProcessor.from_pretrained(model_ref)  # noqa: E731
    try:
        processor = load_processor()
        tokenizer = processor.tokenizer
    except (OSError, ValueError, AttributeError, TypeError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:200]
        raise LoadError(f"{model_ref}: its processor or tokenizer cannot be loaded ({reason}); the folder needs the "
                        "files processor.save_pretrained writes (tokenizer.json / tokenizer_config.json, "
                        "processor_config.json)") from None
    tokenizer.padding_side = "left"
    return model, processor


def chat_text(processor, prompt: str, num_images: int, num_videos: int = 0) -> str:
    """The processor's chat template for one user turn, else LLaVA-1.5's plain format."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return "USER: " + "<image>\n" * num_images + prompt + " ASSISTANT:"


def set_placeholder_counts(input_ids, attention_mask, image_token_id, pad_token_id, stock: int, counts: list[int]):
    """Rewrite a left-padded batch so that image k has ``counts[k]`` placeholders instead of ``stock``.

    Images are numbered in reading order over the batch (the order the model fills them in).
    """
    rows, k = [], 0
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        new, i = [], 0
        while i < len(ids):
            if ids[i] != image_token_id:
                new.append(ids[i])
                i += 1
                continue
            new += [image_token_id] * counts[k]
            i += stock
            k += 1
        rows.append(new)
    width = max(len(r) for r in rows)
    new_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=input_ids.device)
    new_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=input_ids.device)
    return new_ids, new_mask


def downsample_side(tokens: float) -> int:
    """Patch-grid side for the downsample baseline: the square grid closest to ``tokens`` tokens."""
    return max(1, round(math.sqrt(tokens)))


class _ForwardTimer:
    """Times every forward of the model: the first of a generate call is the prefill."""

    def __init__(self, model):
        self.times: list[float] = []
        self._t0 = 0.0
        self._sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *args):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *args):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self.handles:
            h.remove()


def _viewed(item, prompt: int, index: int) -> Image.Image:
    from .images import as_viewed, open_image

    if isinstance(item, Image.Image):
        return as_viewed(item, f"image {index} of prompt {prompt}")
    return open_image(item)


def _video_frames(item, prompt: int, index: int, num_frames: int) -> list[Image.Image]:
    """One video of a prompt as PIL frames: a list of frames (each shown as a viewer shows it), or a video
    file / folder of frames (`dymu.images.load_video`)."""
    from .images import load_video

    if not isinstance(item, (list, tuple)):
        return load_video(item, num_frames)  # checks frames and sizes itself, naming the file
    frames = [_viewed(f, prompt, index) for f in item]
    if not frames or len({f.size for f in frames}) > 1:
        raise ValueError(f"video {index} of prompt {prompt}: needs at least one frame and all frames of one size, "
                         f"got sizes {sorted({f.size for f in frames})}")
    return frames


def prompt_texts(processor, prompts: list[str], images: list[list], chat_template: bool = True,
                 videos: list[list] | None = None) -> list[str]:
    """The prompt strings: the chat template with one image placeholder per image (``chat_template``),
    or the prompts as written, which must then hold the image token once per image."""
    token = getattr(processor, "image_token", None) or "<image>"
    videos = videos if videos is not None else [[] for _ in prompts]
    texts = []
    for prompt, ims, vs in zip(prompts, images, videos):
        have = prompt.count(token)
        if chat_template and have:
            raise ValueError(f"the prompt already contains the image token {token!r}: give only the question "
                             f"(dymu adds the chat template and one {token} per image), or pass the full prompt "
                             "as is with --raw-prompt (Python: chat_template=False)")
        if not chat_template and have != len(ims):
            raise ValueError(f"the raw prompt has {have} image token(s) {token!r} but {len(ims)} image(s) were given: "
                             f"put {token} once per image where the image goes")
        texts.append(chat_text(processor, prompt, len(ims), len(vs)) if chat_template else prompt)
    return texts


def _call_budget(tower, max_tokens, min_tokens):
    """The budget for one call: each bound given here replaces the one `dymu.apply` set."""
    from .towers.encoder import make_budget

    state = getattr(tower, "_dymu_state", None)
    if max_tokens is None and min_tokens is None:
        return None if state is None else state.budget
    if state is None:
        raise ValueError("max_tokens/min_tokens need a merging mode (dymu, dtome or tome), not the stock model")
    current = state.budget
    return make_budget(max_tokens if max_tokens is not None else getattr(current, "max_tokens", None),
                       min_tokens if min_tokens is not None else getattr(current, "min_tokens", None))


def _flat_focus(focus, images) -> list | None:
    """``focus`` nested like ``images`` (one entry per image of each prompt) -> one entry per image."""
    if focus is None:
        return None
    if len(focus) != len(images) or any(f is not None and len(f) != len(ims) for f, ims in zip(focus, images)):
        raise ValueError("focus must be nested like images: one list per prompt, one entry (or None) per image")
    return [f for per_prompt, ims in zip(focus, images) for f in (per_prompt if per_prompt is not None else [None] * len(ims))]


@dataclass
class PreparedInputs:
    inputs: dict  # input_ids, attention_mask, mm_encoder_outputs: what model.generate takes
    visual_tokens: list[list[int]]  # per prompt, per image (then video): what the LLM runs (see Report)
    stock_tokens: list[list[int]]  # per prompt, per image (then video): placeholders in the stock prompt
    full_tokens: int  # tokens per image (LLaVA-1.5) or per crop / frame (AnyRes) in the stock encoder
    encoder_s: float
    image_size: int | None  # downsample: the side the images were resized to
    without: list[list[int]] | None = None  # per prompt, per image: tokens kept without budget / focus
    encoder_tokens: list[list[int]] = field(default_factory=list)  # per prompt, per image (then video)


def _anyres_inputs(model, processor, prompts, images, videos, device, chat_template: bool = True):
    """LLaVA-NeXT / OneVision: the stock processor's inputs, then the encoder run on its own.

    Returns (input_ids, attention_mask, mm_encoder_outputs, visual rows per item, stock placeholders
    per item, encoder tokens per item), items in reading order: every prompt's images, then
    (OneVision) the videos.
    """
    from .families.llava_next import crops_per_image, encoder_tokens_per_item, unique_rows_per_item

    onevision = hasattr(processor, "video_token")
    texts = prompt_texts(processor, prompts, images, chat_template, videos)
    kwargs = {}
    if any(images):  # OneVision reads images per prompt (its multi-image rule); NeXT a flat list
        kwargs["images"] = [list(i) for i in images] if onevision else [im for ims in images for im in ims]
    if any(videos):
        kwargs["videos"] = [v for vs in videos for v in vs]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
    inner, dtype = model.model, model.dtype
    mm, counts = {}, {"visual": {}, "stock": {}, "encoder": {}}
    if "pixel_values" in inputs:
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        mm["image"] = inner.get_image_features(inputs["pixel_values"].to(device, dtype), inputs["image_sizes"].to(device),
                                               **extra)
        crops = crops_per_image(inner, inputs["image_sizes"], inputs.get("batch_num_images"))
        counts["encoder"]["image"] = encoder_tokens_per_item(inner, crops)  # before the video encode replaces it
    if "pixel_values_videos" in inputs:
        mm["video"] = inner.get_video_features(inputs["pixel_values_videos"].to(device, dtype))
        videos_in, frames = inputs["pixel_values_videos"].shape[:2]
        counts["encoder"]["video"] = encoder_tokens_per_item(inner, [frames] * videos_in)
    for kind, out in mm.items():
        counts["visual"][kind] = unique_rows_per_item(out.pooler_output)
        counts["stock"][kind] = [len(f) for f in out.pooler_output]
    per_prompt = {name: [] for name in counts}
    cursor = {"image": 0, "video": 0}
    for ims, vs in zip(images, videos):
        rows = {name: [] for name in counts}
        for kind, n in (("image", len(ims)), ("video", len(vs))):
            for name, by_kind in counts.items():
                rows[name] += by_kind.get(kind, [])[cursor[kind]:cursor[kind] + n]
            cursor[kind] += n
        for name in counts:
            per_prompt[name].append(rows[name])
    return (inputs["input_ids"].to(device), inputs["attention_mask"].to(device), mm or None, per_prompt["visual"],
            per_prompt["stock"], per_prompt["encoder"])


def check_prompts(prompts, images, videos=None) -> None:
    """One-line errors for the shapes `generate` / `prompt_inputs` take: a non-empty list of prompt
    strings, and per prompt a list of its images (and of its videos)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, not {prompts!r:.80}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings (one per prompt)")
    for name, items in (("images", images), ("videos", videos)):
        if items is None and name == "videos":
            continue
        if not isinstance(items, (list, tuple)) or len(items) != len(prompts):
            raise ValueError(f"{name} must be a list with one list per prompt ({len(prompts)}), not {items!r:.80}")
        for i, per_prompt in enumerate(items):
            if not isinstance(per_prompt, (list, tuple)):
                raise ValueError(f"{name}[{i}] must be the list of prompt {i}'s {name} (e.g. [[image]] for one "
                                 f"prompt with one image), not a {type(per_prompt).__name__}")


def _videos_as_frames(model, prompts, images, videos, num_frames: int) -> list[list[list[Image.Image]]]:
    """``videos`` checked against the prompts and the model, every video as its PIL frames."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from .families.qwen_vl import SUPPORTED_QWEN_VLMS

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    videos = videos if videos is not None else [[] for _ in prompts]
    if len(videos) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} video lists")
    if any(videos) and not isinstance(model, (LlavaOnevisionForConditionalGeneration, *SUPPORTED_QWEN_VLMS)):
        # refused before any frame is decoded
        raise ValueError(f"{type(model).__name__} takes no video; videos need LLaVA-OneVision or a Qwen VL")
    frames = [[_video_frames(v, i, k, num_frames) for k, v in enumerate(vs)] for i, vs in enumerate(videos)]
    counts = {len(f): (i, k) for i, vs in enumerate(frames) for k, f in enumerate(vs)}
    if len(counts) > 1 and isinstance(model, LlavaOnevisionForConditionalGeneration):
        seen = ", ".join(f"{n} (prompt {i}, video {k})" for n, (i, k) in sorted(counts.items()))
        raise ValueError(f"LLaVA-OneVision stacks every video of one call into one tensor, so they need one frame "
                         f"count, not {seen}: call generate once per frame count")
    return frames


@torch.no_grad()
def _prepare(model, processor, prompts, images, videos=None, chat_template: bool = True, max_tokens=None,
             min_tokens=None, focus=None, fill=None, num_frames: int = DEFAULT_FRAMES) -> PreparedInputs:
    from .families.qwen_vl import SUPPORTED_QWEN_VLMS

    if isinstance(model, SUPPORTED_QWEN_VLMS):
        raise ValueError(f"{type(model).__name__} keeps the stock prompt in every dymu mode: give model.generate the "
                         "processor's inputs as they are, or use dymu.generate")
    videos = _videos_as_frames(model, prompts, images, videos, num_frames)
    from .focus import DEFAULT_FILL, apply_focus_all, check_focus_survives
    from .towers.encoder import budget_set, encode_with_tower, family_of
    from .families.llava_next import SUPPORTED_VLMS as ANYRES

    original = [[_viewed(im, i, k) for k, im in enumerate(ims)] for i, ims in enumerate(images)]
    flat_original = [im for per_prompt in original for im in per_prompt]
    # Focus regions fill the pixels outside them before the processor (dymu.focus): same layout.
    flat_focus, fill = _flat_focus(focus, original), DEFAULT_FILL if fill is None else fill
    filled = apply_focus_all(flat_original, flat_focus, fill)
    check_focus_survives(processor.image_processor, flat_original, filled, flat_focus, fill)
    images, k = [], 0
    for ims in original:
        images.append(filled[k : k + len(ims)])
        k += len(ims)
    tower = model.model.vision_tower
    budget = _call_budget(tower, max_tokens, min_tokens)
    merging = hasattr(tower, "_dymu_state")
    with_budget = budget_set(tower, budget) if merging else contextlib.nullcontext()

    device = next(model.parameters()).device
    if isinstance(model, ANYRES):
        start = time.perf_counter()
        with with_budget:
            input_ids, attention_mask, mm_encoder_outputs, per_prompt, stock_tokens, encoder = _anyres_inputs(
                model, processor, prompts, images, videos, device, chat_template)
        if device.type == "cuda":
            torch.cuda.synchronize()
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                               "mm_encoder_outputs": mm_encoder_outputs}, per_prompt, stock_tokens, side * side,
                              time.perf_counter() - start, None, encoder_tokens=encoder)
    mode = llava_mode(model)
    inner = model.model
    config = model.config
    flat = [im for per_prompt in images for im in per_prompt]
    texts = prompt_texts(processor, prompts, images, chat_template)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    stock = config.image_seq_length if flat else 0

    mm_encoder_outputs, counts, side = None, [], None
    start = time.perf_counter()
    if flat:
        pixel_values = inputs["pixel_values"]
        kwargs = {}
        if mode == "downsample":
            side = downsample_side(model._dymu_downsample_tokens) * inner.vision_tower.config.patch_size
            small = copy.deepcopy(processor.image_processor)
            small.size, small.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
            pixel_values = small(images=flat, return_tensors="pt")["pixel_values"]
            kwargs["interpolate_pos_encoding"] = True
        with with_budget:
            features = inner.get_image_features(pixel_values.to(device, model.dtype), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        mm_encoder_outputs = {"image": features}
        placeholders = [len(f) for f in features.pooler_output]  # per image, as the LLM will see it
        encoded = getattr(getattr(inner, "_dymu", None), "last_encoded", None)
        counts = encoded.num_tokens.tolist() if encoded is not None else placeholders
        if any(n != stock for n in placeholders):
            input_ids, attention_mask = set_placeholder_counts(
                input_ids, attention_mask, config.image_token_id, processor.tokenizer.pad_token_id, stock,
                placeholders)
    encoder_s = time.perf_counter() - start
    per_prompt, k = [], 0
    for ims in images:
        per_prompt.append(counts[k : k + len(ims)])
        k += len(ims)
    stock_tokens = [[config.image_seq_length] * len(ims) for ims in images]
    without = None
    if flat and merging and (budget is not None or focus is not None):  # the same images, whole, no budget
        plain = processor.image_processor(images=flat_original, return_tensors="pt")["pixel_values"]
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        with budget_set(tower, None):
            plain_counts = encode_with_tower(tower, family_of(tower), plain.to(device, model.dtype), layer,
                                             strategy == "default").num_tokens.tolist()
        without, k = [], 0
        for ims in images:
            without.append(plain_counts[k : k + len(ims)])
            k += len(ims)
    # LLaVA-1.5: the LLM runs one row per kept token (VTU groups, or placeholders without VTU).
    return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                           "mm_encoder_outputs": mm_encoder_outputs}, per_prompt, stock_tokens,
                          config.image_seq_length, encoder_s, side, without, encoder_tokens=per_prompt)


def prompt_inputs(model, processor, prompts: list[str], images: list[list], *, videos: list[list] | None = None,
                  chat_template: bool = True, max_tokens: int | None = None, min_tokens: int | None = None,
                  focus: list[list] | None = None, fill=None, num_frames: int = DEFAULT_FRAMES) -> dict:
    """Inputs for ``model.generate(**inputs)`` in any mode of `dymu.apply`: the images encoded once
    (``mm_encoder_outputs``) and the prompts with as many image placeholders as the LLM will see
    (fewer in ``dtome``, ``tome`` without VTU and ``downsample``). ``prompts[i]`` is the question about
    ``images[i]`` (a list per prompt); ``chat_template=False`` takes each prompt as written (it must
    hold the image token once per image)."""
    from .families.qwen_vl import SUPPORTED_QWEN_VLMS

    check_prompts(prompts, images, videos)
    if isinstance(model, SUPPORTED_QWEN_VLMS):
        from .families.qwen_prompts import qwen_prompt_inputs

        media = _qwen_media(model, prompts, images, videos, chat_template, num_frames)
        with model_lock(model):
            return qwen_prompt_inputs(model, processor, prompts, media, max_tokens=max_tokens, min_tokens=min_tokens,
                                      focus=focus, fill=fill).inputs
    with model_lock(model):
        return _prepare(model, processor, prompts, images, videos, chat_template, max_tokens, min_tokens, focus,
                        fill, num_frames).inputs


def _qwen_media(model, prompts, images, videos, chat_template: bool, num_frames: int) -> list[list]:
    """One list per prompt in the prompt's order: images (a list of frames among them is a video), then videos."""
    if not chat_template:
        raise ValueError(f"{type(model).__name__}: prompts are questions (chat_template=False is for the LLaVA models)")
    videos = _videos_as_frames(model, prompts, images, videos, num_frames)
    return [[_video_frames(m, i, k, num_frames) if isinstance(m, (list, tuple)) else _viewed(m, i, k)
             for k, m in enumerate(ims)] + vs for i, (ims, vs) in enumerate(zip(images, videos))]


@torch.no_grad()
def generate(model, processor, prompts: list[str], images: list[list], *, videos: list[list] | None = None,
             max_new_tokens: int = 32, output_scores: bool = False, chat_template: bool = True,
             max_tokens: int | None = None, min_tokens: int | None = None, focus: list[list] | None = None,
             fill=None, num_frames: int = DEFAULT_FRAMES, **generate_kwargs) -> GenerationResult:
    """Answer ``prompts[i]`` about ``images[i]`` (a list per prompt, possibly empty), greedily by default.

    The model is a LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL, stock or
    patched by `dymu.apply` in any of its modes. ``videos[i]`` (OneVision and the Qwen VLs): the videos
    of prompt i, each a list of PIL frames, a video file (``num_frames`` evenly spaced frames, read with
    PyAV: ``pip install 'dymu[video]'``) or a folder of frame images; they follow the prompt's images.
    (Qwen VLs also take a video as a list of frames inside ``images[i]``, in the prompt's order.)
    The report lists tokens per image, then per video, for every prompt.
    Prompts are questions, wrapped in the chat template with one image placeholder per image;
    ``chat_template=False`` takes them as written (the image token once per image).
    Images are PIL images or file paths, both shown to the model as a viewer shows them
    (`dymu.images.as_viewed`: EXIF orientation, 16-bit, alpha on white, size limits).

    ``max_tokens`` / ``min_tokens``: a token budget per image (per crop on AnyRes) for this call,
    replacing the one `dymu.apply` set. ``focus``: nested like ``images``, one entry per image (None:
    whole image): a box (x0, y0, x1, y1) in the image's pixels, a list of boxes, a mask image or a
    boolean array; outside it the pixels become ``fill`` (default white; "mean" or a colour) before the
    processor (`dymu.focus`). With either, the report of a LLaVA-1.5 or a Qwen VL also gives the tokens
    kept without them. (Qwen VLs: the budget is per image and per video, in LLM tokens; focus is for images.)

    Thread safety: calls on the same model from several threads run one at a time (a per-model
    lock), because a patched model keeps the state of its running forward; each call gets its own
    correct result. Calls on different models run in parallel.
    """
    from .families.qwen_vl import SUPPORTED_QWEN_VLMS

    check_prompts(prompts, images, videos)
    if isinstance(model, SUPPORTED_QWEN_VLMS):
        media = _qwen_media(model, prompts, images, videos, chat_template, num_frames)
        with model_lock(model):
            return _generate_qwen(model, processor, prompts, media, max_new_tokens, output_scores, generate_kwargs,
                                  dict(max_tokens=max_tokens, min_tokens=min_tokens, focus=focus, fill=fill))
    with model_lock(model):
        prepared = _prepare(model, processor, prompts, images, videos, chat_template, max_tokens, min_tokens, focus,
                            fill, num_frames)
        inputs = prepared.inputs
        out, timer, new, answers = _timed_generate(model, processor, inputs, max_new_tokens, output_scores,
                                                   generate_kwargs)
    report = Report(mode=llava_mode(model), visual_tokens=prepared.visual_tokens, full_tokens=prepared.full_tokens,
                    encoder_s=prepared.encoder_s, prefill_s=timer.times[0] if timer.times else 0.0,
                    decode_s=sum(timer.times[1:]), new_tokens=new.shape[1], image_size=prepared.image_size,
                    stock_tokens=prepared.stock_tokens, visual_tokens_without_budget_or_focus=prepared.without,
                    encoder_tokens=prepared.encoder_tokens)
    return GenerationResult(answers=[a.strip() for a in answers], sequences=out.sequences, report=report,
                            scores=list(out.scores) if output_scores else [])


def _timed_generate(model, processor, inputs, max_new_tokens, output_scores, generate_kwargs):
    """`model.generate` (greedy unless asked) with every forward timed: (output, timer, new tokens, answers)."""
    timer = _ForwardTimer(model)
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=generate_kwargs.pop("do_sample", False),
                             return_dict_in_generate=True, output_scores=output_scores, **generate_kwargs)
    finally:
        timer.close()
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return out, timer, new, processor.tokenizer.batch_decode(new, skip_special_tokens=True)


def _generate_qwen(model, processor, prompts, media, max_new_tokens, output_scores, generate_kwargs,
                   call: dict) -> GenerationResult:
    """Qwen VLs: encode images and videos first (timed; `families.qwen_prompts`), then generate with
    them as `mm_encoder_outputs` (stock prompt with VTU, one placeholder per kept token without)."""
    from .families.qwen_prompts import qwen_prompt_inputs

    prepared = qwen_prompt_inputs(model, processor, prompts, media, **call)
    out, timer, new, answers = _timed_generate(model, processor, prepared.inputs, max_new_tokens, output_scores,
                                               generate_kwargs)
    report = Report(mode=getattr(model, "_dymu_mode", "full"), visual_tokens=prepared.kept, full_tokens=prepared.stock,
                    stock_tokens=prepared.stock, encoder_s=prepared.encoder_s,
                    prefill_s=timer.times[0] if timer.times else 0.0, decode_s=sum(timer.times[1:]),
                    new_tokens=new.shape[1], video_tokens_per_temporal_patch=prepared.per_patch,
                    encoder_tokens=prepared.encoder, visual_tokens_without_budget_or_focus=prepared.without)
    return GenerationResult(answers=[a.strip() for a in answers], sequences=out.sequences, report=report,
                            scores=list(out.scores) if output_scores else [])
