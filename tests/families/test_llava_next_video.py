"""LLaVA-NeXT-Video: the tiny random demo model saved and reloaded with from_pretrained.

Oracles: thresholds that never merge == stock logits and generated tokens (one image, two images, a video,
a left-padded batch) in every merge point; real merges (vit, post, both) == a slow reference written here
(the stock packing / pooling of the virtually unmerged features, groups found from dense one-hot indicators
pushed through the same stock steps, the post rounds of test_llava_next's reference, the stock language
model at full length with every layer's attention output averaged over each group); a static video keeps
few LLM rows; rows follow image complexity; batch invariance per image and per frame; calibration merges
exactly B·r per layer / round(r · units) per round on its own batch; the report's three counts.
"""

import math

import pytest
import torch
from transformers import LlavaNextVideoForConditionalGeneration

import dymu
from conftest import IMAGES, MIXED_IMAGES, load_image
from dymu.decoders.llama import rows_processed
from dymu.families import get_vlm_family
from dymu.families.prompting import chat_text
from lm_helpers import mixers_averaged_within_groups
from test_llava_next import _groups_of_rows, masked_max_diff, reference_post

MERGE_POINTS = ["vit", "post", "both"]
ROUNDS = 5
SIDE, POOLED = 8, 16  # the demo's 112px crops of 14px patches: 8x8 tokens, pooled 2x2 to 4x4


@pytest.fixture(scope="session")
def nv_dir(tmp_path_factory):
    from dymu.families.demos.llava import build_demo_anyres_model

    folder = tmp_path_factory.mktemp("tiny_next_video")
    model, processor = build_demo_anyres_model("next_video")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load(folder):
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    processor = get_vlm_family("llava_next_video").load_processor(str(folder), model.config)
    processor.tokenizer.padding_side = "left"
    return model, processor


def odd_image():
    return load_image("darknet_dog_bicycle_truck.jpg").resize((380, 300))  # 3x3 crops, unpadded rows


def frames(name="darknet_kite_beach.jpg", n=3):
    return [load_image(name).resize((160, 120)).rotate(7 * i) for i in range(n)]


def cases():
    two = [load_image("synthetic_gradient.png").resize((200, 90)),
           load_image("skimage_chessboard.png").resize((120, 120))]
    return ["What is this?", "Compare the two pictures.", "What happens in the video?"], [[odd_image()], two, []], \
        [[], [], [frames()]]


def inputs_for(processor, prompts, images, videos):
    texts = [chat_text(processor, p, len(i), len(v)) for p, i, v in zip(prompts, images, videos)]
    kwargs = {}
    if any(images):
        kwargs["images"] = [i for ims in images for i in ims]
    if any(videos):
        kwargs["videos"] = [v for vs in videos for v in vs]
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def never(model, merge_point):
    layers = model.config.vision_config.num_hidden_layers
    return {"vit": [math.inf] * layers, "post": [math.inf] * ROUNDS,
            "both": ([math.inf] * layers, [math.inf] * ROUNDS)}[merge_point]


def test_never_merging_equals_stock_for_images_video_and_a_padded_batch(nv_dir):
    model, processor = load(nv_dir)
    prompts, images, videos = cases()
    batches = [([p], [i], [v]) for p, i, v in zip(prompts, images, videos)] + [(prompts, images, videos)]
    for batch in batches:  # one image, two images, a video, then all three left-padded
        inputs = inputs_for(processor, *batch)
        run = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            stock = model(**inputs).logits
            stock_tokens = model.generate(**inputs, **run)
            for merge_point in MERGE_POINTS:
                dymu.apply(model, never(model, merge_point), merge_point=merge_point)
                assert masked_max_diff(model(**inputs).logits, stock, inputs["attention_mask"]) <= 1e-5, merge_point
                assert torch.equal(model.generate(**inputs, **run), stock_tokens), merge_point
                dymu.remove(model)
        assert stock_tokens.shape[1] == inputs["input_ids"].shape[1] + 6
    assert type(model.model).__name__ == "LlavaNextVideoModel"


# ---- the slow reference ----------------------------------------------------------------------------


def indicators(groups_of_patch):
    """Per crop / frame (P,) merged-token labels -> (k, P, W) one-hot rows, each its own block of columns."""
    width = sum(int(g.max()) + 1 for g in groups_of_patch)
    out, col = torch.zeros(len(groups_of_patch), len(groups_of_patch[0]), width, dtype=torch.float64), 0
    for k, g in enumerate(groups_of_patch):
        out[k, torch.arange(len(g)), col + g] = 1.0
        col += int(g.max()) + 1
    return out


