"""The visual token counts the `dymu` lmms-eval model logs: per sample (`VisualTokenCounts`, in each
logged sample's ``token_counts``) and their means per image and per video, overall and per task, merged
across data-parallel ranks (`visual_token_summary`, into the results' ``throughput``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lmms_eval.api.instance import TokenCounts

# (kind of item, key of its mean tokens, key of its mean stock tokens, key of its count)
SUMMARY_KEYS = (("image", "visual_tokens", "full_visual_tokens", "images"),
                ("video", "video_tokens", "full_video_tokens", "videos"))


@dataclass
class VisualTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus, per visual item of the prompt (images, then videos),
    the tokens the LLM saw, the stock model's count and the item's kind."""

    visual_tokens: list[int] | None = None  # = llm_rows (the older name)
    full_visual_tokens: list[int] | None = None  # = stock_positions (the older name)
    visual_kinds: list[str] | None = None
    encoder_tokens: list[int] | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.visual_tokens is not None:
            d["visual_tokens"] = list(self.visual_tokens)
            d["full_visual_tokens"] = list(self.full_visual_tokens)
            d["visual_kinds"] = list(self.visual_kinds)
            d["encoder_tokens"] = list(self.encoder_tokens)
            d["llm_rows"] = list(self.visual_tokens)
            d["stock_positions"] = list(self.full_visual_tokens)
        return d


def visual_token_summary(per_doc: dict) -> dict[str, float]:
    """Mean visual tokens per image and per video, overall and per task, from {(task, doc_id):
    [(kind, tokens, stock tokens) per visual item]}. Documents without visuals do not count."""
    summary: dict[str, float] = {}
    for kind, tokens_key, full_key, count_key in SUMMARY_KEYS:
        per_task: dict[str, list] = {}
        for (task, _), items in sorted(per_doc.items(), key=lambda kv: str(kv[0])):
            per_task.setdefault(task, []).extend((n, full) for k, n, full in items if k == kind)
        everything = [pair for pairs in per_task.values() for pair in pairs]
        if not everything:
            continue
        summary[tokens_key] = sum(n for n, _ in everything) / len(everything)
        summary[full_key] = sum(f for _, f in everything) / len(everything)
        summary[count_key] = float(len(everything))
        for task, pairs in per_task.items():
            if pairs:
                summary[f"{tokens_key}/{task}"] = sum(n for n, _ in pairs) / len(pairs)
                summary[f"{count_key}/{task}"] = float(len(pairs))
    return summary


def gathered_per_doc(per_doc: dict, world_size: int) -> dict:
    """Every rank's {(task, doc_id): items} in one dict (a collective call under data parallelism: every
    rank must make it); a document found on several ranks keeps the first rank's entry."""
    dist = torch.distributed
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return dict(per_doc)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(per_doc))
    merged: dict = {}
    for part in gathered:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def summary_lines(mode: str, summary: dict[str, float]) -> list[str]:
    """What rank 0 prints at the end: the mean visual tokens per image / video, with the stock count and
    the per-task means."""
    lines = []
    for kind, tokens_key, full_key, _ in SUMMARY_KEYS:
        if tokens_key in summary:
            tasks = ", ".join(f"{k.split('/', 1)[1]} {v:.1f}" for k, v in summary.items()
                              if k.startswith(f"{tokens_key}/"))
            lines.append(f"dymu [{mode}]: {summary[tokens_key]:.1f} visual tokens per {kind} on average "
                         f"(stock {summary[full_key]:.0f}; {tasks})")
    return lines
