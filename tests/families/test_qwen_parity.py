"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL parity with LLaVA: modes dtome and tome, token budgets, focus
regions, through dymu.prompt_inputs + model.generate and dymu.generate.

Oracles: dtome's prefill equals the stock model fed only the kept tokens (features of each group's
first unit) at those units' stock M-RoPE positions, read here off the stock get_rope_index of the stock
prompt with a plain loop; thresholds that never merge give stock logits and tokens; tome with VTU equals
the VTU slow reference of test_qwen_vl; a budget bounds every image / video; an image keeps the same
tokens alone and in a batch.
"""

import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.families.qwen_processors import qwen_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import load_image  # noqa: E402
from lm_helpers import mixers_averaged_within_groups  # noqa: E402
from qwen_helpers import QWEN_FAMILIES, chat, load_qwen  # noqa: E402
from test_qwen_vl import _reference_group_map, frames, static_video  # noqa: E402

INF = float("inf")


def items():
    eagle, white = load_image("darknet_eagle.jpg"), load_image("synthetic_blank_white.png")
    return {"one image": ("What is this?", [eagle]), "two images": ("Compare them.", [white, eagle]),
            "video": ("Describe.", [frames(4)]), "static video": ("And now?", [static_video(2), eagle])}


def stock_inputs(processor, prompts, media):
    texts = [chat(processor, p, ["video" if isinstance(m, list) else "image" for m in ms]) for p, ms in zip(prompts, media)]
    return qwen_inputs(processor, texts, media)


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def stock(qwen_dirs, family):
    return load_qwen(family, qwen_dirs[family])


@pytest.fixture
def model(qwen_dirs, family):
    return load_qwen(family, qwen_dirs[family])[0]


def _split(batch):
    return [p for p, _ in batch], [m for _, m in batch]


@pytest.mark.parametrize("case", ["one image", "two images", "video", "batch"])
def test_dtome_without_merges_equals_stock(stock, model, case):
    stock_model, processor = stock
    batch = list(items().values()) if case == "batch" else [items()[case]]
    prompts, media = _split(batch)
    dymu.apply(model, INF, mode="dtome")
    inputs = dymu.prompt_inputs(model, processor, prompts, media)
    want = stock_inputs(processor, prompts, media)
    assert torch.equal(inputs["input_ids"], want["input_ids"])
    if case == "batch":
        assert (inputs["attention_mask"] == 0).any()  # left padding
    with torch.no_grad():
        assert (model(**inputs).logits - stock_model(**want).logits).abs().max().item() <= 1e-5
        got = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        ref = stock_model.generate(**want, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert got.shape[1] - inputs["input_ids"].shape[1] == 6 and torch.equal(got, ref)


def _first_units(groups):
    """Plain loop: the units that are the first of their group (raster order)."""
    seen, first = set(), []
    for u, g in enumerate(groups.tolist()):
        if g not in seen:
            seen.add(g)
            first.append(u)
    return first


def _reference_logits(stock_model, processor, prompts, media, encoded):
    """The stock model fed only each group's first unit (its feature rows, and deepstack rows) at that
    unit's stock position (stock get_rope_index on the stock prompt), the other placeholders dropped."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    full = stock_inputs(processor, prompts, media)
    keys = [k for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in full]
    positions, _ = stock_model.model.get_rope_index(full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
                                                    attention_mask=full["attention_mask"], **{k: full[k] for k in keys})
    keep = full["attention_mask"].bool().clone()
    outputs = {}
    for modality in ("image", "video"):
        if modality not in encoded:
            continue
        enc, grid = encoded[modality], full[f"{modality}_grid_thw"]
        kept_rows, flags, start = [], [], 0
        for n in (grid.prod(-1) // 4).tolist():
            first = _first_units(enc.group_of_unit[start:start + n])
            kept_rows.append([start + u for u in first])
            flags += [u in set(first) for u in range(n)]
            start += n
        placeholders = full["input_ids"] == getattr(stock_model.config, f"{modality}_token_id")
        keep[placeholders] = torch.tensor(flags)
        out = {"pooler_output": [enc.features[rows] for rows in kept_rows]}
        if enc.deepstack:
            out["deepstack_features"] = [[level[rows] for rows in kept_rows] for level in enc.deepstack]
        outputs[modality] = (BaseModelOutputWithDeepstackFeatures if enc.deepstack else BaseModelOutputWithPooling)(**out)
    width = int(keep.sum(1).max())
    ids = torch.zeros(len(keep), width, dtype=torch.long)
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    pos = torch.zeros(3, len(keep), width, dtype=torch.long)
    for b in range(len(keep)):
        n = int(keep[b].sum())
        ids[b, width - n:] = full["input_ids"][b][keep[b]]
        types[b, width - n:] = full["mm_token_type_ids"][b][keep[b]]
        mask[b, width - n:] = 1
        pos[:, b, width - n:] = positions[:, b, keep[b]]
    # decode steps without position_ids add these to the text positions (stock: max position + 1 - length)
    deltas = torch.stack([positions[:, b, full["attention_mask"][b].bool()].max() + 1 - int(keep[b].sum())
                          for b in range(len(keep))])
    with torch.no_grad():
        return stock_model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_token_type_ids=types,
                           mm_encoder_outputs=outputs, **{k: full[k] for k in keys}).logits, ids, deltas


