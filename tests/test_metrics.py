"""What metrics() and scalars() report: per model, the step the loss belongs to, nothing stale."""

from __future__ import annotations

import gc

import pytest
import torch

import cggr_hook

from common import TinyLM, shifted_loss

# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


def _idx(V=37, seed=0, B=2, T=9):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_step_is_the_optimizer_step_the_loss_belongs_to():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        for micro in range(2):  # gradient accumulation: both micro-batches belong to one step
            shifted_loss(model, _idx(seed=2 * i + micro)).backward()
            assert cggr_hook.metrics()["step"] == i + 1
        opt.step()
        opt.zero_grad()
        # what a loop logs after its step: the same number as the scheduler's count
        assert cggr_hook.metrics()["step"] == cggr_hook.scheduler.step_count == i + 1


def test_cggr_loss_reports_the_same_step():
    crit = cggr_hook.CGGRLoss(warmup_steps=0, dynamic_threshold=False)
    logits = torch.randn(2, 9, 37, requires_grad=True)
    crit(logits, _idx()).backward()
    assert crit.get_metrics()["step"] == 1
    crit.step()
    crit(logits, _idx())
    assert crit.get_metrics()["step"] == 2


@pytest.mark.parametrize("how", ["disable(model)", "disable()", "reset", "load_state_dict"])
def test_nothing_stale_after_disable_or_a_reset(how):
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    shifted_loss(model, _idx())
    assert cggr_hook.metrics() and cggr_hook.metrics(model) and cggr_hook.scalars()
    if how == "disable(model)":
        cggr_hook.disable(model)
    elif how == "disable()":
        cggr_hook.disable()
    elif how == "reset":
        cggr_hook.scheduler.reset()
    else:
        cggr_hook.scheduler.load_state_dict({"step_count": 7, "calls_in_step": 0, "confidence_avg": {}})
    assert cggr_hook.metrics() == {} and cggr_hook.metrics(model) == {} and cggr_hook.scalars() == {}
    if how in ("reset", "load_state_dict"):  # still gated: the next call reports again
        shifted_loss(model, _idx())
        assert cggr_hook.metrics(model)["tokens_total"] == 16


def test_figures_per_model():
    a, b = TinyLM(), TinyLM(vocab=23)
    cggr_hook.enable(a, **FIXED, min_tokens_ratio=0.25)
    cggr_hook.enable(b, **FIXED, min_tokens_ratio=0.5)
    shifted_loss(a, _idx(B=2, T=9))
    shifted_loss(b, _idx(V=23, B=3, T=9))
    assert cggr_hook.metrics(a)["tokens_total"] == 16 and cggr_hook.metrics(a)["tokens_selected"] == 4
    assert cggr_hook.metrics(b)["tokens_total"] == 24 and cggr_hook.metrics(b)["tokens_selected"] == 12
    assert cggr_hook.metrics() == cggr_hook.metrics(b)  # without a model: the last call of any
    cggr_hook.disable(b)
    assert cggr_hook.metrics(b) == {}
    assert cggr_hook.metrics(a)["tokens_total"] == 16  # a's own figures stay
    assert cggr_hook.metrics() == cggr_hook.metrics(a)  # the latest of the models still gated
    assert cggr_hook.metrics(TinyLM()) == {}  # a model never gated has none


def test_figures_through_a_wrapper_are_the_inner_models():
    model = TinyLM()
    wrapped = torch.compile(model, backend="eager")
    cggr_hook.enable(model, **FIXED)
    shifted_loss(model, _idx())
    assert cggr_hook.metrics(wrapped) == cggr_hook.metrics(model) != {}


def test_a_gated_block_keeps_its_figures_for_the_step_after_it():
    model = TinyLM()
    with cggr_hook.gated(model, **FIXED):
        loss = shifted_loss(model, _idx())
    loss.backward()
    assert cggr_hook.metrics(model)["tokens_total"] == 16


def test_a_collected_model_takes_its_figures_along():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    shifted_loss(model, _idx())
    del model
    gc.collect()
    assert cggr_hook.metrics() == {}


def test_metrics_of_a_non_module_is_a_clear_error():
    with pytest.raises(ValueError, match="model must be"):
        cggr_hook.metrics("model")
    with pytest.raises(ValueError, match="prefix"):
        cggr_hook.scalars(prefix=None)


def test_scalars_are_prefixed_numbers():
    model = TinyLM()
    assert cggr_hook.scalars(model) == {} and cggr_hook.scalars() == {}
    cggr_hook.enable(model, **FIXED)
    shifted_loss(model, _idx())
    s = cggr_hook.scalars(model)
    assert set(s) == {
        "cggr/token_ratio",
        "cggr/tokens_selected",
        "cggr/tokens_total",
        "cggr/avg_confidence",
        "cggr/avg_entropy",
        "cggr/avg_difficulty",
    }
    assert all(isinstance(v, (int, float)) for v in s.values())
    assert s["cggr/tokens_total"] == 16
    assert set(cggr_hook.scalars(model, prefix="")) == {k[len("cggr/") :] for k in s}


def test_scalars_carry_the_importance_figures_too():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED, selection="importance", scoring="gradnorm", min_tokens_ratio=0.5)
    shifted_loss(model, _idx())
    s = cggr_hook.scalars(model)
    assert {"cggr/ess", "cggr/max_weight", "cggr/certain_fraction", "cggr/token_ratio"} <= set(s)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s.values())


def test_scalars_reach_a_tensorboard_event_file(tmp_path):
    """The README's two lines for a plain loop, with the real writer, read back from the file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 4):
        shifted_loss(model, _idx(seed=step)).backward()
        opt.step()
        opt.zero_grad()
        for tag, value in cggr_hook.scalars(model).items():
            writer.add_scalar(tag, value, step)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "cggr/token_ratio" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("cggr/tokens_total")] == [1, 2, 3]
    assert all(e.value == 16 for e in events.Scalars("cggr/tokens_total"))
