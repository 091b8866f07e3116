"""The family contract: every registered VLM family runs every test here (timm style: one test per
contract, parametrized over the registry). A family registered without a contract model below fails
`test_every_registered_family_has_a_contract_model`, so it is not supported until it passes.

Models: each family's tiny random demo model, saved and reloaded through `dymu.load`. Oracles:
- merge off (thresholds +inf) ⇒ prefill logits and 6 generated tokens equal the stock model's, for a
  left-padded batch holding one image, two images and (where the family takes video) a video;
- real merges ⇒ the prefill logits equal a slow reference: the stock model fed the same (virtually
  unmerged) features with every layer's token mixer output (attention, linear attention) averaged over
  each group of the group map
  the patched model handed its decoder (paper Eq. 11, `lm_helpers.average_within_groups`);
- an image alone and in a batch gets the same LLM rows (batch invariance);
- apply / remove / apply restores the stock model, then the same patched one;
- beams and num_return_sequences run, and equal the stock model's with merge off;
- every declared mode runs and every refused mode or option raises its declared reason.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dymu
from dymu.families import vlm_families
from dymu.settings import MODES
from dymu.tools.demo_models import DEMO_MODELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_image  # noqa: E402
from lm_helpers import mixers_averaged_within_groups  # noqa: E402

ATOL = 1e-4
NEW_TOKENS = 6


# contract model -> (registered family name, builder of (model, processor)): every demo model
# (`dymu.tools.demo_models`); a new family adds its demo model there and runs every contract here.
CONTRACT_MODELS = {name: (demo.family, demo.build) for name, demo in DEMO_MODELS.items()}


def test_every_registered_family_has_a_contract_model():
    covered = {family for family, _ in CONTRACT_MODELS.values()}
    assert {f.name for f in vlm_families()} <= covered


def test_the_demo_command_offers_every_demo_model():
    from dymu.cli import build_parser

    demo = next(a for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions
                if a.dest == "family")
    assert list(demo.choices) == list(DEMO_MODELS)  # read from the registry, a light module: `dymu --help` stays fast


@pytest.fixture(scope="module", params=list(CONTRACT_MODELS))
def saved(request, tmp_path_factory):
    """(contract model name, folder) of the family's tiny model saved with save_pretrained."""
    from dymu.tools.demo import save_demo_model

    torch.manual_seed(0)
    model, processor = CONTRACT_MODELS[request.param][1]()
    folder = save_demo_model(model, processor, tmp_path_factory.mktemp(request.param))
    return request.param, folder


def load(saved):
    model, processor = dymu.load(saved[1], device="cpu", dtype="float32")
    return model, processor, dymu.families.vlm_family_of(model)


def frames(n=4):
    photo = load_image("darknet_dog_bicycle_truck.jpg").resize((320, 240))
    return [photo.crop((8 * k, 0, 8 * k + 224, 168)) for k in range(n)]


def batch(family):
    """Left-padded: a short prompt with one image; a longer one with two images (and a video)."""
    images = [[load_image("darknet_eagle.jpg")],
              [load_image("synthetic_gradient.png"), load_image("skimage_chelsea_cat.png")]]
    prompts = ["What is this?", "Compare the two pictures and say which one holds more detail, please."]
    videos = [[], [frames()]] if family.supports("video") else None
    return prompts, images, videos


def prefill_and_tokens(model, processor, prompts, images, videos, **generate_kwargs):
    inputs = dymu.prompt_inputs(model, processor, prompts, images, videos=videos)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=NEW_TOKENS,
                        **generate_kwargs)
    return logits, out


@pytest.fixture(scope="module")
def stock_run(saved):
    model, processor, family = load(saved)
    return prefill_and_tokens(model, processor, *batch(family))


