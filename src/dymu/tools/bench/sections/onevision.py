"""Bench section `onevision`: a Qwen2-7B-shaped prefill over LLaVA-OneVision inputs, stock vs VTU.

Two sets of rows, both timed on the same Qwen2 body (decoder layers on inputs_embeds, no lm_head):

- ``rows``: one mid-sized AnyRes photo, full vs VTU with the group maps of fixed r per tower layer at
  the low / mid / high presets (mode "tome": merging in the tower only);
- ``merge_points``: a large photo whose unpadded canvas OneVision's anyres_max_9 downsamples, and an
  8-frame video (2x2 bilinear pooling per frame), each full (stock) vs merge point ``vit`` (DToMe in
  the tower) vs ``post`` (merge rounds on the packed LLM-level tokens) vs ``both``, with mid thresholds
  calibrated here on the map-making model (diverse images resized to the large photo's size). Every row
  gives the tokens the tower kept (encoder_tokens, summed over crops / frames), the distinct rows the
  LLM runs (llm_rows, the VTU groups), the stock placeholders (stock_positions), the measured prefill
  speedup next to its FLOP-ideal, and the tower's FLOP-ideal at the real SigLIP widths (not timed).

The group maps come from dymu's own OneVision wiring on a small random-weight SigLIP with the real crop
grid and depth (the map-making model): only the maps and counts are used, never its features.
"""

from __future__ import annotations

import torch

from .. import PRESET_NAMES
from ..common import bench_prefill, build_qwen2, diverse_images, preset_r, seeded
from ..flops import vit_layer_flops
from ..plan import Plan

MERGE_POINTS = ("vit", "post", "both")
PHOTO = "darknet_dog_bicycle_truck.jpg"