def reference_logits(model, inputs, post=None):
    """The stock language model on the virtually unmerged features after the stock packing (images) and the
    stock pooling then projector (videos), with every layer's attention output averaged over each group;
    with ``post`` (thresholds per round), the reference rounds on every image / video frame first."""
    from transformers.models.llava_next_video import modeling_llava_next_video as stock

    inner, config = model.model, model.config
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    labels = torch.full_like(ids, -1)
    next_label = 0

    def finish(rows, groups, segment):
        return reference_post(rows, groups, segment, post) if post is not None else (rows, groups)

    def place(token_id, items):
        nonlocal embeds, next_label
        mask = (ids == token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, torch.cat([rows for rows, _ in items]))
        parts = []
        for _, groups in items:
            parts.append(groups + next_label)
            next_label += len(groups)
        labels[ids == token_id] = torch.cat(parts)

    if "pixel_values" in inputs:
        sizes, strategy = inputs["image_sizes"], config.vision_feature_select_strategy
        counts = [stock.image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                  for s in sizes]
        enc = dymu.encode(model, torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)]))
        items, start = [], 0
        for i, n in enumerate(counts):
            crops = [enc.image(k) for k in range(start, start + n)]
            start += n
            feats = torch.stack([inner.multi_modal_projector(c["tokens"])[c["group_of_patch"]] for c in crops])
            ind = indicators([c["group_of_patch"] for c in crops])
            packed = inner.pack_image_features([feats], sizes[i:i + 1], strategy,
                                               image_newline=inner.image_newline)[0][0]
            packed_ind = inner.pack_image_features([ind], sizes[i:i + 1], strategy,
                                                   image_newline=torch.zeros(ind.shape[2], dtype=torch.float64))[0][0]
            newline = packed_ind.abs().sum(1) == 0  # no merged token in it
            items.append(finish(packed, _groups_of_rows(packed_ind), torch.where(newline, -1, 0)))
        place(config.image_token_id, items)
    if "pixel_values_videos" in inputs:
        videos = inputs["pixel_values_videos"]
        n = videos.shape[1]
        enc = dymu.encode(model, videos.flatten(0, 1))
        items = []
        for v in range(videos.shape[0]):
            fs = [enc.image(v * n + f) for f in range(n)]
            grids = torch.stack([f["tokens"][f["group_of_patch"]] for f in fs])  # unmerged in the tower's space
            pooled = inner.multi_modal_projector(inner.vision_resampler(grids)).flatten(0, 1)
            pooled_ind = inner.vision_resampler(indicators([f["group_of_patch"] for f in fs])).flatten(0, 1)
            segment = torch.arange(len(pooled)) // (len(pooled) // n)  # the frame
            items.append(finish(pooled, _groups_of_rows(pooled_ind), segment))
        place(config.video_token_id, items)

    group_map = labels.clone()  # text and padding: a group of their own each
    text = labels < 0
    group_map[text] = next_label + torch.arange(int(text.sum()))
    with mixers_averaged_within_groups(inner.language_model.layers, group_map):
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    return model.lm_head(hidden), labels


CALIBRATION = ["skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg", "skimage_coffee.png", "darknet_eagle.jpg",
               "synthetic_blank_white.png", "synthetic_gradient.png", "scipy_raccoon_face.jpg",
               "skimage_chessboard.png"]


@pytest.fixture(scope="session")
def nv_thresholds(nv_dir):
    """Mid-preset thresholds per merge point, calibrated on 8 images (10 crops each) in one batch."""
    model, processor = load(nv_dir)
    images = [load_image(n).resize((380, 300)) for n in CALIBRATION]
    return {merge_point: dymu.calibrate(model, images, preset="mid", batch_size=8, progress=False,
                                        processor=processor.image_processor,
                                        merge_point=None if merge_point == "vit" else merge_point,
                                        warn=lambda message: None)
            for merge_point in MERGE_POINTS}


def video_rows(labels, inputs, token_id):
    at = inputs["input_ids"] == token_id
    return int(labels[at].unique().numel()), int(at.sum())


@pytest.mark.parametrize("merge_point", MERGE_POINTS)
def test_real_merges_equal_the_slow_reference(nv_dir, nv_thresholds, merge_point):
    model, processor = load(nv_dir)
    thresholds = nv_thresholds[merge_point]
    dymu.apply(model, thresholds)
    assert model.model._dymu.merge_point == merge_point  # the file's
    inputs = inputs_for(processor, *cases())
    with torch.no_grad():
        ours = model(**inputs).logits
        rows = rows_processed(model)
        reference, labels = reference_logits(model, inputs, getattr(thresholds, "post_thresholds", None))
    assert masked_max_diff(ours, reference, inputs["attention_mask"]) <= 1e-4
    # VTU ran its MLP once per group of the reference (a finer group map would give the same logits).
    groups = sum(int(row[row >= 0].unique().numel()) for row in labels)
    assert rows["mlp"] == model.config.text_config.num_hidden_layers * (groups + int((labels < 0).sum()))
    for token_id in (model.config.image_token_id, model.config.video_token_id):
        rows, positions = video_rows(labels, inputs, token_id)
        assert rows < positions, (token_id, rows, positions)  # images and the video both merged


