"""GateConfig: the seed's defaults, immutability, and a ValueError naming the option for every bad value."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cggr_hook
from cggr_hook import GateConfig

ORIGINAL_CE = F.cross_entropy


class TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.lm_head(self.embed(ids))


def test_defaults_keep_every_token_and_sample_by_gradient_norm_below_that():
    c = GateConfig()
    assert (c.scoring, c.selection, c.importance_floor) == ("gradnorm", "importance", 0.2)
    assert c.min_tokens_ratio == 1.0 and c.warmup_steps == 0 and c.dynamic_threshold is False
    assert (c.threshold_sensitivity, c.num_strata, c.min_tokens_per_sequence, c.seed) == (0.5, 4, 1, 0)


def test_seed_preset_is_the_original_packages_options():
    c = GateConfig.preset("seed")
    spelled = GateConfig(
        scoring="combined",
        selection="topk",
        min_tokens_ratio=0.25,
        warmup_steps=1000,
        dynamic_threshold=True,
        threshold_sensitivity=0.5,
        num_strata=4,
        min_tokens_per_sequence=1,
    )
    assert c == spelled
    assert GateConfig.preset("seed", min_tokens_ratio=0.5) == spelled.replace(min_tokens_ratio=0.5)
    with pytest.raises(ValueError, match="preset"):
        GateConfig.preset("fast")


def test_enable_with_a_preset_starts_from_it_and_refuses_a_config_beside_it():
    model = TinyLM()
    g = cggr_hook.enable(model, preset="seed", warmup_steps=0)
    assert g.config == GateConfig.preset("seed", warmup_steps=0)
    assert cggr_hook.enable(model, min_tokens_ratio=0.5).config.selection == "topk"  # later options keep it
    with pytest.raises(ValueError, match="preset"):
        cggr_hook.enable(model, GateConfig(), preset="seed")
    with pytest.raises(ValueError, match="preset"):
        cggr_hook.enable(model, preset="nope")


@pytest.mark.parametrize(
    "field",
    [
        "scoring",
        "selection",
        "min_tokens_ratio",
        "warmup_steps",
        "dynamic_threshold",
        "threshold_sensitivity",
        "num_strata",
        "min_tokens_per_sequence",
    ],
)
def test_config_is_frozen(field):
    c = GateConfig()
    before = getattr(c, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(c, field, before)
    assert getattr(c, field) == before


def test_replace_returns_a_changed_copy_and_leaves_the_original():
    c = GateConfig()
    d = c.replace(selection="stratified", num_strata=3, min_tokens_ratio=0.5)
    assert (d.selection, d.num_strata, d.min_tokens_ratio) == ("stratified", 3, 0.5)
    assert (c.selection, c.num_strata, c.min_tokens_ratio) == ("importance", 4, 1.0)


@pytest.mark.parametrize("scoring", ["combined", "entropy", "margin", "loss", "gradnorm", "random"])
def test_every_documented_scoring_is_accepted(scoring):
    assert GateConfig(scoring=scoring).scoring == scoring


@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware", "importance"])
def test_every_documented_selection_is_accepted(selection):
    assert GateConfig(selection=selection).selection == selection


@pytest.mark.parametrize("ratio", [1, 1.0, 0.001, 0.5])
def test_min_tokens_ratio_accepts_the_interval_and_stores_a_float(ratio):
    c = GateConfig(min_tokens_ratio=ratio)
    assert type(c.min_tokens_ratio) is float
    assert c.min_tokens_ratio == float(ratio)


@pytest.mark.parametrize(
    "option, value",
    [
        ("scoring", "confidence"),
        ("scoring", "Entropy"),
        ("selection", "top_k"),
        ("selection", "random"),
        ("min_tokens_ratio", 0),
        ("min_tokens_ratio", 0.0),
        ("min_tokens_ratio", -0.1),
        ("min_tokens_ratio", 1.5),
        ("min_tokens_ratio", math.nan),
        ("min_tokens_ratio", math.inf),
        ("min_tokens_ratio", True),
        ("min_tokens_ratio", "0.25"),
        ("warmup_steps", -1),
        ("warmup_steps", 1.5),
        ("warmup_steps", True),
        ("threshold_sensitivity", 2),
        ("threshold_sensitivity", -0.5),
        ("num_strata", 0),
        ("num_strata", 2.0),
        ("min_tokens_per_sequence", -1),
        ("dynamic_threshold", "yes"),
        ("importance_floor", -0.1),
        ("importance_floor", 1.01),
        ("importance_floor", math.nan),
        ("importance_floor", True),
        ("importance_floor", "0.2"),
    ],
)
def test_bad_value_is_a_value_error_naming_the_option(option, value):
    with pytest.raises(ValueError) as err:
        GateConfig(**{option: value})
    assert option in str(err.value)


@pytest.mark.parametrize("option, value", [("min_tokens_ratio", 0), ("num_strata", 0), ("scoring", "nope")])
def test_bad_value_through_replace_is_a_value_error_naming_the_option(option, value):
    with pytest.raises(ValueError) as err:
        GateConfig().replace(**{option: value})
    assert option in str(err.value)


def test_replace_with_an_unknown_option_names_it():
    with pytest.raises(ValueError) as err:
        GateConfig().replace(foo=1)
    assert "foo" in str(err.value)


def test_enable_with_an_unknown_option_names_it_and_installs_nothing():
    torch.manual_seed(0)
    model = TinyLM()
    assert F.cross_entropy is ORIGINAL_CE
    with pytest.raises(ValueError) as err:
        cggr_hook.enable(model, foo=1)
    assert "foo" in str(err.value)
    assert F.cross_entropy is ORIGINAL_CE
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE
    for m in model.modules():
        assert len(m._forward_hooks) == 0, type(m).__name__
        assert len(m._forward_pre_hooks) == 0, type(m).__name__
    # and the model's loss is the plain one
    ids = torch.randint(0, 11, (2, 7))
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, 11), ids.reshape(-1))
    ref = -torch.log_softmax(logits.detach().double(), -1).gather(-1, ids[..., None]).mean()
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-6, atol=1e-6)


def test_enable_with_a_bad_value_names_it_and_installs_nothing():
    model = TinyLM()
    with pytest.raises(ValueError) as err:
        cggr_hook.enable(model, min_tokens_ratio=1.5)
    assert "min_tokens_ratio" in str(err.value)
    assert F.cross_entropy is ORIGINAL_CE
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bad_option_on_an_enabled_model_keeps_its_previous_options():
    model = TinyLM()
    gate = cggr_hook.enable(model, min_tokens_ratio=0.5)
    with pytest.raises(ValueError) as err:
        cggr_hook.enable(model, foo=1)
    assert "foo" in str(err.value)
    assert gate.config.min_tokens_ratio == 0.5
    assert gate.config == GateConfig(min_tokens_ratio=0.5)


@pytest.mark.parametrize("floor", [0, 0.0, 0.2, 1])
def test_importance_floor_accepts_the_closed_interval_and_stores_a_float(floor):
    c = GateConfig(selection="importance", importance_floor=floor)
    assert type(c.importance_floor) is float and c.importance_floor == float(floor)
