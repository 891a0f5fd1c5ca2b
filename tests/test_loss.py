"""The gated loss (cggr_hook/loss.py): values and gradients against an independent masked reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cggr_hook import CGGRLoss
from cggr_hook.kernels import force_backend

from common import masked_reference_loss, reference_topk_rows, start_held_reader

FIXED = dict(warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


def _inputs(B=3, T=11, V=29, dtype=torch.float32, ignore_frac=0.2, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignore_frac] = ignore_index
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(3, 11, 29), (1, 7, 5), (2, 13, 64)])
def test_loss_and_gradient_match_masked_reference(reduction, label_smoothing, weighted, shape):
    B, T, V = shape
    logits, targets = _inputs(B, T, V, seed=B * T + V)
    weight = torch.rand(V) + 0.5 if weighted else None
    crit = CGGRLoss(min_tokens_ratio=0.3, reduction=reduction, label_smoothing=label_smoothing, weight=weight, **FIXED)
    loss = crit(logits, targets)
    upstream = torch.randn(loss.shape) if reduction == "none" else torch.tensor(1.7)
    (loss * upstream).sum().backward()

    flat_l = logits.detach().reshape(-1, V).clone().requires_grad_()
    flat_t = targets.reshape(-1)
    rows = reference_topk_rows(flat_l, flat_t, 0.3)
    kw = dict(label_smoothing=label_smoothing)
    if weighted:
        kw["weight"] = weight
    ref = masked_reference_loss(flat_l, flat_t, rows, reduction, **kw)
    (ref * upstream.reshape(ref.shape)).sum().backward()

    torch.testing.assert_close(loss.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.reshape(-1, V), flat_l.grad, rtol=1e-5, atol=1e-6)
    # unselected rows carry exact zeros
    unselected = torch.ones(B * T, dtype=torch.bool)
    unselected[rows] = False
    assert torch.count_nonzero(logits.grad.reshape(-1, V)[unselected]) == 0
    m = crit.get_metrics()
    assert m["tokens_selected"] == len(rows)
    assert m["tokens_total"] == int((flat_t != -100).sum())


def test_full_ratio_equals_torch_cross_entropy():
    logits, targets = _inputs(4, 9, 31)
    crit = CGGRLoss(min_tokens_ratio=1.0, **FIXED)
    loss = crit(logits, targets)
    loss.backward()
    ref_l = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_l.reshape(-1, 31), targets.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_l.grad, rtol=1e-5, atol=1e-7)


def test_non_contiguous_shifted_logits():
    base = torch.randn(2, 10, 17, requires_grad=True)
    tgt = torch.randint(0, 17, (2, 10))
    shifted = base[:, :-1]
    assert not shifted.is_contiguous()
    crit = CGGRLoss(min_tokens_ratio=0.5, **FIXED)
    loss = crit(shifted, tgt[:, 1:])
    loss.backward()
    ref_base = base.detach().clone().requires_grad_()
    flat = ref_base[:, :-1].reshape(-1, 17)
    rows = reference_topk_rows(flat.detach(), tgt[:, 1:].reshape(-1), 0.5)
    ref = masked_reference_loss(flat, tgt[:, 1:].reshape(-1), rows)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(base.grad, ref_base.grad)
    assert torch.count_nonzero(base.grad[:, -1]) == 0


def test_flat_input_and_bf16():
    logits, targets = _inputs(1, 40, 23, dtype=torch.bfloat16)
    flat = logits.detach().reshape(40, 23).clone().requires_grad_()
    loss = CGGRLoss(min_tokens_ratio=0.25, **FIXED)(flat, targets.reshape(40))
    loss.backward()
    up = flat.detach().float().requires_grad_()
    rows = reference_topk_rows(up.detach(), targets.reshape(40), 0.25)
    ref = masked_reference_loss(up, targets.reshape(40), rows)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert flat.grad.dtype == torch.bfloat16
    torch.testing.assert_close(flat.grad.float(), up.grad, rtol=2e-2, atol=1e-3)


def test_inplace_backward_writes_gradient_into_logits():
    logits, targets = _inputs(2, 8, 19)
    expected_l = logits.detach().clone().requires_grad_()
    CGGRLoss(min_tokens_ratio=0.4, **FIXED)(expected_l, targets).backward()

    leaf = logits.detach().clone()
    x = leaf.clone().requires_grad_()
    storage = x.data_ptr()
    loss = CGGRLoss(min_tokens_ratio=0.4, inplace_backward=True, **FIXED)(x, targets)
    loss.backward()
    assert x.grad.data_ptr() == storage  # no second logits-sized buffer
    torch.testing.assert_close(x.grad, expected_l.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_matches_torch(reduction):
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.full((2, 5), -100)
    loss = CGGRLoss(**FIXED, reduction=reduction)(logits, targets)
    ref_l = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_l.reshape(-1, 7), targets.reshape(-1), reduction=reduction)
    torch.testing.assert_close(loss.reshape(ref.shape), ref, equal_nan=True)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.equal(logits.grad, ref_l.grad)  # all exact zeros


def test_curriculum_follows_step():
    logits, targets = _inputs(2, 50, 11, ignore_frac=0.0)
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=4, dynamic_threshold=False)
    seen = []
    for _ in range(6):
        crit(logits, targets)
        seen.append(crit.get_metrics()["tokens_selected"])
        crit.step()
    n = 100
    expected = [max(1, math.floor((1 - min(1, s / 4) * 0.75) * n + 0.5)) for s in range(6)]
    assert seen == expected
    assert crit.step_count == 6


def test_metrics_keys():
    logits, targets = _inputs()
    crit = CGGRLoss()
    crit(logits, targets)
    m = crit.get_metrics()
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
    assert all(isinstance(m[k], (int, float)) for k in m if k not in ("selection", "scoring"))
    assert 0 < m["token_ratio"] <= 1


def test_seed_quick_start_runs_unchanged():
    """The original package's Quick Start, with only the import changed."""
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dataloader = [torch.randint(0, 50, (4, 12)) for _ in range(3)]

    from cggr_hook import CGGRLoss as SeedLoss

    criterion = SeedLoss(scoring="combined", selection="stratified", min_tokens_ratio=0.25, warmup_steps=1000)
    for batch in dataloader:
        input_ids, targets = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids)
        loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()
        criterion.step()
    assert criterion.step_count == 3
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware"])
@pytest.mark.parametrize("scoring", ["combined", "entropy", "margin", "loss", "random"])
def test_every_mode_gives_zero_gradient_off_selection(selection, scoring):
    logits, targets = _inputs(3, 12, 21, seed=7)
    crit = CGGRLoss(scoring=scoring, selection=selection, min_tokens_ratio=0.3, **FIXED, reduction="none")
    per_row = crit(logits, targets)
    per_row.sum().backward()
    selected = per_row.reshape(-1) != 0
    g = logits.grad.reshape(-1, 21)
    assert torch.count_nonzero(g[~selected]) == 0
    assert bool((g[selected].abs().sum(-1) > 0).all())
    assert not bool(selected[targets.reshape(-1) == -100].any())
    n_valid = int((targets != -100).sum())
    k = max(1, math.floor(0.3 * n_valid + 0.5))
    if selection == "sequence_aware":
        assert int(selected.sum()) >= k
        for b in range(3):  # every sequence with a valid token keeps one
            if (targets[b] != -100).any():
                assert bool(selected.reshape(3, 12)[b].any())
    else:
        assert int(selected.sum()) == k


