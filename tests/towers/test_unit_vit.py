"""Unit-level DToMe for plain pre-norm ViT towers (dymu.towers.unit_vit) on tiny random towers.

Oracles: thresholds +inf ⇒ the stock tower (and the stock 4x4 average pool on top); real merges ⇒ a
slow reference that runs the stock modules at full length, every copy of a merged unit present (the
repeated-key form of proportional attention), and merges by the paper's rule in a plain loop; batch
invariance per image; ToMe r ⇒ exactly r unit merges per block and image; the calibration chooser ⇒
exactly B·r merges per block; a class token (InternViT) never merges; a patch mask masks keys and
keeps masked units out of merging.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLVisionConfig, InternVLVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from dymu import merge as M
from dymu.compat import UnsupportedTransformersError
from dymu.towers.unit_vit import BlockDescription, encode_units, unit_order

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_image  # noqa: E402

INF = math.inf
SIGLIP = BlockDescription(layer_classes=(SiglipEncoderLayer,))
INTERNVL = BlockDescription(layer_classes=(InternVLVisionLayer,), blocks="encoder.layer", attn_norm="layernorm_before",
                            attention="attention", mlp_norm="layernorm_after", o="projection_layer", q_norm="q_norm",
                            k_norm="k_norm", attn_scale="lambda_1", mlp_scale="lambda_2", final_norm="layernorm",
                            class_token=True)
NAMES = ("darknet_eagle.jpg", "synthetic_blank_white.png", "synthetic_gradient.png", "skimage_chessboard.png")


def _saved(tmp_path_factory, model):
    path = tmp_path_factory.mktemp(type(model).__name__)
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                image_size=64, patch_size=4)  # 16x16 patches
    return _saved(tmp_path_factory, SiglipVisionModel(config))


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    torch.manual_seed(0)
    config = InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=[32, 32], patch_size=[4, 4], use_qk_norm=True, use_mean_pooling=False,
                                  layer_scale_init_value=0.5)  # 8x8 patches and a class token
    model = _saved(tmp_path_factory, InternVLVisionModel(config))
    with torch.no_grad():  # random layer scales, so that a wrong placement shows; random position
        model.embeddings.position_embeddings.normal_(0, 0.5)  # embeddings (zeros here), so that no units tie
        for layer in model.encoder.layer:
            layer.lambda_1.uniform_(0.2, 1.5)
            layer.lambda_2.uniform_(0.2, 1.5)
    return model


def _pixels(size, names=NAMES):
    images = [load_image(n).resize((size, size)) for n in names]
    x = torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32).view(size, size, 3) for im in images])
    return (x.permute(0, 3, 1, 2) / 127.5 - 1).contiguous()


def _run(tower, description, pixels, side, **kw):
    grid = pixels.shape[-1] // tower.config.patch_size if isinstance(tower.config.patch_size, int) else \
        pixels.shape[-1] // tower.config.patch_size[0]
    with torch.no_grad():
        embeddings = tower.embeddings(pixels)
    return encode_units(tower, description, embeddings, (grid, grid), side, **kw)


@pytest.mark.parametrize("side", [2, 4])
def test_infinite_thresholds_equal_stock_tower_and_pool(siglip, side):
    pixels = _pixels(64)
    with torch.no_grad():
        stock = siglip(pixels).last_hidden_state
    out = _run(siglip, SIGLIP, pixels, side, thresholds=[INF] * 4)
    assert (out.features - stock).abs().max().item() <= 1e-5
    assert torch.equal(out.group_of_unit, torch.arange(4 * 256 // side**2))
    assert out.kept_per_block.tolist() == [[256 // side**2] * 4] * 4

    def pool(x):  # Gemma 3's connector: average-pool side x side patches
        grid = x.transpose(1, 2).reshape(len(x), -1, 16, 16)
        return F.avg_pool2d(grid, side).flatten(2).transpose(1, 2)

    assert (pool(out.features) - pool(stock)).abs().max().item() <= 1e-5


def test_unit_order_is_unit_major():
    order = unit_order(4, 4, 2)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    with pytest.raises(ValueError, match="does not split"):
        unit_order(6, 4, 4)


def _slow_reference(tower, description, pixels, side, thresholds):
    """Stock modules at full length (every copy of a merged unit present, which is what log(size) on a
    merged row stands for), the paper's rule on units as a plain loop per image."""
    blocks = tower.encoder.layers if description.blocks == "encoder.layers" else tower.encoder.layer
    with torch.no_grad():
        hidden = tower.embeddings(pixels)
        cls = description.class_token
        n = hidden.shape[1] - cls
        grid = int(n**0.5)
        order = unit_order(grid, grid, side)
        unit_of_patch = torch.empty(n, dtype=torch.long)
        unit_of_patch[order] = torch.arange(n) // side**2
        groups = [list(range(n // side**2)) for _ in range(len(pixels))]  # group of every unit, per image
        for index, block in enumerate(blocks):
            attn = getattr(block, description.attention)
            normed = getattr(block, description.attn_norm)(hidden)
            out = attn(normed)[0]
            if description.attn_scale:
                out = out * getattr(block, description.attn_scale)
            hidden = hidden + out
            if thresholds[index] != INF:
                keys = getattr(attn, description.k)(normed)
                if description.k_norm:
                    keys = getattr(attn, description.k_norm)(keys)
                heads = attn.num_heads
                for b in range(len(pixels)):
                    g = groups[b]
                    alive = sorted(set(g), key=lambda rep: rep)  # a merged unit keeps its destination's place
                    metric = {}
                    for rep in alive:  # every copy of a group has the same rows: take the representative's
                        rows = keys[b, cls:][order].view(-1, side**2, keys.shape[-1])[rep]
                        m = rows.view(side**2, heads, -1).mean((0, 1))
                        metric[rep] = m / m.norm()
                    a_side, b_side = alive[0::2], alive[1::2]
                    edges = []
                    for a in a_side:
                        scores = torch.stack([metric[a] @ metric[bb] for bb in b_side])
                        edges.append((float(scores.max()), a, b_side[int(scores.argmax())]))
                    cap = len(alive) // 2
                    chosen = sorted((e for e in edges if e[0] > thresholds[index]), key=lambda e: -e[0])[:cap]
                    for _, a, dest in chosen:
                        g[:] = [dest if x == a else x for x in g]
                    # every member unit gets the mean of the group's unit rows (size-weighted mean)
                    patches = hidden[b, cls:]
                    units = patches[order].view(-1, side**2, patches.shape[-1])
                    new_units = units.clone()
                    for rep in set(g):
                        members = [u for u, x in enumerate(g) if x == rep]
                        new_units[members] = units[members].mean(0)
                    hidden[b, cls:] = new_units.view(-1, patches.shape[-1])[torch.argsort(order)]
            out = getattr(block, description.mlp)(getattr(block, description.mlp_norm)(hidden))
            if description.mlp_scale:
                out = out * getattr(block, description.mlp_scale)
            hidden = hidden + out
        hidden = getattr(tower, description.final_norm)(hidden)
    return hidden, groups


def _partition(labels):
    first = {}
    return [first.setdefault(x, len(first)) for x in labels]


@pytest.mark.parametrize("which", ["siglip", "internvl"])
def test_merges_equal_the_slow_reference(which, request):
    tower = request.getfixturevalue(which)
    description = SIGLIP if which == "siglip" else INTERNVL
    size = 64 if which == "siglip" else 32
    pixels = _pixels(size)
    depth = tower.config.num_hidden_layers
    thresholds = [0.3, INF, 0.5, INF][:depth]
    want, groups = _slow_reference(tower, description, pixels, 2, thresholds)
    got = _run(tower, description, pixels, 2, thresholds=thresholds)
    cls = int(description.class_token)
    assert got.kept_per_image.min() < got.units_per_image.min(), "the thresholds should merge"
    assert [_partition(g.tolist()) for g in got.groups_per_item()] == [_partition(g) for g in groups]
    assert (got.features - want[:, cls:]).abs().max().item() <= 1e-4
    if cls:
        assert (got.class_tokens - want[:, 0]).abs().max().item() <= 1e-4


def test_batch_invariance_per_image(siglip):
    pixels = _pixels(64)
    thresholds = [0.2, 0.4, 0.4, 0.6]
    batch = _run(siglip, SIGLIP, pixels, 2, thresholds=thresholds)
    for i in range(len(pixels)):
        alone = _run(siglip, SIGLIP, pixels[i : i + 1], 2, thresholds=thresholds)
        assert (alone.features[0] - batch.features[i]).abs().max().item() <= 1e-5
        assert torch.equal(alone.groups_per_item()[0], batch.groups_per_item()[i])
        assert alone.kept_per_block[0].tolist() == batch.kept_per_block[i].tolist()


def test_tome_r_merges_exactly_r_units_per_block(siglip):
    out = _run(siglip, SIGLIP, _pixels(64), 2, r=[5, 0, 7, 3])
    assert out.kept_per_block.tolist() == [[59, 59, 52, 49]] * 4
    assert [len(g.unique()) for g in out.groups_per_item()] == [49] * 4


def test_calibration_chooser_takes_exactly_b_times_r(siglip):
    pixels = _pixels(64)
    taken = []

    def chooser(step, matches):
        chosen, _ = M.top_edges_of_batch(matches, len(pixels) * 6)
        taken.append(int(chosen.sum()))
        return chosen

    out = _run(siglip, SIGLIP, pixels, 2, edge_chooser=chooser)
    assert taken == [24] * 4
    assert out.kept_per_block.sum(0).tolist() == [256 - 24 * k for k in range(1, 5)]
    assert (out.kept_per_block != out.kept_per_block[:1]).any(), "batch-level ranking: simple images should give up more"


def test_patch_mask_masks_keys_and_blocks_units(siglip):
    pixels = _pixels(64)[:2]
    mask = torch.ones(2, 16, 16, dtype=torch.bool)
    mask[:, :, 12:] = False  # the right quarter of both images is padding
    with torch.no_grad():
        embeddings = siglip.embeddings(pixels)
        bias = torch.zeros(2, 1, 1, 256).masked_fill(~mask.view(2, 1, 1, 256), float("-inf"))
        stock = siglip.post_layernorm(siglip.encoder(inputs_embeds=embeddings, attention_mask=bias).last_hidden_state)
    flat = mask.view(2, -1)
    out = encode_units(siglip, SIGLIP, embeddings, (16, 16), 2, thresholds=[INF] * 4, patch_mask=flat)
    assert (out.features - stock).abs().max().item() <= 1e-5
    merged = encode_units(siglip, SIGLIP, embeddings, (16, 16), 2, thresholds=[-INF] * 4, patch_mask=flat)
    padded_units = ~flat[:, unit_order(16, 16, 2)].view(2, -1, 4).all(-1)
    for groups, padded in zip(merged.groups_per_item(), padded_units):
        counts = torch.bincount(groups)
        assert (counts[groups[padded]] == 1).all(), "a unit with padded patches never merges"
        assert counts.max() > 1
    with pytest.raises(ValueError, match="every patch"):
        encode_units(siglip, SIGLIP, embeddings, (16, 16), 2, thresholds=[INF] * 4,
                     patch_mask=torch.zeros(2, 256, dtype=torch.bool))


def test_wrong_tower_is_refused(siglip):
    with pytest.raises(UnsupportedTransformersError, match="not a InternVLVisionLayer"):
        _run(siglip, BlockDescription(layer_classes=(InternVLVisionLayer,)), _pixels(64)[:1], 2, thresholds=[INF] * 4)
    with pytest.raises(ValueError, match="one entry per block"):
        _run(siglip, SIGLIP, _pixels(64)[:1], 2, thresholds=[INF] * 3)


def test_budget_bounds_the_units_per_image(siglip):
    from dymu.towers.qwen_rules import make_qwen_budget

    pixels = _pixels(64)
    free = _run(siglip, SIGLIP, pixels, 2, thresholds=[INF] * 4)
    capped = _run(siglip, SIGLIP, pixels, 2, thresholds=[INF] * 4, budget=make_qwen_budget(max_tokens=20))
    assert capped.kept_per_image.max() <= 20 < free.kept_per_image.max()
    with pytest.raises(ValueError, match="cannot be reached"):
        _run(siglip, SIGLIP, pixels, 2, thresholds=[INF] * 4, budget=make_qwen_budget(max_tokens=3))
