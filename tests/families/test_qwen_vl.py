"""DyMU wiring in tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (saved and reloaded): images, several
images, video, image + video in one prompt, left-padded batches; merge_point "vit" and "post".

Oracles: thresholds +inf ⇒ stock logits and generate tokens; with real merges the prefill equals the
stock model fed the same (virtually unmerged) features with every layer's attention output averaged
over the groups that a plain loop reads off the encoder's group_of_unit in placeholder order (paper
Eq. 11); an image alone and in a batch gives the same groups and features.
"""

import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.towers.qwen_vit import encode_qwen
from dymu.families.qwen_processors import qwen_inputs, video_pixels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_image  # noqa: E402
from lm_helpers import mixers_averaged_within_groups  # noqa: E402
from qwen_helpers import QWEN_FAMILIES, chat, load_qwen  # noqa: E402

ATOL = 1e-5
INF = float("inf")


def frames(n=4):
    """A short video: a window sliding over a photo (same size frames)."""
    photo = load_image("darknet_dog_bicycle_truck.jpg").resize((320, 240))
    return [photo.crop((8 * k, 0, 8 * k + 224, 168)) for k in range(n)]


def batch(processor):
    """Left-padded: one image; two images; a video then an image; a video alone."""
    eagle, white, grad = (load_image(n) for n in ("darknet_eagle.jpg", "synthetic_blank_white.png",
                                                   "synthetic_gradient.png"))
    items = [("What is this?", [eagle]), ("Compare them.", [white, grad]), ("And now?", [frames(), eagle]),
             ("Describe.", [frames(2)])]
    texts = [chat(processor, text, ["video" if isinstance(m, list) else "image" for m in media])
             for text, media in items]
    return qwen_inputs(processor, texts, [media for _, media in items])


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def stock_and_inputs(qwen_dirs, family):
    stock, processor = load_qwen(family, qwen_dirs[family])
    inputs = batch(processor)
    with torch.no_grad():
        logits = stock(**inputs).logits
        tokens = stock.generate(**inputs, max_new_tokens=4, do_sample=False)
    return stock, processor, inputs, logits, tokens


def test_batch_holds_images_videos_and_padding(stock_and_inputs):
    _, _, inputs, _, _ = stock_and_inputs
    assert inputs["image_grid_thw"].shape[0] == 4 and inputs["video_grid_thw"][:, 0].tolist() == [2, 1]
    assert (inputs["attention_mask"] == 0).any()  # left padding


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_infinite_thresholds_equal_stock_logits_and_tokens(qwen_dirs, family, stock_and_inputs, merge_point):
    _, _, inputs, want_logits, want_tokens = stock_and_inputs
    model, _ = load_qwen(family, qwen_dirs[family])
    depth = len(model.model.visual.blocks)
    dymu.apply(model, [INF] * (depth if merge_point == "vit" else 2), merge_point=merge_point)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (logits - want_logits).abs().max().item() <= ATOL
    assert torch.equal(tokens, want_tokens)
    dymu.remove(model)
    assert type(model.model) is type(stock_and_inputs[0].model)


def _reference_group_map(model, inputs, encoded):
    """Plain loop: walk the placeholders in row-major order, images then videos, and label each
    position with (item, group of its unit)."""
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -1)
    next_label = 0
    for modality in ("image", "video"):
        if modality not in encoded:
            continue
        groups = encoded[modality].group_of_unit.tolist()
        token = getattr(model.config, f"{modality}_token_id")
        k = 0
        for b in range(ids.shape[0]):
            for n in range(ids.shape[1]):
                if ids[b, n] == token:
                    labels[b, n] = next_label + groups[k]
                    k += 1
        assert k == len(groups)
        next_label += max(groups) + 1
    group_map = torch.full_like(ids, -1)
    for b in range(ids.shape[0]):
        seen = {}
        for n in range(ids.shape[1]):
            key = ("label", int(labels[b, n])) if labels[b, n] >= 0 else ("pos", n)
            group_map[b, n] = seen.setdefault(key, len(seen))
    return group_map