def map_model(plan: Plan):
    """(LlavaOnevisionForConditionalGeneration, its image processor): a small SigLIP with the real crop
    grid and depth, OneVision's 6x6 grid of crops and anyres_max_9, a one-layer text model (never run)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    t = plan.onevision_tower
    seeded(2)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                         vision_use_head=False, **t),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=64))
    size = t["image_size"]
    config.image_grid_pinpoints = [[size * h, size * w] for h in range(1, 7) for w in range(1, 7)]  # OV's 6x6 grid
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                image_grid_pinpoints=config.image_grid_pinpoints)
    return model, processor


def _photo():
    from ....images import open_image, sample_images

    return open_image(next(p for p in sample_images() if p.name == PHOTO))


def onevision_group_maps(plan: Plan, log) -> tuple[dict[str, torch.Tensor], dict]:
    """Group maps (one per preset) of one AnyRes image in the stock OneVision packed layout, made by
    dymu's own OneVision wiring (the family's `encode_packed`): a small SigLIP tower with the real crop
    grid and depth (27x27 tokens, 26 layers) merges with fixed r per layer, and the model's image path
    unmerges, packs (unpad, newlines, anyres_max_9) and follows the groups. Only the map is used; the
    features are not."""
    from ....api import apply, remove
    from ....families import vlm_family_of

    t = plan.onevision_tower
    model, processor = map_model(plan)
    family = vlm_family_of(model)
    photo = _photo().resize(plan.onevision_image)
    grid = (t["image_size"] // t["patch_size"]) ** 2
    r = preset_r(grid, t["num_hidden_layers"])
    maps, kept = {}, {}
    for name in PRESET_NAMES:
        apply(model, r=r[name], mode="tome")
        group, encoded = family.encode_packed(model, processor, photo)
        maps[name], kept[name] = group.cpu(), encoded.num_tokens.tolist()
        remove(model)
    info = {"crops": len(kept["mid"]), "tokens_per_crop": grid, "r": r, "image_size": list(plan.onevision_image),
            **{f"kept_per_crop_{name}": per_crop for name, per_crop in kept.items()},
            "positions": int(len(maps["mid"]))}
    log(f"onevision: {info['crops']} crops of {grid} tokens -> {info['positions']} packed positions; "
        + ", ".join(f"{n}: {int(m.max()) + 1} groups" for n, m in maps.items()))
    return maps, info


def _frames(plan: Plan) -> list:
    """`onevision_frames` frames of a slow pan over the photo (each a shifted window, `onevision_frame_size`)."""
    w, h = plan.onevision_frame_size
    photo = _photo().resize((w * 5 // 4, h * 5 // 4))
    step = (photo.width - w) / max(plan.onevision_frames - 1, 1)
    return [photo.crop((round(f * step), 0, round(f * step) + w, h)) for f in range(plan.onevision_frames)]


def calibrate_merge_points(plan: Plan, model, processor, log) -> dict:
    """Mid thresholds per merge point, calibrated on the map-making model (diverse images at the large
    photo's size, one batch: the same downsampled layout as the measured photo)."""
    from ...calibration import calibrate
    from ....images import open_image

    images = [open_image(p).resize(plan.onevision_large_image) for p in diverse_images(plan.onevision_cal_images)]
    out = {}
    for merge_point in MERGE_POINTS:
        out[merge_point] = calibrate(model, images, preset="mid", batch_size=len(images), processor=processor,
                                     progress=False, merge_point=merge_point, warn=lambda message: None)
    log(f"onevision: mid thresholds for {', '.join(MERGE_POINTS)} calibrated on {len(images)} images")
    return out


def _encoder_flops(plan: Plan, kept: torch.Tensor | None, items: int, grid: int, layers: int) -> float:
    """Tower FLOPs at the real SigLIP widths: ``kept`` (crops or frames, layers) tokens after every layer
    (None: the stock tower, ``items`` crops / frames of ``grid`` tokens through ``layers`` layers)."""
    hidden, mlp = plan.onevision_tower_widths
    patch_in = 3 * plan.onevision_tower["patch_size"] ** 2
    per_item = kept.tolist() if kept is not None else [[grid] * layers] * items
    total = 0.0
    for counts in per_item:
        total += 2 * grid * patch_in * hidden
        n_in = grid
        for n_out in counts:
            total += vit_layer_flops(n_in, n_out, hidden, mlp)
            n_in = n_out
    return total


@torch.no_grad()
def merge_point_maps(plan: Plan, model, processor, thresholds: dict, log) -> dict:
    """Per input ("image": the large photo, "video": the frames): its counts and the (positions,) group
    map of every merge point, made by dymu's OneVision wiring (the family's `encode_packed`)."""
    from ....api import apply, remove
    from ....families import vlm_family_of

    t = plan.onevision_tower
    grid = (t["image_size"] // t["patch_size"]) ** 2
    layers = t["num_hidden_layers"]
    family = vlm_family_of(model)
    inputs = {"image": _photo().resize(plan.onevision_large_image), "video": _frames(plan)}
    items = {"image": {"size": list(plan.onevision_large_image), "crops": None},
             "video": {"size": list(plan.onevision_frame_size), "frames": plan.onevision_frames}}
    for info in items.values():
        info.update(maps={}, encoder_tokens={}, encoder_flops={})
    for merge_point in MERGE_POINTS:
        apply(model, thresholds[merge_point])
        for name, info in items.items():
            group, encoded = family.encode_packed(model, processor, inputs[name])
            count = len(encoded.num_tokens)  # the image's crops / the video's frames
            if name == "image":
                info["crops"] = count
            info["maps"][merge_point] = torch.unique(group.cpu(), return_inverse=True)[1]  # labels 0..U-1
            info["encoder_tokens"][merge_point] = sum(encoded.num_tokens.tolist())
            info["encoder_flops"][merge_point] = _encoder_flops(plan, encoded.kept_per_layer, count, grid, layers)
            info["stock_positions"] = int(len(group))
            info["items"] = count
        remove(model)
    for name, info in items.items():
        info["encoder_tokens"]["full"] = info["items"] * grid
        info["encoder_flops"]["full"] = _encoder_flops(plan, None, info["items"], grid, layers)
        log(f"onevision {name}: {info['stock_positions']} stock positions; "
            + ", ".join(f"{mp}: {info['encoder_tokens'][mp]} encoder tokens, {int(m.max()) + 1} LLM rows"
                        for mp, m in info["maps"].items()))
    return items


def bench_merge_points(plan: Plan, qwen2, sync, log) -> dict:
    """The merge-point rows: per input, full vs vit / post / both on the Qwen2 body (see the module)."""
    model, processor = map_model(plan)
    thresholds = calibrate_merge_points(plan, model, processor, log)
    items = merge_point_maps(plan, model, processor, thresholds, log)
    out = {}
    for name, info in items.items():
        rows = bench_prefill(plan, qwen2, info["maps"], sync, log, text=plan.onevision_text,
                             runs=plan.onevision_runs, names=MERGE_POINTS)
        for row in rows:
            merge_point = "full" if row["variant"] == "full" else row["variant"].removeprefix("VTU ")
            row.update(variant=merge_point, merge_point=None if merge_point == "full" else merge_point,
                       encoder_tokens=info["encoder_tokens"][merge_point],
                       llm_rows=row["n_un"] if row["n_un"] is not None else info["stock_positions"],
                       stock_positions=info["stock_positions"],
                       encoder_flop_ideal=info["encoder_flops"]["full"] / info["encoder_flops"][merge_point])
        out[name] = {key: value for key, value in info.items() if key not in ("maps", "encoder_flops", "items")}
        out[name]["rows"] = rows
    out["thresholds"] = {mp: {"tokens_kept_mean": th.tokens_kept_mean[-1] if th.tokens_kept_mean else None,
                              "post_rows_kept_mean": (th.post_rows_kept_mean[-1]
                                                      if getattr(th, "post_rows_kept_mean", None) else None)}
                         for mp, th in thresholds.items()}
    return out


def run(ctx) -> None:
    plan = ctx.plan
    with ctx.timed("onevision"):
        maps, info = onevision_group_maps(plan, ctx.log)
        qwen2 = build_qwen2(plan, ctx.device, ctx.dtype)
        ctx.log(f"built {plan.onevision_qwen2['num_hidden_layers']}-layer Qwen2 body "
                f"({sum(p.numel() for p in qwen2.parameters()) / 1e6:.0f}M parameters)")
        rows = bench_prefill(plan, qwen2, maps, ctx.sync, ctx.log, text=plan.onevision_text, runs=plan.onevision_runs)
        merge_points = bench_merge_points(plan, qwen2, ctx.sync, ctx.log)
        ctx.result["onevision"] = {"image": info, "rows": rows, "merge_points": merge_points}
        del qwen2
    ctx.notes.append(f"OneVision prefill: group maps of one {info['image_size'][0]}x{info['image_size'][1]} photo in "
                     f"the stock OneVision layout ({info['crops']} crops of {info['tokens_per_crop']} tokens, "
                     "unpadded canvas, newlines, anyres_max_9), made by dymu's OneVision wiring on a small "
                     "random-weight SigLIP with the real grid and depth (fixed r per layer "
                     f"{', '.join(f'{k} {v}' for k, v in info['r'].items())}); newline tokens and bilinear mixes "
                     "are groups of their own.")
    image, video = merge_points["image"], merge_points["video"]
    ctx.notes.append(f"OneVision merge points: a {image['size'][0]}x{image['size'][1]} photo ({image['crops']} crops; "
                     "its unpadded canvas is downsampled by anyres_max_9) and a "
                     f"{video['frames']}-frame video (a pan over the photo, 2x2 pooling per frame), each full vs vit "
                     "/ post / both with mid thresholds calibrated on the map-making model (random weights: the "
                     "counts are not those of the real model; the video uses the image-calibrated thresholds). "
                     "Encoder FLOP-ideal: the tower at SigLIP-SO400M widths over the tokens it kept per layer (not timed).")
