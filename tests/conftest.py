"""Shared fixtures: tiny random vision towers saved with save_pretrained and reloaded, real images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The test images live in the repository (tests/data/images, see SOURCES.md there);
# DYMU_TEST_IMAGES points the suite at another folder with the same file names.
IMAGES = Path(os.environ.get("DYMU_TEST_IMAGES", REPO / "tests" / "data" / "images"))

MIXED_IMAGES = [
    "synthetic_blank_white.png",
    "skimage_chelsea_cat.png",
    "synthetic_noise.png",
    "skimage_coffee.png",
    "synthetic_gradient.png",
    "darknet_dog_bicycle_truck.jpg",
    "skimage_chessboard.png",
    "scipy_raccoon_face.jpg",
]


def image_path(name: str) -> Path:
    path = IMAGES / name
    if not path.exists():
        pytest.fail(f"test image {path} is missing (tests/data/images holds the test set; DYMU_TEST_IMAGES overrides it)")
    return path


def error_lines(err: str) -> list[str]:
    """stderr of a failed command without the 'loading MODEL…' line that commands print before slow loads."""
    return [line for line in err.strip().splitlines() if not line.startswith("loading ")]


def load_image(name: str) -> Image.Image:
    with Image.open(image_path(name)) as im:
        return im.convert("RGB")


def tiny_vision_config(family: str, **overrides):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=112,
        patch_size=8,  # 14x14 = 196 patches: fine enough for content to matter
    )
    common.update(overrides)
    if family == "clip":
        return CLIPVisionConfig(**common)
    return SiglipVisionConfig(**common)


def build_tiny_tower(family: str, folder: Path, seed: int = 0, **overrides):
    """A random-weight CLIP/SigLIP vision model, saved and reloaded through from_pretrained."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if family == "clip" else SiglipVisionModel
    torch.manual_seed(seed)
    cls(tiny_vision_config(family, **overrides)).save_pretrained(folder)
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def processor_for(family: str, size: int = 112):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if family == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return SiglipImageProcessorPil(size={"height": size, "width": size})


@pytest.fixture(scope="session", params=["clip", "siglip"])
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tower_dir(tmp_path_factory, family):
    folder = tmp_path_factory.mktemp(f"tiny_{family}")
    build_tiny_tower(family, folder)
    return folder


@pytest.fixture
def tower(tower_dir, family):
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if family == "clip" else SiglipVisionModel
    return cls.from_pretrained(tower_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def pixels(family):
    """The eight mixed real images, preprocessed for the tiny tower: (8, 3, 112, 112)."""
    processor = processor_for(family)
    images = [load_image(name) for name in MIXED_IMAGES]
    return processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="session")
def demo_llava_dir(tmp_path_factory):
    """The demo's small random-weight LLaVA (CLIP 224/14 + Llama), saved with save_pretrained."""
    from dymu.families.demos.llava import build_demo_model

    folder = tmp_path_factory.mktemp("tiny_llava")
    model, processor = build_demo_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Debug check of the VTU layers, on in every test: rows of one group are bitwise equal entering
# each decoder layer (dymu.decoders.llama.CHECK_GROUP_ROWS_ENV).
os.environ["DYMU_CHECK_GROUP_ROWS"] = "1"


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory):
    """The three tiny random Qwen VLs (dymu.families.demos.qwen), saved with save_pretrained."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from qwen_helpers import QWEN_FAMILIES, save_qwen

    dirs = {}
    for family in QWEN_FAMILIES:
        dirs[family] = tmp_path_factory.mktemp(family)
        save_qwen(family, dirs[family])
    return dirs