@pytest.mark.parametrize("merge_point,cross_frame,max_tokens", [("vit", False, None), ("post", False, None),
                                                                ("vit", True, None), ("vit", False, 12)])
def test_dtome_prefill_equals_kept_tokens_at_their_positions(stock, model, merge_point, cross_frame, max_tokens):
    stock_model, processor = stock
    prompts, media = _split(items().values())
    steps = len(model.model.visual.blocks) if merge_point == "vit" else 3
    dymu.apply(model, [0.9] * steps, mode="dtome", merge_point=merge_point, cross_frame=cross_frame,
               max_tokens=max_tokens)
    inputs = dymu.prompt_inputs(model, processor, prompts, media)
    encoded = dict(model.model._dymu.last_encoded)
    reference, ids, deltas = _reference_logits(stock_model, processor, prompts, media, encoded)
    assert torch.equal(inputs["input_ids"], ids)
    assert ids.shape[1] < stock_inputs(processor, prompts, media)["input_ids"].shape[1]  # tokens were dropped
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - reference).abs().max().item() <= 1e-4
    assert torch.equal(model.model.rope_deltas.view(-1), deltas)
    if cross_frame:  # the static video's second temporal patch kept no token of its own (an empty run)
        kept = model.model._dymu.last_encoded["video"].groups_per_item(inputs["video_grid_thw"])[1]
        assert all(u < len(kept) // 2 for u in _first_units(kept))
    with torch.no_grad():  # decode steps continue from the stock positions: generate runs and is greedy-stable
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        again = model.generate(**dymu.prompt_inputs(model, processor, prompts, media), max_new_tokens=6,
                               min_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)


def test_dtome_decode_positions_match_the_prefill_of_the_longer_prompt(stock, model):
    """A decode step with the cache equals a prefill of prompt + generated tokens (rope deltas agree)."""
    _, processor = stock
    prompts, media = _split([items()["two images"], items()["video"]])
    dymu.apply(model, [0.9] * len(model.model.visual.blocks), mode="dtome")
    inputs = dymu.prompt_inputs(model, processor, prompts, media)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        longer = dict(inputs, input_ids=out.sequences[:, :-1],
                      attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1),
                      mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros(2, 3, dtype=torch.long)], 1))
        full = model(**longer).logits[:, -4:]
    assert (torch.stack(out.logits, 1) - full).abs().max().item() <= 1e-4


def test_tome_with_vtu_equals_the_vtu_reference(stock, model):
    stock_model, processor = stock
    prompts, media = _split(items().values())
    dymu.apply(model, mode="tome", r=3)
    inputs = stock_inputs(processor, prompts, media)
    with torch.no_grad():
        logits = model(**inputs).logits
        encoded = dict(model.model._dymu.last_encoded)
        outputs = {m: getattr(model.model, f"get_{m}_features")(inputs[f"pixel_values{'_videos' if m == 'video' else ''}"],
                                                               inputs[f"{m}_grid_thw"]) for m in ("image", "video")}
    assert all(e.kept_per_segment.sum() < e.units_per_segment.sum() for e in encoded.values())
    group_map = _reference_group_map(model, inputs, encoded)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    with mixers_averaged_within_groups(stock_model.model.language_model.layers, group_map), torch.no_grad():
        reference = stock_model(**{k: inputs[k] for k in keys if k in inputs}, mm_encoder_outputs=outputs).logits
    assert (logits - reference).abs().max().item() <= 1e-5


def test_tome_merges_r_units_per_block_and_segment(stock, model):
    _, processor = stock
    depth = len(model.model.visual.blocks)
    dymu.apply(model, mode="tome", r=[2] + [0] * (depth - 1), tome_vtu=False)
    result = dymu.generate(model, processor, ["What is this?"], [[load_image("darknet_eagle.jpg")]], max_new_tokens=2)
    assert result.report.visual_tokens[0][0] == result.report.stock_tokens[0][0] - 2


