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
    # the batches not yet done are calibrated; then the per-image check reads all 6 batches once
    assert resumed_calls["n"] == (6 - 3) + 6
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


# ---- reliability ----

def _processor_of(tower):
    return processor_for("clip" if tower.config.model_type.startswith("clip") else "siglip")


def _dies_after(processor, batches: int):
    calls = {"n": 0}

    def run(**kwargs):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return processor(**kwargs)

    return run


def test_checkpoint_of_other_in_memory_images_is_refused(tower, tmp_path):
    # In-memory images are identified by their content, not by their position in the list.
    a = [load_image(n) for n in MIXED_IMAGES[:4]]
    b = [load_image(n) for n in MIXED_IMAGES[4:8]]
    ckpt = tmp_path / "t.partial"
    with pytest.raises(KeyboardInterrupt):
        dymu.calibrate(tower, a, r=5, batch_size=2, processor=_dies_after(_processor_of(tower), 1),
                       checkpoint=ckpt, checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        dymu.calibrate(tower, b, r=5, batch_size=2, checkpoint=ckpt, progress=False)
    # The same pictures as new objects do resume.
    resumed = dymu.calibrate(tower, [load_image(n) for n in MIXED_IMAGES[:4]], r=5, batch_size=2,
                             checkpoint=ckpt, progress=False)
    assert resumed.thresholds == dymu.calibrate(tower, a, r=5, batch_size=2, progress=False).thresholds


def test_result_is_written_before_the_checkpoint_goes(tower, tmp_path, monkeypatch):
    # A kill while the result is being written must leave the checkpoint behind.
    from dymu.thresholds import Thresholds

    images = all_images()[:4]
    out, ckpt = tmp_path / "t.json", tmp_path / "t.json.partial"

    def killed(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Thresholds, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        dymu.calibrate(tower, images, r=5, batch_size=2, checkpoint=ckpt, out=out, progress=False)
    assert ckpt.exists()
    monkeypatch.undo()
    result = dymu.calibrate(tower, images, r=5, batch_size=2, checkpoint=ckpt, out=out, progress=False)
    assert out.exists() and not ckpt.exists()
    assert Thresholds.load(out) == result


@pytest.mark.parametrize("bad", ["folder", "missing_parent"])
def test_out_is_checked_before_the_first_batch(tower, tmp_path, bad):
    # --out pointing at a folder (or into a missing one) fails at once, before any work.
    out = tmp_path / "a_folder" if bad == "folder" else tmp_path / "nope" / "t.json"
    if bad == "folder":
        out.mkdir()

    def never(**kwargs):
        raise AssertionError("the processor ran before --out was checked")

    with pytest.raises(ValueError, match="is a folder" if bad == "folder" else "does not exist"):
        dymu.calibrate(tower, all_images()[:2], r=5, processor=never, out=out, progress=False)


def test_temporary_files_do_not_follow_planted_symlinks(tower, tmp_path):
    # Fixed temporary names (OUT.tmp, OUT.partial.tmp) would overwrite a symlink's target.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out, ckpt = tmp_path / "t.json", tmp_path / "t.json.partial"
    for name in ("t.json.tmp", "t.json.partial.tmp"):
        (tmp_path / name).symlink_to(victim)
    dymu.calibrate(tower, all_images()[:4], r=5, batch_size=2, checkpoint=ckpt, checkpoint_every=1, out=out,
                   progress=False)
    assert victim.read_text() == "precious\n" and out.is_file() and not out.is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t.json")]  # no temporaries left


def test_a_second_calibration_on_the_same_checkpoint_is_refused(tower, tmp_path):
    # Another process holds the lock (taken here with fcntl directly, as another dymu would).
    import fcntl
    import os

    ckpt = tmp_path / "t.json.partial"
    fd = os.open(tmp_path / "t.json.partial.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RuntimeError, match="in use by another process"):
            dymu.calibrate(tower, all_images()[:2], r=5, checkpoint=ckpt, out=tmp_path / "t.json", progress=False)
    finally:
        os.close(fd)
    dymu.calibrate(tower, all_images()[:2], r=5, checkpoint=ckpt, out=tmp_path / "t.json", progress=False)


def test_ctrl_c_saves_every_finished_batch(tower, tmp_path):
    # No lost work: with checkpoint_every=5, Ctrl-C after 3 batches still keeps the 3.
    import json

    ckpt = tmp_path / "t.partial"
    with pytest.raises(KeyboardInterrupt):
        dymu.calibrate(tower, all_images()[:16], r=5, batch_size=2, processor=_dies_after(_processor_of(tower), 3),
                       checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert len(json.loads(ckpt.read_text())["records"]) == 3


def test_corrupt_checkpoint_is_one_clear_line(tower, tmp_path):
    ckpt = tmp_path / "t.partial"
    ckpt.write_text('{"settings": "x", "rec')
    with pytest.raises(ValueError, match=r"calibration checkpoint .*t\.partial is corrupt .*delete it to start over"):
        dymu.calibrate(tower, all_images()[:2], r=5, checkpoint=ckpt, progress=False)


@pytest.mark.parametrize("kwargs, words", [
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"batch_size": -2}, "batch_size must be a whole number >= 1"),
    ({"checkpoint_every": 0}, "checkpoint_every must be"),
    ({"max_images": 0}, "max_images must be a whole number >= 1"),
    ({"r": -1}, "r must be finite numbers >= 0"),
    ({"r": float("nan")}, "r must be finite numbers >= 0"),
])
def test_bad_arguments_are_refused(tower, kwargs, words):
    kwargs = {"r": 5, **kwargs}
    with pytest.raises(ValueError, match=words):
        dymu.calibrate(tower, all_images()[:2], progress=False, **kwargs)


# ---- Qwen VLs: the same loop (checkpoint, resume, torchrun) on 2x2-unit edges -------------------


def test_qwen_calibration_resumes_from_its_checkpoint(qwen_dirs, tmp_path):
    import sys

    from conftest import REPO
    from dymu.tools.calibration import CalibrationWarning

    sys.path.insert(0, str(REPO / "tests"))
    from qwen_helpers import load_qwen

    model, processor = load_qwen("qwen2_vl", qwen_dirs["qwen2_vl"])
    images = all_images()[:8]
    ckpt, out = tmp_path / "q.partial", tmp_path / "q.json"
    settings = dict(preset="mid", batch_size=2, progress=False, merge_point="vit")
    with pytest.warns(CalibrationWarning):
        plain = dymu.calibrate(model, images, processor=processor, **settings)
        with pytest.raises(KeyboardInterrupt):
            dymu.calibrate(model, images, processor=_dies_after(processor.image_processor, 2), checkpoint=ckpt,
                           checkpoint_every=1, out=out, **settings)
        assert ckpt.exists() and not out.exists()
        # 2 of 4 batches were saved: only 2 are left to run (no per-image check: it calls the processor again)
        resumed = dymu.calibrate(model, images, processor=_dies_after(processor.image_processor, 2), checkpoint=ckpt,
                                 out=out, check_images=0, **settings)
    assert resumed.thresholds == plain.thresholds and resumed.images_seen == 8
    assert resumed.tokens_kept_mean == plain.tokens_kept_mean
    assert out.exists() and not ckpt.exists()
    with pytest.raises(ValueError, match="does not take packed"):
        dymu.calibrate(model, images, processor=processor, packed=False, **settings)


def test_batches_of_unequal_size_weigh_by_their_images():
    records = [BatchRecord(index=0, tau=[0.9], images=32, kept_sum=[32 * 10.0], kept_sqsum=[32 * 100.0], skipped=[]),
               BatchRecord(index=1, tau=[0.5], images=5, kept_sum=[5 * 10.0], kept_sqsum=[5 * 100.0], skipped=[])]
    result = summarize(records, [1.0], {}, -1, "constant", run=1)
    assert result.thresholds == [pytest.approx((32 * 0.9 + 5 * 0.5) / 37, abs=1e-15)]


def test_the_reported_per_image_mean_is_what_inference_keeps(tower, family, tmp_path):
    """The 37 test images at batch 32 (a short last batch): the file's per-image figure is the mean
    tokens each image keeps when the thresholds are applied per image, as `dymu analyze` measures."""
    from dymu.images import find_images, open_image

    images = find_images(IMAGES)
    processor = processor_for(family)
    thresholds = dymu.calibrate(tower, images, preset="mid", batch_size=32, processor=processor, progress=False,
                                out=tmp_path / "t.json", warn=lambda message: None)
    stats = thresholds.per_image_tokens
    assert stats["images"] == len(images) == 37 and stats["measured_on"] == "the calibration images"
    assert dymu.Thresholds.load(tmp_path / "t.json").per_image_tokens == stats
    dymu.apply(tower, thresholds)
    counts = []
    for path in images:
        pixels = processor(images=[open_image(path)], return_tensors="pt")["pixel_values"]
        counts += dymu.encode(tower, pixels, feature_layer=thresholds.feature_layer).num_tokens.tolist()
    dymu.remove(tower)
    assert stats["mean"] == pytest.approx(sum(counts) / len(counts), rel=1e-12)
    assert (stats["min"], stats["max"]) == (min(counts), max(counts))


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_unit_calibration_reports_the_llm_rows_inference_keeps(qwen_dirs, merge_point):
    """Units ("vit") and post rounds: the per-image figure is the LLM rows each image gets from the
    thresholds applied per image; the model comes back as it was (here: patched with other settings)."""
    import sys

    from conftest import REPO
    from dymu.api import settings_of

    sys.path.insert(0, str(REPO / "tests"))
    from qwen_helpers import load_qwen

    model, processor = load_qwen("qwen2_vl", qwen_dirs["qwen2_vl"])
    images = [load_image(n) for n in MIXED_IMAGES[:5]]
    dymu.apply(model, None, mode="full")
    before = settings_of(model)
    thresholds = dymu.calibrate(model, images, preset="mid", batch_size=2, processor=processor, progress=False,
                                merge_point=merge_point, check_images=3, warn=lambda message: None)
    assert settings_of(model) is before
    stats = thresholds.per_image_tokens
    assert stats["counts"] == "LLM rows per image" and stats["images"] == 3
    assert stats["measured_on"] == "an even spread of the calibration images"
    checked = [images[i] for i in (0, 1, 3)]  # i * 5 // 3: spread over the list
    dymu.apply(model, thresholds)
    rows = [dymu.encode(model, [image], processor=processor).per_item(
        processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"])[0][0] for image in checked]
    dymu.remove(model)
    assert stats["mean"] == pytest.approx(sum(rows) / 3, rel=1e-12) and (stats["min"], stats["max"]) == (min(rows), max(rows))
    assert min(rows) < max(rows)  # the images differ: a figure that cannot be a constant


def test_the_report_line_says_what_it_counted():
    """Crops (AnyRes, tiles) are counted as crops, not as calibration images."""
    from types import SimpleNamespace

    from dymu.tools.calibration.schedules import target_report

    stats = dict(mean=28.4, min=6, max=81, measured_on="the calibration images")
    crops = SimpleNamespace(target_tokens=29.0, reached_tokens=29.0,
                            per_image_tokens=dict(stats, images=321, counts="encoder tokens per crop"))
    images = SimpleNamespace(target_tokens=None, reached_tokens=None,
                             per_image_tokens=dict(stats, images=6, counts="LLM rows per image"))
    assert "over 321 crops of the calibration images" in target_report(crops)[0]
    assert "over 6 of the calibration images)" in target_report(images)[0]