@pytest.fixture(scope="module")
def thresholds(saved):
    """Calibrated (preset mid) on the bundled sample images, on the stock model."""
    from dymu.images import sample_images

    model, processor, _ = load(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images
        return dymu.calibrate(model, sample_images(), processor=processor.image_processor, batch_size=4,
                              progress=False)


def test_merge_off_equals_stock(saved, stock_run):
    model, processor, family = load(saved)
    dymu.apply(model, math.inf)
    logits, out = prefill_and_tokens(model, processor, *batch(family))
    want_logits, want = stock_run
    assert (logits - want_logits).abs().max().item() <= ATOL
    assert torch.equal(out.sequences, want.sequences)
    assert out.report.llm_rows == want.report.llm_rows == want.report.stock_positions


class GroupMapSpy:
    """Records every group map the patched model hands its VTU decoder layers."""

    def __init__(self, monkeypatch):
        from dymu.decoders.llama import VTUState

        self.maps = []
        original = VTUState.set_group_map

        def spy(state, group_map):
            if group_map is not None:
                self.maps.append(group_map.clone())
            return original(state, group_map)

        monkeypatch.setattr(VTUState, "set_group_map", spy)


def test_real_merges_equal_the_slow_reference(saved, thresholds, monkeypatch):
    model, processor, family = load(saved)
    dymu.apply(model, thresholds)
    prompts, images, videos = batch(family)
    inputs = dymu.prompt_inputs(model, processor, prompts, images, videos=videos)
    spy = GroupMapSpy(monkeypatch)
    with torch.no_grad():
        logits = model(**inputs).logits
    (group_map,) = spy.maps
    positions = inputs["attention_mask"].sum().item()
    groups = sum(len(row.unique()) for row in group_map)
    assert groups < group_map.numel() and positions > 0  # real merging happened
    dymu.remove(model)
    # Every layer's token mixer: attention, or (hybrid decoders) a linear-attention layer. The decoder is
    # transformers' own accessor (`language_model` on most VLMs, `text_model` on SmolVLM / Idefics3).
    with mixers_averaged_within_groups(model.get_decoder().layers, group_map), torch.no_grad():
        reference = model(**inputs).logits
    assert (logits - reference).abs().max().item() <= ATOL


def test_an_image_alone_and_in_a_batch_gets_the_same_rows(saved, thresholds):
    model, processor, family = load(saved)
    dymu.apply(model, thresholds)
    prompts, images, videos = batch(family)
    together = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=1).report
    for i, (prompt, ims) in enumerate(zip(prompts, images)):
        alone = dymu.generate(model, processor, [prompt], [ims], videos=None if videos is None else [videos[i]],
                              max_new_tokens=1).report
        assert alone.llm_rows[0] == together.llm_rows[i]
        assert alone.encoder_tokens[0] == together.encoder_tokens[i]


def test_encode_returns_one_type(saved, thresholds):
    """`dymu.encode` gives every family an `Encoded`: per item, kept <= stock, and a group map over the
    stock positions whose groups are exactly the kept tokens; a patched model keeps one record of its
    settings, and a stock one none."""
    model, processor, _ = load(saved)
    images = [load_image("darknet_eagle.jpg"), load_image("synthetic_gradient.png")]
    assert dymu.api.settings_of(model) is None
    dymu.apply(model, thresholds)
    assert dymu.api.settings_of(model).mode == "dymu"
    encoded = dymu.encode(model, images, processor=processor)
    assert isinstance(encoded, dymu.Encoded) and len(encoded) >= len(images)
    for (kept, stock), groups in zip(encoded.per_item(), encoded.groups_per_item(), strict=True):
        assert 0 < kept <= stock and groups.shape == (stock,)
        assert groups.unique().tolist() == list(range(kept))
    assert any(kept < stock for kept, stock in encoded.per_item())  # thresholds from calibration merge
    assert repr(encoded).startswith(type(encoded).__name__)  # counts, not tensors
    dymu.remove(model)
    assert dymu.api.settings_of(model) is None


