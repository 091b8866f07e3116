"""LLaVA-NeXT / OneVision with merge_point "post" and "both": merge rounds on the packed LLM-level tokens.

Oracles: thresholds that never merge == stock logits and generated tokens in every merge point; real
merges == the slow reference of test_llava_next (stock LM at full length, attention output averaged
over each group) fed by a reference of the rounds written from the description; a blank downsampled
image and a static video keep few LLM rows; rows follow image complexity; batch invariance per image
and per frame; calibration merges exactly round(r · units) per round on its own batch.
"""

import math

import pytest
import torch

import dymu
from conftest import IMAGES, MIXED_IMAGES, load_image
from dymu.families.prompting import chat_text
from test_llava_next import anyres_dirs  # noqa: F401 (the fixture)
from test_llava_next import FAMILIES, cases, inputs_for, load, masked_max_diff, odd_image, reference_logits

MERGE_POINTS = ["vit", "post", "both"]
ROUNDS = 5


def never(model, merge_point):
    layers = model.config.vision_config.num_hidden_layers
    return {"vit": [math.inf] * layers, "post": [math.inf] * ROUNDS,
            "both": ([math.inf] * layers, [math.inf] * ROUNDS)}[merge_point]


@pytest.mark.parametrize("family", FAMILIES)
def test_never_merging_equals_stock_in_every_merge_point(anyres_dirs, family):
    model, processor = load(anyres_dirs, family)
    prompts, images, videos = cases(family)  # a downsampled canvas (OneVision), two images, a video
    batches = [([prompts[0]], [images[0]], [videos[0]]), (prompts, images, videos)]  # the second left-padded
    for batch in batches:
        inputs = inputs_for(processor, *batch)
        with torch.no_grad():
            stock = model(**inputs).logits
            stock_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            for merge_point in MERGE_POINTS:
                dymu.apply(model, never(model, merge_point), merge_point=merge_point)
                assert masked_max_diff(model(**inputs).logits, stock, inputs["attention_mask"]) <= 1e-5, merge_point
                assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), stock_tokens)
                dymu.remove(model)


CALIBRATION = ["skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg", "skimage_coffee.png", "darknet_eagle.jpg",
               "synthetic_blank_white.png", "synthetic_gradient.png", "scipy_raccoon_face.jpg", "skimage_chessboard.png"]


@pytest.fixture(scope="session")
def post_thresholds(anyres_dirs):
    """Mid-preset thresholds per (family, merge point), calibrated on 8 images in one batch."""
    out = {}
    for family in FAMILIES:
        model, processor = load(anyres_dirs, family)
        images = [load_image(n).resize((380, 300)) for n in CALIBRATION]  # 3x3 crops: a downsampled canvas
        for merge_point in ("post", "both"):
            out[family, merge_point] = dymu.calibrate(model, images, preset="mid", batch_size=8, progress=False,
                                                      processor=processor.image_processor, merge_point=merge_point,
                                                      warn=lambda message: None)
    return out


@pytest.mark.parametrize("merge_point", ["post", "both"])
@pytest.mark.parametrize("family", FAMILIES)
def test_real_merges_equal_the_slow_reference(anyres_dirs, post_thresholds, family, merge_point):
    model, processor = load(anyres_dirs, family)
    thresholds = post_thresholds[family, merge_point]
    dymu.apply(model, thresholds)
    assert model.model._dymu.merge_point == merge_point  # the file's
    inputs = inputs_for(processor, *cases(family))
    with torch.no_grad():
        ours = model(**inputs).logits
        reference, labels = reference_logits(model, inputs, post_thresholds=thresholds.post_thresholds)
    assert masked_max_diff(ours, reference, inputs["attention_mask"]) <= 1e-4
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    rows = sum(int(f.dymu_group_of_patch.unique().numel()) for f in features)
    assert rows < sum(len(f) for f in features)  # the rounds merged


def rows_and_positions(model, processor, image):
    with torch.no_grad():
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    return int(features.dymu_group_of_patch.unique().numel()), len(features)


@pytest.mark.parametrize("merge_point", ["post", "both"])
def test_blank_downsampled_image_and_static_video_keep_few_rows(anyres_dirs, post_thresholds, merge_point):
    model, processor = load(anyres_dirs, "onevision")
    dymu.apply(model, post_thresholds["onevision", merge_point])
    rows, positions = rows_and_positions(model, processor, load_image("synthetic_blank_white.png").resize((380, 300)))
    assert positions == 81 + 15 * 20 + 15  # base crop + the 21x27 canvas downsampled to 15x20 + newlines
    assert rows <= 0.10 * positions, (rows, positions)
    still = load_image("synthetic_white_one_circle.png").resize((160, 120))
    pixels = processor(text=[chat_text(processor, "?", 0, 1)], videos=[[still] * 8],
                       return_tensors="pt")["pixel_values_videos"]
    with torch.no_grad():
        video = model.model.get_video_features(pixels).pooler_output
    rows = int(video.dymu_group_of_patch[0].unique().numel())
    assert rows <= 0.15 * video.shape[1], (rows, video.shape[1])


