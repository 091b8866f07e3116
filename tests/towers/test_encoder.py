"""DToMe in stock CLIP and SigLIP towers (tiny random weights, saved and reloaded)."""

import math

import pytest
import torch

import dymu
from dymu import merge as M
from conftest import MIXED_IMAGES, build_tiny_tower, load_image, processor_for
from dtome_reference import dtome_one_image

ORDERS = ["interleaved", "ab", "ab-score"]


def stock_features(tower, family, pixels):
    """What LLaVA-1.5 (CLIP: layer -2, no CLS) or LLaVA-OV (SigLIP: layer -1) reads from the stock tower."""
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
    return hidden[-2][:, 1:] if family == "clip" else hidden[-1]


def test_no_merge_equals_stock_and_remove_restores(tower, family, pixels):
    reference = stock_features(tower, family, pixels)
    dymu.apply(tower, math.inf)
    encoded = dymu.encode(tower, pixels)
    assert (encoded.tokens - reference).abs().max() <= 1e-5
    assert encoded.num_tokens.tolist() == [reference.shape[1]] * len(pixels)
    assert (stock_features(tower, family, pixels) - reference).abs().max() <= 1e-5  # HF forward path too

    dymu.apply(tower, 0.8)
    assert dymu.encode(tower, pixels).num_tokens.max() < reference.shape[1]
    dymu.remove(tower)
    assert all(type(layer).__name__.startswith(("CLIP", "Siglip")) for layer in tower.encoder.layers)
    assert not any(layer.self_attn.k_proj._forward_hooks for layer in tower.encoder.layers)
    assert not tower.encoder._forward_pre_hooks
    assert torch.equal(stock_features(tower, family, pixels), reference)


def test_merged_tokens_form_a_valid_partition(tower, family, pixels):
    dymu.apply(tower, 0.8)
    encoded = dymu.encode(tower, pixels)
    patches = encoded.group_of_patch.shape[1]
    assert patches == 196
    for i in range(len(encoded)):
        one = encoded.image(i)
        n = len(one["tokens"])
        assert one["sizes"].sum() == patches
        assert one["group_of_patch"].min() == 0 and one["group_of_patch"].max() == n - 1
        assert torch.bincount(one["group_of_patch"], minlength=n).tolist() == one["sizes"].tolist()
        kept = one["kept_per_layer"]
        assert (kept[1:] <= kept[:-1]).all()
        assert int(kept[-1]) == n + (1 if family == "clip" else 0)  # the class token was dropped


@pytest.mark.parametrize("packed", [False, True])
def test_merge_is_the_size_weighted_mean_of_pre_merge_tokens(tower, family, pixels, packed):
    """Merge at one layer only and compare against a per-token reference built from the stock tower."""
    layers = len(tower.encoder.layers)
    merge_layer = 1
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
    captured = {}
    thresholds = [math.inf] * layers
    thresholds[merge_layer] = 0.8
    dymu.apply(tower, thresholds)
    tower._dymu_state.packed = packed  # packed rows (Σ n_i, D) after the merge, or the padded layout
    layer = tower.encoder.layers[merge_layer]
    # The tokens entering the MLP of the merge layer: capture them with a hook on layer_norm2.
    handle = layer.layer_norm2.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    encoded = dymu.encode(tower, pixels, feature_layer=merge_layer + 1, drop_class_token=False)
    handle.remove()
    merged = captured["x"]
    if packed:
        assert merged.dim() == 2 and merged.shape[0] == int(encoded.num_tokens.sum())
        merged, _ = M.unpack(merged, encoded.sizes[encoded.sizes > 0], M.offsets(encoded.num_tokens))
    # Stock residual stream after the attention of the merge layer, before its MLP.
    stock_layer = tower.encoder.layers[merge_layer]
    with torch.no_grad():
        before = hidden[merge_layer]
        attn, _ = stock_layer.self_attn(stock_layer.layer_norm1(before), attention_mask=None)
        premerge = before + attn
    group = encoded.group_of_patch
    assert encoded.num_tokens.min() < 0.75 * group.shape[1]  # the check below is about real merges
    for i in range(len(pixels)):
        n = int(encoded.num_tokens[i])
        for j in range(n):
            members = (group[i] == j).nonzero().flatten()
            torch.testing.assert_close(merged[i, j], premerge[i, members].mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_batch_invariance_on_mixed_real_images(tower, pixels, order):
    dymu.apply(tower, 0.85, order=order)
    batch = dymu.encode(tower, pixels)
    counts = batch.num_tokens.tolist()
    assert len(set(counts)) > 3, f"token counts should diverge across images: {counts}"
    for i in range(len(pixels)):
        alone = dymu.encode(tower, pixels[i : i + 1]).image(0)
        inside = batch.image(i)
        assert len(alone["tokens"]) == len(inside["tokens"]), MIXED_IMAGES[i]
        assert (alone["tokens"] - inside["tokens"]).abs().max() <= 1e-5, MIXED_IMAGES[i]
        assert torch.equal(alone["group_of_patch"], inside["group_of_patch"])
        assert torch.equal(alone["sizes"], inside["sizes"])
    # Batch order does not matter either.
    flipped = dymu.encode(tower, pixels.flip(0))
    assert flipped.num_tokens.flip(0).tolist() == counts


def test_simpler_images_keep_fewer_tokens(tower, family):
    names = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "synthetic_noise.png"]
    pixels = processor_for(family)(images=[load_image(n) for n in names], return_tensors="pt")["pixel_values"]
    dymu.apply(tower, 0.85)
    blank, cat, noise = dymu.encode(tower, pixels).num_tokens.tolist()
    assert blank < cat < noise


