"""Selection on hand-made difficulty vectors: topk, stratified and sequence_aware, through
selection.rank_rows / count_selected / choose_rows, against expectations computed in plain Python."""

import math
from fractions import Fraction

import pytest
import torch

from cggr_hook import GateConfig, selection
from cggr_hook.kernels import spec as kernels_spec

from common import count_target_counts

NEG_INF = -math.inf


def make_inputs(n, n_ignored=0, levels=None, seed=0):
    """Difficulties (fp32, -inf where ignored) and the valid mask; ``levels`` draws integer values
    from range(levels) so many rows tie."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        diff = torch.randint(0, levels, (n,), generator=g).float()
    else:
        diff = torch.rand(n, generator=g) * 3
    valid = torch.ones(n, dtype=torch.bool)
    if n_ignored:
        valid[torch.randperm(n, generator=g)[:n_ignored]] = False
    diff = torch.where(valid, diff, torch.full_like(diff, NEG_INF))
    return diff, valid


def hardest_first(diff, valid, rows=None):
    """Valid rows (of ``rows``, default all) by difficulty, hardest first, ties by lower index."""
    d = diff.tolist()
    v = valid.tolist()
    rows = range(len(d)) if rows is None else rows
    return sorted((i for i in rows if v[i]), key=lambda i: (-d[i], i))


def run(diff, valid, config, k, seq_len=None, generator=None):
    prep = selection.rank_rows(diff, valid, config, seq_len)
    n_valid = int(valid.sum())
    keep_ranks = prep.keep_ranks.tolist() if prep.keep_ranks is not None else None
    n_sel = selection.count_selected(config, k, diff.numel(), keep_ranks)
    rows = selection.choose_rows(prep, n_valid, k, n_sel, config, generator)
    assert rows.dtype == torch.int64
    assert rows.dim() == 1 and rows.numel() == n_sel
    r = rows.tolist()
    assert r == sorted(r) and len(set(r)) == len(r), "rows must be ascending and distinct"
    return r, n_sel


def k_values(n_valid):
    return sorted(k for k in {1, 2, n_valid // 3, n_valid // 2, n_valid - 1, n_valid} if 0 < k <= n_valid)


# --------------------------------------------------------------------------------------------------
# topk
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, n_ignored", [(1, 0), (7, 0), (13, 4), (31, 10), (64, 0), (97, 33)])
def test_topk_takes_exactly_the_k_hardest(n, n_ignored):
    torch.manual_seed(n)
    diff, valid = make_inputs(n, n_ignored, seed=n)
    cfg = GateConfig(selection="topk")
    n_valid = n - n_ignored
    for k in k_values(n_valid):
        rows, n_sel = run(diff, valid, cfg, k)
        assert n_sel == k
        assert rows == sorted(hardest_first(diff, valid)[:k])


@pytest.mark.parametrize("n, levels", [(9, 1), (17, 2), (40, 3), (101, 4)])
def test_topk_breaks_ties_by_lower_index(n, levels):
    diff, valid = make_inputs(n, levels=levels, seed=levels)
    cfg = GateConfig(selection="topk")
    for k in range(1, n + 1):
        rows, _ = run(diff, valid, cfg, k)
        assert rows == sorted(hardest_first(diff, valid)[:k]), k


def test_topk_all_equal_takes_the_first_rows():
    diff = torch.full((11,), 0.5)
    valid = torch.ones(11, dtype=torch.bool)
    for k in (1, 4, 11):
        rows, _ = run(diff, valid, GateConfig(selection="topk"), k)
        assert rows == list(range(k))


@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware"])
@pytest.mark.parametrize("n, n_ignored", [(5, 2), (23, 9), (50, 49)])
def test_ignored_rows_are_never_selected_even_at_k_equal_n_valid(selection, n, n_ignored):
    diff, valid = make_inputs(n, n_ignored, seed=7)
    cfg = GateConfig(selection=selection)
    n_valid = n - n_ignored
    rows, n_sel = run(diff, valid, cfg, n_valid, seq_len=5, generator=torch.Generator().manual_seed(1))
    assert rows == [i for i in range(n) if valid[i]]
    for k in k_values(n_valid):
        rows, _ = run(diff, valid, cfg, k, seq_len=5, generator=torch.Generator().manual_seed(1))
        assert all(valid[i] for i in rows)


@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware"])
def test_k_zero_selects_nothing(selection):
    diff, valid = make_inputs(6, 6)
    rows, n_sel = run(
        diff, valid, GateConfig(selection=selection), 0, seq_len=3, generator=torch.Generator().manual_seed(0)
    )
    assert rows == [] and n_sel == 0


# --------------------------------------------------------------------------------------------------
# stratified: sizes and quotas
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 16, 33, 101])
@pytest.mark.parametrize("S", [1, 2, 3, 4, 7])
def test_strata_sizes_are_equal_count_larger_first(n, S):
    sizes = selection.strata_sizes(n, S)
    assert len(sizes) == min(S, n)
    assert sum(sizes) == n
    assert all(s in (n // len(sizes), n // len(sizes) + 1) for s in sizes)
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n", [1, 3, 8, 12, 17, 40, 63, 100])
@pytest.mark.parametrize("S", [1, 2, 3, 4, 5])
def test_strata_quotas_sum_to_k_and_fit_their_buckets(n, S):
    sizes = selection.strata_sizes(n, S)
    for k in range(0, n + 1):
        q = selection.strata_quotas(n, k, S)
        assert len(q) == len(sizes)
        assert sum(q) == k, (n, k, S, q)
        assert all(0 <= qb <= sb for qb, sb in zip(q, sizes)), (n, k, S, q, sizes)


@pytest.mark.parametrize("S", [2, 3, 4, 6])
@pytest.mark.parametrize("per_bucket", [1, 2, 5, 9])
def test_strata_quotas_are_non_increasing_for_equal_buckets(S, per_bucket):
    n = S * per_bucket
    for k in range(0, n + 1):
        q = selection.strata_quotas(n, k, S)
        assert q == sorted(q, reverse=True), (n, k, S, q)


def test_harder_bucket_gives_more_when_uncapped():
    # 4 buckets of 25: weights 4:3:2:1 of k = 40 -> 16, 12, 8, 4
    assert selection.strata_quotas(100, 40, 4) == [16, 12, 8, 4]
    # 3 buckets of 10, k = 12: weights 3:2:1 -> 6, 4, 2
    assert selection.strata_quotas(30, 12, 3) == [6, 4, 2]


def test_full_buckets_pass_their_share_to_easier_ones():
    # 4 buckets of 5, k = 18: the hardest buckets fill up, the rest goes to the easier ones
    q = selection.strata_quotas(20, 18, 4)
    assert sum(q) == 18 and q[0] == 5 and q[1] == 5
    assert selection.strata_quotas(20, 20, 4) == [5, 5, 5, 5]


def largest_remainder(n, k, S):
    """Hamilton apportionment of k over the buckets in proportion to (S - b) * size, remainders
    largest first, ties to the harder bucket (valid where no bucket's share reaches its size)."""
    sizes = selection.strata_sizes(n, S)
    S = len(sizes)
    w = [(S - b) * sizes[b] for b in range(S)]
    shares = [Fraction(k * wb, sum(w)) for wb in w]
    q = [math.floor(s) for s in shares]
    for b in sorted(range(S), key=lambda b: (-(shares[b] - q[b]), b))[: k - sum(q)]:
        q[b] += 1
    return q, shares, sizes


@pytest.mark.parametrize(
    "n, k, S, expected",
    [
        (40, 9, 4, [3, 3, 2, 1]),
        (6, 2, 3, [1, 1, 0]),
        (9, 4, 3, [2, 1, 1]),
        (50, 5, 5, [2, 1, 1, 1, 0]),
    ],
    ids=["n40-k9-S4", "n6-k2-S3", "n9-k4-S3", "n50-k5-S5"],
)
def test_strata_quotas_are_the_largest_remainder_apportionment(n, k, S, expected):
    q, shares, _ = largest_remainder(n, k, S)
    assert q == expected  # the expectation above, checked against the independent rule
    got = selection.strata_quotas(n, k, S)
    assert got == expected
    assert all(abs(g - s) < 1 for g, s in zip(got, shares))


def test_strata_quotas_match_largest_remainder_where_it_is_unambiguous():
    # cases where the package's rule and largest remainder agree: each quota within 1 of its share
    for n, k, S in [(100, 40, 4), (30, 12, 3), (20, 10, 2), (7, 7, 1), (12, 6, 3)]:
        q, shares, sizes = largest_remainder(n, k, S)
        assert selection.strata_quotas(n, k, S) == q


# --------------------------------------------------------------------------------------------------
# stratified: the draw
# --------------------------------------------------------------------------------------------------
def per_bucket_counts(diff, valid, rows, S):
    ordered = hardest_first(diff, valid)
    sizes = selection.strata_sizes(len(ordered), S)
    bucket_of = {}
    pos = 0
    for b, size in enumerate(sizes):
        for i in ordered[pos : pos + size]:
            bucket_of[i] = b
        pos += size
    counts = [0] * len(sizes)
    for r in rows:
        counts[bucket_of[r]] += 1
    return counts


@pytest.mark.parametrize("n, n_ignored, S", [(13, 0, 4), (29, 6, 3), (64, 11, 4), (101, 0, 5), (57, 20, 7)])
def test_stratified_draws_each_bucket_its_quota(n, n_ignored, S):
    diff, valid = make_inputs(n, n_ignored, seed=n)
    cfg = GateConfig(selection="stratified", num_strata=S)
    n_valid = n - n_ignored
    for k in k_values(n_valid):
        rows, n_sel = run(diff, valid, cfg, k, generator=torch.Generator().manual_seed(k))
        assert n_sel == k and len(rows) == k
        assert all(valid[i] for i in rows)
        assert per_bucket_counts(diff, valid, rows, S) == selection.strata_quotas(n_valid, k, S)


def test_stratified_buckets_follow_the_tie_broken_order():
    # ties everywhere: the bucket of a row is its position in the stable descending order
    diff, valid = make_inputs(41, 5, levels=3, seed=4)
    cfg = GateConfig(selection="stratified", num_strata=4)
    for k in (3, 10, 20, 35):
        rows, _ = run(diff, valid, cfg, k, generator=torch.Generator().manual_seed(k))
        assert per_bucket_counts(diff, valid, rows, 4) == selection.strata_quotas(36, k, 4)


def test_stratified_draw_is_reproducible_with_the_seed_and_varies_with_it():
    diff, valid = make_inputs(200, 17, seed=9)
    cfg = GateConfig(selection="stratified", num_strata=4)
    k = 50

    def draw(seed):
        return run(diff, valid, cfg, k, generator=torch.Generator().manual_seed(seed))[0]

    a, b = draw(123), draw(123)
    assert a == b
    others = {tuple(draw(s)) for s in (124, 125, 126)}
    assert tuple(a) not in others
    assert len(others) == 3
    # and it is a sample, not the top k
    assert a != sorted(hardest_first(diff, valid)[:k])


def test_stratified_samples_inside_buckets_uniformly_enough():
    # over many draws every row of a bucket with a partial quota gets picked sometimes
    diff, valid = make_inputs(24, 0, seed=5)
    cfg = GateConfig(selection="stratified", num_strata=3)
    seen = set()
    for s in range(60):
        seen.update(run(diff, valid, cfg, 6, generator=torch.Generator().manual_seed(s))[0])
    quotas = selection.strata_quotas(24, 6, 3)
    ordered = hardest_first(diff, valid)
    for b, q in enumerate(quotas):
        bucket = set(ordered[8 * b : 8 * (b + 1)])
        if q:
            assert bucket <= seen, b
        else:
            assert not (bucket & seen), b


# --------------------------------------------------------------------------------------------------
# sequence_aware
# --------------------------------------------------------------------------------------------------
def seq_aware_expected(diff, valid, k, m, L):
    n = diff.numel()
    L = L or n
    chosen = set(hardest_first(diff, valid)[:k])
    for start in range(0, n, L):
        chosen.update(hardest_first(diff, valid, range(start, min(n, start + L)))[:m])
    return sorted(chosen)


@pytest.mark.parametrize(
    "n, L, n_ignored", [(15, 5, 0), (21, 7, 6), (23, 5, 4), (60, 12, 20), (9, 1, 3), (11, None, 2)]
)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_sequence_aware_is_topk_plus_each_sequences_hardest(n, L, n_ignored, m):
    diff, valid = make_inputs(n, n_ignored, seed=n + m)
    cfg = GateConfig(selection="sequence_aware", min_tokens_per_sequence=m)
    n_valid = n - n_ignored
    for k in k_values(n_valid):
        rows, n_sel = run(diff, valid, cfg, k, seq_len=L)
        want = seq_aware_expected(diff, valid, k, m, L)
        assert rows == want, (k, m)
        assert n_sel == len(want)


def test_sequence_aware_with_ties_keeps_the_lowest_index_rows():
    diff, valid = make_inputs(30, 4, levels=2, seed=3)
    cfg = GateConfig(selection="sequence_aware", min_tokens_per_sequence=2)
    for k in (1, 5, 13):
        rows, n_sel = run(diff, valid, cfg, k, seq_len=6)
        assert rows == seq_aware_expected(diff, valid, k, 2, 6)


def test_sequence_aware_keeps_easy_sequences_that_topk_misses():
    # sequence 0 is hard, sequence 1 easy: topk alone would take only sequence 0
    diff = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.1, 0.3, 0.2, 0.05])
    valid = torch.ones(8, dtype=torch.bool)
    cfg = GateConfig(selection="sequence_aware", min_tokens_per_sequence=1)
    rows, n_sel = run(diff, valid, cfg, 2, seq_len=4)
    assert rows == [0, 1, 5] and n_sel == 3
    rows, n_sel = run(diff, valid, cfg.replace(min_tokens_per_sequence=2), 2, seq_len=4)
    assert rows == [0, 1, 5, 6] and n_sel == 4