def test_llm_rows_follow_image_complexity(anyres_dirs, post_thresholds):
    from dymu.tools.analyze.measure import jpeg_complexity, spearman

    model, processor = load(anyres_dirs, "onevision")
    dymu.apply(model, post_thresholds["onevision", "post"])
    complexity, rows = [], []
    for path in sorted(IMAGES.glob("*.*")):
        if path.suffix.lower() not in (".png", ".jpg"):
            continue
        image = load_image(path.name).resize((380, 300))  # one layout: every image has 396 stock positions
        complexity.append(jpeg_complexity(image))
        rows.append(rows_and_positions(model, processor, image)[0])
    blank = rows_and_positions(model, processor, load_image("synthetic_blank_white.png").resize((380, 300)))[0]
    cluttered = rows_and_positions(model, processor, load_image("sam2_street_classic_cars.jpg").resize((380, 300)))[0]
    assert cluttered > blank
    assert spearman(complexity, rows) > 0.5, list(zip(complexity, rows))


@pytest.mark.parametrize("merge_point", ["post", "both"])
def test_batch_invariance_per_image_and_per_frame(anyres_dirs, post_thresholds, merge_point):
    model, processor = load(anyres_dirs, "onevision")
    dymu.apply(model, post_thresholds["onevision", merge_point])
    images = [load_image(n).resize((380, 300)) for n in MIXED_IMAGES[:4]]
    with torch.no_grad():
        inputs = processor.image_processor(images=images, return_tensors="pt")
        batch = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        for i, image in enumerate(images):
            alone = processor.image_processor(images=[image], return_tensors="pt")
            one = model.model.get_image_features(alone["pixel_values"], alone["image_sizes"]).pooler_output[0]
            assert torch.equal(one.dymu_group_of_patch, batch[i].dymu_group_of_patch)
            assert (one - batch[i]).abs().max() <= 1e-5
        frames = [load_image(n).resize((160, 120)) for n in MIXED_IMAGES[:3]]
        text = [chat_text(processor, "?", 0, 1)]
        video = lambda fs: processor(text=text, videos=[fs], return_tensors="pt")["pixel_values_videos"]  # noqa: E731
        both = model.model.get_video_features(torch.cat([video(frames), video(frames[::-1])])).pooler_output
        kept = model.model._dymu.last_post_kept[:, -1].tolist()  # per frame of the two videos
        assert kept[:3] == kept[3:][::-1]  # a frame keeps the same rows wherever it is
        alone = model.model.get_video_features(video(frames)).pooler_output
        assert torch.equal(alone.dymu_group_of_patch[0], both.dymu_group_of_patch[0])


@pytest.mark.parametrize("merge_point", ["post", "both"])
def test_calibration_merges_exactly_r_times_units_per_round(anyres_dirs, tmp_path, merge_point):
    model, processor = load(anyres_dirs, "onevision")
    # Photos only: a blank image's edges tie, and no threshold can take part of a tie.
    images = [load_image(n) for n in ("skimage_chelsea_cat.png", "darknet_dog_bicycle_truck.jpg", "skimage_coffee.png",
                                      "darknet_eagle.jpg")]
    thresholds = dymu.calibrate(model, images, r=0.2, rounds=3, batch_size=4, progress=False,
                                processor=processor.image_processor, merge_point=merge_point, warn=lambda m: None)
    thresholds.save(tmp_path / "t.json")
    loaded = dymu.Thresholds.load(tmp_path / "t.json")
    assert loaded.encoder["merge_point"] == merge_point and loaded.post_thresholds == thresholds.post_thresholds
    assert (loaded.thresholds == [math.inf] * 4) == (merge_point == "post")
    inputs = processor.image_processor(images=images, return_tensors="pt")

    def kept_per_round(th):
        dymu.apply(model, th, merge_point=merge_point)
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        return model.model._dymu.last_post_kept.sum(0).tolist()

    tower = None if merge_point == "post" else loaded.thresholds
    units = kept_per_round([math.inf] * 3 if tower is None else (tower, [math.inf] * 3))[0]
    kept = kept_per_round(loaded)
    assert [a - b for a, b in zip([units] + kept[:-1], kept)] == [round(0.2 * units)] * 3


