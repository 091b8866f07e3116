"""The `dymu` model for lmms-eval 0.7.x, found through the `lmms_eval.models` entry point.

    python -m lmms_eval --model dymu \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,thresholds=llava15-mid.json,mode=dymu,batch_size=8 \
        --tasks gqa --log_samples --output_path results/

Every request goes through `dymu.apply` and `dymu.generate`, so every VLM family dymu supports is
served with no code of its own here. `loglikelihood` too: `dymu.generate` runs with a logits
processor that forces the continuation's tokens one by one and reads their log-probabilities on
the way (the same prefill as a forward pass; each forced token is one cached decode step).

Visuals: a task's `doc_to_visual` may give PIL images, image files and videos (a video file or a
folder of frames; ``max_frames_num`` evenly spaced frames each, read with PyAV): videos need a family
that takes them (one that does not refuses them with its reason), and follow the images in the prompt.

Visual tokens: each logged sample's `token_counts` entry carries, per visual item in prompt order,
`encoder_tokens` (what the vision tower kept), `llm_rows` (the distinct rows the LLM ran),
`stock_positions` (the stock prompt's placeholders) and `visual_kinds` ("image" / "video"; the older
names `visual_tokens` = llm_rows and `full_visual_tokens` = stock_positions are kept); at the end of the requests the means per image and per video, over all ranks
and per task, are logged through lmms-eval's metric log and land in the results JSON as
`throughput.avg_visual_tokens` (per image; and `avg_full_visual_tokens`, `avg_images`,
`avg_visual_tokens/TASK`, `avg_images/TASK`), `avg_video_tokens` (per video; and
`avg_full_video_tokens`, `avg_videos`, `.../TASK`); lmms-eval prefixes `avg_`. `dymu report` reads them.

Data-parallel: under `accelerate launch`, lmms-eval gives each process its shard of the documents
(rank / world size); this model only puts itself on its process's device, keeps its own counts,
and merges them across processes at the end.

This module is the request loop; the model_args and a task's generation kwargs are read in
`lmms_eval_args`, the visual token counts kept in `lmms_eval_counts`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from transformers import LogitsProcessor, LogitsProcessorList

# generation_kwargs, load_thresholds, VisualTokenCounts and visual_token_summary are imported from here too
from .lmms_eval_args import (
    DEFAULT_FRAMES,
    DEFAULT_MAX_NEW_TOKENS,
    generation_kwargs,
    load_thresholds,
    positive_int_arg,
    refuse_unknown,
    settings_from_model_args,
)
from .lmms_eval_counts import VisualTokenCounts, gathered_per_doc, summary_lines, visual_token_summary

__all__ = ["DEFAULT_FRAMES", "DEFAULT_MAX_NEW_TOKENS", "MODEL_ID", "ContinuationScorer", "DyMU", "VisualTokenCounts",
           "cut_at_stop_strings", "generation_kwargs", "length_sorted_batches", "load_thresholds", "manifest",
           "visual_token_summary"]

MODEL_ID = "dymu"


def manifest():
    """The payload of the `lmms_eval.models` entry point (see pyproject.toml)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.DyMU")


# ---------------------------------------------------------------------------------------------
# Pure helpers


