"""What `dymu demo` shows every family's tiny model (families/demos/): the bundled images, simplest to most
cluttered, and how a demo model is saved with them (`--save-model`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..images import sample_images

DEMO_IMAGES = [  # simplest to most cluttered (see assets/images/SOURCES.md)
    "synthetic_blank_white.png",
    "synthetic_white_one_circle.png",
    "synthetic_gradient.png",
    "skimage_chessboard.png",
    "darknet_eagle.jpg",
    "darknet_dog_bicycle_truck.jpg",
]
def demo_image_paths() -> list[Path]:
    by_name = {p.name: p for p in sample_images()}
    return [by_name[name] for name in DEMO_IMAGES]


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