def test_merge_point_errors(anyres_dirs, post_thresholds, demo_llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, _ = load(anyres_dirs, "onevision")
    post = post_thresholds["onevision", "post"]
    with pytest.raises(ValueError, match="calibrated with merge_point='post', not 'both'"):
        dymu.apply(model, post, merge_point="both")
    with pytest.raises(ValueError, match="the pair"):
        dymu.apply(model, [0.9] * 3, merge_point="both")
    with pytest.raises(ValueError, match="needs mode 'dymu'"):
        dymu.apply(model, r=4, mode="tome", merge_point="post")
    with pytest.raises(ValueError, match="merge_point must be one of vit, post, both"):
        dymu.apply(model, post, merge_point="llm")
    llava = LlavaForConditionalGeneration.from_pretrained(demo_llava_dir)
    with pytest.raises(ValueError, match="merge_point is not available for LlavaForConditionalGeneration: merges in the vision tower only"):
        dymu.apply(llava, [0.9] * 6, merge_point="post")
    # A post_r list of the wrong length is named by its rounds, not by encoder layers.
    bad = post.to_json()
    bad["post_r"] = bad["post_r"][:-1]
    import json

    (tmp_path / "short.json").write_text(json.dumps(bad))
    with pytest.raises(dymu.thresholds.ThresholdsError, match=f"'post_r' has {len(bad['post_r'])} entries but "
                                                              f"post_thresholds has {len(bad['post_r']) + 1} rounds"):
        dymu.Thresholds.load(tmp_path / "short.json")
    # A file written before merge points existed loads as "vit".
    data = post.to_json()
    del data["encoder"]["merge_point"]
    for key in ("post_thresholds", "post_r", "post_rows_kept_mean"):
        del data[key]
    import json

    (tmp_path / "old.json").write_text(json.dumps(data))
    old = dymu.Thresholds.load(tmp_path / "old.json")
    dymu.apply(model, old)
    assert model.model._dymu.merge_point == "vit" and not model.model._dymu.post


def test_report_gives_encoder_tokens_llm_rows_and_stock_positions(anyres_dirs, post_thresholds):
    model, processor = load(anyres_dirs, "onevision")
    prompts, images, videos = cases("onevision")  # 10 crops; two base crops; 3 frames (of 81 tokens each)
    reports = {}
    for merge_point in ("post", "both"):
        dymu.apply(model, post_thresholds["onevision", merge_point])
        reports[merge_point] = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=1).report
    post, both = reports["post"], reports["both"]
    assert post.encoder_tokens == [[810], [81, 81], [243]]  # the stock tower keeps every token
    assert all(b < p for bs, ps in zip(both.encoder_tokens, post.encoder_tokens) for b, p in zip(bs, ps))
    for rep in (post, both):
        assert rep.llm_rows == rep.visual_tokens and rep.stock_positions == rep.stock_tokens
        pairs = [(r, s) for rs, ss in zip(rep.llm_rows, rep.stock_positions) for r, s in zip(rs, ss)]
        assert all(r <= s for r, s in pairs) and sum(r for r, _ in pairs) < sum(s for _, s in pairs), pairs
        assert "encoder_tokens" in rep.to_json() and "llm_rows" in rep.to_json()


COUNTS = ("encoder_tokens", "llm_rows", "stock_positions")


def test_every_tool_gives_the_same_three_counts(anyres_dirs, post_thresholds, tmp_path, capsys):
    """One vocabulary for counts: one OneVision image (3x3 crops, its canvas downsampled) with merge_point
    both gives the same encoder_tokens, llm_rows and stock_positions in dymu.generate's report, `dymu
    generate --json`, `dymu encode --json` and `dymu analyze` (tokens.csv)."""
    import csv
    import json

    from dymu.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    path = folder / "odd.png"
    odd_image().save(path)  # lossless: every tool reads the same pixels
    th = tmp_path / "both.json"
    post_thresholds["onevision", "both"].save(th)
    model_dir = str(anyres_dirs["onevision"])

    model, processor = load(anyres_dirs, "onevision")
    dymu.apply(model, dymu.Thresholds.load(th))
    report = dymu.generate(model, processor, ["What is this?"], [[load_image(path)]], max_new_tokens=1).report
    expected = {name: getattr(report, name)[0][0] for name in COUNTS}
    assert expected["stock_positions"] == 81 + 15 * 20 + 15  # base crop + the downsampled canvas + newlines
    assert expected["llm_rows"] < expected["stock_positions"] and expected["encoder_tokens"] < 10 * 81

    capsys.readouterr()
    assert main(["generate", "--model", model_dir, "--thresholds", str(th), "--images", str(path), "--prompt", "?",
                 "--max-new-tokens", "1", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert {name: generated[name][0][0] for name in COUNTS} == expected
    assert main(["generate", "--model", model_dir, "--thresholds", str(th), "--images", str(path), "--prompt", "?",
                 "--max-new-tokens", "1"]) == 0
    assert ("per image/video: " + ", ".join(f"{name} {expected[name]}" for name in COUNTS)) in capsys.readouterr().err

    assert main(["encode", "--model", model_dir, "--thresholds", str(th), "--images", str(path),
                 "--json", str(tmp_path / "encoded.json")]) == 0
    encoded = json.loads((tmp_path / "encoded.json").read_text())["images"][0]
    assert {name: encoded[name] for name in COUNTS} == expected

    assert main(["analyze", "--model", model_dir, "--thresholds", str(th), "--images", str(folder), "--quiet",
                 "--out", str(tmp_path / "analysis")]) == 0
    assert "per image: encoder_tokens" in capsys.readouterr().out
    with open(tmp_path / "analysis" / "tokens.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert {name: int(row[name]) for name in COUNTS} == expected
    assert (int(row["tokens"]), int(row["full_tokens"])) == (expected["llm_rows"], expected["stock_positions"])
