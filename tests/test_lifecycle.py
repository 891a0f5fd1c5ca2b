"""A gated model's life as a user's script sees it: dropped without disable(), saved whole, copied."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

import cggr_hook
from cggr_hook import gate as gate_mod
from cggr_hook import patch
from cggr_hook.registry import registry

from common import TinyLM, shifted_loss

ORIGINAL_CE = F.cross_entropy
# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


def _llama(vocab=61):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).train()


def _sequential(vocab=37):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(vocab, 16), nn.Tanh(), nn.Linear(16, vocab))


MODELS = {"tiny": (TinyLM, 37), "llama": (_llama, 61), "sequential": (_sequential, 37)}


def _step(model, vocab, seed=0):
    """One gated training step (forward, backward, optimizer step) the way a script takes it."""
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if hasattr(model, "config"):
        loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = shifted_loss(model, ids)
    assert "Gated" in type(loss.grad_fn).__name__ or "Div" in type(loss.grad_fn).__name__
    loss.backward()
    opt.step()


def _nothing_installed() -> bool:
    return (
        F.cross_entropy is ORIGINAL_CE
        and not patch.installed()
        and len(_global_optimizer_post_hooks) == 0
        and not cggr_hook.scheduler.attached
    )


# --------------------------------------------------------------------------------------------------
# a dropped model is freed; the last one takes the patch with it
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_dropped_gated_model_is_freed_and_uninstalls_everything(kind):
    make, vocab = MODELS[kind]
    model = make()
    cggr_hook.enable(model, **FIXED)
    _step(model, vocab)
    assert cggr_hook.scheduler.step_count == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())] if ref() is not None else None
    assert _nothing_installed()


def test_sweep_of_re_created_models_keeps_none_alive():
    """A hyper-parameter sweep or a notebook cell run again: every model it drops is freed."""
    refs = []
    for trial in range(4):
        model = _llama()
        cggr_hook.enable(model, **FIXED, min_tokens_ratio=0.25 + 0.1 * trial)
        _step(model, 61, seed=trial)
        refs.append(weakref.ref(model))
        del model
        gc.collect()
    assert all(r() is None for r in refs)
    assert _nothing_installed()


def test_the_patch_stays_while_any_gated_model_lives():
    a, b = TinyLM(), TinyLM(vocab=23)
    cggr_hook.enable(a, **FIXED)
    cggr_hook.enable(b, **FIXED)
    del a
    gc.collect()
    assert F.cross_entropy is not ORIGINAL_CE and cggr_hook.scheduler.attached
    _step(b, 23)
    assert cggr_hook.scheduler.step_count == 1
    del b
    gc.collect()
    assert _nothing_installed()


def test_a_head_kept_after_its_model_is_dropped_carries_no_hook():
    model = TinyLM()
    head = model.lm_head
    cggr_hook.enable(model, **FIXED)
    del model
    gc.collect()
    assert not head._forward_hooks
    assert _nothing_installed()


def test_a_pending_step_of_a_dropped_model_is_waited_for_as_after_disable():
    """A gated loss whose optimizer step has not come yet keeps the step counter until that step,
    whether the model was disabled or dropped (the loss's graph holds the parameters)."""
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cggr_hook.enable(model, **FIXED)
    loss = shifted_loss(model, torch.randint(0, 37, (2, 7)))
    del model
    gc.collect()
    assert F.cross_entropy is ORIGINAL_CE and cggr_hook.scheduler.attached
    loss.backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 1
    assert _nothing_installed()


def test_disable_lets_the_gate_go_too():
    model = TinyLM()
    gate = weakref.ref(cggr_hook.enable(model, **FIXED))
    shifted_loss(model, torch.randint(0, 37, (2, 7))).backward()
    cggr_hook.disable(model)
    gc.collect()
    assert gate() is None


# --------------------------------------------------------------------------------------------------
# saving a gated model whole
# --------------------------------------------------------------------------------------------------
def _outputs(model, vocab):
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(input_ids=ids) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def _loss_node(model, vocab):
    """The grad_fn name of a training-mode loss of ``model``."""
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(6))
    if hasattr(model, "config"):
        return type(model(input_ids=ids, labels=ids).loss.grad_fn).__name__
    return type(shifted_loss(model, ids).grad_fn).__name__


def _round_trip(model, how):
    import copy
    import io
    import pickle

    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(copy.deepcopy(model) if how == "deepcopy+torch.save" else model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy+torch.save"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_gated_model_saves_whole_and_loads_ungated(kind, how):
    make, vocab = MODELS[kind]
    model = make()
    cggr_hook.enable(model, **FIXED)
    _step(model, vocab)
    copy_ = _round_trip(model, how)
    torch.testing.assert_close(_outputs(copy_, vocab), _outputs(model, vocab), rtol=0, atol=0)
    assert "Gated" not in _loss_node(copy_, vocab)  # the copy is not gated ...
    assert "Gated" in _loss_node(model, vocab)  # ... and the original still is
    gate = cggr_hook.enable(copy_, **FIXED)  # and it can be gated in its own right
    assert gate is not registry.gate_of(model)
    assert "Gated" in _loss_node(copy_, vocab)
    cggr_hook.disable()
    assert "Gated" not in _loss_node(copy_, vocab) and "Gated" not in _loss_node(model, vocab)


class WithCriterion(nn.Module):
    """A model that owns its loss (pickled by reference, so defined at module level)."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM()
        self.criterion = cggr_hook.CGGRLoss(warmup_steps=0, min_tokens_ratio=0.5)


def test_a_model_holding_a_cggr_loss_saves_whole():
    import copy
    import pickle

    model = WithCriterion()
    ids = torch.randint(0, 37, (2, 9))
    model.criterion(model.lm(ids), ids).backward()
    model.criterion.step()
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert twin.criterion.step_count == 1 and twin.criterion.config == model.criterion.config
        twin.criterion(twin.lm(ids), ids).backward()
        twin.criterion.step()
        assert twin.criterion.step_count == 2 and model.criterion.step_count == 1


def test_a_model_that_is_its_own_head_is_freed():
    """enable(lin, head=lin): the registry's entry must not keep the model alive through its head."""
    lin = nn.Linear(8, 11)
    cggr_hook.enable(lin, head=lin, **FIXED)
    F.cross_entropy(lin(torch.randn(5, 8)), torch.randint(0, 11, (5,))).backward()
    torch.optim.SGD(lin.parameters(), lr=0.1).step()
    ref = weakref.ref(lin)
    del lin
    gc.collect()
    assert ref() is None
    assert _nothing_installed()


def test_disable_takes_the_inert_hooks_of_copies_made_inside_the_model():
    """A head deep-copied inside the model after enable (PEFT's modules_to_save does this) carries
    an inert stand-in of the gate's hook; disable() leaves no hook of the gate anywhere."""
    import copy

    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    model.extra_head = copy.deepcopy(model.lm_head)
    assert any(isinstance(fn, gate_mod._InertHook) for fn in model.extra_head._forward_hooks.values())
    cggr_hook.disable(model)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
