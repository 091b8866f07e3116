"""SmolVLM / Idefics3 beyond the family contract (tests/families/test_contract.py runs every oracle
on both demo models): the connector on merged units equals the stock connector, tiles merge on their
own, calibration takes exactly B·r merges per block, a blank image keeps few rows, counts follow image
complexity, the prompt's tile layout, thresholds files that record the family, and the modes without
VTU. Tiny random models saved and reloaded through `dymu.load`."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dymu
from dymu.families.smolvlm import encode_smolvlm, global_token_id, tiles_per_image
from dymu.towers.smolvlm_vit import encode_tiles, real_tiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import IMAGES, load_image  # noqa: E402


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def saved(request, tmp_path_factory):
    from dymu.tools.demo import save_demo_model
    from dymu.families.demos.smolvlm import build_smolvlm_demo_model

    model, processor = build_smolvlm_demo_model(request.param)
    return save_demo_model(model, processor, tmp_path_factory.mktemp(request.param))


def load(folder):
    return dymu.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def mid(saved):
    from dymu.images import sample_images

    model, processor = load(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images
        return dymu.calibrate(model, sample_images(), preset="mid", processor=processor, batch_size=6, progress=False)


def tiles_of(model, processor, images):
    out = processor.image_processor(images=[[im] for im in images], return_tensors="pt")
    return real_tiles(out["pixel_values"], out["pixel_attention_mask"], model.config.vision_config.patch_size)


def test_connector_on_merged_units_equals_the_stock_connector(saved):
    model, processor = load(saved)
    images = [load_image("darknet_eagle.jpg"), load_image("skimage_chelsea_cat.png")]
    out = processor.image_processor(images=[[im] for im in images], return_tensors="pt")
    with torch.no_grad():
        stock = model.model.get_image_features(out["pixel_values"], out["pixel_attention_mask"]).pooler_output
    encoded = encode_smolvlm(model, out["pixel_values"], out["pixel_attention_mask"])  # no DyMU: +inf thresholds
    assert encoded.kept_per_tile == [encoded.units_per_tile] * len(encoded.kept_per_tile)
    assert (encoded.features() - torch.cat(stock)).abs().max().item() <= 1e-5


def test_every_tile_merges_on_its_own(saved, mid):
    model, processor = load(saved)
    tiles, mask, _ = tiles_of(model, processor, [load_image("darknet_eagle.jpg"), load_image("skimage_coffee.png")])
    values = mid.thresholds
    together = encode_tiles(model.model, tiles, mask, values)
    groups = together.groups_per_item()
    for k in range(len(tiles)):
        alone = encode_tiles(model.model, tiles[k : k + 1], mask[k : k + 1], values)
        assert alone.kept_per_tile == [together.kept_per_tile[k]]
        assert torch.equal(alone.groups_per_item()[0], groups[k])
        rows = together.features().split(together.units_per_tile)[k]
        assert (alone.features() - rows).abs().max().item() <= 1e-5


def test_calibration_takes_exactly_b_r_merges_per_block(saved):
    from dymu.tools.calibration.loop import batch_top_edges

    model, processor = load(saved)
    images = [load_image(n) for n in ("darknet_eagle.jpg", "skimage_coffee.png", "synthetic_gradient.png")]
    depth = len(model.model.vision_model.encoder.layers)
    fraction = 0.125  # of the batch's units, every block
    family = dymu.families.vlm_family_of(model)
    tau = [math.nan] * depth
    units_seen = []

    def chooser(units):
        units_seen.append(units)
        return batch_top_edges([fraction] * depth, units, tau)

    kept = family.unit_calibration_batch(model, processor.image_processor, images, "vit", depth, chooser)
    (units,) = units_seen
    merges = round(fraction * units)
    total = torch.cat([torch.tensor([units]), kept.sum(0)])
    assert (total[:-1] - total[1:]).tolist() == [merges] * depth
    assert all(math.isfinite(t) for t in tau)


def test_a_blank_image_keeps_at_most_15_percent_at_mid(saved, mid):
    model, processor = load(saved)
    dymu.apply(model, mid)
    report = dymu.generate(model, processor, ["What is this?"], [[load_image("synthetic_blank_white.png")]],
                           max_new_tokens=1).report
    ((rows,),), ((stock,),) = report.llm_rows, report.stock_positions
    assert rows <= 0.15 * stock, (rows, stock)


def test_rows_rise_with_image_complexity(saved, mid):
    from dymu.tools.analyze.measure import jpeg_complexity, spearman

    model, processor = load(saved)
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))
    images = [load_image(p.name) for p in paths]
    dymu.apply(model, mid)
    records, _ = dymu.families.vlm_family_of(model).encode_records(model, processor, list(zip(paths, images)), [])
    fraction = [r["llm_rows"] / r["stock_positions"] for r in records]
    rho = spearman([jpeg_complexity(im) for im in images], fraction)
    assert rho > 0.5, rho


def test_the_prompt_layout_gives_the_tiles_of_every_image(saved):
    _, processor = load(saved)
    images = [load_image("darknet_eagle.jpg"), load_image("pytesseract_tiny_word.jpg"),
              load_image("llava_waterview_panorama.jpg")]
    info = processor.image_processor(images=[[im] for im in images], return_row_col_info=True)
    want = [r[0] * c[0] + 1 for r, c in zip(info["rows"], info["cols"])]
    inputs = processor(images=[[images[0]], images[1:]], text=["<image>a", "<image>b<image>c"], return_tensors="pt",
                       padding=True)
    token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert tiles_per_image(inputs["input_ids"], token, global_token_id(processor)) == want
    assert len(set(want)) > 1  # a panorama is cut into fewer tiles than a 3:2 photo


def test_thresholds_files_record_the_family(saved, mid, tmp_path):
    model, _ = load(saved)
    mid.save(tmp_path / "mid.json")
    loaded = dymu.Thresholds.load(tmp_path / "mid.json")
    assert loaded.encoder["family"] == model.config.model_type and loaded.encoder["unit_side"] == 3
    other = "idefics3" if model.config.model_type == "smolvlm" else "smolvlm"
    loaded.encoder = {**loaded.encoder, "family": other}
    with pytest.raises(ValueError, match=f"are for a {other} model"):
        dymu.apply(model, loaded)
    with pytest.raises(ValueError, match="one threshold per block"):
        dymu.apply(model, [0.5, 0.5])


def test_modes_without_vtu_shorten_each_tile(saved, mid):
    model, processor = load(saved)
    image = load_image("skimage_chelsea_cat.png")
    dymu.apply(model, mid, mode="dtome")
    inputs = dymu.prompt_inputs(model, processor, ["What is this?"], [[image]])
    per_tile = model.model._dymu.last_encoded.kept_per_tile
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(per_tile) < 16 * len(per_tile)
    dymu.apply(model, mid)
    assert dymu.generate(model, processor, ["What is this?"], [[image]], max_new_tokens=1).report.llm_rows == \
        [[sum(per_tile)]]


def test_the_budget_counts_llm_tokens_per_tile(saved, mid):
    model, processor = load(saved)
    dymu.apply(model, mid)
    image = load_image("darknet_dog_bicycle_truck.jpg")
    out = dymu.generate(model, processor, ["What is this?"], [[image]], max_new_tokens=1, max_tokens=2)
    assert all(k <= 2 for k in model.model._dymu.last_encoded.kept_per_tile)
    assert out.report.llm_rows[0][0] <= 2 * 5 < out.report.visual_tokens_without_budget_or_focus[0][0]


def test_the_lmms_eval_plugin_answers_and_counts_per_image(saved, mid, tmp_path):
    pytest.importorskip("lmms_eval")
    pytest.importorskip("accelerate")
    from lmms_eval.api.instance import Instance

    from dymu.integrations.lmms_eval import DyMU

    mid.save(tmp_path / "mid.json")
    docs = [{"image": load_image(n)} for n in ("synthetic_blank_white.png", "darknet_dog_bicycle_truck.jpg")]

    def request(kind, arguments, doc_id):
        return Instance(request_type=kind, arguments=arguments, idx=0,
                        metadata={"task": "t", "doc_id": doc_id, "repeats": 1})

    visual = lambda doc: [doc["image"]]  # noqa: E731
    runs = {}
    for mode, thresholds in (("full", None), ("dymu", str(tmp_path / "mid.json"))):
        lm = DyMU(pretrained=str(saved), mode=mode, thresholds=thresholds, batch_size=2)
        lm.task_dict = {"t": {"test": docs}}
        answers = lm.generate_until([request("generate_until", ("What is this?", {"max_new_tokens": 3}, visual, d,
                                                                 "t", "test"), d) for d in range(2)])
        scores = lm.loglikelihood([request("loglikelihood", ("What is this?", " a dog", visual, 1, "t", "test"), 1)])
        runs[mode] = (answers, scores, [(a.token_counts.visual_tokens, a.token_counts.full_visual_tokens)
                                        for a in answers])
    assert all(isinstance(a.text, str) for a in runs["dymu"][0]) and math.isfinite(runs["dymu"][1][0].text[0])
    full_counts, dymu_counts = runs["full"][2], runs["dymu"][2]
    assert [rows for rows, _ in full_counts] == [stock for _, stock in full_counts]  # full: every stock position
    (blank,), _ = dymu_counts[0]
    (busy,), (busy_stock,) = dymu_counts[1]
    assert blank < busy <= busy_stock  # per image: a blank image keeps fewer rows


def test_a_connector_that_lays_units_out_otherwise_is_refused(saved, mid):
    model, _ = load(saved)
    connector = model.model.connector
    side = connector.scale_factor
    # Groups of s² consecutive raster patches: what a pixel shuffle reading rows of patches would make.
    connector.pixel_shuffle = lambda x, scale_factor=2: x.reshape(x.shape[0], -1, x.shape[-1] * side * side)
    with pytest.raises(Exception, match="pixel_shuffle lays out units differently"):
        dymu.apply(model, mid)
    assert dymu.families.vlm_family_of(model).mode_of(model) == "full"  # all or nothing: nothing changed


def test_the_demo_walkthrough_counts_rows_per_image_and_saves_a_loadable_model(tmp_path):
    from dymu.tools.walkthrough import run_walkthrough

    lines: list[str] = []
    result = run_walkthrough("smolvlm", save_model=str(tmp_path / "tiny"), max_new_tokens=2, out=lines.append)
    counts = result["counts"]["default"]
    assert counts["synthetic_blank_white.png"][0] < counts["darknet_dog_bicycle_truck.jpg"][0]
    assert all(rows <= stock == 80 for rows, stock in counts.values())
    assert result["results"][("image", "full")].report.llm_rows == [[80]]
    model, processor = load(tmp_path / "tiny")
    assert type(model).__name__ == "SmolVLMForConditionalGeneration" and (tmp_path / "tiny" / "images").is_dir()


def test_the_opt_in_bench_section_runs_at_toy_sizes(tmp_path, capsys):
    import json

    from dymu.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--only", "smolvlm", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["smolvlm"]
    assert [r["variant"] for r in result["tower"]] == ["full (stock tower + connector)", "DToMe low", "DToMe mid",
                                                     "DToMe high"]
    kept = [r["llm_rows"] for r in result["tower"]]
    assert kept[0] == result["tower"][0]["stock_positions"] and kept[1] <= kept[2] <= kept[3] <= kept[0]
    assert [r["n_un"] for r in result["prefill"][1:]] == kept[1:]  # the prefill's groups are the tower's
    assert all(r["flop_ideal"] >= 1.0 for r in result["tower"] + result["prefill"])