def test_bad_input_is_a_clear_error():
    logits, targets = _inputs(2, 5, 7)
    crit = CGGRLoss(**FIXED)
    with pytest.raises(ValueError, match="targets"):
        crit(logits, targets[:, :-1])
    bad = targets.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="target"):
        crit(logits, bad)
    with pytest.raises(ValueError, match="weight"):
        CGGRLoss(weight=torch.ones(6))(logits, targets)
    with pytest.raises(ValueError, match="reduction"):
        CGGRLoss(reduction="avg")
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        CGGRLoss(min_tokens_ratio=0.0)
    with pytest.raises(ValueError, match="scoring"):
        CGGRLoss(scoring="confidence")


def test_triton_backend_matches_reference(monkeypatch):
    """The same gated loss through the Triton kernels (interpreted on the CPU) and the reference."""
    pytest.importorskip("triton")
    logits, targets = _inputs(2, 9, 33, seed=3)
    results = {}
    for backend in ("torch", "triton"):
        force_backend(backend)
        x = logits.detach().clone().requires_grad_()
        loss = CGGRLoss(min_tokens_ratio=0.4, label_smoothing=0.05, **FIXED)(x, targets)
        loss.backward()
        results[backend] = (loss.detach(), x.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)


def test_full_ratio_with_smoothing_weights_and_ignored_targets_equals_torch():
    """At 100% of tokens the gated loss is torch's, label smoothing, weights and ignored rows included."""
    x = torch.randn(30, 11)
    t = torch.randint(0, 11, (30,))
    t[:7] = -100
    w = torch.rand(11) + 0.5
    for kw in (dict(label_smoothing=0.2), dict(label_smoothing=0.2, weight=w), dict(weight=w)):
        got = CGGRLoss(min_tokens_ratio=1.0, **FIXED, **kw)(x, t)
        torch.testing.assert_close(got, F.cross_entropy(x, t, **kw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_valid_and_bad_target_counts_on_both_host_read_paths(dynamic, ignore_index, backend, monkeypatch):
    """A fixed ratio reads target counts before scoring, a dynamic one reads the kernel's sums after
    it: both count the same valid tokens (ignore_index inside the vocabulary included) and both
    reject a target outside [0, V) before anything changes, on either backend."""
    force_backend(backend)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 6, generator=gen)
    t = torch.randint(0, 6, (3, 8), generator=gen)
    t[0, :3] = ignore_index
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=dynamic, ignore_index=ignore_index)
    crit(x, t)
    assert crit.get_metrics()["tokens_total"] == int((t != ignore_index).sum())
    for bad in (6, -1):
        tb = t.clone()
        tb[1, 1] = bad
        calls = crit.scheduler.calls_in_step
        with pytest.raises(ValueError, match=r"target has 1 value\(s\) outside \[0, 6\)"):
            crit(x, tb)
        assert crit.scheduler.calls_in_step == calls