def length_sorted_batches(lengths: list[int], keys: list, batch_size: int) -> list[list[int]]:
    """Request indices in batches: requests with equal ``keys`` (generation settings) together,
    longest first within a key (so padding is small and an out-of-memory shows at once), groups in
    order of first appearance. Every index appears exactly once."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = []
    for members in groups.values():
        members.sort(key=lambda i: (-lengths[i], i))
        batches += [members[s : s + batch_size] for s in range(0, len(members), batch_size)]
    return batches


def cut_at_stop_strings(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


class ContinuationScorer(LogitsProcessor):
    """Forces each row's continuation, token by token, and adds up its log-probability.

    ``logprob[b]`` = Σ_t log p(cont_b[t] | prompt_b, cont_b[:t]); ``greedy[b]`` = every cont_b[t]
    was the arg-max. Rows whose continuation is over are forced to ``fill_id`` (EOS ends them).
    """

    def __init__(self, continuations: list[list[int]], fill_id: int):
        width = max(len(c) for c in continuations)
        self.lengths = torch.tensor([len(c) for c in continuations])
        self.targets = torch.tensor([c + [fill_id] * (width - len(c)) for c in continuations])  # (B, T)
        self.logprob = torch.zeros(len(continuations), dtype=torch.float64)
        self.greedy = torch.ones(len(continuations), dtype=torch.bool)
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = self.step
        self.step += 1
        target = self.targets[:, t].to(scores.device)  # (B,)
        live = (t < self.lengths).to(scores.device)
        logp = scores.float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        self.logprob += torch.where(live, logp, 0.0).double().cpu()
        self.greedy &= (~live | (scores.argmax(-1) == target)).cpu()
        forced = torch.full_like(scores, -math.inf)
        forced.scatter_(1, target[:, None], 0.0)
        return forced


# ---------------------------------------------------------------------------------------------
# The model


class DyMU(lmms):
    """lmms-eval model: a Hugging Face VLM patched by `dymu.apply` (any mode), answering through
    `dymu.generate`.

    model_args: ``pretrained`` (hub id or folder), ``thresholds`` (a `dymu calibrate` JSON file, or
    one number for every layer: ``inf`` = no merge), ``mode`` (full, dymu, dtome, tome, downsample;
    default dymu), ``r`` (merges per layer, mode tome), ``batch_size``, ``device``, ``dtype``
    (float32, bfloat16, float16), ``max_new_tokens`` (default when a task sets none), ``max_tokens`` /
    ``min_tokens`` (a per-image token budget at the feature layer, as in `dymu.apply`),
    ``max_frames_num`` (frames taken evenly from each video, default 32), and the other settings of
    `dymu.apply`: ``order``, ``merge_point``, ``vtu_attention``, ``kv_cache``, ``tome_vtu`` and
    ``cross_frame`` (`dymu.settings.Settings`; a family refuses what it does not support, with its reason).
    """

    is_simple = True

    def __init__(self, pretrained: str, thresholds=None, mode: str = "dymu", r: int | None = None,
                 batch_size: int | str = 1, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_batch_size=None, max_tokens=None,
                 min_tokens=None, max_frames_num: int | str = DEFAULT_FRAMES, cross_frame=None, order=None,
                 merge_point=None, vtu_attention="fast", kv_cache=None, tome_vtu=None, **unknown) -> None:
        super().__init__()
        refuse_unknown(unknown)
        self.batch_size_per_process = positive_int_arg("batch_size", batch_size)
        from ..videos import check_num_frames

        self.max_frames_num = check_num_frames(positive_int_arg("max_frames_num", max_frames_num),
                                               "dymu lmms-eval model: max_frames_num")
        from accelerate import Accelerator

        from ..api import apply_settings
        from ..generation import load_vlm

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # one device per process, whatever --device said
            device = str(self.accelerator.device)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        # Every model_arg is checked before the model loads: a typo fails in a second, naming the argument.
        # The thresholds load once per process.
        settings = settings_from_model_args(thresholds, mode, r, max_tokens, min_tokens, cross_frame, tome_vtu, order,
                                            merge_point, vtu_attention, kv_cache)
        self.max_new_tokens = positive_int_arg("max_new_tokens", max_new_tokens)
        self.model, self.processor = load_vlm(str(pretrained), device, dtype)
        apply_settings(self.model, settings)
        self.mode = mode
        self._device = next(self.model.parameters()).device
        self._visual_tokens: dict = {}  # (task, doc_id) -> (tokens per image, stock tokens per image)
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that ``--model_args`` win over the command line's defaults
        (``--batch_size`` defaults to 1, which would otherwise clash with ``batch_size=8``)."""
        from lmms_eval import utils

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **utils.simple_parse_args_string(arg_string)})

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # --- requests ------------------------------------------------------------------------------

    def _visuals(self, request: Instance) -> tuple[list, list]:
        """The request's (images, videos): PIL images and image files as RGB images; video files and
        folders of frames as they are (dymu.generate reads ``max_frames_num`` frames of each)."""
        from PIL import Image

        from ..images import IMAGE_SUFFIXES, open_image, to_rgb
        from ..videos import is_video_path

        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        images, videos = [], []
        for item in _flatten(visuals):
            if isinstance(item, Image.Image):
                images.append(to_rgb(item))
            elif isinstance(item, (str, Path)) and Path(item).suffix.lower() in IMAGE_SUFFIXES:
                images.append(open_image(item))
            elif is_video_path(item):
                videos.append(str(item))
            else:
                raise ValueError(f"dymu lmms-eval model: task {task} doc {doc_id} gives a visual of type "
                                 f"{type(item).__name__} ({str(item)[:80]!r}); dymu takes images (PIL or image "
                                 "files) and videos (video files or folders of frames), not audio or other data.")
        return images, videos

    def _frame_counts(self, request: Instance) -> tuple[int, ...]:
        """The frame count of each of the request's videos (none for image tasks): a batch keeps to one
        count, since a family may stack a call's videos into one tensor (dymu.generate refuses a mix)."""
        from ..videos import is_video_path, video_frame_count

        doc_to_visual, doc_id, task, split = request.args[2:6]
        if doc_to_visual is None:
            return ()
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        return tuple(video_frame_count(v, self.max_frames_num) for v in visuals if is_video_path(v))

    def _answer(self, requests: list[Instance], batch: list[int], prompts: list[str], visuals: list[tuple], **kwargs):
        """`dymu.generate` on one batch of requests and their (images, videos); records and returns each
        request's token counts."""
        from ..generation import generate

        out = generate(self.model, self.processor, prompts, [images for images, _ in visuals],
                       videos=[videos for _, videos in visuals], num_frames=self.max_frames_num, **kwargs)
        rep = out.report
        counts = []
        for k, (i, (images, videos)) in enumerate(zip(batch, visuals)):
            kinds = ["image"] * len(images) + ["video"] * len(videos)
            counts.append(VisualTokenCounts(visual_tokens=rep.llm_rows[k], full_visual_tokens=rep.stock_positions[k],
                                            visual_kinds=kinds, encoder_tokens=rep.encoder_tokens[k]))
            if not requests[i].metadata.get("__padding_only__"):  # lmms-eval's filler to even out ranks
                self._visual_tokens.setdefault((requests[i].task_name, requests[i].doc_id),
                                               list(zip(kinds, rep.visual_tokens[k], rep.stock_tokens[k])))
        return out, counts

    def _generation_kwargs(self, gen: dict) -> dict:
        kwargs, ignored = generation_kwargs(gen, self.max_new_tokens)
        if set(ignored) - self._warned:
            self._warned.update(ignored)
            logger.warning(f"dymu lmms-eval model: ignoring generation kwargs {', '.join(ignored)}")
        return kwargs

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        contexts = [req.args[0] for req in requests]
        lengths = [len(ids) for ids in self.tokenizer(contexts)["input_ids"]] if contexts else []
        keys = [(json.dumps(req.args[1], sort_keys=True, default=str), self._frame_counts(req)) for req in requests]
        results: list = [None] * len(requests)
        pad_id = self.tokenizer.pad_token_id
        for batch in length_sorted_batches(lengths, keys, self.batch_size):
            gen = dict(requests[batch[0]].args[1])
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            kwargs = self._generation_kwargs(gen)
            if until:  # stop as soon as a stop string appears; the text is cut below as well
                kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
            out, counts = self._answer(requests, batch, [contexts[i] for i in batch],
                                       [self._visuals(requests[i]) for i in batch], **kwargs)
            rep = out.report
            new = out.sequences[:, out.sequences.shape[1] - rep.new_tokens:]
            generated = (new != pad_id).sum(1).tolist() if pad_id is not None else [rep.new_tokens] * len(batch)
            for k, i in enumerate(batch):
                counts[k].output_tokens = int(generated[k])
                results[i] = GenerationResult(text=cut_at_stop_strings(out.answers[k], until), token_counts=counts[k])
            elapsed = rep.encoder_s + rep.prefill_s + rep.decode_s
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=int(sum(generated)),
                        avg_speed=sum(generated) / elapsed if elapsed > 0 else 0.0)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(negative log-likelihood of the continuation, is it the greedy answer)``.

        lmms-eval's multiple-choice scoring takes the arg-min of the first number (its models
        return a loss), so this returns the summed negative log-likelihood. The pair is wrapped in a
        `GenerationResult`, which lmms-eval 0.7.3 passes through as is (a bare tuple it turns into
        its string), together with the visual token counts.
        """
        contexts, continuations = [], []
        for req in requests:
            context, target, _, doc_id, task, split = req.args[:6]
            continuations.append(target if isinstance(target, str) else target(self.task_dict[task][split][doc_id]))
            contexts.append(context)
        # Sorting needs only a length; the exact continuation tokens are found per batch.
        lengths = [len(ids) for ids in self.tokenizer([c + t for c, t in zip(contexts, continuations)])["input_ids"]]
        eos = self.model.generation_config.eos_token_id
        fill = (eos[0] if isinstance(eos, list) else eos) if eos is not None else self.tokenizer.pad_token_id
        results: list = [None] * len(requests)
        for batch in length_sorted_batches(lengths, [self._frame_counts(r) for r in requests], self.batch_size):
            visuals = [self._visuals(requests[i]) for i in batch]
            targets = [self._continuation_ids(contexts[i], continuations[i], len(images), len(videos), requests[i])
                       for i, (images, videos) in zip(batch, visuals)]
            scorer = ContinuationScorer(targets, fill)
            _, counts = self._answer(requests, batch, [contexts[i] for i in batch], visuals,
                                     max_new_tokens=max(len(t) for t in targets), do_sample=False,
                                     logits_processor=LogitsProcessorList([scorer]))
            for k, i in enumerate(batch):
                results[i] = GenerationResult(text=(-float(scorer.logprob[k]), bool(scorer.greedy[k])),
                                              token_counts=counts[k])
        return results

    def _continuation_ids(self, context: str, continuation: str, num_images: int, num_videos: int,
                          request: Instance) -> list[int]:
        """The continuation's tokens as lm-eval splits them: tokenize the prompt (as dymu.generate
        builds it) with the continuation, and take what follows the prompt's own tokens (a word
        boundary can tokenize differently on its own)."""
        from ..families.prompting import chat_text

        prompt = chat_text(self.processor, context, num_images, num_videos)
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        ids = self.tokenizer(prompt + continuation)["input_ids"][len(prompt_ids):]
        if not ids:
            raise ValueError(f"dymu lmms-eval model: task {request.task_name} doc {request.doc_id}: the continuation "
                             f"{continuation!r} has no tokens.")
        return ids

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("dymu lmms-eval model: multi-round generation is not supported.")

    # --- the end of the requests ---------------------------------------------------------------

    def visual_token_summary(self) -> dict[str, float]:
        """Mean visual tokens per image over every process's documents (a collective call under data
        parallelism: every rank must make it)."""
        return visual_token_summary(gathered_per_doc(self._visual_tokens, self.world_size))

    def clean(self):
        """lmms-eval calls this on every rank once all requests are answered: report the visual
        tokens (into results["throughput"]) before the base class frees the model."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        summary = self.visual_token_summary()
        if summary and self.rank == 0:
            log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=summary)
            for line in summary_lines(self.mode, summary):
                print(line, flush=True)
        super().clean()


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]
