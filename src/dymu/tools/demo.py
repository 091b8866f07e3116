"""`dymu demo`: DyMU end to end on a small LLaVA-shaped model with RANDOM weights, fully offline.

The model is LLaVA-1.5's architecture at small dimensions (CLIP ViT tower read at layer -2 without
the class token, 2-layer GELU projector, Llama decoder) with a real byte-level BPE tokenizer trained
here on a few sentences and the stock `LlavaProcessor`, so every code path is the real one. The
weights are random, so the answers are noise; token counts and timings are real.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from ..images import sample_images

DEMO_IMAGES = [  # simplest to most cluttered (see assets/images/SOURCES.md)
    "synthetic_blank_white.png",
    "synthetic_white_one_circle.png",
    "synthetic_gradient.png",
    "skimage_chessboard.png",
    "darknet_eagle.jpg",
    "darknet_dog_bicycle_truck.jpg",
]
DEMO_PROMPT = "What is in this image?"
TIMED_RUNS = 3
_CORPUS = [
    "USER: What is in this image? ASSISTANT: The image shows a dog, a bicycle and a truck on a street.",
    "A white page with one red circle. An eagle flying over a field. A chessboard of black and white squares.",
    "Describe the picture in detail. Count the objects. Read the text. What colour is the sky?",
    "Vision language models turn images into tokens; merging similar tokens makes them cheaper.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'video' %}<video>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def demo_image_paths() -> list[Path]:
    by_name = {p.name: p for p in sample_images()}
    return [by_name[name] for name in DEMO_IMAGES]


def build_tokenizer(video: bool = False):
    """A real byte-level BPE tokenizer (vocab 512) trained offline, with LLaVA's special tokens
    (and OneVision's ``<video>`` when ``video``)."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"] + (["<video>"] if video else [])
    tok = train_byte_bpe(_CORPUS, specials, vocab_size=512, unk_token="<unk>")
    extra = {"image_token": "<image>", **({"video_token": "<video>"} if video else {})}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=extra, padding_side="left")


def train_byte_bpe(corpus: list[str], specials: list[str], vocab_size: int, unk_token: str):
    """A byte-level BPE `tokenizers.Tokenizer` trained offline on ``corpus`` (every demo model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def build_demo_model(seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) at small dimensions with random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    image_size, patch = 224, 14  # a 16x16 grid: 256 visual tokens per image
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=128)
    text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model, processor


ANYRES_CROP, ANYRES_PATCH = 126, 14  # a 9x9 grid per crop: odd, like SigLIP's 27x27
# AnyRes pinpoints up to 3x3 crops. OneVision's anyres_max_9 becomes anyres_max_4 here, so that the
# tiny model's larger canvases (3x3 and 2x3 crops) take the bilinear downsampling path.
ANYRES_PINPOINTS = [[ANYRES_CROP * h, ANYRES_CROP * w] for h in (1, 2, 3) for w in (1, 2, 3)]
ONEVISION_ASPECT = "anyres_max_4"


NEXT_VIDEO_CROP = 112  # an 8x8 grid: the stock 2x2 video pooling (and its processor's "// 4") needs it even
DEMO_FAMILIES = ("llava", "onevision", "next", "next_video")


def build_demo_anyres_model(family: str, seed: int = 0):
    """(model, processor) shaped like LLaVA-OneVision (SigLIP read at -1 "full", Qwen2, anyres_max,
    video), LLaVA-NeXT (CLIP read at -2 "default", Llama) or LLaVA-NeXT-Video (NeXT's image path on
    112px crops, plus video frames average-pooled 2x2) at small dimensions, random weights.

    The processor is the stock `LlavaNextProcessor`, or for OneVision / NeXT-Video the stock one (without
    its video processor, videos as lists of PIL frames, when torchvision is missing:
    `dymu.families.onevision_processor`, `dymu.families.llava_next_video.next_video_processor`).
    """
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    if family not in DEMO_FAMILIES[1:]:
        raise ValueError(f"unknown demo family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")
    onevision, next_video = family == "onevision", family == "next_video"
    tokenizer = build_tokenizer(video=family != "next")
    crop = NEXT_VIDEO_CROP if next_video else ANYRES_CROP
    pinpoints = [[crop * h, crop * w] for h in (1, 2, 3) for w in (1, 2, 3)]
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  image_size=crop, patch_size=ANYRES_PATCH)
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    grid = (crop // ANYRES_PATCH) ** 2
    torch.manual_seed(seed)
    if onevision:
        from ..families.onevision_processor import onevision_processor

        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **vision), text_config=Qwen2Config(**text),
            image_token_index=image_token_id, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=ANYRES_PINPOINTS, vision_aspect_ratio=ONEVISION_ASPECT,
            vision_feature_layer=-1, vision_feature_select_strategy="full")
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        processor = onevision_processor(tokenizer, ANYRES_CROP, ANYRES_PINPOINTS, grid, ONEVISION_ASPECT,
                                        chat_template=CHAT_TEMPLATE)
    else:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        common = dict(vision_config=CLIPVisionConfig(projection_dim=64, **vision), text_config=LlamaConfig(**text),
                      image_token_index=image_token_id, image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=grid)
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop},
                                                     crop_size={"height": crop, "width": crop},
                                                     image_grid_pinpoints=pinpoints)
        kwargs = dict(image_processor=image_processor, tokenizer=tokenizer, patch_size=ANYRES_PATCH,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=CHAT_TEMPLATE)
        if next_video:
            from ..families.llava_next_video import next_video_processor

            config = LlavaNextVideoConfig(video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                          spatial_pool_mode="average", spatial_pool_stride=2,
                                          video_seq_length=grid // 4, **common)
            model = LlavaNextVideoForConditionalGeneration(config).eval()
            processor = next_video_processor(**kwargs)
        else:
            model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common)).eval()
            processor = LlavaNextProcessor(**kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def save_demo_model(model, processor, folder: str | Path) -> Path:
    """Save the demo model with `save_pretrained`, and the bundled sample images (with their
    SOURCES.md) under ``folder/images`` so that the README's walkthrough has images to work on."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for path in sample_images() + [sample_images()[0].with_name("SOURCES.md")]:
        shutil.copyfile(path, images / path.name)
    return folder


