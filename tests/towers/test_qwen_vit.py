"""Unit-level DToMe in the Qwen VL vision towers (dymu.towers.qwen_vit) on tiny random towers.

Oracles: thresholds +inf ⇒ the stock tower (features and Qwen3-VL deepstack); one merging block ⇒
the partition a plain loop computes from the stock keys by the paper's rule (A = even, B = odd
units of one image, best cosine partner, merge above τ); calibration on its own batch ⇒ exactly
round(r·units) merges per block; video ⇒ merges stay inside each temporal patch; token counts
rise with image complexity.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from dymu.tools.analyze.measure import jpeg_complexity, spearman
from dymu.towers.qwen_vit import encode_qwen
from dymu.tools.calibration import calibrate
from dymu.families.qwen_processors import video_pixels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import IMAGES, load_image  # noqa: E402
from qwen_helpers import QWEN_FAMILIES, load_qwen  # noqa: E402

INF = math.inf


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen(request, qwen_dirs):
    model, processor = load_qwen(request.param, qwen_dirs[request.param])
    return model, processor


def _images(names=("darknet_eagle.jpg", "synthetic_blank_white.png", "synthetic_gradient.png")):
    return [load_image(n) for n in names]


def test_infinite_thresholds_equal_stock_tower(qwen):
    model, processor = qwen
    visual = model.model.visual
    inputs = processor.image_processor(images=_images(), return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        stock = visual(pixels, grid_thw=grid, return_dict=True)
    vit = encode_qwen(visual, pixels, grid, [INF] * len(visual.blocks), "vit")
    post = encode_qwen(visual, pixels, grid, [INF, INF], "post")
    assert (vit.features - stock.pooler_output).abs().max().item() <= 1e-5
    assert torch.equal(post.features, stock.pooler_output)
    for mine, want in zip(vit.deepstack, getattr(stock, "deepstack_features", None) or []):
        assert (mine - want).abs().max().item() <= 1e-5
    assert torch.equal(vit.group_of_unit, torch.arange(len(stock.pooler_output)))
    assert vit.kept_per_step.tolist() == [[n] * len(visual.blocks) for n in (grid.prod(-1) // 4).tolist()]


def _slow_partition(keys, num_heads, lengths, tau):
    """Paper rule on one block, as a plain loop: per image, units in tower order, A even / B odd."""
    dim = keys.shape[-1] // 3
    k = keys[:, dim:2 * dim]
    labels, start = [], 0
    for n in lengths:
        metric = []
        for u in range(start, start + n):
            rows = k[4 * u:4 * u + 4].view(4, num_heads, -1)
            m = rows.mean(dim=(0, 1))
            metric.append(m / m.norm())
        label = list(range(start, start + n))
        for a in range(0, n, 2):
            best, partner = -INF, None
            for b in range(1, n, 2):
                score = float(metric[a] @ metric[b])
                if score > best:
                    best, partner = score, b
            if partner is not None and best > tau:
                label[a] = start + partner
        labels += label
        start += n
    return torch.tensor(labels)


def _same_partition(a, b):
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_one_merging_block_equals_slow_reference(qwen):
    model, processor = qwen
    visual = model.model.visual
    # Photos: a flat image has exactly tied partners, decided by float noise (1e-7) between two
    # attention implementations, so it cannot tell a wrong rule from a different tie-break.
    inputs = processor.image_processor(images=_images(("darknet_eagle.jpg", "darknet_dog_bicycle_truck.jpg")),
                                       return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    captured = []
    handle = visual.blocks[1].attn.qkv.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    handle.remove()
    lengths = (grid.prod(-1) // 4).tolist()
    tau = 0.8
    want = _slow_partition(captured[0], visual.blocks[1].attn.num_heads, lengths, tau)  # tower (window) order
    if hasattr(visual, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        want = want[torch.argsort(window_index)]  # the unit in tower slot s is stock unit window_index[s]
        want = torch.argsort(window_index)[want]
    thresholds = [INF] * len(visual.blocks)
    thresholds[1] = tau
    got = encode_qwen(visual, pixels, grid, thresholds, "vit")
    assert 0 < got.kept_per_segment.sum() < sum(lengths)  # it merged, not everything
    assert _same_partition(got.group_of_unit, want)
    for g in got.group_of_unit.unique():  # virtual unmerge: rows of one group equal
        rows = got.features[got.group_of_unit == g]
        assert torch.equal(rows, rows[:1].expand_as(rows))


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_calibration_merges_exactly_r_times_units_per_block(qwen, merge_point):
    model, processor = qwen
    images = _images() + _images(("skimage_chessboard.png", "darknet_dog_bicycle_truck.jpg"))
    thresholds = calibrate(model, images, r=0.15, batch_size=len(images), processor=processor, progress=False,
                           merge_point=merge_point, rounds=2 if merge_point == "post" else None)
    inputs = processor.image_processor(images=images, return_tensors="pt")
    units = int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    steps = len(thresholds.thresholds)
    kept = thresholds.tokens_kept_mean  # per step, mean over images of units alive
    alive = [units] + [round(k * len(images)) for k in kept]
    assert [alive[i] - alive[i + 1] for i in range(steps)] == [round(0.15 * units)] * steps
    assert thresholds.encoder["merge_point"] == merge_point and all(0 <= t < INF for t in thresholds.thresholds)


def test_video_merges_stay_inside_each_temporal_patch(qwen):
    model, processor = qwen
    visual = model.model.visual
    frame = load_image("synthetic_gradient.png").resize((224, 168))
    video = video_pixels(processor.image_processor, [frame] * 6)  # static: 3 temporal patches
    grid = video["video_grid_thw"]
    encoded = encode_qwen(visual, video["pixel_values_videos"], grid, [0.5] * len(visual.blocks), "vit")
    per_patch = int(grid[0, 1] * grid[0, 2]) // 4
    assert encoded.units_per_segment.tolist() == [per_patch] * 3
    patch_of_unit = torch.arange(3 * per_patch) // per_patch
    for g in encoded.group_of_unit.unique():
        assert patch_of_unit[encoded.group_of_unit == g].unique().numel() == 1
    # The same frames give the same tokens in every temporal patch (a function of the segment alone).
    assert len(set(encoded.kept_per_segment.tolist())) == 1 and encoded.kept_per_segment[0] < per_patch


def test_token_fraction_rises_with_image_complexity(qwen_dirs):
    model, processor = load_qwen("qwen2_5_vl", qwen_dirs["qwen2_5_vl"])
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))[:16]
    images = [load_image(p.name) for p in paths]
    thresholds = calibrate(model, images, preset="mid", batch_size=8, processor=processor, progress=False)
    inputs = processor.image_processor(images=images, return_tensors="pt")
    encoded = encode_qwen(model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"],
                          thresholds.thresholds, "vit")
    fraction = [k / n for k, n in encoded.per_item(inputs["image_grid_thw"])]
    rho = spearman([jpeg_complexity(im) for im in images], fraction)
    assert rho > 0.5, rho


def test_frame_parity_layout():
    """A video of 3 temporal patches (2, 2, 2 units) and an image (3 units) in one call: the video's A
    slots hold patches 0 and 2 (ranks 0, 2), its B slots patch 1; the image keeps plain alternation.
    With patch 1 merged away, patches 0 and 2 are ranks 0 and 1: A and B."""
    from dymu.towers.qwen_vit import across_frames, within_segments

    segment_of_unit = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    item_of_segment = torch.tensor([0, 0, 0, 1])
    layout = across_frames(segment_of_unit, item_of_segment, 2)
    assert layout.row.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert layout.slot.tolist() == [0, 2, 1, 3, 4, 6, 0, 1, 2]  # A: 0, 2, 4, 6 (patches 0, 2); B: 1, 3 (patch 1)
    assert (layout.rows, layout.width) == (2, 7)
    later = across_frames(torch.tensor([0, 0, 2, 2]), item_of_segment, 2)
    assert later.slot.tolist() == [0, 2, 1, 3]
    stock = within_segments(segment_of_unit, 4)
    assert stock.row.tolist() == segment_of_unit.tolist() and stock.slot.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 2]