def test_sequence_without_valid_rows_contributes_nothing():
    g = torch.Generator().manual_seed(11)
    L, n_seq = 5, 4
    diff = torch.rand(L * n_seq, generator=g)
    valid = torch.ones(L * n_seq, dtype=torch.bool)
    valid[L : 2 * L] = False  # sequence 1 is all padding
    valid[3 * L + 1 :] = False  # sequence 3 has one valid row
    diff = torch.where(valid, diff, torch.full_like(diff, NEG_INF))
    cfg = GateConfig(selection="sequence_aware", min_tokens_per_sequence=2)
    for k in (1, 3, 6):
        rows, n_sel = run(diff, valid, cfg, k, seq_len=L)
        assert not any(L <= r < 2 * L for r in rows)
        assert 3 * L in rows
        assert rows == seq_aware_expected(diff, valid, k, 2, L)
        assert n_sel == len(rows)


@pytest.mark.parametrize("n, L", [(12, 4), (25, 5), (17, 3)])
def test_sequence_aware_with_m_zero_equals_topk(n, L):
    diff, valid = make_inputs(n, 3, seed=n)
    seq_cfg = GateConfig(selection="sequence_aware", min_tokens_per_sequence=0)
    for k in k_values(n - 3):
        rows, n_sel = run(diff, valid, seq_cfg, k, seq_len=L)
        assert n_sel == k
        assert rows == sorted(hardest_first(diff, valid)[:k])


