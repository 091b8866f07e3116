"""Ties with the paper's code: flat synthetic images, where many scores tie or differ in the last bit.

On a white canvas with flat shapes most patches are alike, so the choice among (nearly) tied partners,
the ranking of tied edges and the float steps of the merged sums decide which tokens merge. dymu must
make the paper's batch-1 choice there (tests/dtome_reference.py), after every layer, alone and in a
batch, in the paper's token orders: ``ab`` for CLIP (class token), ``ab-score`` for SigLIP.
"""

import math

import pytest
import torch
from PIL import Image, ImageDraw

import dymu
from conftest import build_tiny_tower, processor_for
from dtome_reference import dtome_one_image


def flat_images() -> dict[str, Image.Image]:
    """White canvases with flat shapes only (no fonts: the pixels must not depend on Pillow's version)."""
    images = {}
    im = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(im).rectangle([40, 40, 120, 150], fill=(200, 30, 30))
    images["one_rectangle"] = im
    im = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([20, 30, 100, 110], fill=(30, 30, 200))
    draw.ellipse([120, 120, 200, 200], fill=(20, 160, 40))
    images["two_shapes"] = im
    im = Image.new("RGB", (224, 224), "white")  # a two-colour bar chart
    draw = ImageDraw.Draw(im)
    for k, height in enumerate([60, 120, 90, 160, 40]):
        draw.rectangle([20 + 40 * k, 200 - height, 44 + 40 * k, 200], fill=(40, 90, 200))
    images["bar_chart"] = im
    im = Image.new("RGB", (224, 224), (0, 0, 0))  # glyph-like strokes on a flat (transparent-black) ground
    draw = ImageDraw.Draw(im)
    for k in range(9):
        draw.rectangle([24 + 20 * k, 96, 30 + 20 * k, 124 - 6 * (k % 3)], fill=(255, 255, 255))
    images["strokes_on_black"] = im
    images["blank"] = Image.new("RGB", (224, 224), "white")
    return images


ORDER = {"clip": "ab", "siglip": "ab-score"}  # the paper's batch-1 layouts


@pytest.fixture(scope="module")
def odd_tower(tmp_path_factory, family):
    """225 patches: an odd count, where the cap binds without a class token (SigLIP)."""
    return build_tiny_tower(family, tmp_path_factory.mktemp(f"ties_odd_{family}"), seed=1, image_size=120)


def check_against_reference(tower, family, size, thresholds):
    images = flat_images()
    names = list(images)
    pixels = processor_for(family, size)(images=list(images.values()), return_tensors="pt")["pixel_values"]
    class_token = family == "clip"
    dymu.apply(tower, thresholds, order=ORDER[family])
    batch = dymu.encode(tower, pixels, feature_layer=-1, drop_class_token=False)
    for i, name in enumerate(names):
        ref_x, ref_group, ref_counts = dtome_one_image(tower, pixels[i : i + 1], thresholds, ORDER[family],
                                                       class_token)
        alone = dymu.encode(tower, pixels[i : i + 1], feature_layer=-1, drop_class_token=False).image(0)
        for where, one in (("in a batch", batch.image(i)), ("alone", alone)):
            assert one["kept_per_layer"].tolist() == ref_counts, f"{name} {where}"
            assert torch.equal(one["group_of_patch"], ref_group), f"{name} {where}"
            assert (one["tokens"] - ref_x).abs().max() <= 1e-5, f"{name} {where}"
    return batch


@pytest.mark.parametrize("thresholds", [[0.85] * 4, [0.9] * 4, [0.95, 0.9, 0.85, 0.8]])
def test_flat_images_equal_the_papers_batch1_rule(tower, family, thresholds):
    batch = check_against_reference(tower, family, 112, thresholds)
    assert batch.kept_per_layer[:, -1].max() < 60  # flat images: real merging, among many near-ties


def test_flat_images_equal_the_papers_batch1_rule_where_the_cap_binds(odd_tower, family):
    thresholds = [0.9, -math.inf, 0.8, 0.7]  # -inf: every edge of layer 1, up to the cap
    batch = check_against_reference(odd_tower, family, 120, thresholds)
    if family == "siglip":  # t // 2 merges at layer 1 whatever the scores: the cap chose the edges
        counts = batch.kept_per_layer
        assert (counts[:, 1] == (counts[:, 0] + 1) // 2).all() and (counts[:, 0] % 2 == 1).any()