@pytest.mark.parametrize("order", ORDERS)
def test_fixed_r_merges_exactly_r_per_layer(tower, family, pixels, order):
    dymu.apply(tower, r=10, order=order)
    encoded = dymu.encode(tower, pixels, feature_layer=-1, drop_class_token=False)
    n0 = 197 if family == "clip" else 196
    layers = len(tower.encoder.layers)
    assert encoded.kept_per_layer.tolist() == [[n0 - 10 * (k + 1) for k in range(layers)]] * len(pixels)


def test_layers_after_the_feature_layer_are_not_computed(tower, pixels):
    dymu.apply(tower, 0.9)
    calls = []
    handle = tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    encoded = dymu.encode(tower, pixels, feature_layer=-2)
    handle.remove()
    assert calls == [] and encoded.kept_per_layer.shape[1] == len(tower.encoder.layers) - 1


def test_clear_errors(tower):
    with pytest.raises(ValueError, match="3 entries but the vision tower has 4 layers"):
        dymu.apply(tower, [0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="exactly one of thresholds"):
        dymu.apply(tower, 0.9, r=3)
    with pytest.raises(ValueError, match="Linear is not supported: dymu.apply takes"):
        dymu.apply(torch.nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="out of range"):
        dymu.encode(tower, torch.zeros(1, 3, 112, 112), feature_layer=9)


# ---------------------------------------------------------------------------------------------
# Fidelity to the paper's code: its batch-1 inference rule, written out per token.


@pytest.fixture(scope="module")
def odd_tower(tmp_path_factory, family):
    """A tiny tower with 15x15 = 225 patches: an odd count, where the cap binds without a class token."""
    return build_tiny_tower(family, tmp_path_factory.mktemp(f"odd_{family}"), seed=1, image_size=120)


@pytest.mark.parametrize("order", ORDERS)
def test_equals_the_papers_batch1_rule_per_image(odd_tower, family, order):
    names = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "synthetic_noise.png", "skimage_coffee.png"]
    pixels = processor_for(family, 120)(images=[load_image(n) for n in names], return_tensors="pt")["pixel_values"]
    thresholds = [0.9, -math.inf, 0.8, 0.7]  # -inf: every edge up to the cap
    dymu.apply(odd_tower, thresholds, order=order)
    encoded = dymu.encode(odd_tower, pixels, feature_layer=-1, drop_class_token=False)  # one batch
    class_token = family == "clip"
    for i, name in enumerate(names):
        ref_x, ref_group, ref_counts = dtome_one_image(odd_tower, pixels[i : i + 1], thresholds, order, class_token)
        one = encoded.image(i)
        assert one["kept_per_layer"].tolist() == ref_counts, name
        assert len(ref_group) == 225 + class_token
        assert torch.equal(one["group_of_patch"], ref_group), name
        assert (one["tokens"] - ref_x).abs().max() <= 1e-5, name
    counts = encoded.kept_per_layer
    assert len(set(counts[:, -1].tolist())) == len(names)  # real, content-dependent merging
    if not class_token:  # 225 tokens, every edge above -inf: the cap (t // 2) is what stops layer 2
        assert (counts[:, 1] == (counts[:, 0] + 1) // 2).all() and (counts[:, 0] % 2 == 1).any()


def test_merging_every_edge_of_25_tokens_keeps_13(tmp_path):
    """1-layer SigLIP, 25 tokens, every edge above the threshold: the cap (25 // 2 = 12) leaves 13."""
    tower = build_tiny_tower("siglip", tmp_path, num_hidden_layers=1, image_size=80, patch_size=16)
    for order in ORDERS:
        dymu.apply(tower, thresholds=-math.inf, order=order)
        assert dymu.encode(tower, torch.zeros(1, 3, 80, 80), feature_layer=-1).num_tokens.tolist() == [13]


def test_threshold_infinities_and_nan(tower, family, pixels):
    n0 = 197 if family == "clip" else 196
    dymu.apply(tower, [math.inf, None, math.inf, math.inf])  # None = +inf = never
    assert dymu.encode(tower, pixels, feature_layer=-1, drop_class_token=False).kept_per_layer.unique().tolist() == [n0]
    dymu.apply(tower, [-math.inf, math.inf, math.inf, math.inf])
    kept = dymu.encode(tower, pixels, feature_layer=-1, drop_class_token=False).kept_per_layer
    assert kept[:, 0].tolist() == [n0 - n0 // 2] * len(pixels)  # every edge: 98 merges either way
    with pytest.raises(ValueError, match="threshold of layer 2 is NaN"):
        dymu.apply(tower, [0.9, 0.9, math.nan, 0.9])
    with pytest.raises(ValueError, match="'abc' is not a merge order"):
        dymu.apply(tower, 0.9, order="abc")
