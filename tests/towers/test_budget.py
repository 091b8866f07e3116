"""Cost control: the per-image token budget (max_tokens / min_tokens) on tiny CLIP and SigLIP towers."""

import math

import pytest
import torch

import dymu
from dymu import merge as M
from conftest import IMAGES, MIXED_IMAGES, load_image, processor_for
from dtome_reference import dtome_one_image

ALL_IMAGES = sorted(p.name for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
THRESHOLDS = [0.95, 0.9, 0.85, 0.8]  # real, content-dependent merging on the tiny towers


@pytest.fixture(scope="module")
def all_pixels(family):
    return processor_for(family)(images=[load_image(n) for n in ALL_IMAGES], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("order", ["interleaved", "ab"])
@pytest.mark.parametrize("thresholds, max_tokens, min_tokens", [
    (math.inf, 30, None),  # budget alone: +inf thresholds never merge on their own
    (math.inf, 13, None),  # the fewest 4 layers can leave of 196 patches
    (THRESHOLDS, 40, 20),  # on top of thresholds, with a floor
])
def test_budget_equals_the_rule_written_per_token(tower, family, pixels, order, thresholds, max_tokens, min_tokens):
    class_token = family == "clip"
    run = 3 if class_token else 4  # what dymu.encode reads by default: -2 (CLIP) or -1 (SigLIP)
    if class_token and max_tokens == 13:
        max_tokens = 25  # 3 layers leave at least 25 of 196
    dymu.apply(tower, thresholds, order=order, max_tokens=max_tokens, min_tokens=min_tokens)
    encoded = dymu.encode(tower, pixels, drop_class_token=False)
    per_layer = [thresholds] * 4 if isinstance(thresholds, float) else thresholds
    for i, name in enumerate(MIXED_IMAGES):
        x, group, counts = dtome_one_image(tower, pixels[i : i + 1], per_layer, order, class_token, run=run,
                                           max_tokens=max_tokens, min_tokens=min_tokens)
        one = encoded.image(i)
        assert one["kept_per_layer"].tolist() == counts, name
        assert torch.equal(one["group_of_patch"], group), name
        assert (one["tokens"] - x).abs().max() <= 1e-5, name
        assert counts[-1] - class_token <= max_tokens, name


def test_every_test_image_within_budget_and_untouched_when_already_within(tower, family, all_pixels):
    dymu.apply(tower, THRESHOLDS)
    plain = dymu.encode(tower, all_pixels)
    for k in (25, 40, 60):
        dymu.apply(tower, THRESHOLDS, max_tokens=k)
        budgeted = dymu.encode(tower, all_pixels)
        assert (budgeted.num_tokens <= k).all()
        within = plain.num_tokens <= k
        assert torch.equal(budgeted.num_tokens[within], plain.num_tokens[within])
        assert torch.equal(budgeted.group_of_patch[within], plain.group_of_patch[within])
        assert (~within).any()
        assert torch.equal(budgeted.num_tokens, plain.num_tokens.clamp(max=k))  # clipped images land on k
    # the extra merges go to the last layers: before them, counts are the thresholded ones
    assert torch.equal(budgeted.kept_per_layer[:, 0], plain.kept_per_layer[:, 0])


def test_min_tokens_stops_merging_early(tower, family, all_pixels):
    dymu.apply(tower, THRESHOLDS)
    plain = dymu.encode(tower, all_pixels).num_tokens
    dymu.apply(tower, THRESHOLDS, min_tokens=40)
    floored = dymu.encode(tower, all_pixels).num_tokens
    assert torch.equal(floored, plain.clamp(min=40))


def test_budget_is_batch_invariant(tower, family, all_pixels):
    dymu.apply(tower, THRESHOLDS, max_tokens=30, min_tokens=10)
    batch = dymu.encode(tower, all_pixels)
    for i in range(0, len(all_pixels), 5):
        alone = dymu.encode(tower, all_pixels[i : i + 1])
        assert torch.equal(alone.group_of_patch[0], batch.group_of_patch[i])
        n = int(alone.num_tokens[0])
        assert (alone.tokens[0, :n] - batch.tokens[i, :n]).abs().max() <= 1e-5
    again = dymu.encode(tower, all_pixels.flip(0))  # deterministic, whatever the batch order
    assert torch.equal(again.group_of_patch.flip(0), batch.group_of_patch)


def test_budget_from_the_thresholds_file_and_overrides(tower, family, pixels, tmp_path):
    from dymu.thresholds import Thresholds, encoder_identity
    from dymu.towers.encoder import family_of

    file = Thresholds(thresholds=list(THRESHOLDS), encoder=encoder_identity(tower, family_of(tower)), feature_layer=-1,
                      max_tokens=25, order="ab")
    file = Thresholds.load(file.save(tmp_path / "t.json"))
    assert file.max_tokens == 25 and file.min_tokens is None
    dymu.apply(tower, list(THRESHOLDS))
    plain = dymu.encode(tower, pixels).num_tokens
    assert plain.max() > 40
    dymu.apply(tower, file)
    assert torch.equal(dymu.encode(tower, pixels).num_tokens, plain.clamp(max=25))
    dymu.apply(tower, file, max_tokens=40)
    assert torch.equal(dymu.encode(tower, pixels).num_tokens, plain.clamp(max=40))
    dymu.apply(tower, file, max_tokens=math.inf)  # switches the file's budget off
    assert torch.equal(dymu.encode(tower, pixels).num_tokens, plain)
    data = file.to_json()
    data["max_tokens"] = 0
    (tmp_path / "bad.json").write_text(__import__("json").dumps(data))
    with pytest.raises(ValueError, match="bad.json: field 'max_tokens' must be a whole number >= 1 or null, not 0"):
        Thresholds.load(tmp_path / "bad.json")


def test_clear_budget_errors(tower, family, pixels):
    fewest = 25 if family == "clip" else 13
    with pytest.raises(ValueError, match=f"max_tokens=5 cannot be reached.*leaves at least {fewest} of 196; "
                                         f"raise max_tokens to {fewest}"):
        dymu.apply(tower, THRESHOLDS, max_tokens=5)
    with pytest.raises(ValueError, match="min_tokens=30 is above max_tokens=20"):
        dymu.apply(tower, THRESHOLDS, max_tokens=20, min_tokens=30)
    with pytest.raises(ValueError, match="max_tokens must be a whole number >= 1, not 2.5"):
        dymu.apply(tower, THRESHOLDS, max_tokens=2.5)
    dymu.apply(tower, THRESHOLDS, max_tokens=30)
    with pytest.raises(ValueError, match=r"max_tokens=30 \(feature layer 1\) cannot be reached"):
        dymu.encode(tower, pixels, feature_layer=1)  # one layer halves 196 to 98 at best


def test_budget_count_rule_is_as_late_as_possible():
    chosen = torch.tensor([0, 5, 0, 3])
    mergeable = torch.tensor([100, 70, 40, 9])
    # 2 layers after this one: at most 10 * 4 = 40 may be left now, and at most half merge (the cap)
    assert M.budget_merge_count(chosen, mergeable, 10, None, 2).tolist() == [50, 30, 0, 3]
    assert M.budget_merge_count(chosen, mergeable, 10, None, 0).tolist() == [50, 35, 20, 3]  # the cap: half
    assert M.budget_merge_count(chosen, mergeable, None, 68, 0).tolist() == [0, 2, 0, 0]
    assert M.reachable_tokens(196, 3) == 25 and M.reachable_tokens(197, 1) == 99
