"""enable / disable / gated / paused / metrics, and which cross-entropy calls are gated (gate.py, patch.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

import cggr_hook
from cggr_hook import figures as figures_mod
from cggr_hook.registry import registry

from common import TinyLM, masked_reference_loss, reference_topk_rows, shifted_loss, start_held_reader

ORIGINAL_CE = F.cross_entropy
# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    a = TinyLM(**kw)
    return a, copy.deepcopy(a)


def _idx(B=3, T=10, V=37, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------
# the handle, enabling twice, disabling
# --------------------------------------------------------------------------------------------------
def test_enable_returns_handle_and_disable_restores_everything():
    model = TinyLM()
    hooks_before = dict(model.lm_head._forward_hooks)
    g = cggr_hook.enable(model)
    assert isinstance(g, cggr_hook.Gate)
    assert F.cross_entropy is not ORIGINAL_CE
    assert len(model.lm_head._forward_hooks) == 1
    assert len(_global_optimizer_post_hooks) == 1
    cggr_hook.disable(model)
    assert F.cross_entropy is ORIGINAL_CE
    assert dict(model.lm_head._forward_hooks) == hooks_before
    assert len(_global_optimizer_post_hooks) == 0


def test_enable_twice_updates_options_and_keeps_one_hook():
    model = TinyLM()
    g1 = cggr_hook.enable(model, min_tokens_ratio=0.5)
    g2 = cggr_hook.enable(model, scoring="entropy")
    assert g1 is g2
    assert g2.config.scoring == "entropy" and g2.config.min_tokens_ratio == 0.5
    assert len(model.lm_head._forward_hooks) == 1
    g2.remove()
    assert F.cross_entropy is ORIGINAL_CE and len(model.lm_head._forward_hooks) == 0


def test_disable_without_enable_is_a_no_op():
    model = TinyLM()
    cggr_hook.disable(model)
    cggr_hook.disable()
    assert F.cross_entropy is ORIGINAL_CE


def test_two_models_gated_at_once():
    a, b = TinyLM(), TinyLM(vocab=23)
    ga = cggr_hook.enable(a, **FIXED)
    cggr_hook.enable(b, **FIXED, min_tokens_ratio=0.5)
    shifted_loss(a, _idx()).backward()
    assert cggr_hook.metrics()["tokens_selected"] == round(0.25 * 27)
    shifted_loss(b, _idx(V=23)).backward()
    assert cggr_hook.metrics()["tokens_selected"] == round(0.5 * 27 + 1e-9)
    cggr_hook.disable(a)
    assert F.cross_entropy is not ORIGINAL_CE  # b is still gated
    assert not ga.enabled
    cggr_hook.disable(b)
    assert F.cross_entropy is ORIGINAL_CE


# --------------------------------------------------------------------------------------------------
# gated calls: values and gradients against the masked reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["functional", "module"])
def test_user_shift_is_gated_with_exact_gradients(via):
    model, ref = _pair()
    idx = _idx()
    cggr_hook.enable(model, **FIXED)
    logits = model(idx)
    X, t = logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)
    loss = F.cross_entropy(X, t) if via == "functional" else nn.CrossEntropyLoss()(X, t)
    assert "GatedHead" in type(loss.grad_fn).__name__
    loss.backward()

    rl = ref(idx)[:, :-1].reshape(-1, 37)
    rows = reference_topk_rows(rl.detach(), t, 0.25)
    expected = masked_reference_loss(rl, t, rows)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(model)[name], g, msg=name)


def test_transposed_class_dim_input_is_gated():
    model, ref = _pair()
    idx = _idx()
    cggr_hook.enable(model, **FIXED)
    loss = F.cross_entropy(model(idx).transpose(1, 2), idx)  # (B, V, T), targets (B, T)
    loss.backward()
    X = ref(idx).reshape(-1, 37)
    rows = reference_topk_rows(X.detach(), idx.reshape(-1), 0.25)
    expected = masked_reference_loss(X, idx.reshape(-1), rows)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_through_the_hook(reduction):
    model, ref = _pair(bias=True)
    idx = _idx()
    cggr_hook.enable(model, **FIXED, min_tokens_ratio=0.4)
    out = shifted_loss(model, idx, reduction=reduction, label_smoothing=0.1)
    up = torch.randn(out.shape)
    (out * up).sum().backward()
    X, t = ref(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)
    rows = reference_topk_rows(X.detach(), t, 0.4)
    expected = masked_reference_loss(X, t, rows, reduction, label_smoothing=0.1)
    (expected * up).sum().backward()
    torch.testing.assert_close(out, expected)
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(model)[name], g, msg=name)


# --------------------------------------------------------------------------------------------------
# plain loss, bit for bit
# --------------------------------------------------------------------------------------------------
def _plain(model, idx):
    loss = shifted_loss(model, idx)
    return loss


@pytest.mark.parametrize("mode", ["eval", "no_grad", "paused", "disabled"])
def test_plain_loss_bit_for_bit(mode):
    model, ref = _pair()
    idx = _idx()
    cggr_hook.enable(model, **FIXED)
    if mode == "eval":
        model.eval(), ref.eval()
        got = _plain(model, idx)
    elif mode == "no_grad":
        with torch.no_grad():
            got = _plain(model, idx)
    elif mode == "paused":
        with cggr_hook.paused():
            got = _plain(model, idx)
    else:
        cggr_hook.disable(model)
        got = _plain(model, idx)
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        expected = _plain(ref, idx)
    assert torch.equal(got, expected)
    if got.requires_grad:
        got.backward(), expected.backward()
        for name, g in _grads(ref).items():
            assert torch.equal(_grads(model)[name], g), name


def test_other_cross_entropy_calls_are_untouched():
    """A classifier head, an auxiliary loss and a second call on the same logits keep the plain loss."""
    model = TinyLM()
    classifier = nn.Linear(16, 5)
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    h = torch.tanh(model.mix(model.emb(idx)))
    labels = torch.randint(0, 5, (3,))
    cls = F.cross_entropy(classifier(h[:, 0]), labels)
    assert torch.equal(cls, ORIGINAL_CE(classifier(h[:, 0]), labels))
    logits = model(idx)
    X, t = logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)
    first = F.cross_entropy(X, t)
    second = F.cross_entropy(X, t)
    assert "GatedHead" in type(first.grad_fn).__name__
    assert torch.equal(second, ORIGINAL_CE(X, t))
    (first + second).backward()  # both gradients flow: gated rows + the full second loss


def test_rescaled_logits_are_not_gated_and_warn():
    model = TinyLM()
    registry.reset()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    with pytest.warns(RuntimeWarning, match="not gated"):
        loss = F.cross_entropy((logits * 0.5).reshape(-1, 37), idx.reshape(-1))
    assert torch.equal(loss, ORIGINAL_CE((logits * 0.5).reshape(-1, 37), idx.reshape(-1)))


def test_gated_context_manager_restores_previous_state_on_exception():
    model = TinyLM()
    with pytest.raises(RuntimeError, match="boom"):
        with cggr_hook.gated(model, min_tokens_ratio=0.5) as g:
            assert g.enabled and g.config.min_tokens_ratio == 0.5
            raise RuntimeError("boom")
    assert F.cross_entropy is ORIGINAL_CE and not model.lm_head._forward_hooks

    cggr_hook.enable(model, min_tokens_ratio=0.3)
    with cggr_hook.gated(model, min_tokens_ratio=0.9):
        assert registry.gate_of(model).config.min_tokens_ratio == 0.9
    assert registry.gate_of(model).config.min_tokens_ratio == 0.3


def test_gated_without_model_overrides_an_outer_pause():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    with cggr_hook.paused():
        assert type(shifted_loss(model, idx).grad_fn).__name__.startswith("Nll")
        with cggr_hook.gated():
            assert "GatedHead" in type(shifted_loss(model, idx).grad_fn).__name__
        assert type(shifted_loss(model, idx).grad_fn).__name__.startswith("Nll")


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_targets_are_clear_errors_before_any_work():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    with pytest.raises(ValueError, match="target of shape"):
        F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)[:-1])
    bad = idx[:, 1:].reshape(-1).clone()
    bad[3] = 37
    logits = model(idx)
    with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
        F.cross_entropy(logits[:, :-1].reshape(-1, 37), bad)
    assert cggr_hook.scheduler.calls_in_step == 0  # nothing was counted
    with pytest.raises(ValueError, match="weight"):
        F.cross_entropy(model(idx).reshape(-1, 37), idx.reshape(-1), weight=torch.ones(3))


def test_bad_options_leave_nothing_installed():
    model = TinyLM()
    for bad in (dict(min_tokens_ratio=1.5), dict(min_tokens_ratio=0), dict(scoring="nope"), dict(foo=1)):
        with pytest.raises(ValueError):
            cggr_hook.enable(model, **bad)
        assert F.cross_entropy is ORIGINAL_CE and not model.lm_head._forward_hooks
        assert len(_global_optimizer_post_hooks) == 0


# --------------------------------------------------------------------------------------------------
# metrics and host synchronisation
# --------------------------------------------------------------------------------------------------
def test_metrics_have_the_seed_keys():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    shifted_loss(model, _idx())
    m = cggr_hook.metrics()
    assert set(m) == {
        "step",
        "token_ratio",
        "tokens_selected",
        "tokens_total",
        "avg_confidence",
        "avg_entropy",
        "avg_difficulty",
        "selection",
        "scoring",
    }
    assert m["tokens_total"] == 27 and m["tokens_selected"] == 7
    assert 0 < m["avg_confidence"] <= 1 and m["avg_entropy"] > 0


@pytest.mark.parametrize(
    "options",
    [
        # (a dynamic ratio on the read path: more buckets than the device computes quotas for)
        dict(dynamic_threshold=True, selection="stratified", num_strata=65),
        dict(dynamic_threshold=False, selection="topk", plain_when_faster=False),
        dict(dynamic_threshold=False, selection="stratified", plain_when_faster=False),
    ],
)
def test_one_host_read_per_gated_step(monkeypatch, options):
    """Forward + backward of a gated step reads device values once (one .tolist()), nothing else;
    where the ratio does not depend on the logits the metric averages stay on the device until
    metrics() asks for them, once."""
    model = TinyLM()
    cggr_hook.enable(model, warmup_steps=0, **options)
    idx = _idx()
    counts = {"tolist": 0, "item": 0, "nonzero": 0, "__bool__": 0, "__int__": 0, "__float__": 0}
    for name in counts:
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _name=name, _orig=original, **k):
            counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    shifted_loss(model, idx).backward()
    assert counts == {"tolist": 1, "item": 0, "nonzero": 0, "__bool__": 0, "__int__": 0, "__float__": 0}
    lazy = not options["dynamic_threshold"]
    m = cggr_hook.metrics()
    assert counts["tolist"] == 1 + lazy
    assert cggr_hook.metrics() == m and counts["tolist"] == 1 + lazy
    assert 0 < m["avg_confidence"] <= 1 and m["avg_entropy"] > 0 and "_sums" not in m


# --------------------------------------------------------------------------------------------------
# the gated-head backward multiplies the selected rows only
# --------------------------------------------------------------------------------------------------
def test_head_backward_multiplies_selected_rows_only():
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.shapes.append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
            return func(*args, **(kwargs or {}))

    model = TinyLM(vocab=41)
    cggr_hook.enable(model, **FIXED)
    idx = _idx(B=4, T=25, V=41)
    loss = shifted_loss(model, idx)
    k = cggr_hook.metrics()["tokens_selected"]
    rec = RecordMatmuls()
    with rec:
        loss.backward()
    vocab_mms = [s for s in rec.shapes if any(41 in dims for dims in s)]
    assert vocab_mms, rec.shapes
    # top-k at a fixed ratio counts k on the device: the products run over keep_count(ratio, N)
    # rows of the N head rows, the host's upper bound of k (the rows past k scaled by 0)
    K = cggr_hook.kernels.spec.keep_count(0.25, 4 * 25)
    assert k <= K < 4 * 25
    for shapes in vocab_mms:  # every product that touches the vocabulary runs over K rows, not N
        assert any(K in dims for dims in shapes), (K, shapes)
        assert not any(4 * 25 in dims for dims in shapes), shapes


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("selection", ["topk", "sequence_aware"])
def test_through_logits_route_equals_the_head_route(reduction, selection):
    """The route sharded models take (gradient through the logits' graph) gives the same loss,
    selection and gradients as the selected-rows head backward."""
    results = []
    for through in (False, True):
        torch.manual_seed(0)
        model = TinyLM()
        gate = cggr_hook.enable(model, **FIXED, selection=selection, min_tokens_ratio=0.2)
        gate.through_logits = through
        out = shifted_loss(model, _idx(B=4, T=9), reduction=reduction)
        out.sum().backward()
        results.append((out.detach(), _grads(model), cggr_hook.metrics()["tokens_selected"]))
        cggr_hook.disable()
    (l0, g0, k0), (l1, g1, k1) = results
    assert k0 == k1
    torch.testing.assert_close(l0, l1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], msg=name)


def test_step_after_a_gated_block_counts():
    """``with gated(model):`` around the forward only: the optimizer step after the block belongs
    to the gated loss and counts, so the curriculum advances."""
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(3):
        with cggr_hook.gated(model, min_tokens_ratio=0.25, warmup_steps=2, dynamic_threshold=False):
            loss = shifted_loss(model, _idx(seed=s))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert cggr_hook.scheduler.step_count == 3
    assert cggr_hook.metrics()["token_ratio"] == pytest.approx(round(0.25 * 27) / 27)
    assert len(_global_optimizer_post_hooks) == 0 and F.cross_entropy is ORIGINAL_CE


def test_dynamic_average_survives_re_enabling():
    """The running confidence average is keyed by the model, not by the gate object: a new gated()
    block continues it, and so does a resumed scheduler."""
    model = TinyLM()
    for s in range(3):
        with cggr_hook.gated(model, warmup_steps=0, dynamic_threshold=True):
            shifted_loss(model, _idx(seed=s))
    assert len(cggr_hook.scheduler.confidence_avg) == 1


def test_bad_target_does_not_consume_the_logits():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    X, t = logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)
    bad = t.clone()
    bad[0] = 99
    with pytest.raises(ValueError):
        F.cross_entropy(X, bad)
    assert "GatedHead" in type(F.cross_entropy(X, t).grad_fn).__name__  # the corrected retry is gated


def test_numpy_scalar_arguments_are_accepted():
    np = pytest.importorskip("numpy")
    model, ref = _pair()
    cggr_hook.enable(model, **FIXED, min_tokens_ratio=1.0)
    idx = _idx()
    got = shifted_loss(model, idx, ignore_index=np.int64(3), label_smoothing=np.float32(0.1))
    want = shifted_loss(ref, idx, ignore_index=3, label_smoothing=float(np.float32(0.1)))
    assert "GatedHead" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want)


def test_a_deep_copy_of_a_gated_model_is_not_gated():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    twin = copy.deepcopy(model)
    assert type(shifted_loss(twin, _idx()).grad_fn).__name__.startswith("Nll")
    assert "GatedHead" in type(shifted_loss(model, _idx()).grad_fn).__name__


def test_metrics_reader_does_not_hold_the_lock_while_it_waits(monkeypatch):
    """A thread waiting for the lazily read averages must not block a gated call that records its
    own figures, and the reader must not put its older figures back over the newer ones."""
    import threading

    model = TinyLM()
    cggr_hook.enable(model, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5)
    shifted_loss(model, _idx())
    first = 3 * 9  # the first call's tokens (its figures stay unread on the device until the reader below)
    reader, release = start_held_reader(monkeypatch, figures_mod, "resolve", cggr_hook.metrics)
    idx = torch.randint(0, 37, (3, 20))
    done = threading.Event()
    writer = threading.Thread(target=lambda: (shifted_loss(model, idx), done.set()))
    writer.start()
    blocked = not done.wait(3)
    release.set()
    assert not blocked, "a gated call waited for a metrics() reader"
    reader.join(5)
    writer.join(5)
    assert cggr_hook.metrics()["tokens_total"] == 3 * 19 != first  # the newer call's figures


# --------------------------------------------------------------------------------------------------
# the watchdog: optimizer steps with a gate enabled and nothing gated warn once, naming the cause
# --------------------------------------------------------------------------------------------------
def _steps(model, loss_of, n=4):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for s in range(n):
        loss = loss_of(model, _idx(seed=s))
        loss.backward()
        opt.step()
        opt.zero_grad()


def _watchdog(model, loss_of, n=4, **enable):
    cggr_hook.enable(model, **FIXED, **enable)
    with pytest.warns(RuntimeWarning, match="optimizer steps with a gate enabled") as rec:
        _steps(model, loss_of, n)
    msgs = [str(w.message) for w in rec if "optimizer steps with a gate enabled" in str(w.message)]
    assert len(msgs) == 1  # once
    return msgs[0]


def test_watchdog_custom_loss_that_is_not_cross_entropy():
    def loss_of(model, idx):
        logits = model(idx)
        return -torch.log_softmax(logits[:, :-1], -1).gather(-1, idx[:, 1:, None]).mean()

    msg = _watchdog(TinyLM(), loss_of)
    assert "ran in training forwards" in msg and "CGGRLoss" in msg


def _custom_loss(model, idx):
    logits = model(idx)
    return -torch.log_softmax(logits[:, :-1], -1).gather(-1, idx[:, 1:, None]).mean()


def test_watchdog_custom_loss_under_the_defaults_choice_of_the_plain_loss():
    """The default's plain steps are booked by a cross entropy on the head's logits, not by the
    head's forward: with a loss written by hand nothing is booked, so the watchdog still warns and
    the gate stays on the plain loss (its first candidate), untapped."""
    model = TinyLM()
    gate = cggr_hook.enable(model)
    with pytest.warns(RuntimeWarning, match="optimizer steps with a gate enabled") as rec:
        _steps(model, _custom_loss, 4)
    msgs = [str(w.message) for w in rec if "optimizer steps with a gate enabled" in str(w.message)]
    assert len(msgs) == 1 and "ran in training forwards" in msgs[0]
    assert cggr_hook.scheduler.step_count == 0 and gate.runs_plain()
    assert type(model(_idx()).grad_fn).__name__ != "HeadTapBackward"


def test_the_defaults_plain_step_is_booked_once_per_forward_by_its_cross_entropy():
    from cggr_hook import auto

    model = TinyLM()
    key = cggr_hook.enable(model).key
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = model(_idx())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), _idx()[:, 1:].reshape(-1))
    again = F.cross_entropy(logits[:, 1:].reshape(-1, 37), _idx()[:, :-1].reshape(-1))  # a second loss
    m = cggr_hook.metrics(model)
    assert m["auto_plain"] and m["token_ratio"] == 1.0
    assert m["tokens_selected"] == m["tokens_total"] == _idx()[:, 1:].numel()  # logging code keeps its keys
    (loss + again).backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 1  # counted: a plain loss of the gated head was booked
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert state.steps == 1 and state.probe_steps == 1  # one step of the plain candidate


def _default_steps(model, loss_of, n, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.0)
    for s in range(n):
        loss_of(model, _idx(seed=s)).backward()
        opt.step()
        opt.zero_grad()


def test_the_defaults_plain_step_is_booked_when_the_head_output_is_not_kept():
    """``F.cross_entropy(model(x)[:, :-1].reshape(-1, V), ...)``: the reshape copies the slice and
    nothing keeps the head's output, only its autograd node; the step is still booked."""
    from cggr_hook import auto

    model = TinyLM()
    key = cggr_hook.enable(model).key
    _default_steps(model, lambda m, i: F.cross_entropy(m(i)[:, :-1].reshape(-1, 37), i[:, 1:].reshape(-1)), 7)
    assert cggr_hook.scheduler.step_count == 7
    assert cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS).steps == 7