def test_count_selected_for_other_selections_is_k():
    for sel in ("topk", "stratified"):
        assert selection.count_selected(GateConfig(selection=sel), 7, 20, None) == 7
    cfg = GateConfig(selection="sequence_aware")
    # kept ranks below k are already in the top k; n_rows is padding
    assert selection.count_selected(cfg, 3, 10, [0, 2, 3, 9, 10, 10]) == 3 + 2


@pytest.mark.parametrize("selection_name", ["topk", "stratified", "importance"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_row_kept_needs_no_difficulty_order(monkeypatch, selection_name, backend):
    """At a fixed ratio of 1.0 (the default) the gate keeps every valid row whatever the batch, so
    it computes no difficulty order (a launch up to 8192 rows, a sort and a scatter past that): the loss
    and gradients are the plain ones, through the logits and through the head's narrowed backward
    (its rows: the valid ones ascending); below 1.0 the order is computed."""
    import torch.nn.functional as F

    import cggr_hook
    from cggr_hook import kernels

    from common import DEVICE, TinyLM

    kernels.force_backend(backend)
    calls = []
    real = kernels.difficulty_rank
    monkeypatch.setattr(kernels, "difficulty_rank", lambda d: calls.append(d.numel()) or real(d))
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 11, 29, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 29, (3, 11), generator=g)
    targets[0, :4] = -100
    targets[2, 7] = -100
    targets = targets.to(DEVICE)
    opts = dict(scoring="gradnorm", selection=selection_name, warmup_steps=0, dynamic_threshold=False)
    loss = cggr_hook.CGGRLoss(min_tokens_ratio=1.0, **opts)(logits, targets)
    loss.backward()
    ref = logits.detach().clone().requires_grad_()
    plain = F.cross_entropy(ref.reshape(-1, 29), targets.reshape(-1))
    plain.backward()
    assert calls == []
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    model = TinyLM(vocab=29, dim=8).to(DEVICE)
    twin = TinyLM(vocab=29, dim=8).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    idx = torch.randint(0, 29, (3, 12), generator=g).to(DEVICE)
    cggr_hook.enable(model, min_tokens_ratio=1.0, **opts)
    try:
        F.cross_entropy(model(idx)[:, :-1].reshape(-1, 29), idx[:, 1:].reshape(-1)).backward()
    finally:
        cggr_hook.disable(model)
    F.cross_entropy(twin(idx)[:, :-1].reshape(-1, 29), idx[:, 1:].reshape(-1)).backward()
    assert calls == []
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)

    cggr_hook.CGGRLoss(min_tokens_ratio=0.5, **opts)(logits, targets)
    assert calls == [33]


