"""Cost control on the demo model (random-weight LLaVA-1.5 shape): focus regions, budgets, reports, CLI."""

import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import dymu
from conftest import IMAGES, load_image
from dymu.cli import main
from dymu.focus import apply_focus

CLUTTERED = "darknet_dog_bicycle_truck.jpg"


@pytest.fixture(scope="module")
def demo(demo_llava_dir):
    """The demo model with the demo's thresholds (preset mid, calibrated on the demo images)."""
    from dymu.tools.demo import demo_image_paths

    model = LlavaForConditionalGeneration.from_pretrained(demo_llava_dir, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(demo_llava_dir)
    processor.tokenizer.padding_side = "left"
    thresholds = dymu.calibrate(model, demo_image_paths(), preset="mid", batch_size=6,
                                processor=processor.image_processor, progress=False)
    return model, processor, thresholds


def quarter_box(image):
    w, h = image.size
    return (w / 4, h / 4, 3 * w / 4, 3 * h / 4)  # the centre: a quarter of the image's area


def test_a_quarter_focus_box_halves_the_tokens_of_a_cluttered_image(demo):
    model, processor, thresholds = demo
    dymu.apply(model, thresholds, mode="dtome")
    image = load_image(CLUTTERED)
    plain = dymu.encode(model, [image], processor=processor.image_processor).num_tokens
    focused = dymu.encode(model, [image], processor=processor.image_processor, focus=[quarter_box(image)])
    assert focused.num_tokens <= plain / 2, (plain, focused.num_tokens)
    assert focused.group_of_patch.shape == (1, 256)  # the stock layout: every patch position is still there
    with pytest.raises(ValueError, match="focus is applied to the images before the processor"):
        dymu.encode(model, torch.zeros(1, 3, 224, 224), focus=[quarter_box(image)])


def patch_changed(a, b, patch=14):
    """(P,) True where the focus changed any pixel value of a patch (row-major patch grid)."""
    diff = (a != b).any(dim=0)  # (H, W)
    h, w = diff.shape
    return diff.view(h // patch, patch, w // patch, patch).any(dim=3).any(dim=1).flatten()


def test_groups_inside_the_region_are_kept_where_no_merge_crosses_the_border(demo):
    """The property the docs state: at the first merging layer, on the patches whose groups lie wholly in
    the part the focus left untouched, with and without focus, the partition is the same."""
    model, processor, thresholds = demo
    first_only = [0.9] + [math.inf] * (len(thresholds.thresholds) - 1)  # merges inside the box too
    dymu.apply(model, first_only, mode="dtome")
    image = load_image("sam_truck.jpg")
    pixels = processor.image_processor(images=[image, apply_focus(image, quarter_box(image))],
                                       return_tensors="pt")["pixel_values"]
    encoded = dymu.encode(model, pixels)
    plain, focused = encoded.group_of_patch
    changed = patch_changed(pixels[0], pixels[1])
    assert changed.any() and (~changed).sum() >= 40

    def touches_change(groups):  # per patch: its group holds a changed patch
        bad = torch.zeros(int(groups.max()) + 1, dtype=torch.bool).index_put_((groups[changed],), torch.tensor(True))
        return bad[groups]

    kept = ~touches_change(plain) & ~touches_change(focused)
    same_plain = plain[kept, None] == plain[None, kept]
    same_focused = focused[kept, None] == focused[None, kept]
    assert torch.equal(same_plain, same_focused)
    assert (same_plain.sum(1) > 1).sum() >= 10  # real groups of several patches (8 on this image) are compared
    assert encoded.num_tokens[1] < encoded.num_tokens[0]  # and the fill did merge


def test_generate_report_shows_tokens_with_and_without(demo):
    model, processor, thresholds = demo
    dymu.apply(model, thresholds, mode="dymu")
    image, blank = load_image(CLUTTERED), load_image("synthetic_blank_white.png")
    result = dymu.generate(model, processor, ["What is this?"], [[image, blank]], max_new_tokens=2,
                           max_tokens=64, focus=[[quarter_box(image), None]])
    rep = result.report
    assert rep.visual_tokens_without_budget_or_focus[0][1] == rep.visual_tokens[0][1]  # blank: within budget
    assert rep.visual_tokens[0][0] <= 64 < rep.visual_tokens_without_budget_or_focus[0][0]
    plain = dymu.generate(model, processor, ["What is this?"], [[image, blank]], max_new_tokens=2)
    assert plain.report.visual_tokens_without_budget_or_focus is None
    assert plain.report.visual_tokens == rep.visual_tokens_without_budget_or_focus
    dymu.apply(model, thresholds, mode="dymu", max_tokens=50)  # the budget lives in the tower's state
    assert dymu.generate(model, processor, ["x"], [[image]], max_new_tokens=1).report.visual_tokens == [[50]]
    with pytest.raises(ValueError, match="focus must be nested like images"):
        dymu.generate(model, processor, ["x"], [[image]], focus=[quarter_box(image)])
    with pytest.raises(ValueError, match="max_tokens=1 .*cannot be reached"):
        dymu.generate(model, processor, ["x"], [[image]], max_tokens=1)
    dymu.apply(model, thresholds, mode="full")
    with pytest.raises(ValueError, match="need a merging mode"):
        dymu.generate(model, processor, ["x"], [[image]], max_tokens=50)


@pytest.fixture(scope="module")
def saved_thresholds(demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "t.json"
    demo[2].save(path)
    return path


def test_cli_generate_with_budget_and_focus(demo_llava_dir, saved_thresholds, tmp_path, capsys):
    image = IMAGES / CLUTTERED
    w, h = Image.open(image).size
    base = ["generate", "--model", str(demo_llava_dir), "--thresholds", str(saved_thresholds), "--image", str(image),
            "--prompt", "hi", "--max-new-tokens", "1", "--json", "-"]
    assert main(base + ["--max-tokens", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"][0][0] == 40 < out["visual_tokens_without_budget_or_focus"][0][0]
    box = f"{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}"
    assert main(base + ["--focus", box]) == 0
    focused = json.loads(capsys.readouterr().out)
    assert 2 * focused["visual_tokens"][0][0] <= focused["visual_tokens_without_budget_or_focus"][0][0]
    mask = Image.new("L", (w, h))
    mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    mask.save(tmp_path / "mask.png")
    assert main(base + ["--focus-mask", str(tmp_path / "mask.png")]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == focused["visual_tokens"]
    mask.resize((w // 2, h // 2)).save(tmp_path / "small.png")
    assert main(base + ["--focus-mask", str(tmp_path / "small.png")]) == 1
    assert "focus mask is" in capsys.readouterr().err
    assert main(base + ["--max-tokens", "1"]) == 1
    assert "raise max_tokens to" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--focus", "1,2,3"])
    assert "--focus expects x0,y0,x1,y1" in capsys.readouterr().err


def test_cli_calibrate_reports_the_clip_fraction(demo_llava_dir, tmp_path, capsys):
    from dymu.thresholds import Thresholds

    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(demo_llava_dir), "--images", str(IMAGES), "--max-images", "8",
                 "--batch-size", "8", "--quiet", "--out", str(out), "--max-tokens", "100"]) == 0
    printed = capsys.readouterr().out
    thresholds = Thresholds.load(out)
    assert thresholds.max_tokens == 100
    model = LlavaForConditionalGeneration.from_pretrained(demo_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(demo_llava_dir).image_processor
    dymu.apply(model, thresholds, mode="dtome", max_tokens=math.inf)
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))[:8]
    counts = dymu.encode(model, [load_image(p.name) for p in paths], processor=processor).num_tokens
    over = int((counts > 100).sum())
    assert f"max_tokens=100 would clip {over} of 8 calibration images" in printed