def test_max_pooling_group_map_equals_the_reference(nv_dir):
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    model, processor = load(nv_dir)
    model.config.spatial_pool_mode = "max"
    model.model.vision_resampler = LlavaNextVideoPooler(model.config)
    dymu.apply(model, r=12, mode="tome")
    inputs = inputs_for(processor, *[c[2:] for c in cases()])  # the video
    with torch.no_grad():
        ours = model(**inputs).logits
        processed = rows_processed(model)["mlp"]
        reference, labels = reference_logits(model, inputs)
    assert masked_max_diff(ours, reference, inputs["attention_mask"]) <= 1e-4
    groups = int(labels[labels >= 0].unique().numel())
    assert processed == model.config.text_config.num_hidden_layers * (groups + int((labels < 0).sum()))
    rows, positions = video_rows(labels, inputs, model.config.video_token_id)
    assert rows < positions == 3 * POOLED


def test_conv_pooling_is_refused_in_one_line(nv_dir):
    model, _ = load(nv_dir)
    model.config.spatial_pool_mode = "conv"
    with pytest.raises(ValueError, match="spatial_pool_mode 'conv' is not supported: DyMU carries the group map "
                                         "through average or max pooling only$"):
        dymu.apply(model, r=4, mode="tome")
    assert dymu.api.settings_of(model) is None


def video_pixels(processor, video_frames):
    return processor(text=[chat_text(processor, "?", 0, 1)], videos=[video_frames],
                     return_tensors="pt")["pixel_values_videos"]


@pytest.mark.parametrize("merge_point", ["post", "both"])
def test_a_static_video_keeps_few_llm_rows(nv_dir, nv_thresholds, merge_point):
    model, processor = load(nv_dir)
    dymu.apply(model, nv_thresholds[merge_point])
    still = load_image("synthetic_white_one_circle.png").resize((160, 120))
    with torch.no_grad():
        video = model.model.get_video_features(video_pixels(processor, [still] * 8)).pooler_output
    rows = int(video.dymu_group_of_patch[0].unique().numel())
    assert video.shape[1] == 8 * POOLED and rows <= 0.15 * video.shape[1], (rows, video.shape[1])


def rows_of(model, processor, images):
    with torch.no_grad():
        inputs = processor.image_processor(images=images, return_tensors="pt")
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output


def test_llm_rows_follow_image_complexity(nv_dir, nv_thresholds):
    from dymu.tools.analyze.measure import jpeg_complexity, spearman

    model, processor = load(nv_dir)
    dymu.apply(model, nv_thresholds["post"])
    complexity, rows = [], []
    for path in sorted(IMAGES.glob("*.*")):
        if path.suffix.lower() in (".png", ".jpg"):
            image = load_image(path.name).resize((380, 300))  # one layout: the same stock positions for all
            complexity.append(jpeg_complexity(image))
            rows.append(int(rows_of(model, processor, [image])[0].dymu_group_of_patch.unique().numel()))
    assert len(rows) > 30 and spearman(complexity, rows) > 0.5, list(zip(complexity, rows))


@pytest.mark.parametrize("merge_point", ["post", "both"])
def test_batch_invariance_per_image_and_per_frame(nv_dir, nv_thresholds, merge_point):
    model, processor = load(nv_dir)
    dymu.apply(model, nv_thresholds[merge_point])
    images = [load_image(n).resize((380, 300)) for n in MIXED_IMAGES[:4]]
    batch = rows_of(model, processor, images)
    for i, image in enumerate(images):
        one = rows_of(model, processor, [image])[0]
        assert torch.equal(one.dymu_group_of_patch, batch[i].dymu_group_of_patch)
        assert (one - batch[i]).abs().max() <= 1e-5
    fs = [load_image(n).resize((160, 120)) for n in MIXED_IMAGES[:3]]
    with torch.no_grad():
        both = model.model.get_video_features(torch.cat([video_pixels(processor, fs),
                                                         video_pixels(processor, fs[::-1])])).pooler_output
        kept = model.model._dymu.last_post_kept[:, -1].tolist()  # per frame of the two videos
        alone = model.model.get_video_features(video_pixels(processor, fs)).pooler_output
    assert kept[:3] == kept[3:][::-1]  # a frame keeps the same rows wherever it is
    assert torch.equal(alone.dymu_group_of_patch[0], both.dymu_group_of_patch[0])
    assert (alone[0] - both[0]).abs().max() <= 1e-5