@pytest.mark.parametrize("merge_point,cross_frame", [("vit", False), ("post", False), ("vit", True), ("post", True)])
def test_merged_prefill_equals_slow_reference(qwen_dirs, family, stock_and_inputs, merge_point, cross_frame):
    stock, _, inputs, _, _ = stock_and_inputs
    model, _ = load_qwen(family, qwen_dirs[family])
    depth = len(model.model.visual.blocks)
    dymu.apply(model, [0.6] * (depth if merge_point == "vit" else 2), merge_point=merge_point, cross_frame=cross_frame)
    with torch.no_grad():
        logits = model(**inputs).logits
        encoded = dict(model.model._dymu.last_encoded)
        outputs = {m: getattr(model.model, f"get_{m}_features")(inputs[f"pixel_values{'_videos' if m == 'video' else ''}"],
                                                               inputs[f"{m}_grid_thw"]) for m in ("image", "video")}
    for enc in encoded.values():  # real merging happened, and within every segment
        assert enc.kept_per_segment.sum() < enc.units_per_segment.sum()
    if cross_frame:  # some group of the 2-patch video holds units of both of its temporal patches
        first = encoded["video"].group_of_unit[: int(inputs["video_grid_thw"][0].prod()) // 4].view(2, -1)
        assert set(first[0].tolist()) & set(first[1].tolist())
    group_map = _reference_group_map(model, inputs, encoded)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
            "second_per_grid_ts")
    with mixers_averaged_within_groups(stock.model.language_model.layers, group_map), torch.no_grad():
        reference = stock(**{k: inputs[k] for k in keys if k in inputs}, mm_encoder_outputs=outputs).logits
    assert (logits - reference).abs().max().item() <= ATOL


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_image_alone_and_in_batch_gives_same_groups_and_features(stock_and_inputs, merge_point):
    stock, _, inputs, _, _ = stock_and_inputs
    visual = stock.model.visual
    thresholds = [0.6] * (len(visual.blocks) if merge_point == "vit" else 2)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    rows = (grid.prod(-1)).tolist()
    together = encode_qwen(visual, pixels, grid, thresholds, merge_point)
    units = (grid.prod(-1) // 4).tolist()
    start_row, start_unit = 0, 0
    for i in range(len(grid)):
        alone = encode_qwen(visual, pixels[start_row:start_row + rows[i]], grid[i:i + 1], thresholds, merge_point)
        part = slice(start_unit, start_unit + units[i])
        groups = together.group_of_unit[part]
        assert torch.equal(groups - groups.min(), alone.group_of_unit)
        assert (together.features[part] - alone.features).abs().max().item() <= ATOL
        start_row, start_unit = start_row + rows[i], start_unit + units[i]


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_an_image_merged_down_to_one_unit_alone_and_in_a_batch(stock_and_inputs, merge_point):
    """-inf merges every edge up to the cap: a segment of t units keeps ceil(t/2) at every step. After
    8 rounds ("post") an image alone in its call is down to one unit, and the rounds after that have
    nothing to match (a batch of one-unit rows once failed there); in a batch the same."""
    stock, _, inputs, _, _ = stock_and_inputs
    visual = stock.model.visual
    thresholds = [-INF] * (len(visual.blocks) if merge_point == "vit" else 8)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    first = int(grid[0].prod())
    alone = encode_qwen(visual, pixels[:first], grid[:1], thresholds, merge_point)
    together = encode_qwen(visual, pixels, grid, thresholds, merge_point)
    units, halving = int(grid[0].prod()) // 4, []
    for _ in thresholds:
        units = (units + 1) // 2
        halving.append(units)
    assert alone.kept_per_step[0].tolist() == halving
    if merge_point == "post":
        assert halving[-1] == 1 and set(together.kept_per_segment.tolist()) == {1}
    assert torch.equal(together.kept_per_step[0], alone.kept_per_step[0])
    assert (together.features[: len(alone.features)] - alone.features).abs().max().item() <= ATOL


def static_video(patches: int = 4):
    """A video of one photo repeated: 2·patches identical frames."""
    photo = load_image("skimage_chelsea_cat.png").resize((224, 168))
    return [photo] * (2 * patches)


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_cross_frame_merges_every_unit_with_its_twin_in_a_static_video(stock_and_inputs, merge_point):
    """Frame parity: at block/round 0 the units of patches 0 and 2 meet their twins in 1 and 3 (score 1,
    all merge: 4u -> 2u); block 1 matches within frames (threshold 2: nothing); at block 2 the patches
    left (1, 3) are ranked 0, 1 and merge again (2u -> u). Every group is one position in all 4
    patches. Per temporal patch only, the same thresholds merge (almost) nothing."""
    stock, processor, _, _, _ = stock_and_inputs
    visual = stock.model.visual
    video = video_pixels(processor.image_processor, static_video())
    pixels, grid = video["pixel_values_videos"], video["video_grid_thw"]
    u = int(grid[0, 1] * grid[0, 2]) // 4
    steps = len(visual.blocks) if merge_point == "vit" else 3
    thresholds = [0.999, 2.0, 0.999] + [INF] * (steps - 3)
    across = encode_qwen(visual, pixels, grid, thresholds, merge_point, cross_frame=True)
    assert across.kept_per_step.sum(0)[:3].tolist() == [2 * u, 2 * u, u]
    assert across.kept_per_segment.tolist() == [0, 0, 0, u]  # merged units sit in the destination's patch
    assert torch.equal(across.group_of_unit.view(4, u), across.group_of_unit[:u].expand(4, u))
    within = encode_qwen(visual, pixels, grid, thresholds, merge_point)
    assert within.kept_per_segment.sum() > 3 * u
    # the merged tokens are the twins' (equal) features: the stock tower's rows for patch 0
    stock_rows = encode_qwen(visual, pixels, grid, [INF] * steps, merge_point).features[:u]
    assert (across.features[:u] - stock_rows).abs().max().item() <= (ATOL if merge_point == "post" else 1e-4)


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_cross_frame_video_alone_and_in_a_batch(stock_and_inputs, merge_point):
    stock, processor, _, _, _ = stock_and_inputs
    visual = stock.model.visual
    videos = [video_pixels(processor.image_processor, f) for f in (frames(6), static_video(2), frames(4))]
    pixels = torch.cat([v["pixel_values_videos"] for v in videos])
    grid = torch.cat([v["video_grid_thw"] for v in videos])
    thresholds = [0.6] * (len(visual.blocks) if merge_point == "vit" else 3)
    together = encode_qwen(visual, pixels, grid, thresholds, merge_point, cross_frame=True)
    groups = together.groups_per_item(grid)
    start = 0
    for k, video in enumerate(videos):
        alone = encode_qwen(visual, video["pixel_values_videos"], video["video_grid_thw"], thresholds, merge_point,
                            cross_frame=True)
        n = len(alone.group_of_unit)
        assert torch.equal(groups[k], alone.group_of_unit)
        assert (together.features[start : start + n] - alone.features).abs().max().item() <= ATOL
        start += n


def test_generate_with_merges_runs_with_beams(qwen_dirs, family, stock_and_inputs):
    _, _, inputs, _, _ = stock_and_inputs
    model, _ = load_qwen(family, qwen_dirs[family])
    dymu.apply(model, 0.6)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 2 * inputs["input_ids"].shape[0]


def test_bad_settings_have_clear_errors(qwen_dirs):
    model, _ = load_qwen("qwen2_5_vl", qwen_dirs["qwen2_5_vl"])
    with pytest.raises(ValueError, match="mode 'downsample' is not available for Qwen2_5_VL.*native resolution"):
        dymu.apply(model, 0.5, mode="downsample")
    with pytest.raises(ValueError, match="merge_point must be one of vit, post"):
        dymu.apply(model, 0.5, merge_point="middle")
    with pytest.raises(ValueError, match="one threshold per vision block \\(4\\), got 3"):
        dymu.apply(model, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="needs thresholds"):
        dymu.apply(model, None)