def test_cggrloss_auto_plain_candidate_keeps_every_row_without_an_order(monkeypatch):
    """CGGRLoss has no plain path: under min_tokens_ratio='auto' its plain candidate runs as every
    token through the gate, and needs no difficulty order either (else its steps, timed for the
    plain candidate, would carry work the plain loss does not)."""
    import cggr_hook
    from cggr_hook import auto, kernels

    calls = []
    real = kernels.difficulty_rank
    monkeypatch.setattr(kernels, "difficulty_rank", lambda d: calls.append(d.numel()) or real(d))
    crit = cggr_hook.CGGRLoss(min_tokens_ratio="auto")
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    seen = []
    for _ in range(auto.PROBE_STEPS * 2):  # 1.0's steps, then the plain candidate's
        seen.append(crit.scheduler.auto_state("loss").candidate())
        crit(logits, targets)
        crit.step()
    assert seen == [1.0] * auto.PROBE_STEPS + [auto.PLAIN] * auto.PROBE_STEPS
    assert calls == []


# --------------------------------------------------------------------------------------------------
# top-k at a fixed ratio: n and k counted on the device, nothing read on the host
# --------------------------------------------------------------------------------------------------
FIXED = dict(warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)


def _topk_inputs(seed, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 11, 13, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, 13, (3, 11), generator=g)
    targets[torch.rand(3, 11, generator=g) < 0.25] = -100
    if all_ignored:
        targets[:] = -100
    return logits, targets


