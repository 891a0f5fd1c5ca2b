"""Importance sampling (``selection='importance'``): inclusion probabilities, the draw, and the
Horvitz-Thompson loss, against references written here from the definitions.

The statistical tests (inclusion frequencies, the mean gradient over draws, the mean gated loss of
a Hugging Face model) run many draws on the PyTorch backend; the Triton kernels that a draw goes
through are checked draw by draw against that backend under the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cggr_hook
from cggr_hook import CGGRLoss, selection
from cggr_hook.kernels import force_backend

FIXED = dict(warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


# --------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------
def water_filling(scores: list[float], k: int, floor: float) -> list[float]:
    """pi_i = min(1, c q_i) with sum pi = k, by repeated capping (float64, plain Python)."""
    n = len(scores)
    total = sum(scores)
    q = [(1 - floor) * (s / total if total > 0 else 1 / n) + floor / n for s in scores]
    capped: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in capped]
        mass = sum(q[i] for i in free)
        if mass == 0:  # only zero scores left: they share what remains
            share = (k - len(capped)) / len(free)
            return [1.0 if i in capped else share for i in range(n)]
        c = (k - len(capped)) / mass
        over = [i for i in free if c * q[i] > 1]
        if not over:
            return [1.0 if i in capped else c * q[i] for i in range(n)]
        capped.update(over)


def gradnorm_oracle(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """||softmax(x) - y~|| per row in float64 (0 where the target is ignored)."""
    V = logits.shape[-1]
    p = torch.softmax(logits.detach().double().reshape(-1, V), -1)
    t = targets.reshape(-1)
    valid = t >= 0
    y = torch.full_like(p, label_smoothing / V)
    y[torch.arange(len(t))[valid], t[valid]] += 1 - label_smoothing
    return torch.where(valid, (p - y).norm(dim=-1), torch.zeros(len(t), dtype=torch.float64))


def ht_reference(logits, targets, drawn, pi, reduction, weight=None, label_smoothing=0.0):
    """The Horvitz-Thompson loss of the drawn rows, from torch's per-token cross entropy."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()
    t = targets.reshape(-1)
    per_row = F.cross_entropy(x, t, reduction="none", weight=weight, label_smoothing=label_smoothing)
    w = torch.zeros(len(t), dtype=torch.float32)
    w[drawn] = 1.0 / pi[drawn].float()
    if reduction == "none":
        return (per_row * w).view(targets.shape)
    total = (per_row * w).sum()
    if reduction == "sum":
        return total
    valid = t >= 0
    denom = weight[t[valid]].sum() if weight is not None else valid.sum()
    return total / denom


def pi_of_rows(scores: torch.Tensor, valid: torch.Tensor, k: int, floor: float) -> torch.Tensor:
    """pi of every row (0 where not valid) from ``water_filling`` over the valid rows."""
    idx = torch.nonzero(valid).flatten().tolist()
    pis = water_filling([float(scores[i]) for i in idx], k, floor)
    pi = torch.zeros(len(valid), dtype=torch.float64)
    pi[idx] = torch.tensor(pis, dtype=torch.float64)
    return pi