PHOTOS = ["skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg", "skimage_coffee.png", "darknet_eagle.jpg"]


def test_calibration_merges_b_times_r_per_layer_on_its_crops(nv_dir):
    from dymu.api import encoder_pixels

    model, processor = load(nv_dir)
    # Photos only: a blank image's edges tie, and no threshold can take part of a tie.
    images = [load_image(n) for n in PHOTOS[:3]]
    thresholds = dymu.calibrate(model, images, r=4, batch_size=3, progress=False, processor=processor.image_processor,
                                warn=lambda message: None)
    crops, counts = encoder_pixels(model, processor.image_processor(images=images, return_tensors="pt"))
    assert thresholds.images_seen == len(crops) > 3 and thresholds.encoder["patches_per_image"] == SIDE * SIDE
    dymu.apply(model, thresholds)
    with torch.no_grad():
        kept = dymu.encode(model, crops).kept_per_layer  # (crops, layers run)
    before = torch.cat([torch.full((len(crops), 1), SIDE * SIDE + 1), kept[:, :-1]], dim=1)  # CLIP: + class token
    assert (before - kept).sum(0).tolist() == [len(crops) * 4] * kept.shape[1]


@pytest.mark.parametrize("merge_point", ["post", "both"])
def test_calibration_merges_r_times_units_per_round(nv_dir, merge_point):
    model, processor = load(nv_dir)
    thresholds = dymu.calibrate(model, [load_image(n) for n in PHOTOS], r=0.2, rounds=3, batch_size=4, progress=False,
                                processor=processor.image_processor, merge_point=merge_point, warn=lambda m: None)
    inputs = processor.image_processor(images=[load_image(n) for n in PHOTOS], return_tensors="pt")

    def kept_per_round(th):
        dymu.apply(model, th, merge_point=merge_point)
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        return model.model._dymu.last_post_kept.sum(0).tolist()

    units = kept_per_round([math.inf] * 3 if merge_point == "post" else (thresholds.thresholds, [math.inf] * 3))[0]
    kept = kept_per_round(thresholds)
    assert [a - b for a, b in zip([units] + kept[:-1], kept)] == [round(0.2 * units)] * 3


def test_report_gives_encoder_tokens_llm_rows_and_stock_positions(nv_dir, nv_thresholds):
    model, processor = load(nv_dir)
    prompts, images, videos = cases()
    stock = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=1).report
    crops = [[n // (SIDE * SIDE) for n in ns] for ns in stock.encoder_tokens]
    assert crops == [[10], [3, 5], [3]]  # base + 3x3, 1x2 and 2x2 crops (no multi-image rule); 3 frames
    assert stock.stock_positions[2] == [3 * POOLED] and stock.llm_rows == stock.stock_positions
    reports = {}
    for merge_point in MERGE_POINTS:
        dymu.apply(model, nv_thresholds[merge_point])
        reports[merge_point] = rep = dymu.generate(model, processor, prompts, images, videos=videos,
                                                   max_new_tokens=1).report
        assert rep.stock_positions == stock.stock_positions
        pairs = [(r, s) for rs, ss in zip(rep.llm_rows, rep.stock_positions) for r, s in zip(rs, ss)]
        assert all(r <= s for r, s in pairs) and rep.llm_rows[2][0] < 3 * POOLED, (merge_point, pairs)
    assert reports["post"].encoder_tokens == stock.encoder_tokens  # the stock tower keeps every token
    for merged in (reports["vit"], reports["both"]):
        assert all(m < s for ms, ss in zip(merged.encoder_tokens, stock.encoder_tokens) for m, s in zip(ms, ss))


def test_demo_saves_a_model_that_dymu_load_reloads(tmp_path, capsys):
    from dymu.cli import main

    folder = tmp_path / "tiny-next-video"
    assert main(["demo", "--family", "next_video", "--save-model", str(folder), "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "LLaVA-NeXT-Video-shaped" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("image", "2 images", "video"))]) == 6
    model, processor = dymu.load(folder, device="cpu", dtype="float32")
    assert type(model) is LlavaNextVideoForConditionalGeneration and processor.patch_size == 14
    from dymu.families.demos.llava import build_demo_anyres_model

    _, built = build_demo_anyres_model("next_video")
    prompts, images, videos = cases()
    ours, want = inputs_for(processor, prompts, images, videos), inputs_for(built, prompts, images, videos)
    assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want)
    result = dymu.generate(model, processor, prompts[2:], images[2:], videos=videos[2:], max_new_tokens=2)
    assert result.report.stock_positions == [[3 * POOLED]]
