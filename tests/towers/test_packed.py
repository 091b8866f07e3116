"""Packed batches: after the first merge a batch runs as rows (Σ n_i, D) with per-image
offsets. Oracle: the padded path (the reference) and each image encoded alone give the same tokens,
group maps and sizes, and features within 1e-5."""

import math

import pytest
import torch

import dymu
from conftest import IMAGES, MIXED_IMAGES, build_tiny_tower, load_image, processor_for
from dymu.towers.encoder import apply_dtome, encode_with_tower, family_of

ORDERS = ["interleaved", "ab", "ab-score"]
# One value for every layer, a per-layer schedule with a -inf layer (every edge up to the cap), and
# a high one that merges little and unevenly.
THRESHOLDS = [0.9, [0.95, -math.inf, 0.8, 0.7], 0.97]


def encode(tower, pixels, thresholds, order, packed):
    apply_dtome(tower, family_of(tower), thresholds=thresholds, order=order, packed=packed)
    with torch.no_grad():
        return encode_with_tower(tower, family_of(tower), pixels, -1, drop_class_token=False)


def assert_same_image(got: dict, want: dict, what: str):
    assert torch.equal(got["kept_per_layer"], want["kept_per_layer"]), what
    assert torch.equal(got["sizes"], want["sizes"]), what
    assert torch.equal(got["group_of_patch"], want["group_of_patch"]), what
    assert (got["tokens"] - want["tokens"]).abs().max() <= 1e-5, what


def check_packed_padded_alone(tower, pixels, names, thresholds, order):
    padded = encode(tower, pixels, thresholds, order, packed=False)
    packed = encode(tower, pixels, thresholds, order, packed=True)
    counts = packed.num_tokens.tolist()
    assert len(set(counts)) > 1, f"token counts should differ inside the batch: {counts}"
    assert packed.tokens.shape == padded.tokens.shape
    assert torch.equal(packed.sizes, padded.sizes) and torch.equal(packed.group_of_patch, padded.group_of_patch)
    assert (packed.tokens - padded.tokens).abs().max() <= 1e-5  # padding rows: zeros on both sides
    for i, name in enumerate(names):
        alone = encode(tower, pixels[i : i + 1], thresholds, order, packed=True).image(0)
        assert_same_image(packed.image(i), padded.image(i), f"{name}: packed vs padded")
        assert_same_image(packed.image(i), alone, f"{name}: packed vs alone")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("thresholds", THRESHOLDS, ids=["0.9", "schedule", "0.97"])
def test_packed_equals_padded_and_alone(tower, pixels, order, thresholds):
    check_packed_padded_alone(tower, pixels, MIXED_IMAGES, thresholds, order)


@pytest.fixture(scope="module")
def odd_tower(tmp_path_factory, family):
    """15x15 = 225 patches: an odd token count (SigLIP: the cap binds; CLIP: 226 with the class token)."""
    return build_tiny_tower(family, tmp_path_factory.mktemp(f"packed_odd_{family}"), seed=2, image_size=120)


@pytest.mark.parametrize("order", ORDERS)
def test_packed_equals_padded_and_alone_odd_token_count(odd_tower, family, order):
    names = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "synthetic_noise.png", "skimage_coffee.png",
             "synthetic_gradient.png"]
    pixels = processor_for(family, 120)(images=[load_image(n) for n in names], return_tensors="pt")["pixel_values"]
    for thresholds in ([-math.inf, 0.9, -math.inf, 0.8], 0.85):
        check_packed_padded_alone(odd_tower, pixels, names, thresholds, order)


def test_fixed_r_and_feature_layer_packed(tower, family, pixels):
    """Fixed r (equal counts), the LLaVA read-out (CLIP: layer -2 without the class token), and a
    padded stock forward after a packed encode (the tower's own loop never runs packed)."""
    for rule in (dict(r=10), dict(thresholds=0.9)):
        outs = []
        for packed in (False, True):
            dymu.apply(tower, **rule)
            tower._dymu_state.packed = packed
            outs.append(dymu.encode(tower, pixels))
        assert torch.equal(outs[0].group_of_patch, outs[1].group_of_patch)
        assert torch.equal(outs[0].sizes, outs[1].sizes)
        assert (outs[0].tokens - outs[1].tokens).abs().max() <= 1e-5
    with torch.no_grad():
        hidden = tower(pixels).last_hidden_state  # stock loop: padded (B, N, D)
    assert hidden.shape[0] == len(pixels)


def test_calibration_thresholds_unchanged(tower, family):
    images = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))[:12]
    got = {packed: dymu.calibrate(tower, images, r=25, batch_size=6, progress=False, packed=packed)
           for packed in (False, True)}
    assert got[True].tokens_kept_mean == got[False].tokens_kept_mean
    for a, b in zip(got[True].thresholds, got[False].thresholds):
        assert (a == b) or abs(a - b) <= 1e-6, (a, b)
