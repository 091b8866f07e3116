"""`dymu.generate`: prompts + images -> answers and a per-call report, in any DyMU mode.

The encoder runs first (timed on its own), then `model.generate` with the encoded images passed
as `mm_encoder_outputs`, so prefill and decode are timed apart. Modes that change the number of
visual tokens the LLM sees (`dtome`, `tome` without VTU, `downsample`) need the prompt to hold one
placeholder per token; this module rewrites the stock prompt accordingly. `dymu` and `tome` keep
the stock prompt (virtual unmerge + VTU). `prompt_inputs` builds those inputs for a plain
`model.generate(**inputs)` in any mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .families import Request, vlm_family_for, vlm_family_of
from .families.prompting import video_frames
from .videos import DEFAULT_FRAMES
from .locks import model_lock


@dataclass
class Report:
    mode: str
    # Per prompt, per image (then per video): distinct visual rows the LLM runs. LLaVA-1.5 and the Qwen
    # VLs: the tokens kept; AnyRes / video: the VTU groups of the packed (unpadded, newline, pooled) layout.
    visual_tokens: list[list[int]]
    # Per prompt, per image (then per video): tokens the stock vision tower makes (summed over crops / frames).
    full_tokens: list[list[int]]
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
    """(model, processor) of a VLM of any registered family, from a hub id or a local folder."""
    from transformers import AutoModelForImageTextToText

    from .families import family_model_types
    from .loading import LoadError, _config, resolve_device_dtype

    config = _config(model_ref)
    family = vlm_family_for(config.model_type)
    if family is None:
        raise LoadError(f"{model_ref} is a {config.model_type!r} model; dymu supports the VLM model types "
                        f"{', '.join(family_model_types())}.")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_ref, dtype=torch_dtype).to(torch_device).eval()
    if not family.matches(model):
        raise LoadError(f"{model_ref}: its {config.model_type!r} config loads as a {type(model).__name__}, which the "
                        f"{family.title} adapter does not patch")
    try:
        processor = family.load_processor(model_ref, config)
        tokenizer = processor.tokenizer
    except (OSError, ValueError, AttributeError, TypeError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:200]
        raise LoadError(f"{model_ref}: its processor or tokenizer cannot be loaded ({reason}); the folder needs the "
                        "files processor.save_pretrained writes (tokenizer.json / tokenizer_config.json, "
                        "processor_config.json)") from None
    tokenizer.padding_side = "left"
    return model, processor


def family_or_refuse(model):
    """The family adapter of ``model``, or a one-line refusal naming the supported classes."""
    family = vlm_family_of(model)
    if family is None:
        from .families import supported_vlm_names

        raise ValueError(f"{type(model).__name__} is not a supported VLM (supported: {', '.join(supported_vlm_names())})")
    return family


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


def _request(model, family, prompts, images, videos, chat_template, max_tokens, min_tokens, focus, fill,
             num_frames) -> Request:
    """The call checked against the family, every video as PIL frames (refused before any frame is decoded
    where the family takes no video)."""
    check_prompts(prompts, images, videos)
    videos = videos if videos is not None else [[] for _ in prompts]
    if any(videos):
        family.refuse_unsupported("video", model)
    frames = [[video_frames(v, i, k, num_frames) for k, v in enumerate(vs)] for i, vs in enumerate(videos)]
    family.check_videos(model, frames)
    return Request(list(prompts), [list(ims) for ims in images], frames, chat_template, max_tokens, min_tokens,
                   focus, fill)


def prompt_inputs(model, processor, prompts: list[str], images: list[list], *, videos: list[list] | None = None,
                  chat_template: bool = True, max_tokens: int | None = None, min_tokens: int | None = None,
                  focus: list[list] | None = None, fill=None, num_frames: int = DEFAULT_FRAMES) -> dict:
    """Inputs for ``model.generate(**inputs)`` in any mode of `dymu.apply`: the images encoded once
    (``mm_encoder_outputs``) and the prompts with as many image placeholders as the LLM will see
    (fewer in ``dtome``, ``tome`` without VTU and ``downsample``). ``prompts[i]`` is the question about
    ``images[i]`` (a list per prompt); ``chat_template=False`` takes each prompt as written (it must
    hold the image token once per image)."""
    family = family_or_refuse(model)
    request = _request(model, family, prompts, images, videos, chat_template, max_tokens, min_tokens, focus, fill,
                       num_frames)
    with model_lock(model):
        return family.prepare(model, processor, request).inputs


@torch.no_grad()
def generate(model, processor, prompts: list[str], images: list[list], *, videos: list[list] | None = None,
             max_new_tokens: int = 32, output_scores: bool = False, chat_template: bool = True,
             max_tokens: int | None = None, min_tokens: int | None = None, focus: list[list] | None = None,
             fill=None, num_frames: int = DEFAULT_FRAMES, **generate_kwargs) -> GenerationResult:
    """Answer ``prompts[i]`` about ``images[i]`` (a list per prompt, possibly empty), greedily by default.

    The model is a VLM of any registered family (`dymu.families`), stock or patched by `dymu.apply` in
    any of its modes. ``videos[i]`` (families that take video): the videos of prompt i, each a list of
    PIL frames, a video file (``num_frames`` evenly spaced frames, read with PyAV: ``pip install
    'dymu[video]'``) or a folder of frame images; they follow the prompt's images. (Qwen VLs also take
    a video as a list of frames inside ``images[i]``, in the prompt's order.)
    The report lists tokens per image, then per video, for every prompt.
    Prompts are questions, wrapped in the chat template with one image placeholder per image;
    ``chat_template=False`` takes them as written (the image token once per image).
    Images are PIL images or file paths, both shown to the model as a viewer shows them
    (`dymu.images.as_viewed`: EXIF orientation, 16-bit, alpha on white, size limits).

    ``max_tokens`` / ``min_tokens``: a token budget per image (per crop on AnyRes) for this call,
    replacing the one `dymu.apply` set. ``focus``: nested like ``images``, one entry per image (None:
    whole image): a box (x0, y0, x1, y1) in the image's pixels, a list of boxes, a mask image or a
    boolean array; outside it the pixels become ``fill`` (default white; "mean" or a colour) before the
    processor (`dymu.focus`). With either, the report of a LLaVA-1.5 also gives the tokens kept without
    them. A family that does not support an option refuses it with its declared reason.

    Thread safety: calls on the same model from several threads run one at a time (a per-model
    lock), because a patched model keeps the state of its running forward; each call gets its own
    correct result. Calls on different models run in parallel.
    """
    family = family_or_refuse(model)
    request = _request(model, family, prompts, images, videos, chat_template, max_tokens, min_tokens, focus, fill,
                       num_frames)
    with model_lock(model):
        prepared = family.prepare(model, processor, request)
        out, timer, new, answers = _timed_generate(model, processor, prepared.inputs, max_new_tokens, output_scores,
                                                   generate_kwargs)
    report = Report(mode=family.mode_of(model), visual_tokens=prepared.llm_rows, full_tokens=prepared.full_tokens,
                    encoder_s=prepared.encoder_s, prefill_s=timer.times[0] if timer.times else 0.0,
                    decode_s=sum(timer.times[1:]), new_tokens=new.shape[1], image_size=prepared.image_size,
                    stock_tokens=prepared.stock_positions, visual_tokens_without_budget_or_focus=prepared.without,
                    encoder_tokens=prepared.encoder_tokens, **prepared.report_extras)
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
