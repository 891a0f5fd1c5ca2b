"""Where training really runs: compiled steps, mixed precision, checkpointing, resume, threads, misuse."""

from __future__ import annotations

import copy
import io
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cggr_hook

from common import TinyLM, masked_reference_loss, reference_topk_rows, shifted_loss

# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


def _idx(seed=0, B=3, T=12, V=37):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _expected(ref, idx, ratio=0.25):
    X = ref(idx)[:, :-1].reshape(-1, 37)
    t = idx[:, 1:].reshape(-1)
    loss = masked_reference_loss(X, t, reference_topk_rows(X.detach(), t, ratio))
    loss.backward()
    return loss


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def test_compiled_training_step_matches_eager_without_recompiling():
    """A whole compiled step (model + cross entropy): the gated call is a graph break, loss and
    gradients are eager's, and later steps reuse the compiled graphs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **FIXED)

    @torch.compile(backend="aot_eager")
    def step_loss(idx):
        return shifted_loss(model, idx)

    graphs = []
    for s in range(3):
        model.zero_grad(), ref.zero_grad()
        idx = _idx(s)
        loss = step_loss(idx)
        loss.backward()
        expected = _expected(ref, idx)
        torch.testing.assert_close(loss, expected)
        for name, g in _grads(ref).items():
            torch.testing.assert_close(_grads(model)[name], g, msg=name)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[-1], graphs


# --------------------------------------------------------------------------------------------------
# mixed precision
# --------------------------------------------------------------------------------------------------
def test_autocast_bf16_gradients_match_reference():
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = shifted_loss(model, idx)
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        X = ref(idx)[:, :-1].reshape(-1, 37).float()
    t = idx[:, 1:].reshape(-1)
    expected = masked_reference_loss(X, t, reference_topk_rows(X.detach(), t, 0.25))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.grad.dtype == torch.float32  # master weights keep their dtype
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=2e-2, atol=2e-3)


def test_grad_scaler_skipped_step_is_not_counted():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    counts = []
    for s in range(5):
        opt.zero_grad()
        scaler.scale(shifted_loss(model, _idx(s))).backward()
        if s in (1, 2):  # an fp16 overflow: the scaler finds an inf and skips the step
            model.mix.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        counts.append(cggr_hook.scheduler.step_count)
    assert counts == [1, 1, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# activation checkpointing
# --------------------------------------------------------------------------------------------------
def test_checkpointed_head_is_gated_once_with_exact_gradients():
    """The head inside a checkpointed region runs twice (forward, then recomputation in backward);
    the recomputation neither gates again nor changes the gradients."""
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    calls_before = cggr_hook.scheduler.calls_in_step
    logits = checkpoint(model, idx, use_reentrant=False)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    loss.backward()
    assert cggr_hook.scheduler.calls_in_step == calls_before + 1
    expected = _expected(ref, idx)
    torch.testing.assert_close(loss, expected)
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(model)[name], g, msg=name)


@pytest.mark.parametrize("name", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_hf_activation_checkpointing(name):
    """transformers' current name and the one it deprecated both checkpoint the decoder layers;
    the head stays outside and its loss is gated once, with exact gradients."""
    import warnings

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=53,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name's deprecation notice
        getattr(model, name)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    cggr_hook.enable(model, **FIXED)
    cggr_hook.enable(ref, **FIXED)
    ids = torch.randint(0, 53, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    assert cggr_hook.scheduler.calls_in_step == 2
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["stratified", "topk"])
def test_resumed_run_selects_what_the_uninterrupted_run_selects(selection):
    opts = dict(selection=selection, warmup_steps=6, dynamic_threshold=True)

    def train(steps, state=None, snapshot_at=None):
        torch.manual_seed(0)
        model = TinyLM()
        cggr_hook.enable(model, **opts)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        selected, saved = [], None
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            cggr_hook.scheduler.load_state_dict(torch.load(io.BytesIO(state["sched"]), weights_only=True))
            start = state["step"]
        for s in range(start, steps):
            if s == snapshot_at:
                buf = io.BytesIO()
                torch.save(cggr_hook.scheduler.state_dict(), buf)
                saved = dict(
                    model=copy.deepcopy(model.state_dict()),
                    opt=copy.deepcopy(opt.state_dict()),
                    sched=buf.getvalue(),
                    step=s,
                )
            opt.zero_grad()
            per_row = shifted_loss(model, _idx(s), reduction="none")
            selected.append(torch.nonzero(per_row).flatten().tolist())
            per_row.sum().backward()
            opt.step()
        cggr_hook.disable()
        cggr_hook.scheduler.reset()
        return selected, saved

    full, snap = train(8, snapshot_at=4)
    resumed, _ = train(8, state=snap)
    assert resumed == full[4:]


# --------------------------------------------------------------------------------------------------
# threads, two models, misuse
# --------------------------------------------------------------------------------------------------
def test_gated_model_used_from_a_second_thread():
    """Pausing is per thread: a pause in the main thread does not reach a training thread."""
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    result = {}

    def work():
        result["loss"] = shifted_loss(model, idx)
        result["loss"].backward()

    with cggr_hook.paused():
        t = threading.Thread(target=work)
        t.start()
        t.join()
        plain_here = shifted_loss(model, idx)
    assert "GatedHead" in type(result["loss"].grad_fn).__name__
    assert type(plain_here.grad_fn).__name__.startswith("Nll")
    torch.testing.assert_close(result["loss"], _expected(ref, idx))


def test_nan_and_inf_logits_give_what_the_plain_loss_gives():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    logits = model(idx)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    bad = model(idx)
    loss = F.cross_entropy(bad[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    assert math.isnan(loss.item())  # a NaN row is selected first, so the NaN reaches the loss
    del logits
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("inf")
    loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    assert not math.isfinite(loss.item())


def test_all_ignored_batch_through_the_hook_matches_plain():
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)
    idx = _idx()
    t = torch.full((3 * 11,), -100)
    loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), t)
    assert math.isnan(loss.item())
    loss.backward()
    assert torch.count_nonzero(model.lm_head.weight.grad) == 0
    with cggr_hook.paused():
        assert math.isnan(F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), t).item())


def test_compiled_hf_model_with_labels_is_gated():
    """torch.compile of a Hugging Face model whose own loss runs inside the compiled forward: the
    cross entropy is a graph break, the row map is recovered across the compiled region."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(
        vocab_size=53,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **FIXED)
    cggr_hook.enable(ref, **FIXED)
    compiled = torch.compile(model, backend="aot_eager")
    for s in range(2):
        ids = torch.randint(0, 53, (2, 10), generator=torch.Generator().manual_seed(s))
        model.zero_grad(), ref.zero_grad()
        got = compiled(input_ids=ids, labels=ids).loss
        assert "GatedHead" in type(got.grad_fn).__name__
        want = ref(input_ids=ids, labels=ids).loss
        got.backward(), want.backward()
        torch.testing.assert_close(got, want)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.usefixtures("probe_the_reference")