def test_a_plain_step_forward_never_backpropagated_leaves_nothing_alive():
    """The default's plain step marks its head output's autograd node; nothing of the gate holds
    the graph, so a forward whose output is dropped (a batch skipped after an error, a metric
    computed with grad on) frees its activations as it would without the gate."""
    import gc
    import weakref

    model = TinyLM()
    cggr_hook.enable(model)
    h = torch.randn(3, 10, 16, requires_grad=True)
    act = torch.tanh(h)  # saved by the head's matmul for its backward
    alive = weakref.ref(act)
    out = model.lm_head(act)
    assert type(out.grad_fn).__name__ != "HeadTapBackward"  # a plain step: untapped
    del act, out
    gc.collect()
    assert alive() is None


def test_two_default_models_stepped_in_turn_each_book_their_steps():
    from cggr_hook import auto

    a, b = TinyLM(), TinyLM(dim=8)  # other head shapes: other keys
    ka, kb = cggr_hook.enable(a).key, cggr_hook.enable(b).key
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.0), torch.optim.SGD(b.parameters(), lr=0.0)
    for s in range(6):
        idx = _idx(seed=s)
        la, lb = a(idx), b(idx)  # both forwards first, then each loss and its optimizer's step
        F.cross_entropy(la[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)).backward()
        oa.step()
        F.cross_entropy(lb[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)).backward()
        ob.step()
    assert cggr_hook.scheduler.auto_state(ka, auto.FULL_TOKENS).steps == 6
    assert cggr_hook.scheduler.auto_state(kb, auto.FULL_TOKENS).steps == 6


