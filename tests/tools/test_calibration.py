"""Threshold finding (paper Eq. 4) on tiny random towers and real images."""

import math

import pytest
import torch

import dymu
from conftest import IMAGES, MIXED_IMAGES, image_path, load_image, processor_for
from dymu.tools.calibration import BatchRecord, schedule_r, summarize


def all_images():
    return sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("order", ["interleaved", "ab", "ab-score"])
def test_on_the_calibration_batch_exactly_b_times_r_edges_merge_per_layer(tower, family, order):
    batch = [image_path(n) for n in MIXED_IMAGES]
    thresholds = dymu.calibrate(tower, batch, r=30, batch_size=len(batch), progress=False, order=order)
    assert thresholds.order == order
    run = len(tower.encoder.layers) - 1 if family == "clip" else len(tower.encoder.layers)
    assert all(math.isfinite(t) and t >= 0 for t in thresholds.thresholds[:run])
    assert all(math.isinf(t) for t in thresholds.thresholds[run:])  # layers never computed never merge

    dymu.apply(tower, thresholds)  # in the order the file records
    pixels = processor_for(family)(images=[load_image(n) for n in MIXED_IMAGES], return_tensors="pt")["pixel_values"]
    kept = dymu.encode(tower, pixels).kept_per_layer  # (8, layers run)
    n0 = 197 if family == "clip" else 196
    before = torch.cat([torch.full((len(batch), 1), n0), kept[:, :-1]], dim=1)
    merges_per_layer = (before - kept).sum(0)
    assert merges_per_layer.tolist() == [len(batch) * 30] * run
    # ...and simple images gave up more of them than complex ones.
    counts = dict(zip(MIXED_IMAGES, kept[:, -1].tolist()))
    assert counts["synthetic_blank_white.png"] < counts["skimage_chelsea_cat.png"] < counts["synthetic_noise.png"]


def test_target_tokens_is_met_on_the_calibration_images(tower, family):
    images = all_images()
    thresholds = dymu.calibrate(tower, images, target_tokens=60, batch_size=8, progress=False)
    assert thresholds.images_seen == len(images)
    assert abs(thresholds.tokens_kept_mean[-1] - 60) < 1  # batch-level merging hits it by construction

    dymu.apply(tower, thresholds)
    processor = processor_for(family)
    counts = []
    for start in range(0, len(images), 8):
        pixels = processor(images=[load_image(p.name) for p in images[start : start + 8]], return_tensors="pt")
        counts += dymu.encode(tower, pixels["pixel_values"]).num_tokens.tolist()
    mean = sum(counts) / len(counts)
    assert 54 <= mean <= 66, f"mean tokens kept {mean} is not within 10% of 60"
    by_name = {p.name: c for p, c in zip(images, counts)}
    assert by_name["synthetic_blank_white.png"] < by_name["skimage_chelsea_cat.png"] < by_name["synthetic_noise.png"]


def test_resume_after_an_interruption_is_bit_identical(tower, family, tmp_path):
    images = all_images()[:24]
    processor = processor_for(family)
    full = dymu.calibrate(tower, images, target_tokens=80, batch_size=4, processor=processor, progress=False)

    calls = {"n": 0}

    def dies_after_three_batches(**kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # what a kill looks like from inside
        return processor(**kwargs)

    ckpt = tmp_path / "t.json.partial"
    with pytest.raises(KeyboardInterrupt):
        dymu.calibrate(tower, images, target_tokens=80, batch_size=4, processor=dies_after_three_batches,
                       checkpoint=ckpt, checkpoint_every=1, progress=False)
    assert ckpt.exists()
    resumed_calls = {"n": 0}

    def counting(**kwargs):
        resumed_calls["n"] += 1
        return processor(**kwargs)

    resumed = dymu.calibrate(tower, images, target_tokens=80, batch_size=4, processor=counting,
                             checkpoint=ckpt, progress=False)
    assert resumed_calls["n"] == 6 - 3  # only the batches not yet done
    assert resumed.thresholds == full.thresholds
    assert resumed.to_json() == full.to_json()
    assert not ckpt.exists()  # cleaned up after success


def test_checkpoint_from_other_settings_is_refused(tower, tmp_path):
    images = all_images()[:8]
    ckpt = tmp_path / "t.partial"
    calls = {"n": 0}
    proc = processor_for("clip" if tower.config.model_type.startswith("clip") else "siglip")

    def dies(**kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return proc(**kwargs)

    with pytest.raises(KeyboardInterrupt):
        dymu.calibrate(tower, images, r=5, batch_size=4, processor=dies, checkpoint=ckpt, checkpoint_every=1,
                       progress=False)
    with pytest.raises(ValueError, match="other settings"):
        dymu.calibrate(tower, images, r=6, batch_size=4, checkpoint=ckpt, progress=False)


def test_cli_order_is_recorded_and_used(tower, tower_dir, tmp_path):
    from dymu.cli import main
    from dymu.thresholds import Thresholds

    out = tmp_path / "t.json"
    args = ["calibrate", "--model", str(tower_dir), "--images", str(IMAGES), "--max-images", "8", "--r", "20",
            "--batch-size", "8", "--quiet", "--out", str(out)]
    assert main(args + ["--order", "ab-score"]) == 0
    thresholds = Thresholds.load(out)
    assert thresholds.order == "ab-score"
    assert main(args) == 0
    assert Thresholds.load(out).order == "ab"  # the default: the paper's calibration layout

    dymu.apply(tower, thresholds)
    assert tower._dymu_state.order == "ab-score"
    dymu.apply(tower, thresholds, order="interleaved")  # an explicit order wins
    assert tower._dymu_state.order == "interleaved"


def test_float64_averaging_does_not_drift():
    taus = [0.88 + (0.01 if k % 2 else -0.01) for k in range(5000)]
    records = [BatchRecord(k, [t], 1, [1], [1], []) for k, t in enumerate(taus)]
    result = summarize(records, [1.0], {}, -1, "constant", run=1)
    assert abs(result.thresholds[0] - 0.88) <= 1e-9
    # Order of arrival (resume, several processes) does not change a single bit.
    assert summarize(records[::-1], [1.0], {}, -1, "constant", run=1).thresholds == result.thresholds


def test_schedules_spread_the_same_total():
    for schedule in ("constant", "linear", "reverse-linear"):
        r = schedule_r(230.0, 23, 24, schedule)
        assert len(r) == 24 and r[-1] == 0 and math.isclose(sum(r), 230.0)
    constant, linear, reverse = (schedule_r(230.0, 23, 24, s) for s in ("constant", "linear", "reverse-linear"))
    assert constant[:23] == [10.0] * 23
    assert linear[0] > linear[22] and reverse[0] < reverse[22]
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_r(1, 2, 2, "cosine")


def test_presets_keep_the_papers_fractions(tower):
    from dymu.tools.calibration import resolve_r

    patches = 196
    run = len(tower.encoder.layers)
    for preset, fraction in (("low", 93 / 576), ("mid", 208 / 576), ("high", 392 / 576)):
        r = resolve_r(tower, -1, preset=preset)
        assert math.isclose(sum(r), patches - round(patches * fraction))
        assert len(r) == run
    with pytest.raises(ValueError, match="not preset and r"):
        resolve_r(tower, -1, preset="low", r=3)