def run_demo(model_ref: str | None = None, save_model: str | None = None, max_new_tokens: int = 12,
             out=print, family: str = "llava") -> dict:
    """The README's main command. Returns what it printed, as data (used by the tests). A bar with the
    step and an ETA on a terminal (stderr)."""
    from .console import Steps

    with Steps(4, "demo", out) as steps:  # building, calibrating, encoding, timing (one step per prompt)
        return _walkthrough(model_ref, save_model, max_new_tokens, steps, family)


def _walkthrough(model_ref, save_model, max_new_tokens, steps, family):
    from .calibration import calibrate, target_report
    from ..generation import generate, load_vlm
    from ..images import open_image
    from ..api import apply, encoder_pixels
    from ..families import vlm_family_of

    out = steps.say
    steps.next("building the model" if model_ref is None else f"loading {model_ref}")
    random_weights = model_ref is None
    if random_weights:
        if family == "llava":
            model, processor = build_demo_model()
            out("dymu demo: a small LLaVA-1.5-shaped model (CLIP ViT 224px/14, Llama decoder) with RANDOM weights,")
        else:
            model, processor = build_demo_anyres_model(family)
            shape = {"onevision": "LLaVA-OneVision-shaped model (SigLIP, Qwen2 decoder, AnyRes crops of 126px/14, "
                                  f"{ONEVISION_ASPECT}, video)",
                     "next": "LLaVA-NeXT-shaped model (CLIP, Llama decoder, AnyRes crops of 126px/14)",
                     "next_video": "LLaVA-NeXT-Video-shaped model (CLIP, Llama decoder, AnyRes crops of 112px/14, "
                                   "video frames pooled 2x2)"}[family]
            out(f"dymu demo: a small {shape} with RANDOM weights,")
        out("built offline. Token counts and timings are real; the answers are noise.")
        if save_model:
            save_demo_model(model, processor, save_model)
            out(f"saved the demo model (weights, config, tokenizer, processor) to {save_model}, "
                f"and {len(sample_images())} sample images to {Path(save_model) / 'images'}")
    else:
        model, processor = load_vlm(model_ref)
        out(f"dymu demo on {model_ref}")
    vlm = vlm_family_of(model)
    anyres = vlm.crops_images  # every crop of an image counts
    paths = demo_image_paths()
    images = [open_image(p) for p in paths]

    steps.next("calibrating")
    start = time.perf_counter()
    thresholds = calibrate(model, images, preset="mid", batch_size=len(images), progress=False,
                           processor=processor.image_processor, model_ref=model_ref or f"dymu-demo-{family}-random",
                           warn=lambda message: None)  # 6 images are too few for real use: said below
    patches = thresholds.encoder["patches_per_image"]
    unit = "crop" if anyres else "image"
    out(f"calibrated thresholds (preset mid) on {len(images)} bundled images in {time.perf_counter() - start:.1f}s "
        f"(a demo: real calibrations use hundreds), of {patches} tokens per {unit}: {target_report(thresholds)[0]}")

    steps.next("encoding")
    apply(model, thresholds, mode="dymu")
    pixels, crops = encoder_pixels(model, processor.image_processor(images=images, return_tensors="pt"))
    with torch.no_grad():
        from ..api import encode

        kept = encode(model, pixels).num_tokens.tolist()
    counts, first = [], 0
    for n in crops:
        counts.append(sum(kept[first:first + n]))
        first += n
    every = ", all its crops" if anyres else ""
    out(f"\nvisual tokens kept per image{every} (simplest to most cluttered):")
    for path, n, c in zip(paths, counts, crops):
        full = c * patches
        extra = f" ({c} crops)" if anyres else ""
        out(f"  {path.name:34s} {n:5d} / {full}{extra:11s} {'#' * math.ceil(40 * n / full)}")

    # Timed the bench's way (shared code): a warm-up round, then full and dymu interleaved round-robin,
    # medians of the timed rounds. min_new_tokens: both sides decode the same number of tokens.
    from .bench.timing import Side, interleaved, median

    pick = len(images) - 1  # the cluttered scene
    cases = [("image", [DEMO_PROMPT], [[images[pick]]], None)]
    if random_weights and vlm.supports("video"):  # a multi-image prompt, a video of the images
        cases.append(("2 images", ["Compare the two pictures."], [[images[0], images[pick]]], None))
        frames = [im.resize((160, 120)) for im in images]  # a video's frames share one size
        cases.append(("video", ["What happens in the video?"], [[]], [[frames]]))
    runs: dict[tuple[str, str], list] = {}

    def side(name, prompts, ims, videos, mode: str) -> Side:
        record = runs.setdefault((name, mode), [])
        return Side(mode, setup=lambda: apply(model, thresholds, mode=mode),
                    run=lambda: record.append(generate(model, processor, prompts, ims, videos=videos,
                                                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)))

    steps.set_total(3 + len(cases))
    with torch.no_grad():
        for case in cases:
            steps.next(f"timing: {case[0]}")
            interleaved([side(*case, "full"), side(*case, "dymu")], runs=TIMED_RUNS, warmup=1, sync=lambda: None)
    out(f"\nprompt: {DEMO_PROMPT!r} on {paths[pick].name}" + ("; then 2 images; then the 6 images as "
                                                             "video frames" if len(cases) > 1 else "")
        + f"; times are medians of {TIMED_RUNS} interleaved runs after 1 warm-up round")
    out(f"  {'input':8s} {'mode':6s} {'LLM rows/stock':>15s} {'encoder':>9s} {'prefill':>9s} {'decode':>9s}  "
        + ("answer (random weights: noise)" if random_weights else "answer"))
    for (name, mode), record in runs.items():
        timed = [r.report for r in record[1:]]  # record[0] is the warm-up
        rep = timed[0]
        ms = {k: median([getattr(t, k) for t in timed]) * 1e3 for k in ("encoder_s", "prefill_s", "decode_s")}
        rows = f"{sum(rep.visual_tokens[0])}/{sum(rep.stock_tokens[0])}"
        out(f"  {name:8s} {mode:6s} {rows:>15s} {ms['encoder_s']:7.1f}ms "
            f"{ms['prefill_s']:7.1f}ms {ms['decode_s']:7.1f}ms  {record[-1].answers[0]!r}")
    if random_weights:
        out("\nAt these toy dimensions the merge bookkeeping costs about what it saves; `dymu bench` measures "
            "the speedup at real model dimensions.")
    return {"counts": dict(zip([p.name for p in paths], counts)), "results": {k: r[-1] for k, r in runs.items()},
            "runs": runs, "thresholds": thresholds}