@pytest.mark.parametrize("kind", ["lossy cast", "probability targets"])
@pytest.mark.usefixtures("probe_the_reference")
def test_a_loss_the_gate_leaves_plain_sends_the_default_back_to_the_plain_loss(kind):
    """Booked as plain steps (a cross entropy on the head's logits), but not gated at 1.0 (the
    gate leaves a lossy cast and probability targets to the plain loss): after the first such
    step the default runs the plain loss, untapped, instead of tapping every forward for a probe
    that never advances."""
    from cggr_hook import auto

    def loss_of(m, i):
        x = m(i)[:, :-1].reshape(-1, 37)
        if kind == "lossy cast":
            return F.cross_entropy(x.to(torch.bfloat16), i[:, 1:].reshape(-1)).float()
        return F.cross_entropy(x, F.one_hot(i[:, 1:].reshape(-1), 37).float())

    model = TinyLM()
    key = cggr_hook.enable(model).key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _default_steps(model, loss_of, auto.PROBE_STEPS + 4)
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert state.choice == auto.PLAIN and not state.in_window() and state.decisions == 1
    assert type(model(_idx()).grad_fn).__name__ != "HeadTapBackward"  # untapped again
    # every step but the two at 1.0 whose loss was not gated (the second sends it back to plain)
    assert cggr_hook.scheduler.step_count == auto.PROBE_STEPS + 4 - auto.LEAVE_AFTER