AT_RATIO = [
    dict(selection="topk"),
    dict(selection="stratified"),
    dict(selection="stratified", num_strata=7),
    dict(selection="sequence_aware", min_tokens_per_sequence=4),  # (more than the top k holds)
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "reduction, weighted, smoothing",
    [("mean", False, 0.0), ("mean", True, 0.1), ("sum", False, 0.0), ("none", True, 0.0)],
)
@pytest.mark.parametrize("chosen", AT_RATIO, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_selection_at_a_ratio_is_the_selection_with_the_counts_read(
    backend, reduction, weighted, smoothing, chosen, monkeypatch
):
    """The same loss, gradient and figures whether top-k's, stratified's or sequence_aware's n and
    k are counted on the device or read on the host first; on the device path no target count is
    launched and nothing is read until the figures are asked for (the scoring pass's partial sums,
    and sequence_aware's count of its selection)."""
    import cggr_hook
    from cggr_hook import kernels, pipeline

    kernels.force_backend(backend)
    logits, targets = _topk_inputs(seed=5)
    V = logits.shape[-1]
    weight = torch.rand(V, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    opts = dict(min_tokens_ratio=0.35, reduction=reduction, weight=weight, label_smoothing=smoothing, **FIXED)
    out = []
    counted = count_target_counts(monkeypatch)
    for device_k in (True, False):
        counted.clear()
        if not device_k:
            monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
        crit = cggr_hook.CGGRLoss(scoring="combined", **chosen, **opts)
        logits.grad = None
        loss = crit(logits, targets)
        (loss * (torch.arange(loss.numel()).reshape(loss.shape) % 3 + 1)).sum().backward()
        if device_k:
            assert counted == [] and "tokens_total" not in crit._metrics and "_sums" in crit._metrics
        else:  # (sequence_aware's read path reads the scoring pass's sums with its kept ranks instead)
            assert counted == ([] if chosen["selection"] == "sequence_aware" else [1])
        out.append((loss.detach(), logits.grad.clone(), crit.get_metrics()))
    (l_dev, g_dev, m_dev), (l_host, g_host, m_host) = out
    torch.testing.assert_close(l_dev, l_host, rtol=0, atol=0)
    torch.testing.assert_close(g_dev, g_host, rtol=0, atol=0)
    n = int((targets >= 0).sum())
    k = cggr_hook.kernels.spec.keep_count(0.35, n)
    if chosen["selection"] == "sequence_aware":  # the top k and the 4 hardest rows of each of 3 sequences
        k_top, k = k, int((g_dev.reshape(-1, V) != 0).any(-1).sum())
        assert k_top < k <= k_top + 3 * 4
    assert (m_dev["tokens_total"], m_dev["tokens_selected"]) == (n, k) and m_dev["token_ratio"] == k / n
    for key in ("tokens_total", "tokens_selected", "token_ratio", "avg_confidence", "avg_entropy", "avg_difficulty"):
        assert m_dev[key] == pytest.approx(m_host[key], rel=1e-12), key
    assert "_keep_ratio" not in m_dev and "_selected" not in m_dev


DYNAMIC = dict(warmup_steps=0, dynamic_threshold=True, threshold_sensitivity=0.5, plain_when_faster=False)


def _dynamic_batches(calls: int):
    """Batches of varying confidence (the logits' scale grows), a quarter of the targets ignored,
    the last but one with none valid: the dynamic ratio moves from call to call."""
    out = []
    for i in range(calls):
        g = torch.Generator().manual_seed(40 + i)
        logits = (torch.randn(3, 11, 13, generator=g) * (0.5 + i)).requires_grad_()
        targets = torch.randint(0, 13, (3, 11), generator=g)
        targets[torch.rand(3, 11, generator=g) < 0.25] = -100
        if i == calls - 2:
            targets[:] = -100
        out.append((logits, targets))
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])  # (the ratio does not meet the reduction)
@pytest.mark.parametrize(
    "chosen", [*AT_RATIO, dict(selection="importance")], ids=lambda o: "-".join(str(v) for v in o.values())
)
def test_the_dynamic_threshold_on_the_device_is_the_read_path(backend, reduction, chosen, monkeypatch):
    """With the dynamic threshold, a selection at a ratio computes the batch's ratio from its
    confidence on the device (``kernels.dynamic_ratio``): no target count launched, nothing read
    until the figures are asked for, and call after call the same ratio, loss, gradient, figures
    and running confidence as the path that reads the scoring pass's sums first."""
    import cggr_hook
    from cggr_hook import kernels, pipeline

    kernels.force_backend(backend)
    counted = count_target_counts(monkeypatch)
    runs = []
    for device_k in (True, False):
        if not device_k:
            monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
        crit = cggr_hook.CGGRLoss(scoring="combined", min_tokens_ratio=0.3, reduction=reduction, **chosen, **DYNAMIC)
        calls = []
        for logits, targets in _dynamic_batches(6):
            logits.grad = None
            loss = crit(logits, targets)
            if device_k:
                assert "tokens_total" not in crit._metrics and ("_sums" in crit._metrics or "_draw" in crit._metrics)
            loss.sum().backward()
            calls.append((loss.detach(), logits.grad.clone(), crit.get_metrics()))
        runs.append((calls, crit.scheduler.state_dict()["confidence_avg"]))
    assert counted == []  # (the read path reads the scoring pass's sums, no counts of its own)
    (dev, avg_dev), (host, avg_host) = runs
    assert avg_dev == avg_host and len(avg_dev) == 1
    ratios = set()
    for (l_d, g_d, m_d), (l_h, g_h, m_h) in zip(dev, host):
        exact = chosen["selection"] != "importance"  # (importance's mean: the same sum in another order)
        torch.testing.assert_close(l_d, l_h, rtol=0 if exact else 1e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(g_d, g_h, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
        for key in ("tokens_total", "tokens_selected", "token_ratio", "avg_confidence"):
            assert m_d[key] == pytest.approx(m_h[key], rel=1e-12, nan_ok=True), key
        ratios.add(m_h["token_ratio"])
    assert len(ratios) >= 3, "the batches did not move the ratio"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_call_with_a_bad_target_leaves_the_running_confidence_on_either_path(backend, monkeypatch):
    """A call whose targets hold a value outside the vocabulary raises and moves nothing: the
    next call selects as it would have, on the device path as on the read path."""
    import cggr_hook
    from cggr_hook import kernels, pipeline

    kernels.force_backend(backend)
    (l0, t0), (l1, t1), (l2, t2) = _dynamic_batches(3)
    bad = t1.clone()
    bad[0, 0] = 13 + 2
    out = []
    for device_k in (True, False):
        if not device_k:
            monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
        crit = cggr_hook.CGGRLoss(selection="topk", min_tokens_ratio=0.3, **DYNAMIC)
        crit(l0, t0)
        before = crit.scheduler.confidence_avg
        with pytest.raises(ValueError, match="outside"):
            crit(l1, bad)
        assert crit.scheduler.confidence_avg == before
        crit(l2, t2)
        out.append((crit.get_metrics()["tokens_selected"], crit.scheduler.confidence_avg))
    assert out[0] == out[1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_running_confidence_moves_between_the_paths_and_into_checkpoints(backend, monkeypatch):
    """A gate whose calls take the device path, then the read path (the ratio read on the host),
    then the device path again keeps one running confidence: every call's selection and the
    final average are those of a run that read every call; ``state_dict`` and a pickled copy
    carry the device's average as a float, and a loaded state starts the device path from it."""
    import pickle

    import cggr_hook
    from cggr_hook import kernels, pipeline

    kernels.force_backend(backend)
    batches = _dynamic_batches(7)
    real_at_ratio = pipeline.at_ratio

    def run(paths):
        crit = cggr_hook.CGGRLoss(selection="topk", min_tokens_ratio=0.3, **DYNAMIC)
        out = []
        for (logits, targets), path in zip(batches, paths):
            monkeypatch.setattr(pipeline, "at_ratio", real_at_ratio if path == "d" else (lambda *a: False))
            crit(logits, targets)
            out.append(crit.get_metrics()["tokens_selected"])
        return crit, out

    mixed, sel_mixed = run("ddrrddd")
    read, sel_read = run("rrrrrrr")
    assert sel_mixed == sel_read
    assert mixed.scheduler._confidence_dev  # the last calls' average is on the device
    state = mixed.scheduler.state_dict()
    assert state["confidence_avg"] == read.scheduler.state_dict()["confidence_avg"]
    copy = pickle.loads(pickle.dumps(mixed.scheduler))
    assert copy.confidence_avg == state["confidence_avg"] and copy._confidence_dev == {}
    # resumed from the checkpoint, the device path goes on from the same average
    monkeypatch.setattr(pipeline, "at_ratio", real_at_ratio)
    resumed = cggr_hook.CGGRLoss(selection="topk", min_tokens_ratio=0.3, **DYNAMIC)
    resumed.scheduler.load_state_dict(state)
    monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
    read.scheduler.load_state_dict(state)
    logits, targets = batches[2]
    monkeypatch.setattr(pipeline, "at_ratio", real_at_ratio)
    resumed(logits, targets)
    monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
    read(logits, targets)
    assert resumed.get_metrics()["tokens_selected"] == read.get_metrics()["tokens_selected"]
    assert resumed.scheduler.state_dict()["confidence_avg"] == read.scheduler.state_dict()["confidence_avg"]


@pytest.mark.parametrize("num_strata, reads", [(kernels_spec.MAX_STRATA, False), (kernels_spec.MAX_STRATA + 1, True)])
def test_stratified_past_max_strata_reads_the_counts(num_strata, reads, monkeypatch):
    """Up to ``spec.MAX_STRATA`` buckets the quotas are computed on the device (no target count
    launched, nothing read); past it the call reads n on the host, and gives the same loss."""
    import cggr_hook
    from cggr_hook import kernels, pipeline

    kernels.force_backend("torch")
    logits, targets = _topk_inputs(seed=8)
    counted = count_target_counts(monkeypatch)
    opts = dict(selection="stratified", num_strata=num_strata, min_tokens_ratio=0.4, **FIXED)
    loss = cggr_hook.CGGRLoss(**opts)(logits, targets)
    assert counted == ([1] if reads else [])
    monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
    torch.testing.assert_close(loss, cggr_hook.CGGRLoss(**opts)(logits, targets), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware"])
def test_selection_at_a_ratio_with_no_valid_target_gives_torchs_loss_and_no_gradient(backend, reduction, selection):
    import torch.nn.functional as F

    import cggr_hook
    from cggr_hook import kernels

    kernels.force_backend(backend)
    logits, targets = _topk_inputs(seed=6, all_ignored=True)
    crit = cggr_hook.CGGRLoss(selection=selection, min_tokens_ratio=0.25, reduction=reduction, **FIXED)
    loss = crit(logits, targets)
    want = F.cross_entropy(logits.detach().reshape(-1, 13), targets.reshape(-1), reduction=reduction)
    torch.testing.assert_close(loss.reshape(want.shape), want, equal_nan=True)
    loss.sum().backward()
    assert bool((logits.grad == 0).all())
    m = crit.get_metrics()
    assert (m["tokens_total"], m["tokens_selected"], m["token_ratio"]) == (0, 0, 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_at_a_ratio_checks_the_targets(backend, monkeypatch):
    """On a CPU the copy is in at once: the call itself raises; where it is still on its way, the
    next gated call raises the error that names the earlier call's bad target."""
    import cggr_hook
    from cggr_hook import kernels, pipeline

    kernels.force_backend(backend)
    logits, targets = _topk_inputs(seed=7)
    bad = targets.clone()
    bad[1, 2] = 13 + 3
    crit = cggr_hook.CGGRLoss(selection="topk", min_tokens_ratio=0.3, **FIXED)
    with pytest.raises(ValueError, match=r"cggr_hook: target has 1 value\(s\) outside \[0, 13\)"):
        crit(logits, bad)
    monkeypatch.setattr(pipeline.HostRead, "done", lambda self: False)
    crit(logits, bad).backward()
    assert bool(logits.grad[1, 2].eq(0).all()), "the bad target's row has a gradient"
    monkeypatch.undo()
    kernels.force_backend(backend)
    with pytest.raises(ValueError, match=r"earlier gated call's target had 1 value\(s\) outside \[0, 13\)"):
        crit(logits, targets)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware"])
def test_selection_at_a_ratio_through_the_head_matches_the_host_count(backend, reduction, selection, monkeypatch):
    """The head's narrowed backward over the first keep_count(ratio, N) rows of the order (an upper
    bound of k; the rows past it scaled by 0; stratified's drawn rows first; sequence_aware's
    kept rows first, over min_tokens_per_sequence more rows a sequence) gives the gradients of the
    host-count path."""
    import torch.nn.functional as F

    import cggr_hook
    from cggr_hook import kernels, pipeline

    from common import TinyLM

    kernels.force_backend(backend)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 29, (3, 12), generator=g)
    labels = idx[:, 1:].clone()
    labels[0, :5] = -100
    grads = []
    for device_k in (True, False):
        if not device_k:
            monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
        torch.manual_seed(0)
        model = TinyLM(vocab=29, dim=8)
        cggr_hook.scheduler.reset()  # both runs at step 0, call 0: stratified's draws are a function of them
        cggr_hook.enable(model, selection=selection, scoring="combined", min_tokens_ratio=0.3, **FIXED)
        try:
            loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 29), labels.reshape(-1), reduction=reduction)
            (loss.sum() if reduction == "none" else loss).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        finally:
            cggr_hook.disable(model)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("selection", ["topk", "sequence_aware", "importance"])
def test_a_ratio_moved_after_every_row_was_expected_selects_as_the_ratio_says(selection, monkeypatch):
    """Where a call expected to keep every row (``keeps_every_row``) but its ratio came out lower
    (another thread counted a step in between), it ranks after all and selects what a call that
    knew the ratio selects: the same loss, gradient and figures (sequence_aware's kept rows
    counted too)."""
    import cggr_hook
    from cggr_hook import kernels
    from cggr_hook.schedule import Scheduler

    kernels.force_backend("torch")
    logits, targets = _topk_inputs(seed=9)
    opts = dict(selection=selection, min_tokens_ratio=0.1, min_tokens_per_sequence=2, reduction="sum", **FIXED)
    runs = []
    for moved in (False, True):
        if moved:
            monkeypatch.setattr(Scheduler, "keeps_every_row", lambda self, config, key: True)
        crit = cggr_hook.CGGRLoss(**opts)
        logits.grad = None
        loss = crit(logits, targets)
        loss.backward()
        runs.append((loss.detach(), logits.grad.clone(), crit.get_metrics()))
    (l0, g0, m0), (l1, g1, m1) = runs
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert m1["tokens_selected"] == m0["tokens_selected"] and m1["token_ratio"] == m0["token_ratio"]


def test_device_k_pays_while_the_head_gradient_stays_within_twice_k():
    from cggr_hook.pipeline import ValidShare, device_k_pays

    assert device_k_pays("g", need_rows=True)  # nothing known yet
    ValidShare.record("g", 40, 100)
    assert not device_k_pays("g", need_rows=True)  # 2.5 x k rows: the read path
    assert device_k_pays("g", need_rows=False)  # the loss alone does no more work
    ValidShare.record("g", 50, 100)
    assert device_k_pays("g", need_rows=True)
    ValidShare.record("g", 7, 0)  # no rows: nothing learnt
    assert ValidShare.get("g") == 0.5
    # the dynamic threshold sizes the rows for min(1, r (1 + s)): a spread of 1.5 at s = 0.5
    ValidShare.record("g", 70, 100)
    assert device_k_pays("g", need_rows=True) and not device_k_pays("g", need_rows=True, spread=1.5)
    ValidShare.record("g", 80, 100)
    assert device_k_pays("g", need_rows=True, spread=1.5)


def test_the_spread_of_a_dynamic_threshold_is_its_largest_ratio_over_the_curriculums():
    from cggr_hook import GateConfig
    from cggr_hook.pipeline import _spread
    from cggr_hook.schedule import Scheduler

    s = Scheduler()
    dyn = dict(warmup_steps=0, dynamic_threshold=True, threshold_sensitivity=0.5)
    assert _spread(GateConfig(min_tokens_ratio=0.25, **dyn), s, "k", 100) == 38 / 25  # keep_count(0.375, 100)
    assert _spread(GateConfig(min_tokens_ratio=0.8, **dyn), s, "k", 100) == 100 / 80  # at most every row
    assert _spread(GateConfig(min_tokens_ratio=0.25, **FIXED), s, "k", 100) == 1.0
    # sequence_aware: min_tokens_per_sequence rows a sequence past keep_count(r, N), over a
    # selection of at least those rows: 100 rows in 4 sequences of 25, r = 0.25, 2 rows each:
    # (25 + 8) / 25; with the dynamic threshold (38 + 8) / 25
    seq_aware = GateConfig(min_tokens_ratio=0.25, selection="sequence_aware", min_tokens_per_sequence=2, **FIXED)
    assert _spread(seq_aware, s, "k", 100, 25) == pytest.approx(33 / 25)
    seq_dyn = GateConfig(min_tokens_ratio=0.25, selection="sequence_aware", min_tokens_per_sequence=2, **dyn)
    assert _spread(seq_dyn, s, "k", 100, 25) == pytest.approx(46 / 25)
    # 4 sequences of 16, 5 rows each: 36 rows over a selection of at least 20 (not k = 16)
    many = GateConfig(min_tokens_ratio=0.25, selection="sequence_aware", min_tokens_per_sequence=5, **FIXED)
    assert _spread(many, s, "k", 64, 16) == pytest.approx(36 / 20)


@pytest.mark.parametrize("selection_name", ["topk", "importance"])
def test_a_head_call_with_most_targets_ignored_takes_the_read_path(selection_name, monkeypatch):
    """Through the head, a ratio counted on the device multiplies keep_count(ratio, N) rows: with
    most targets ignored (prompts masked) the next call reads the counts instead and multiplies k
    rows; once most targets are valid again, it counts on the device again. Both paths give the
    same gradients."""
    import torch.nn.functional as F

    import cggr_hook
    from cggr_hook import pipeline

    from common import TinyLM

    counted = count_target_counts(monkeypatch)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 29, (4, 16), generator=g)
    masked = idx[:, 1:].clone()
    masked[:, :12] = -100  # 12 of 15 targets a row ignored
    opts = dict(selection=selection_name, scoring="gradnorm", min_tokens_ratio=0.25, **FIXED)
    torch.manual_seed(0)
    model = TinyLM(vocab=29, dim=8)

    def step(labels):
        counted.clear()
        model.zero_grad()
        F.cross_entropy(model(idx)[:, :-1].reshape(-1, 29), labels.reshape(-1)).backward()
        return "read" if counted else "device"

    cggr_hook.enable(model, **opts)
    try:
        assert [step(x) for x in (masked, masked, idx[:, 1:], idx[:, 1:])] == ["device", "read", "read", "device"]
        grads = {}
        for path in ("device", "read"):
            cggr_hook.scheduler.reset()  # the same (step, call): the same draw
            monkeypatch.setattr(pipeline, "device_k_pays", lambda *a, p=path: p == "device")
            assert step(masked) == path
            grads[path] = [p.grad.clone() for p in model.parameters()]
    finally:
        cggr_hook.disable(model)
    for a, b in zip(grads["device"], grads["read"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
