"""LLaVA-OneVision and LLaVA-NeXT (AnyRes): tiny random models saved and reloaded with from_pretrained.

Oracles: thresholds +inf == stock logits; real merges == a slow reference written here from the
description (stock packing of the virtually unmerged crops, stock language model with the attention
output averaged over each group, groups found from dense one-hot indicators pushed through the stock
packing); batch == each prompt alone; calibration merges B·r edges per layer on its batch of crops.
"""

import math

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

import dymu
from conftest import load_image
from dymu.decoders.llama import rows_processed
from dymu.families.prompting import chat_text

FAMILIES = ["onevision", "next"]
CLASSES = {"onevision": LlavaOnevisionForConditionalGeneration, "next": LlavaNextForConditionalGeneration}


@pytest.fixture(scope="session")
def anyres_dirs(tmp_path_factory):
    from dymu.families.demos.llava import build_demo_anyres_model

    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny_{family}")
        model, processor = build_demo_anyres_model(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[family] = folder
    return folders


def load(anyres_dirs, family):
    from dymu.families.onevision_processor import load_onevision_processor

    folder = anyres_dirs[family]
    model = CLASSES[family].from_pretrained(folder, attn_implementation="eager").eval()
    processor = load_onevision_processor(folder) if family == "onevision" else AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


def odd_image():
    """3x3 crops of an odd aspect ratio: unpadding cuts token rows (27 -> 21), and OneVision's
    (tiny) anyres_max_4 then downsamples the 21x27 canvas bilinearly (to 15x20)."""
    return load_image("darknet_dog_bicycle_truck.jpg").resize((380, 300))


def frames():
    image = load_image("darknet_kite_beach.jpg")
    return [image.resize((160, 120)).rotate(7 * i) for i in range(3)]


def cases(family):
    """(prompts, images per prompt, videos per prompt): one AnyRes image, multi-image, video (OneVision)."""
    two = [load_image("synthetic_gradient.png").resize((200, 90)), load_image("skimage_chessboard.png").resize((120, 120))]
    prompts = ["What is this?", "Compare the two pictures.", "What happens in the video?"]
    images = [[odd_image()], two, []]
    videos = [[], [], [frames()]]
    if family == "next":  # LLaVA-NeXT has no video input: a second AnyRes image instead
        images[2], videos[2] = [load_image("darknet_eagle.jpg").resize((250, 120))], []
    return prompts, images, videos


def inputs_for(processor, prompts, images, videos):
    texts = [chat_text(processor, p, len(i), len(v)) for p, i, v in zip(prompts, images, videos)]
    kwargs = {}
    if any(images):
        # OneVision's processor reads the images per prompt (multi-image rule); NeXT's takes a flat list.
        kwargs["images"] = images if hasattr(processor, "video_token") else [i for ims in images for i in ims]
    if any(videos):
        kwargs["videos"] = [v for vs in videos for v in vs]
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def masked_max_diff(a, b, mask):
    return float((a - b)[mask.bool()].abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_no_merge_equals_stock_single_multi_video_and_mixed_batch(anyres_dirs, family):
    model, processor = load(anyres_dirs, family)
    prompts, images, videos = cases(family)
    batches = [([p], [i], [v]) for p, i, v in zip(prompts, images, videos)] + [(prompts, images, videos)]
    layers = model.config.vision_config.num_hidden_layers
    for batch in batches:
        inputs = inputs_for(processor, *batch)
        with torch.no_grad():
            stock = model(**inputs).logits
            dymu.apply(model, [math.inf] * layers, mode="dymu")
            ours = model(**inputs).logits
            dymu.remove(model)
            again = model(**inputs).logits
        assert masked_max_diff(ours, stock, inputs["attention_mask"]) <= 1e-5
        assert torch.equal(again, stock)
    assert type(model.model).__name__ in ("LlavaNextModel", "LlavaOnevisionModel")


# ---- the slow reference ----------------------------------------------------------------------------


def _groups_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """(L, G) float64 indicator rows -> (L,) group ids: identical rows (to 1e-9) share an id; an
    all-zero row (a newline: no merged token in it) is a group of its own."""
    key = (rows * 1e9).round()
    ids = torch.unique(key, dim=0, return_inverse=True)[1]
    empty = rows.abs().sum(1) == 0
    ids[empty] = ids.max() + 1 + torch.arange(int(empty.sum()))
    return ids


def reference_rounds(rows, metric, sizes, thresholds):
    """One segment's post rounds, written from the description: A = even, B = odd units (reading
    order), each A's most cosine-similar B; edges above the threshold merge, at most half the units
    (the best edges); a merged unit is the size-weighted mean of its rows and of its (unit-length)
    metrics, the metric normalised again, and takes its B's place. Returns the final unit of every
    input unit."""
    owner = list(range(len(rows)))  # input unit -> current unit
    for tau in thresholds:
        n = len(rows)
        if n < 2:
            continue
        a, b = list(range(0, n, 2)), list(range(1, n, 2))
        scores = metric[a] @ metric[b].T
        best, partner = scores.max(dim=1)
        ranked = sorted(range(len(a)), key=lambda i: -float(best[i]))  # stable: ties by slot
        chosen = [i for i in ranked[: n // 2] if best[i] > tau]
        into = {bi: [b[bi]] for bi in range(len(b))}
        for i in chosen:
            into[int(partner[i])].append(a[i])
        gone = {a[i] for i in chosen}
        keep = [u for u in range(n) if u not in gone]
        where = {}
        for bi, members in into.items():
            for u in members:
                where[u] = b[bi]
        for u in keep:
            where.setdefault(u, u)
        new_rows, new_metric, new_sizes = [], [], []
        for u in keep:
            members = [v for v in range(n) if where[v] == u]
            w = sizes[members].to(rows.dtype)[:, None]
            new_rows.append((rows[members] * w).sum(0) / w.sum())
            m = (metric[members] * w).sum(0) / w.sum()
            new_metric.append(m / m.norm())
            new_sizes.append(sizes[members].sum())
        rows, metric, sizes = torch.stack(new_rows), torch.stack(new_metric), torch.stack(new_sizes)
        owner = [keep.index(where[u]) for u in owner]
    return rows, owner


def reference_post(features, groups, segment, thresholds):
    """An item's packed features (L, D) and groups (L,) after the post rounds, per segment (-1:
    newlines, never merged): the merged rows and the new group of every position."""
    features, groups = features.clone(), groups.clone()
    next_group = int(groups.max()) + 1
    for s in segment.unique().tolist():
        if s < 0:
            continue
        at = (segment == s).nonzero().flatten()
        units = list(dict.fromkeys(groups[at].tolist()))  # groups in reading order
        first = torch.stack([at[groups[at] == g][0] for g in units])
        sizes = torch.stack([(groups == g).sum() for g in units])
        rows = features[first]  # in the model's dtype: calibrated thresholds sit among near-tied scores
        merged, owner = reference_rounds(rows, rows / rows.norm(dim=-1, keepdim=True), sizes, thresholds)
        new = groups.clone()
        for g, o in zip(units, owner):
            new[groups == g] = next_group + o
            features[groups == g] = merged[o]
        next_group += len(merged)
        groups = new
    return features, torch.unique(groups, return_inverse=True)[1]


def reference_logits(model, inputs, post_thresholds=None):
    """Stock language model on the virtually unmerged, stock-packed features, with the attention
    output of every layer replaced by its mean over each VTU group (paper Eq. 11). With
    ``post_thresholds``: the reference post rounds on every image (every video frame) first."""
    from transformers.models.llava_next import modeling_llava_next as stock_next
    from transformers.models.llava_onevision import modeling_llava_onevision as stock_ov

    inner = model.model
    onevision = isinstance(model, LlavaOnevisionForConditionalGeneration)
    stock = stock_ov if onevision else stock_next
    config = model.config
    crop_px = config.vision_config.image_size
    input_ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(input_ids)
    labels = torch.full_like(input_ids, -1)
    next_label = 0

    def pack(per_item, newline, sizes):
        if onevision:
            return inner.pack_image_features(per_item, sizes, image_newline=newline,
                                             vision_aspect_ratio=config.vision_aspect_ratio)[0]
        return inner.pack_image_features(per_item, sizes, config.vision_feature_select_strategy,
                                         image_newline=newline)[0]

    def unmerge(pixels):
        enc = dymu.encode(model, pixels)
        feats, onehots = [], []
        for k in range(len(enc)):
            crop = enc.image(k)
            projected = inner.multi_modal_projector(crop["tokens"])
            feats.append(projected[crop["group_of_patch"]])  # (P, D) virtual unmerge
            onehots.append(torch.nn.functional.one_hot(crop["group_of_patch"], len(crop["tokens"])).double())
        return feats, onehots

    def place(token_id, items):  # items: list of (features (L, D), group ids (L,)) in reading order
        nonlocal embeds, next_label
        feats = torch.cat([f for f, _ in items])
        mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats)
        ids = []
        for _, g in items:
            ids.append(g + next_label)
            next_label += len(g)
        labels[input_ids == token_id] = torch.cat(ids)

    if "pixel_values" in inputs:
        sizes = inputs["image_sizes"]
        per_sample = inputs.get("batch_num_images")
        patched = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
        counts = [stock.image_size_to_num_patches(s, config.image_grid_pinpoints, crop_px) if p else 1
                  for s, p in zip(sizes, patched)]
        crops = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)])
        feats, onehots = unmerge(crops)
        items, start = [], 0
        for i, n in enumerate(counts):
            f = torch.stack(feats[start:start + n])
            width = sum(o.shape[1] for o in onehots[start:start + n])
            ind, col = [], 0
            for o in onehots[start:start + n]:  # each crop's tokens get their own columns
                block = torch.zeros(o.shape[0], width, dtype=torch.float64)
                block[:, col:col + o.shape[1]] = o
                ind.append(block)
                col += o.shape[1]
            start += n
            packed = pack([f], inner.image_newline, sizes[i:i + 1])[0]
            packed_ind = pack([torch.stack(ind)], torch.zeros(width, dtype=torch.float64), sizes[i:i + 1])[0]
            groups = _groups_of_rows(packed_ind)
            if post_thresholds is not None:
                segment = torch.where(packed_ind.abs().sum(1) == 0, -1, 0)  # newlines: no merged token in them
                packed, groups = reference_post(packed, groups, segment, post_thresholds)
            items.append((packed, groups))
        place(config.image_token_id, items)
    if "pixel_values_videos" in inputs:
        videos = inputs["pixel_values_videos"]
        feats, onehots = unmerge(videos.flatten(0, 1))
        frames_per_video = videos.shape[1]
        items = []
        for v in range(videos.shape[0]):
            fs = feats[v * frames_per_video:(v + 1) * frames_per_video]
            os_ = onehots[v * frames_per_video:(v + 1) * frames_per_video]
            width = sum(o.shape[1] for o in os_)
            ind, col = [], 0
            for o in os_:
                block = torch.zeros(o.shape[0], width, dtype=torch.float64)
                block[:, col:col + o.shape[1]] = o
                ind.append(block)
                col += o.shape[1]
            pooled = inner.apply_pooling(torch.stack(fs)).flatten(0, 1)
            pooled_ind = inner.apply_pooling(torch.stack(ind)).flatten(0, 1)
            packed = torch.cat([pooled, inner.image_newline[None]])
            packed_ind = torch.cat([pooled_ind, torch.zeros(1, width, dtype=torch.float64)])
            groups = _groups_of_rows(packed_ind)
            if post_thresholds is not None:
                segment = torch.arange(len(packed)) // (len(pooled) // frames_per_video)  # the frame
                segment[-1] = -1
                packed, groups = reference_post(packed, groups, segment, post_thresholds)
            items.append((packed, groups))
        place(config.video_token_id, items)

    # Dense per-sequence group membership: (B, N, N) "same group", text and padding alone.
    same = (labels[:, :, None] == labels[:, None, :]) & (labels[:, :, None] >= 0)
    same = same | torch.eye(labels.shape[1], dtype=torch.bool)
    average = same.double() / same.sum(-1, keepdim=True)

    def group_mean(module, args, output):
        out = output[0]
        return (torch.einsum("bij,bjd->bid", average.to(out.dtype), out),) + tuple(output[1:])

    layers = inner.language_model.layers
    handles = [layer.self_attn.register_forward_hook(group_mean) for layer in layers]
    try:
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return model.lm_head(hidden), labels