def test_get_metrics_does_not_restore_an_older_call(monkeypatch):
    """get_metrics() racing a newer call keeps the newer call's figures."""
    import cggr_hook.figures as figures_mod

    crit = CGGRLoss(min_tokens_ratio=0.5, **FIXED)
    crit(torch.randn(1, 4, 7), torch.randint(0, 7, (1, 4)))
    reader, release = start_held_reader(monkeypatch, figures_mod, "resolve", crit.get_metrics)
    crit(torch.randn(1, 9, 7), torch.randint(0, 7, (1, 9)))
    release.set()
    reader.join(5)
    assert crit.get_metrics()["tokens_total"] == 9


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gated_loss_can_be_modified_in_place_as_the_plain_one(reduction):
    """`loss *= mask` on a 'none' loss (or `loss.mul_` on a reduced one) works as on torch's loss,
    and the gradient follows the modified loss."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 13, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    t = torch.randint(0, 13, (2, 5))
    t[0, 1] = -100
    crit = CGGRLoss(min_tokens_ratio=1.0, reduction=reduction, **FIXED)
    loss, expected = crit(x, t), F.cross_entropy(x_ref.transpose(1, 2), t, reduction=reduction)
    mask = torch.rand(expected.shape) if reduction == "none" else torch.tensor(0.5)
    loss.mul_(mask)
    expected.mul_(mask)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