@pytest.mark.parametrize("mode", ["dtome", "tome"])
def test_an_image_keeps_the_same_tokens_alone_and_in_a_batch(stock, model, mode):
    _, processor = stock
    batch = list(items().values())
    if mode == "tome":
        dymu.apply(model, mode="tome", r=2, tome_vtu=False)
    else:
        dymu.apply(model, [0.9] * len(model.model.visual.blocks), mode="dtome")
    together = dymu.prompt_inputs(model, processor, *_split(batch))["mm_encoder_outputs"]["image"].pooler_output
    alone = dymu.prompt_inputs(model, processor, *_split([batch[1]]))["mm_encoder_outputs"]["image"].pooler_output
    for k in range(2):  # the two images of "two images" are images 1 and 2 of the batch
        assert torch.equal(together[1 + k].dymu_kept_units, alone[k].dymu_kept_units)
        assert (together[1 + k] - alone[k]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("merge_point", ["vit", "post"])
def test_budget_bounds_every_image_and_video(stock, model, merge_point):
    _, processor = stock
    prompts, media = _split(items().values())
    steps = len(model.model.visual.blocks) if merge_point == "vit" else 4
    dymu.apply(model, [INF] * steps, merge_point=merge_point, max_tokens=30)
    result = dymu.generate(model, processor, prompts, media, max_new_tokens=2)
    report = result.report
    flat = [n for row in report.visual_tokens for n in row]
    assert max(flat) <= 30 and min(flat) >= 1
    assert report.visual_tokens_without_budget_or_focus == report.stock_tokens  # +inf: no merge without it
    assert any(n > 30 for row in report.stock_tokens for n in row)
    # per call: a tighter bound, and min_tokens against merging every edge
    tighter = dymu.generate(model, processor, prompts, media, max_new_tokens=2, max_tokens=20).report
    assert max(n for row in tighter.visual_tokens for n in row) <= 20
    dymu.apply(model, [-INF] * steps, merge_point=merge_point, mode="dtome", min_tokens=9)
    floor = dymu.generate(model, processor, prompts, media, max_new_tokens=2).report
    assert min(n for row in floor.visual_tokens for n in row) >= 9
    assert all(n < s for row, srow in zip(floor.visual_tokens, floor.stock_tokens) for n, s in zip(row, srow))


def test_unreachable_budget_is_refused_with_one_line(stock, model):
    _, processor = stock
    prompts, media = _split([items()["one image"]])
    dymu.apply(model, [INF], merge_point="post", max_tokens=2)  # one round halves 54 units at best
    with pytest.raises(ValueError, match=r"max_tokens=2 cannot be reached for image/video 0") as err:
        dymu.generate(model, processor, prompts, media, max_new_tokens=2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="min_tokens=5 is above max_tokens=4"):
        dymu.apply(model, INF, max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="max_tokens must be a whole number"):
        dymu.apply(model, INF, max_tokens=-3)


def test_focus_keeps_fewer_tokens_and_none_is_no_focus(stock, model):
    _, processor = stock
    eagle = load_image("darknet_eagle.jpg")
    dymu.apply(model, [0.95] * len(model.model.visual.blocks))
    box = (0, 0, eagle.width // 3, eagle.height // 3)
    focused = dymu.generate(model, processor, ["What?"], [[eagle]], focus=[[box]], max_new_tokens=3)
    whole = dymu.generate(model, processor, ["What?"], [[eagle]], max_new_tokens=3)
    none = dymu.generate(model, processor, ["What?"], [[eagle]], focus=[[None]], max_new_tokens=3)
    assert focused.report.visual_tokens[0][0] < whole.report.visual_tokens[0][0]
    assert focused.report.visual_tokens_without_budget_or_focus == whole.report.visual_tokens
    assert torch.equal(none.sequences, whole.sequences) and none.report.visual_tokens == whole.report.visual_tokens
    encoded = dymu.encode(model, [eagle], focus=[box], processor=processor)
    assert int(encoded.kept_per_segment[0]) == focused.report.visual_tokens[0][0]
    with pytest.raises(ValueError, match="focus regions are for images, not videos"):
        dymu.generate(model, processor, ["What?"], [[frames(2)]], focus=[[box]], max_new_tokens=2)


def test_bad_mode_settings_have_one_line_errors(model):
    with pytest.raises(ValueError, match="mode 'tome' needs r"):
        dymu.apply(model, mode="tome")
    with pytest.raises(ValueError, match="needs merge_point='vit'"):
        dymu.apply(model, mode="tome", r=2, merge_point="post")
    with pytest.raises(ValueError, match="r is for mode 'tome'"):
        dymu.apply(model, 0.5, r=2)
    with pytest.raises(ValueError, match="tome_vtu=False is a setting of mode 'tome'"):
        dymu.apply(model, 0.5, tome_vtu=False)
    with pytest.raises(ValueError, match="r has 2 entries"):
        dymu.apply(model, mode="tome", r=[1, 2])
