"""Careless use: the gated path accepts and rejects what the plain one does, and says why."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import cggr_hook

from common import TinyLM, shifted_loss

ORIGINAL_CE = F.cross_entropy
FIXED = dict(warmup_steps=0, dynamic_threshold=False)


def _idx(V=37, seed=0, B=2, T=9):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _outcome(fn):
    """(kind, message) of calling fn: ('ok', grad_fn name) or (exception type, message)."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e).__name__, str(e)
    return "ok", type(out.grad_fn).__name__


# --------------------------------------------------------------------------------------------------
# target dtypes: what the original function accepts, the gated one accepts, and the reverse
# --------------------------------------------------------------------------------------------------
REJECTED = [(dtype, layout) for dtype in (torch.int32, torch.int16, torch.int8, torch.bool, torch.float32, torch.float64)
            for layout in ("rows", "class_dim_1")] + [(torch.uint8, "class_dim_1")]


@pytest.mark.parametrize("dtype, layout", REJECTED)
def test_target_dtypes_rejected_by_torch_are_rejected_the_same_way(dtype, layout):
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()

    def loss():
        logits = model(idx)
        if layout == "rows":
            return F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1).to(dtype))
        return F.cross_entropy(logits.transpose(1, 2), idx.to(dtype))  # (B, V, T): torch's nll_loss2d

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "probability targets" warning either
        gated = _outcome(loss)
    model.eval()  # the evaluation loop's plain loss
    plain = _outcome(loss)
    assert plain[0] == "RuntimeError"  # torch rejects these
    assert gated == plain
    assert cggr_hook.scheduler.calls_in_step == 0  # nothing was counted


def test_target_dtypes_torch_accepts_are_gated():
    """uint8 class indices are accepted by torch for (N, V) logits: gated, with the same loss as int64."""
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    X = logits[:, :-1].reshape(-1, 37)
    got = F.cross_entropy(X, idx[:, 1:].reshape(-1).to(torch.uint8))
    assert "GatedHead" in type(got.grad_fn).__name__
    want = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(got, want)


def test_int32_targets_train_and_evaluate_alike():
    """The case a user hit: int32 targets trained under the gate, then evaluation crashed. Now
    training says what evaluation would say, and the int64 retry is gated."""
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    with pytest.raises(RuntimeError, match="Long"):
        shifted_loss(model, idx.int())
    assert "GatedHead" in type(shifted_loss(model, idx).grad_fn).__name__


def test_probability_targets_still_warn_and_take_the_plain_loss():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    X = logits[:, :-1].reshape(-1, 37)
    probs = torch.softmax(torch.randn(X.shape), -1)
    with pytest.warns(RuntimeWarning, match="probability targets"):
        got = F.cross_entropy(X, probs)
    assert torch.equal(got, ORIGINAL_CE(X, probs))


def test_targets_on_another_device_than_torch_allows_are_rejected_alike():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    target = idx[:, 1:].reshape(-1).to("meta")
    gated = _outcome(lambda: F.cross_entropy(logits[:, :-1].reshape(-1, 37), target))
    with torch.no_grad():
        plain = _outcome(lambda: ORIGINAL_CE(logits[:, :-1].reshape(-1, 37), target))
    assert gated[0] == plain[0] != "ok"


# --------------------------------------------------------------------------------------------------
# the meta device
# --------------------------------------------------------------------------------------------------
def test_a_meta_model_gets_the_plain_loss():
    with torch.device("meta"):
        model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx().to("meta")
    loss = shifted_loss(model, idx)
    assert loss.device.type == "meta" and "Gated" not in type(loss.grad_fn).__name__
    loss.backward()  # and its backward runs, as the ungated one's does
    assert cggr_hook.metrics() == {}


def test_a_meta_hugging_face_model_gets_the_plain_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    cggr_hook.enable(model, **FIXED)
    ids = torch.zeros(2, 9, dtype=torch.long, device="meta")
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.device.type == "meta" and "Gated" not in type(loss.grad_fn).__name__


def test_cggr_loss_on_meta_logits_is_a_clear_error():
    crit = cggr_hook.CGGRLoss()
    with pytest.raises(ValueError, match="meta"):
        crit(torch.zeros(2, 9, 37, device="meta"), torch.zeros(2, 9, dtype=torch.long, device="meta"))