@pytest.mark.usefixtures("probe_the_reference")
def test_an_occasional_loss_the_gate_leaves_plain_does_not_end_the_probe():
    """An auxiliary loss on the logits now and then (here a KL term, every fourth step) is a step
    with no gated loss; alone it changes nothing: the window measures both candidates."""
    from cggr_hook import auto

    def loss_of(m, i):
        x = m(i)[:, :-1].reshape(-1, 37)
        if loss_of.calls % 4 == 3:
            out = F.kl_div(x.log_softmax(-1), torch.full_like(x, 1 / 37), reduction="batchmean")
        else:
            out = F.cross_entropy(x, i[:, 1:].reshape(-1))
        loss_of.calls += 1
        return out

    loss_of.calls = 0
    model = TinyLM()
    key = cggr_hook.enable(model).key
    _default_steps(model, loss_of, 3 * auto.PROBE_STEPS)
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert state.decisions == 1 and set(state.step_seconds) == {1.0, auto.PLAIN}


def test_watchdog_head_never_called():
    """A fused path that reads the head's weight without calling the module."""

    def loss_of(model, idx):
        h = torch.tanh(model.mix(model.emb(idx)))
        logits = F.linear(h, model.lm_head.weight)
        return F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))

    msg = _watchdog(TinyLM(), loss_of)
    assert "was never called" in msg and "fused loss path" in msg and "head=" in msg