def inputs(B=3, T=11, V=13, seed=0, ignore_frac=0.25, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return logits, targets


# --------------------------------------------------------------------------------------------------
# inclusion probabilities
# --------------------------------------------------------------------------------------------------
SCORE_CASES = {
    "random": lambda g, n: torch.rand(n, generator=g, dtype=torch.float64),
    "skewed": lambda g, n: torch.rand(n, generator=g, dtype=torch.float64) ** 8,  # a few dominate: capping
    "ties": lambda g, n: torch.randint(0, 3, (n,), generator=g).double(),
    "zeros": lambda g, n: torch.where(torch.rand(n, generator=g) < 0.7, 0.0, 1.0).double(),
    "all_zero": lambda g, n: torch.zeros(n, dtype=torch.float64),
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
@pytest.mark.parametrize("n", [2, 7, 40])
@pytest.mark.parametrize("floor", [0.0, 0.2, 1.0])
def test_inclusion_probabilities_are_the_water_filling(case, n, floor):
    g = torch.Generator().manual_seed(n * 7 + len(case))
    s = torch.sort(SCORE_CASES[case](g, n), descending=True).values
    for k in sorted({1, n // 3 or 1, n // 2 or 1, n - 1}):
        pi, m = selection.inclusion_probabilities(s.float(), k, floor)
        want = torch.tensor(water_filling(s.float().double().tolist(), k, floor), dtype=torch.float64)
        torch.testing.assert_close(pi, want, rtol=1e-9, atol=1e-12, msg=lambda msg: f"k={k}: {msg}")
        assert abs(float(pi.sum()) - k) < 1e-9
        assert float(pi.max()) <= 1.0 and float(pi.min()) >= 0.0
        assert bool((pi[: int(m)] == 1.0).all())


def test_uniform_floor_and_zero_scores_give_k_over_n():
    s = torch.tensor([5.0, 1.0, 0.5, 0.0])
    pi, _ = selection.inclusion_probabilities(s, 2, 1.0)
    torch.testing.assert_close(pi, torch.full((4,), 0.5, dtype=torch.float64))
    pi, _ = selection.inclusion_probabilities(torch.zeros(4), 3, 0.0)
    torch.testing.assert_close(pi, torch.full((4,), 0.75, dtype=torch.float64))


def test_an_infinite_score_is_certain():
    # NaN logits score +inf: such a row is always drawn, so its NaN reaches the loss
    s = torch.tensor([math.inf, 3.0, 2.0, 1.0, 0.5])
    pi, m = selection.inclusion_probabilities(s, 2, 0.2)
    assert float(pi[0]) == 1.0 and int(m) >= 1
    assert abs(float(pi.sum()) - 2) < 1e-9


# --------------------------------------------------------------------------------------------------
# the draw
# --------------------------------------------------------------------------------------------------
def test_systematic_draw_takes_exactly_k_distinct_rows_at_the_given_frequencies():
    g0 = torch.Generator().manual_seed(3)
    n, k, draws = 12, 5, 4000
    s = torch.sort(torch.rand(n, generator=g0) ** 3, descending=True).values
    pi, m = selection.inclusion_probabilities(s, k, 0.1)
    assert int(m) >= 1  # the test covers capped rows too
    counts = torch.zeros(n)
    gen = torch.Generator().manual_seed(11)
    for _ in range(draws):
        pos = selection.systematic_draw(pi, m, k, gen)
        assert pos.numel() == k and pos.unique().numel() == k
        counts[pos] += 1
    freq = counts / draws
    sd = torch.sqrt(pi * (1 - pi) / draws).float()
    assert bool((freq[: int(m)] == 1.0).all())
    z = (freq - pi.float()).abs() / sd.clamp(min=1e-9)
    assert float(z[int(m) :].max()) < 4.5, (freq, pi)


# --------------------------------------------------------------------------------------------------
# the loss of each draw
# --------------------------------------------------------------------------------------------------
def drawn_rows(grad: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(grad.reshape(-1, grad.shape[-1]).abs().sum(-1) > 0).flatten()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted, smoothing", [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_each_draw_is_the_horvitz_thompson_loss_of_k_valid_rows(reduction, weighted, smoothing, ratio):
    logits, targets = inputs(seed=int(ratio * 100) + int(weighted) + int(smoothing * 10))
    V = logits.shape[-1]
    weight = torch.rand(V, generator=torch.Generator().manual_seed(5)) + 0.5 if weighted else None
    floor = 0.2
    crit = CGGRLoss(
        scoring="gradnorm",
        selection="importance",
        min_tokens_ratio=ratio,
        importance_floor=floor,
        reduction=reduction,
        weight=weight,
        label_smoothing=smoothing,
        **FIXED,
    )
    t = targets.reshape(-1)
    valid = t >= 0
    n = int(valid.sum())
    k = max(1, math.floor(ratio * n + 0.5))
    pi = pi_of_rows(gradnorm_oracle(logits, targets, smoothing), valid, k, floor)
    for draw in range(3):
        logits.grad = None
        loss = crit(logits, targets)
        upstream = torch.randn(loss.shape) if reduction == "none" else torch.tensor(1.3)
        (loss * upstream).sum().backward()
        rows = drawn_rows(logits.grad)
        assert rows.numel() == k, f"draw {draw}: {rows.numel()} rows, k = {k}"
        assert bool(valid[rows].all()), "an ignored target was drawn"
        ref_logits = logits.detach().clone().requires_grad_()
        ref = ht_reference(ref_logits, targets, rows, pi, reduction, weight, smoothing)
        (ref * upstream).sum().backward()
        torch.testing.assert_close(loss.reshape(ref.shape), ref, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=2e-5, atol=1e-6)
        m = crit.get_metrics()
        assert m["tokens_selected"] == k and m["tokens_total"] == n and m["selection"] == "importance"
        w = 1.0 / pi[rows]
        assert m["ess"] == pytest.approx(float(w.sum() ** 2 / (w * w).sum()), rel=1e-5)
        assert m["max_weight"] == pytest.approx(float(w.max()), rel=1e-5)
        assert m["certain_fraction"] == pytest.approx(float((pi >= 1.0 - 1e-9).sum()) / n)


def test_random_scoring_draws_uniformly_and_weighs_k_over_n():
    logits, targets = inputs(seed=4)
    crit = CGGRLoss(scoring="random", selection="importance", min_tokens_ratio=0.3, **FIXED)
    loss = crit(logits, targets)
    loss.backward()
    rows = drawn_rows(logits.grad)
    n = int((targets >= 0).sum())
    k = max(1, math.floor(0.3 * n + 0.5))
    # pi = k / n: (1 / n) sum_S l / (k / n) is the mean over the drawn rows
    want = F.cross_entropy(logits.detach().reshape(-1, logits.shape[-1])[rows], targets.reshape(-1)[rows])
    assert rows.numel() == k
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert crit.get_metrics()["max_weight"] == pytest.approx(n / k)


def test_draws_are_seeded_by_seed_step_and_call():
    logits, targets = inputs(seed=6)

    def rows_of(seed, steps):
        crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, seed=seed, **FIXED)
        for _ in range(steps):
            crit.step()
        logits.grad = None
        crit(logits, targets).backward()
        return drawn_rows(logits.grad).tolist()

    assert rows_of(0, 2) == rows_of(0, 2)
    draws = {tuple(rows_of(s, st)) for s in (0, 1) for st in (0, 1, 2)}
    assert len(draws) > 3


def test_full_ratio_is_the_plain_loss():
    logits, targets = inputs(seed=8)
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=1.0, **FIXED)
    loss = crit(logits, targets)
    V = logits.shape[-1]
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().reshape(-1, V), targets.reshape(-1)))


@pytest.mark.parametrize("scoring", ["gradnorm", "loss", "combined"])
def test_triton_backend_matches_the_torch_backend_draw_by_draw(scoring, monkeypatch):
    logits, targets = inputs(B=2, T=9, V=21, seed=9)
    results = {}
    for backend in ("torch", "triton"):
        force_backend(backend)
        crit = CGGRLoss(scoring=scoring, selection="importance", min_tokens_ratio=0.4, label_smoothing=0.05, **FIXED)
        out = []
        for _ in range(2):
            logits.grad = None
            loss = crit(logits, targets)
            loss.backward()
            out.append((loss.detach(), logits.grad.clone()))
        results[backend] = out
    for (l_t, g_t), (l_k, g_k) in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(l_k, l_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# unbiasedness
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scoring, floor", [("gradnorm", 0.0), ("gradnorm", 0.2), ("loss", 0.5)])
def test_mean_gradient_over_draws_is_the_plain_gradient(scoring, floor):
    logits, targets = inputs(B=2, T=10, V=7, seed=12, scale=3.0)
    V = logits.shape[-1]
    plain = logits.detach().clone().requires_grad_()
    F.cross_entropy(plain.reshape(-1, V), targets.reshape(-1)).backward()
    crit = CGGRLoss(scoring=scoring, selection="importance", min_tokens_ratio=0.25, importance_floor=floor, **FIXED)
    draws = 3000
    total = torch.zeros_like(logits, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for _ in range(draws):
        logits.grad = None
        crit(logits, targets).backward()
        g = logits.grad.double()
        total += g
        total_sq += g * g
    mean = total / draws
    se = ((total_sq / draws - mean * mean).clamp(min=0) / draws).sqrt()
    z = (mean - plain.grad.double()).abs() / (se + 1e-9)
    assert float(z.max()) < 5.0, float(z.max())
    # and the estimate is not trivially exact: the draws did vary
    assert float(se.max()) > 1e-4


def test_mean_gated_loss_of_a_hugging_face_model_is_the_plain_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    with torch.no_grad():  # confident on some tokens, unsure on others: scores that vary
        model.lm_head.weight.mul_(40)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = float(model(input_ids=ids, labels=ids).loss)
    cggr_hook.enable(
        model, scoring="loss", selection="importance", min_tokens_ratio=0.25, importance_floor=0.3, **FIXED
    )
    losses = torch.tensor([model(input_ids=ids, labels=ids).loss.item() for _ in range(600)], dtype=torch.float64)
    m = cggr_hook.metrics()
    assert m["selection"] == "importance" and m["score_cv2"] > 0.1
    se = float(losses.std() / math.sqrt(len(losses)))
    assert se > 0
    assert abs(float(losses.mean()) - plain) < 4.5 * se + 1e-6 * plain, (float(losses.mean()), plain, se)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gated_head_backward_over_the_drawn_rows_matches_the_logits_route(reduction):
    """Through ``enable`` the head's backward runs over the k drawn rows only; the same draw (same
    seed, step and call) through ``CGGRLoss`` on the logits gives the same loss and gradients."""
    from common import TinyLM

    torch.manual_seed(0)
    model = TinyLM(vocab=23, dim=8, bias=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # scores that vary, so the draw is far from uniform
    idx = torch.randint(0, 23, (3, 9), generator=torch.Generator().manual_seed(2))
    opts = dict(scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, importance_floor=0.1, **FIXED)

    def shifted(logits):
        V = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1), reduction=reduction)

    cggr_hook.enable(model, **opts)
    gated = shifted(model(idx))
    gated.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    cggr_hook.disable(model)
    model.zero_grad()
    logits = model(idx)
    crit = CGGRLoss(reduction=reduction, **opts)
    want = crit(logits[:, :-1], idx[:, 1:])
    want.backward()
    torch.testing.assert_close(gated, want, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert crit.get_metrics()["ess"] > 1


def test_the_draw_does_not_depend_on_how_near_ties_are_ordered():
    """Scores equal up to rounding (as two backends give them) can swap places in the difficulty
    order; the random order of the draw is keyed by row, so the same rows are drawn."""
    g = torch.Generator().manual_seed(0)
    n = 400
    base = torch.randint(0, 5, (n,), generator=g).float() + 1.0  # many exact ties
    nudged = base * (1 + 1e-6 * torch.rand(n, generator=g))  # the ties now break in another order
    cfg = cggr_hook.GateConfig(selection="importance")
    draws = []
    for diff in (base, nudged):
        prep = selection.rank_rows(diff, torch.ones(n, dtype=torch.bool), cfg, None)
        draws.append(selection.importance_draw(prep, diff, n, 100, 0.2, torch.Generator().manual_seed(7)).rows)
    orders = [selection.rank_rows(d, torch.ones(n, dtype=torch.bool), cfg, None).order for d in (base, nudged)]
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_infinite_loss_is_always_drawn(backend, monkeypatch):
    """A target whose logit is -inf has a bounded gradient norm but an infinite loss: it scores +inf
    and is kept with certainty, so the gated loss is infinite as the plain one is."""
    force_backend(backend)
    logits = torch.randn(1, 12, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 5, (1, 12), generator=torch.Generator().manual_seed(0))
    logits[0, 3, targets[0, 3]] = -math.inf
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.25, **FIXED)
    for _ in range(5):  # five different draws
        assert math.isinf(float(crit(logits, targets)))


@pytest.mark.parametrize("scoring", ["entropy", "margin"])
def test_a_zero_floor_with_a_score_that_can_be_zero_off_a_zero_gradient_is_refused(scoring):
    """A confidently wrong token scores 0 by entropy or margin: with no floor it could never be
    drawn, and the loss would be biased. Refused, naming the option and the fix."""
    with pytest.raises(ValueError, match="importance_floor.*gradnorm"):
        cggr_hook.GateConfig(selection="importance", scoring=scoring, importance_floor=0.0)
    cggr_hook.GateConfig(selection="topk", scoring=scoring, importance_floor=0.0)  # the floor is unused there
    cggr_hook.GateConfig(selection="importance", scoring=scoring, importance_floor=0.01)


def test_a_zero_floor_with_label_smoothing_needs_gradnorm():
    logits, targets = inputs(seed=3)
    for scoring in ("loss", "combined"):
        crit = CGGRLoss(
            scoring=scoring,
            selection="importance",
            importance_floor=0.0,
            min_tokens_ratio=0.5,
            label_smoothing=0.1,
            **FIXED,
        )
        with pytest.raises(ValueError, match="label_smoothing"):
            crit(logits, targets)
    CGGRLoss(
        scoring="gradnorm",
        selection="importance",
        importance_floor=0.0,
        min_tokens_ratio=0.5,
        label_smoothing=0.1,
        **FIXED,
    )(logits, targets)


def test_a_confidently_wrong_token_is_drawn_by_every_allowed_zero_floor_scoring():
    """The case behind the refusal: logits [200, 0, ...] with the target elsewhere. With the
    scorings allowed at floor 0 it is drawn, and the mean gated loss is the plain loss."""
    logits = torch.zeros(1, 8, 5)
    logits[0, :, 0] = torch.linspace(0.0, 1.0, 8)
    logits[0, 2, 0] = 200.0
    targets = torch.zeros(1, 8, dtype=torch.long)
    targets[0, 2] = 1
    plain = float(F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1)))
    for scoring in ("gradnorm", "loss", "combined"):
        crit = CGGRLoss(scoring=scoring, selection="importance", importance_floor=0.0, min_tokens_ratio=0.5, **FIXED)
        losses = torch.tensor([float(crit(logits, targets)) for _ in range(400)], dtype=torch.float64)
        se = float(losses.std()) / 20
        assert abs(float(losses.mean()) - plain) < 4 * se + 1e-4 * plain, (scoring, float(losses.mean()), plain, se)


