"""Careless use: the gated path accepts and rejects what the plain one does, and says why."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cggr_hook

from common import TinyLM, shifted_loss

ORIGINAL_CE = F.cross_entropy
# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


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
REJECTED = [
    (dtype, layout)
    for dtype in (torch.int32, torch.int16, torch.int8, torch.bool, torch.float32, torch.float64)
    for layout in ("rows", "class_dim_1")
] + [(torch.uint8, "class_dim_1")]


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
    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
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


# --------------------------------------------------------------------------------------------------
# option types: real-valued scalars as torch takes them; anything else named in the message
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, stored",
    [
        ("min_tokens_ratio", np.float32(0.5), 0.5),
        ("min_tokens_ratio", np.float64(0.3), 0.3),
        ("min_tokens_ratio", torch.tensor(0.5), 0.5),
        ("min_tokens_ratio", torch.tensor(0.5, dtype=torch.float64), 0.5),
        ("min_tokens_ratio", np.array(0.5), 0.5),
        ("min_tokens_ratio", np.int64(1), 1.0),
        ("threshold_sensitivity", np.float32(0.25), 0.25),
        ("threshold_sensitivity", torch.tensor(0.25), 0.25),
        ("warmup_steps", np.int64(100), 100),
        ("warmup_steps", torch.tensor(100), 100),
        ("num_strata", np.int32(3), 3),
        ("min_tokens_per_sequence", torch.tensor(2), 2),
        ("seed", np.uint8(7), 7),
        ("importance_floor", np.float32(0.5), 0.5),
        ("importance_floor", torch.tensor(0.5), 0.5),
        ("dynamic_threshold", np.bool_(False), False),
        ("dynamic_threshold", torch.tensor(False), False),
    ],
)
def test_real_valued_scalars_are_accepted_as_torch_accepts_them(option, value, stored):
    config = cggr_hook.GateConfig(**{option: value})
    got = getattr(config, option)
    assert got == pytest.approx(stored) and type(got) is type(stored)  # stored as the Python number
    model = TinyLM()
    assert getattr(cggr_hook.enable(model, **{option: value}).config, option) == got
    cggr_hook.disable()
    assert hash(config) == hash(cggr_hook.GateConfig(**{option: stored}))


@pytest.mark.parametrize(
    "option, value, kind",
    [
        ("min_tokens_ratio", "0.3", "str"),
        ("min_tokens_ratio", torch.tensor([0.3, 0.4]), "Tensor"),
        ("min_tokens_ratio", 0.3 + 0j, "complex"),
        ("min_tokens_ratio", None, "NoneType"),
        ("warmup_steps", 10.0, "float"),
        ("warmup_steps", torch.tensor(10.0), "Tensor"),
        ("num_strata", "4", "str"),
        ("dynamic_threshold", 1, "int"),
        ("scoring", 3, "int"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_type(option, value, kind):
    with pytest.raises(ValueError) as err:
        cggr_hook.GateConfig(**{option: value})
    message = str(err.value)
    assert option in message and f"is a {kind}, not " in message, message  # the type, not the range, is blamed


def test_a_ratio_out_of_range_still_blames_the_range():
    with pytest.raises(ValueError, match=r"min_tokens_ratio.*\(0, 1\]"):
        cggr_hook.GateConfig(min_tokens_ratio=np.float32(1.5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: cggr_hook.CGGRLoss(bogus=1),
        lambda: cggr_hook.GateConfig(bogus=1),
        lambda: cggr_hook.enable(TinyLM(), bogus=1),
    ],
)
def test_an_unknown_option_is_a_value_error_everywhere(make):
    with pytest.raises(ValueError, match="bogus"):
        make()
    assert F.cross_entropy is ORIGINAL_CE


# --------------------------------------------------------------------------------------------------
# in-place operations on the gated model's logits
# --------------------------------------------------------------------------------------------------
def test_the_tapped_logits_are_not_a_view():
    """The head's output is a tensor of its own, as without the gate: FSDP2 warns about a module
    returning a view (an in-place op on it would drop FSDP's pre-backward hook)."""
    model = TinyLM()
    assert model(_idx())._base is None
    cggr_hook.enable(model, **FIXED)
    logits = model(_idx())
    assert logits._base is None and not logits._is_view()
    assert type(logits.grad_fn).__name__ == "HeadTapBackward"


@pytest.mark.parametrize("op", ["div_", "masked_fill_", "setitem"])
def test_an_in_place_op_on_the_logits_works_as_without_the_gate(op):
    """An in-place change of the logits (a temperature, a mask) is a loss on other values than the
    head's: the plain loss, with the same gradients as the ungated model, and a warning."""
    import copy

    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **FIXED)
    idx = _idx()

    def loss(m):
        logits = m(idx)
        if op == "div_":
            logits.div_(2.0)
        elif op == "masked_fill_":
            logits.masked_fill_(torch.arange(37) == 3, -1e4)
        else:
            logits[..., 5] = 0.0
        return F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))

    with pytest.warns(RuntimeWarning, match="plain loss"):
        got = loss(model)
    want = loss(ref)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