def test_apply_remove_apply_restores(saved, stock_run, thresholds):
    model, processor, family = load(saved)
    stock_class = type(model.model)
    prompts, images, videos = batch(family)
    dymu.apply(model, thresholds)
    first, _ = prefill_and_tokens(model, processor, prompts, images, videos)
    dymu.remove(model)
    assert type(model.model) is stock_class and family.mode_of(model) == "full"
    stock_logits, _ = prefill_and_tokens(model, processor, prompts, images, videos)
    assert (stock_logits - stock_run[0]).abs().max().item() <= ATOL
    dymu.apply(model, thresholds)
    again, _ = prefill_and_tokens(model, processor, prompts, images, videos)
    assert torch.equal(first, again)
    dymu.apply(model, thresholds)  # on the patched model: replaces its patch, never patches twice
    assert type(model.model).__bases__[-1] is stock_class
    twice, _ = prefill_and_tokens(model, processor, prompts, images, videos)
    assert torch.equal(first, twice)


def test_beams_and_several_return_sequences(saved):
    model, processor, family = load(saved)
    prompts, images, videos = batch(family)
    kwargs = dict(num_beams=2, num_return_sequences=2)
    want = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=4, **kwargs)
    dymu.apply(model, math.inf)
    got = dymu.generate(model, processor, prompts, images, videos=videos, max_new_tokens=4, **kwargs)
    assert got.sequences.shape[0] == 2 * len(prompts) and torch.equal(got.sequences, want.sequences)


# How each option is exercised: (settings for dymu.apply, keyword arguments for dymu.generate).
OPTION_USES = {
    "r": ({"mode": "tome", "r": 2}, {}),
    "order": ({"order": "ab"}, {}),
    "tome_vtu": ({"mode": "tome", "r": 2, "tome_vtu": False}, {}),
    "merge_point": ({"merge_point": "vit"}, {}),
    "cross_frame": ({"cross_frame": True}, {}),
    "budget": ({"max_tokens": 10_000}, {}),
    "focus": ({}, {"focus": [[(300, 150, 500, 350)]]}),  # the eagle image's centre (773x512)
    "video": ({}, {"videos": [[frames(2)]]}),
    "raw_prompt": ({}, {"chat_template": False}),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_or_raises_its_declared_reason(saved, thresholds, mode):
    model, processor, family = load(saved)
    settings = {"r": 2} if mode == "tome" else {}
    arg = thresholds if mode in ("dymu", "dtome", "downsample") else None
    reason = family.modes[mode]
    if reason is not None:
        with pytest.raises(ValueError, match=re.escape(reason)):
            dymu.apply(model, arg, mode=mode, **settings)
        return
    dymu.apply(model, arg, mode=mode, **settings)
    report = dymu.generate(model, processor, ["What is this?"], [[load_image("darknet_eagle.jpg")]],
                           max_new_tokens=2).report
    assert report.mode == mode and family.mode_of(model) == mode


@pytest.mark.parametrize("option", list(OPTION_USES))
def test_every_option_runs_or_raises_its_declared_reason(saved, thresholds, option):
    model, processor, family = load(saved)
    settings, call = OPTION_USES[option]
    image = load_image("darknet_eagle.jpg")
    prompt = "What is this?"
    if option == "raw_prompt":
        prompt = f"USER: {getattr(processor, 'image_token', '<image>')}\nWhat is this? ASSISTANT:"
    reason = family.options[option]

    def run():
        dymu.apply(model, None if settings.get("mode") == "tome" else thresholds, **settings)
        return dymu.generate(model, processor, [prompt], [[image]], max_new_tokens=2, **call)

    if reason is not None:
        with pytest.raises(ValueError, match=re.escape(reason)):
            run()
        return
    assert run().answers


def test_readme_feature_matrix_is_the_declared_one():
    from dymu.families.base import feature_matrix

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("<!-- families:start -->\n", 1)[1].split("\n<!-- families:end -->", 1)[0]
    assert table == feature_matrix(), "README's family table is stale: paste dymu.families.base.feature_matrix()"