def test_watchdog_training_in_eval_mode():
    model = TinyLM().eval()
    msg = _watchdog(model, shifted_loss)
    assert "eval mode" in msg and "model.train()" in msg


def test_watchdog_optimizer_that_does_not_see_the_gated_model():
    gated, trained = _pair()
    cggr_hook.enable(gated, **FIXED)
    opt = torch.optim.SGD(trained.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="does not see") as rec:
        for s in range(3):
            shifted_loss(gated, _idx(seed=s)).backward()
            shifted_loss(trained, _idx(seed=s)).backward()
            opt.step()
    assert sum("optimizer steps with a gate enabled" in str(w.message) for w in rec) == 1
    assert cggr_hook.scheduler.step_count == 0


def test_watchdog_is_quiet_when_gating_works_and_when_paused():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _steps(model, shifted_loss, 5)
        other = TinyLM()
        cggr_hook.enable(other, **FIXED)
        with cggr_hook.paused():  # a deliberately plain stretch is not a fault
            _steps(other, shifted_loss, 5)
    assert cggr_hook.scheduler.step_count == 5


def test_watchdog_is_quiet_about_another_models_optimizer_stepping_in_between():
    """A critic's optimizer steps several times between the gated model's steps (no gated loss
    waiting then): those steps are not the gated model's, so nothing is wrong."""
    model, critic = TinyLM(), TinyLM()
    cggr_hook.enable(model, **FIXED)
    opt, opt_c = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, critic))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for s in range(3):
            for _ in range(5):
                critic(_idx(seed=s)).sum().backward()
                opt_c.step()
                opt_c.zero_grad()
            shifted_loss(model, _idx(seed=s)).backward()
            opt.step()
            opt.zero_grad()
    assert cggr_hook.scheduler.step_count == 3