def test_compiled_hf_model_under_the_default_books_its_plain_steps():
    """The default's plain steps are booked by Hugging Face's cross entropy on the compiled model's
    logits: the probe advances to the gate's kernels."""
    transformers = pytest.importorskip("transformers")
    from cggr_hook import auto

    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    key = cggr_hook.enable(model).key
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = torch.randint(0, 53, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(auto.PROBE_STEPS + 1):
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert cggr_hook.scheduler.step_count == auto.PROBE_STEPS + 1
    assert cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS).candidate() == 1.0  # the kernels' turn


def test_compiled_region_that_changes_logits_is_not_gated():
    """A compiled step that edits one logit between the head and the loss: the row map would fit
    at a few columns, but the input is not the head's logits, so the loss is the plain one."""
    torch._dynamo.reset()
    model = TinyLM()
    cggr_hook.enable(model, **FIXED)

    @torch.compile(backend="aot_eager")
    def step_loss(idx):
        logits = model(idx)
        masked = logits.clone()
        masked[..., 1] = -1e4
        return F.cross_entropy(masked[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))

    idx = _idx()
    with pytest.warns(RuntimeWarning):
        loss = step_loss(idx)
    assert "GatedHead" not in type(loss.grad_fn).__name__
    with torch.no_grad():
        ref = model(idx).clone()
        ref[..., 1] = -1e4
        expected = F.cross_entropy(ref[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