# --------------------------------------------------------------------------------------------------
# at a fixed ratio: n and k counted on the device, nothing read on the host
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_fixed_ratio_reads_nothing_on_the_host_until_the_figures_are_asked_for(backend):
    """The call's figures stay on the device (n and k among them) until ``get_metrics()``; that no
    host synchronisation happens is checked on a GPU (tests/test_gpu.py)."""
    force_backend(backend)
    logits, targets = inputs(seed=11)
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, **FIXED)
    crit(logits, targets).backward()
    assert "tokens_total" not in crit._metrics and "_draw" in crit._metrics
    n = int((targets >= 0).sum())
    m = crit.get_metrics()
    k = cggr_hook.kernels.spec.keep_count(0.3, n)
    assert (m["tokens_total"], m["tokens_selected"]) == (n, k) and m["token_ratio"] == pytest.approx(k / n)
    assert m["ess"] > 1 and math.isfinite(m["avg_confidence"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_fixed_ratio_counts_its_targets_in_the_scoring_pass_and_copies_one_tensor(backend, monkeypatch):
    """No target count of its own (one launch fewer): n comes from the scoring pass's partial
    sums, whose one copy to the host serves the bad-target check and the metric averages."""
    from cggr_hook import pipeline

    force_backend(backend)
    logits, targets = inputs(seed=11)
    monkeypatch.setattr(
        cggr_hook.kernels, "target_counts", lambda *a: pytest.fail("target_counts launched at a fixed ratio")
    )
    copies = []
    real_init = pipeline.HostRead.__init__

    def counting_init(self, t, now=True):
        copies.append(now)
        real_init(self, t, now)

    monkeypatch.setattr(pipeline.HostRead, "__init__", counting_init)
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, **FIXED)
    crit(logits, targets).backward()
    assert copies == [True, False]  # the partial sums' copy; the draw's figures only marked
    assert crit.get_metrics()["tokens_total"] == int((targets >= 0).sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction, weighted", [("mean", False), ("mean", True), ("sum", False), ("none", True)])
def test_the_draw_at_a_ratio_is_the_draw_with_the_counts_read(backend, reduction, weighted, monkeypatch):
    """The same rows, loss and gradient whether n and k are counted on the device (the rows listed
    up to keep_count(ratio, N), the rest weighted zero) or read on the host first."""
    from cggr_hook import pipeline

    force_backend(backend)
    logits, targets = inputs(seed=12)
    V = logits.shape[-1]
    weight = torch.rand(V, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    opts = dict(scoring="gradnorm", selection="importance", min_tokens_ratio=0.35, reduction=reduction, weight=weight)
    out = []
    for device_k in (True, False):
        if not device_k:
            monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
        crit = CGGRLoss(**opts, **FIXED)
        logits.grad = None
        loss = crit(logits, targets)
        (loss * (torch.arange(loss.numel()).reshape(loss.shape) % 3 + 1)).sum().backward()
        out.append((loss.detach(), logits.grad.clone(), crit.get_metrics()))
    (l_dev, g_dev, m_dev), (l_host, g_host, m_host) = out
    torch.testing.assert_close(l_dev, l_host, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_dev, g_host, rtol=1e-6, atol=1e-7)
    for key in ("tokens_total", "tokens_selected", "token_ratio", "ess", "max_weight", "avg_confidence"):
        assert m_dev[key] == pytest.approx(m_host[key], rel=1e-9), key


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_target_at_a_ratio_gives_torchs_loss_and_no_gradient(backend, reduction):
    force_backend(backend)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.full((2, 5), -100)
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.25, reduction=reduction, **FIXED)
    loss = crit(logits, targets)
    want = F.cross_entropy(logits.detach().reshape(-1, 11), targets.reshape(-1), reduction=reduction)
    torch.testing.assert_close(loss.reshape(want.shape), want, equal_nan=True)
    loss.sum().backward()
    assert bool((logits.grad == 0).all())
    m = crit.get_metrics()
    assert (m["tokens_total"], m["tokens_selected"], m["token_ratio"]) == (0, 0, 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_bad_target_at_a_ratio_raises_at_a_later_call_where_its_counts_were_not_in(backend, monkeypatch):
    """Where the call's counts are already in (on a CPU, always), the call itself raises, as every
    other gated call does; where they are still on their way (a busy GPU: here, ``done`` says no),
    the call goes on, counting the bad target as ignored, and the next gated call,
    ``get_metrics()`` or ``disable()`` raises the ValueError that names it, once for each such call."""
    from cggr_hook import pipeline

    force_backend(backend)
    logits, targets = inputs(seed=13)
    bad = targets.clone()
    bad[0, 0] = logits.shape[-1] + 4
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, **FIXED)
    with pytest.raises(ValueError, match=r"cggr_hook: target has 1 value\(s\) outside \[0, 13\)"):
        crit(logits, bad)
    monkeypatch.setattr(pipeline.HostRead, "done", lambda self: False)
    loss = crit(logits, bad)  # not checked yet
    loss.backward()
    assert bool(logits.grad[0, 0].eq(0).all()), "the bad target's row has a gradient"
    with pytest.raises(ValueError, match=r"earlier gated call's target had 1 value\(s\) outside \[0, 13\)"):
        crit.get_metrics()
    assert not pipeline.PendingTargetCheck._pending
    crit(logits, bad)
    crit(logits, bad)  # two bad calls in flight: two errors
    monkeypatch.undo()
    force_backend(backend)
    for _ in range(2):
        with pytest.raises(ValueError, match="earlier gated call's target"):
            crit(logits, targets)  # the next call finds the counts in
    assert not pipeline.PendingTargetCheck._pending
    crit(logits, targets)  # and goes on once reported


def test_a_bad_target_left_pending_raises_at_disable_after_the_gates_are_removed(monkeypatch):
    from cggr_hook import pipeline

    from common import TinyLM

    model = TinyLM(vocab=13, dim=8)
    idx = torch.randint(0, 13, (2, 6))
    bad = idx.clone()
    bad[1, 3] = 40
    original = F.cross_entropy
    cggr_hook.enable(model, scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, **FIXED)
    monkeypatch.setattr(pipeline.HostRead, "done", lambda self: False)
    F.cross_entropy(model(idx).reshape(-1, 13), bad.reshape(-1))
    with pytest.raises(ValueError, match="earlier gated call's target"):
        cggr_hook.disable(model)
    assert F.cross_entropy is original and cggr_hook.registry.gate_of(model) is None
    assert not pipeline.PendingTargetCheck._pending


def test_an_exception_leaving_a_gates_block_is_not_replaced_by_a_pending_target_check(monkeypatch):
    from cggr_hook import pipeline

    from common import TinyLM

    model = TinyLM(vocab=13, dim=8)
    idx = torch.randint(0, 13, (2, 6))
    bad = idx.clone()
    bad[0, 2] = -7
    original = F.cross_entropy
    monkeypatch.setattr(pipeline.HostRead, "done", lambda self: False)
    with pytest.raises(RuntimeError, match="the user's own error"):
        with cggr_hook.enable(model, scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, **FIXED):
            F.cross_entropy(model(idx).reshape(-1, 13), bad.reshape(-1))
            raise RuntimeError("the user's own error")
    assert F.cross_entropy is original and cggr_hook.registry.gate_of(model) is None
    with pytest.raises(ValueError, match="earlier gated call's target"):  # still reported, later
        cggr_hook.disable()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_listed_past_the_draw_get_no_gradient_whatever_the_upstream_gradient(backend):
    """The head route lists keep_count(ratio, N) rows, those past the k drawn weighted zero: an
    infinite upstream gradient on them (their loss is an exact 0 under 'none') must not reach the
    head's gradients, as it does not on the logits' route."""
    from common import TinyLM

    force_backend(backend)
    torch.manual_seed(0)
    model = TinyLM(vocab=13, dim=8)
    idx = torch.randint(0, 13, (2, 40), generator=torch.Generator().manual_seed(1))
    t = idx[:, 1:].reshape(-1).clone()
    t[::2] = -100
    cggr_hook.enable(model, scoring="gradnorm", selection="importance", min_tokens_ratio=0.3, **FIXED)
    loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 13), t, reduction="none")
    go = torch.ones_like(loss)
    go[loss == 0] = float("inf")
    loss.backward(go)
    for n, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