@pytest.mark.parametrize("mode", ["tome", "dymu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_real_merges_equal_the_slow_reference(anyres_dirs, anyres_thresholds, family, mode):
    model, processor = load(anyres_dirs, family)
    if mode == "tome":
        dymu.apply(model, r=6, mode="tome")  # fixed merges: every crop and frame loses tokens
    else:
        dymu.apply(model, anyres_thresholds[family], mode="dymu")  # DToMe: calibrated thresholds
    prompts, images, videos = cases(family)
    inputs = inputs_for(processor, prompts, images, videos)
    with torch.no_grad():
        ours = model(**inputs).logits
        rows = rows_processed(model)
        reference, labels = reference_logits(model, inputs)
    assert masked_max_diff(ours, reference, inputs["attention_mask"]) <= 1e-4
    # VTU ran its MLP on fewer rows than positions, and the reference's groups are as many.
    groups = sum(int(l[l >= 0].unique().numel()) for l in labels)
    text = int((labels < 0).sum())
    layers = model.config.text_config.num_hidden_layers
    assert rows["mlp"] == layers * (groups + text) < rows["positions"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_of_a_group_are_bitwise_equal(anyres_dirs, family):
    model, processor = load(anyres_dirs, family)
    dymu.apply(model, r=6, mode="tome")
    prompts, images, videos = cases(family)
    inputs = inputs_for(processor, prompts[:1], [[odd_image()]], [[]])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    for f in features:
        group = f.dymu_group_of_patch
        for g in group.unique():
            rows = f[group == g]
            assert torch.equal(rows, rows[:1].expand_as(rows))
        assert group.unique().numel() < len(f)
        if family == "onevision":  # the canvas went through the bilinear downsampling: 21x27 -> 15x20 (+ newlines)
            assert len(f) == 81 + 15 * 20 + 15


# ---- calibration on crops, dymu.generate, batches ----------------------------------------------------

CALIBRATION = ["synthetic_blank_white.png", "skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg",
               "synthetic_gradient.png", "skimage_coffee.png", "darknet_eagle.jpg"]


@pytest.fixture(scope="session")
def anyres_thresholds(anyres_dirs):
    out = {}
    for family in FAMILIES:
        model, processor = load(anyres_dirs, family)
        images = [load_image(n).resize((200, 150)) for n in CALIBRATION]  # 1x2 crops + base: 3 crops each
        out[family] = dymu.calibrate(model, images, preset="mid", batch_size=3, progress=False,
                                     processor=processor.image_processor, model_ref=str(anyres_dirs[family]))
    return out


def test_calibration_on_crops_merges_b_times_r_per_layer_and_loads_back(anyres_dirs, tmp_path):
    from dymu.api import encoder_pixels

    model, processor = load(anyres_dirs, "onevision")
    # Photos only: a blank image's edges all score exactly 1.0, and when the B·r-th edge falls inside
    # such a tie no threshold can take part of it (τ = the tied score merges none of them).
    images = [load_image(n) for n in ("skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg", "skimage_coffee.png")]
    thresholds = dymu.calibrate(model, images, r=9, batch_size=3, progress=False,
                                processor=processor.image_processor)
    crops, counts = encoder_pixels(model, processor.image_processor(images=images, return_tensors="pt"))
    assert len(counts) == 3 and sum(counts) == len(crops) > 3  # AnyRes: several crops per image
    assert thresholds.images_seen == len(crops)
    assert thresholds.encoder["patches_per_image"] == 81  # per crop (SigLIP's 729 in the real OneVision)
    dymu.apply(model, thresholds)
    with torch.no_grad():
        kept = dymu.encode(model, crops).kept_per_layer  # (crops, layers)
    before = torch.cat([torch.full((len(crops), 1), 81), kept[:, :-1]], dim=1)
    assert (before - kept).sum(0).tolist() == [len(crops) * 9] * kept.shape[1]
    thresholds.save(tmp_path / "t.json")
    loaded = dymu.Thresholds.load(tmp_path / "t.json")
    loaded.check_compatible(model.model.vision_tower)
    assert loaded.thresholds == thresholds.thresholds


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_equal_each_prompt_alone(anyres_dirs, anyres_thresholds, family):
    model, processor = load(anyres_dirs, family)
    dymu.apply(model, anyres_thresholds[family], mode="dymu")
    prompts, images, videos = cases(family)
    batch = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=4, output_scores=True)
    report = batch.report
    assert [len(v) for v in report.visual_tokens] == [len(i) + len(v) for i, v in zip(images, videos)]
    pairs = [(n, s) for ns, ss in zip(report.visual_tokens, report.stock_tokens) for n, s in zip(ns, ss)]
    assert all(0 < n <= s for n, s in pairs) and sum(n for n, _ in pairs) < sum(s for _, s in pairs), report
    for i, prompt in enumerate(prompts):
        alone = dymu.generate(model, processor, [prompt], [images[i]], videos=[videos[i]], max_new_tokens=4,
                              output_scores=True)
        assert alone.answers[0] == batch.answers[i]
        assert alone.report.visual_tokens[0] == report.visual_tokens[i]
        assert alone.report.stock_tokens[0] == report.stock_tokens[i]
        for step_alone, step_batch in zip(alone.scores, batch.scores):
            assert (step_alone[0] - step_batch[i]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mode_report_and_stock_generate_in_dymu_mode(anyres_dirs, anyres_thresholds, family):
    model, processor = load(anyres_dirs, family)
    prompts, images, videos = cases(family)
    stock = dymu.generate(model, processor, prompts[:1], images[:1], max_new_tokens=3)
    assert stock.report.visual_tokens == stock.report.stock_tokens  # stock: every placeholder its own row
    dymu.apply(model, anyres_thresholds[family], mode="dymu")
    ours = dymu.generate(model, processor, prompts[:1], images[:1], max_new_tokens=3)
    assert ours.report.stock_tokens == stock.report.stock_tokens
    inputs = inputs_for(processor, prompts[:1], images[:1], videos[:1])
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ours.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_refuses_modes_without_vtu(anyres_dirs, anyres_thresholds, family):
    model, _ = load(anyres_dirs, family)
    for mode in ("dtome", "downsample"):
        with pytest.raises(ValueError, match=f"mode '{mode}' is not available for"):
            dymu.apply(model, anyres_thresholds[family], mode=mode)
    with pytest.raises(ValueError, match=r"without VTU \(tome_vtu=False\) is not available"):
        dymu.apply(model, r=4, mode="tome", tome_vtu=False)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        dymu.apply(model, anyres_thresholds[family], mode="fast")


def test_beam_search_and_several_return_sequences_with_images_and_video(anyres_dirs):
    model, processor = load(anyres_dirs, "onevision")
    dymu.apply(model, r=6, mode="tome")
    prompts, images, videos = cases("onevision")
    for i in (0, 2):  # one AnyRes image; one video (generate re-stacks video features per beam)
        inputs = inputs_for(processor, prompts[i:i + 1], images[i:i + 1], videos[i:i + 1])
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        assert out.shape[0] == 2
