"""`dymu bench` sizes: the real benchmark (`full_plan`), its --quick smoke-test version, the GPU variant."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    """Everything the benchmark runs (the notes in the report say in words what was done)."""

    name: str
    clip: dict  # CLIPVisionConfig kwargs
    feature_layer: int  # LLaVA-1.5 reads hidden_states[-2]
    batches: tuple[int, ...]
    # The large batch runs only the first `large_batch_layers` layers (None: all), with r scaled
    # so that the last layer run keeps the tokens of the preset: the CPU budget does not allow 8 x 23
    # CLIP-L layers x 4 variants x 6 rounds.
    large_batch_layers: int | None
    llama: dict  # LlamaConfig kwargs
    text_before: int
    text_after: int
    exact_preset: str  # the N_un at which the exact Eq. 10 path is timed
    exact_layers: int  # decoder layers the exact comparison runs (it is slow and memory hungry)
    exact_runs: int  # timed runs of the exact path itself (full and fast get `runs`)
    cal_images: int
    cal_batch: int
    cal_layers: int | None  # calibration and its plain forward run this many layers (None: to the feature layer)
    merge_off_runs: int  # the merge-off overhead is a few %: more runs than the others
    runs: int
    warmup: int
    # OneVision prefill: Qwen2 body kwargs, the SigLIP grid of the (small, map-making) tower, the
    # photo's size (w, h), text around the image, and the timed runs (a full 7B-layer prefill over
    # ~3,000 positions is slow on a CPU).
    onevision_qwen2: dict | None = None
    onevision_tower: dict | None = None
    onevision_image: tuple[int, int] = (640, 480)
    onevision_text: tuple[int, int] = (14, 20)
    onevision_runs: int = 3
    # The merge-point rows (full vs vit / post / both, thresholds calibrated on the map-making model):
    # a large photo (w, h) whose unpadded canvas OneVision's anyres_max_9 downsamples (canvas tokens >
    # 1.21 x 9 crops: a 3x4 grid of crops), an `onevision_frames`-frame video (frames of (w, h) before
    # the 2x2 pooling), and the images the mid thresholds are calibrated on (resized to the large photo).
    onevision_large_image: tuple[int, int] = (1536, 1152)
    onevision_frames: int = 8
    onevision_frame_size: tuple[int, int] = (640, 480)
    onevision_cal_images: int = 8
    # The real tower's widths (SigLIP-SO400M), for the encoder FLOP-ideal of the merge-point rows.
    onevision_tower_widths: tuple[int, int] = (1152, 4304)
    # Packed vs padded batches (calibrated mid thresholds, diverse images): encoder batches (all
    # layers to the feature layer), batch-1 runs (a <= 2% comparison: more rounds), calibration.
    packed_batches: tuple[int, ...] = (8,)
    packed_b1_runs: int = 7
    packed_cal_images: int = 32
    packed_cal_batch: int = 32
    packed_cal_layers: int | None = 8  # None: to the feature layer


def full_plan(device: torch.device) -> Plan:
    gpu = device.type == "cuda"
    return Plan(
        name="full",
        clip=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14),
        feature_layer=-2,
        batches=(1, 64) if gpu else (1, 8),
        large_batch_layers=None if gpu else 4,
        llama=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                   num_hidden_layers=32 if gpu else 2, vocab_size=32000 if gpu else 256,
                   max_position_embeddings=4096),
        text_before=35,
        text_after=29,
        exact_preset="low",
        exact_layers=4 if gpu else 1,
        exact_runs=5 if gpu else 1,
        cal_images=64 if gpu else 8,
        cal_batch=32 if gpu else 8,
        cal_layers=None if gpu else 4,
        merge_off_runs=10,
        runs=5,
        warmup=1,
        onevision_qwen2=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                             num_key_value_heads=4, num_hidden_layers=28 if gpu else 2,
                             vocab_size=152064 if gpu else 256, max_position_embeddings=32768),
        onevision_tower=dict(image_size=384, patch_size=14, num_hidden_layers=26),  # SigLIP-SO400M's grid and depth
        onevision_runs=5 if gpu else 3,
        packed_batches=(8, 32) if gpu else (8,),
        packed_b1_runs=7,
        packed_cal_images=64 if gpu else 32,
        packed_cal_batch=32,
        packed_cal_layers=None if gpu else 8,
    )


def quick_plan(device: torch.device) -> Plan:
    return Plan(
        name="quick",
        clip=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  image_size=112, patch_size=14),
        feature_layer=-2,
        batches=(1, 4),
        large_batch_layers=2,
        llama=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
                   num_hidden_layers=2, vocab_size=64, max_position_embeddings=512),
        text_before=6,
        text_after=6,
        exact_preset="low",
        exact_layers=1,
        exact_runs=1,
        cal_images=4,
        cal_batch=2,
        cal_layers=2,
        merge_off_runs=1,
        runs=1,
        warmup=1,
        onevision_qwen2=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, vocab_size=64, max_position_embeddings=4096),
        onevision_tower=dict(image_size=126, patch_size=14, num_hidden_layers=4),
        onevision_image=(300, 220),
        onevision_large_image=(504, 378),  # the smallest 3x4 grid of 126 px crops: 27x36 canvas tokens, downsampled
        onevision_frame_size=(160, 120),
        onevision_cal_images=4,
        onevision_text=(6, 6),
        onevision_runs=1,
        packed_batches=(4,),
        packed_b1_runs=1,
        packed_cal_images=4,
        packed_cal_batch=4,
        packed_cal_layers=2,
    )

