"""Triton importance draw (kernels/importance.py) against the PyTorch reference.

Without CUDA the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), also
with 16-row blocks so that a few hundred rows cross the block boundaries of every pass (the
running sums, the tails walked backwards, the compaction's running count). The reference's running
sums add in the order the kernel's block scans do under the interpreter, so the two draw the same
rows bit for bit there; the weights and figures agree to rounding. The statistics of the draw
itself (water-filling against an independent reference, inclusion frequencies, unbiasedness) are
in tests/test_importance.py, on the reference; the slow test here repeats the frequency check
through the kernel.
"""

import math

import pytest
import torch

import cggr_hook
import cggr_hook.kernels as K
from cggr_hook import selection
from cggr_hook.kernels import force_backend, importance, reference

from common import DEVICE


@pytest.fixture(autouse=True)
def triton_backend():
    force_backend("triton")


@pytest.fixture(params=["shipped_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    if request.param == "small_blocks" and DEVICE == "cpu":
        monkeypatch.setattr(importance, "BLOCK", 16)
    return request.param


def difficulties(N, n_ignored, case, seed):
    """fp32 (N,) difficulties as the scoring leaves them: -inf on ``n_ignored`` rows spread over the
    batch, and scores of the given ``case``."""
    g = torch.Generator().manual_seed(seed)
    if case == "ties":
        d = torch.randint(0, 3, (N,), generator=g).float()
    elif case == "skewed":  # a few rows dominate: certain rows (m > 0)
        d = torch.rand(N, generator=g) ** 12
    else:
        d = torch.rand(N, generator=g) * 3
    if case == "zeros":
        d[torch.rand(N, generator=g) < 0.6] = 0.0
    if case == "inf":
        d[torch.randperm(N, generator=g)[:3]] = math.inf
    d[torch.randperm(N, generator=g)[:n_ignored]] = -math.inf
    return d.to(DEVICE)


def draw_both(d, k, floor, uniform=False, norm: int | torch.Tensor = 1, seed=0):
    """The Triton draw and the reference draw from the same random numbers."""
    n = int((d > -math.inf).sum())
    order, rank = reference.difficulty_rank(d)
    g = torch.Generator().manual_seed(seed)
    perm = torch.sort(torch.rand(n, generator=g), stable=True).indices.to(DEVICE)
    u = torch.rand(1, generator=g, dtype=torch.float64).to(DEVICE)
    got = K.importance_draw(d, order, rank, perm, u, n, k, floor, uniform, norm)
    want = reference.importance_draw(d, order, rank, perm, u, n, k, floor, uniform, norm)
    return got, want, n, rank


def check_draw(draw, n, k, rank, norm):
    """What every draw is: k distinct valid rows ascending, the certain rows among them, the key and
    the weights consistent with the rows."""
    N = draw.key.numel()
    rows = draw.rows.cpu()
    assert rows.dtype == torch.int64 and rows.numel() == k
    assert bool((rows[1:] > rows[:-1]).all()), "rows not strictly ascending"
    rank = rank.cpu()
    assert bool((rank[rows] < n).all()), "an ignored row was drawn"
    m = int(draw.figures[2])
    assert bool(torch.isin(torch.nonzero(rank < m).flatten(), rows).all()), "a certain row was not drawn"
    key = draw.key.cpu()
    assert key.dtype == torch.int64 and int((key == 0).sum()) == k and bool((key[rows] == 0).all())
    assert bool(((key == 0) | (key == 1)).all())
    rw = draw.row_weight.cpu()
    assert rw.dtype == torch.float32 and rw.numel() == N
    assert bool((rw[key == 1] == 0).all())
    torch.testing.assert_close(rw[rows], (draw.inv_pi.cpu() / norm).float(), rtol=0, atol=0)
    assert bool((draw.inv_pi >= 1.0).all())


def assert_same_draw(got, want):
    assert torch.equal(got.rows, want.rows)
    assert torch.equal(got.key, want.key)
    torch.testing.assert_close(got.inv_pi, want.inv_pi, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.row_weight, want.row_weight, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.figures, want.figures, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "N, n_ignored, case, floor",
    [
        (2, 0, "random", 0.2),
        (9, 2, "ties", 0.0),
        (37, 5, "skewed", 0.2),
        (64, 13, "zeros", 0.0),
        (101, 7, "inf", 0.2),
        (150, 30, "skewed", 1.0),
        (257, 40, "ties", 0.2),
        (1500, 200, "skewed", 0.0),  # over two of the shipped blocks
    ],
)
def test_draw_matches_the_reference(N, n_ignored, case, floor, blocks):
    if N > 1000 and blocks == "small_blocks":
        pytest.skip("the interpreter's time: the small blocks cross their boundaries at fewer rows")
    n = N - n_ignored
    d = difficulties(N, n_ignored, case, seed=N)
    for k in sorted({1, n // 3 or 1, n - 1}):
        for seed in range(2 if blocks == "shipped_blocks" else 1):
            got, want, n_, rank = draw_both(d, k, floor, seed=seed * 100 + k)
            assert n_ == n
            assert_same_draw(got, want)
            check_draw(got, n, k, rank, 1)


@pytest.mark.parametrize("N, n_ignored, k", [(23, 4, 6), (300, 50, 249)])
def test_uniform_scores_draw_k_over_n(N, n_ignored, k, blocks):
    """``uniform``: every score 1, so pi = k / n whatever the difficulty (and no row is certain)."""
    d = difficulties(N, n_ignored, "skewed", seed=3)
    got, want, n, rank = draw_both(d, k, 0.2, uniform=True, seed=5)
    assert_same_draw(got, want)
    check_draw(got, n, k, rank, 1)
    torch.testing.assert_close(got.inv_pi.cpu(), torch.full((k,), n / k, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(got.figures[2]) == 0.0


def test_zero_scores_with_no_floor_share_what_is_left():
    """Fewer positive scores than k and floor 0: the positive rows are certain and the zero rows
    share the remaining k - m uniformly."""
    d = torch.zeros(40)
    d[[3, 17, 29]] = torch.tensor([2.0, 1.0, 0.5])
    d[[5, 6]] = -math.inf
    d = d.to(DEVICE)
    got, want, n, rank = draw_both(d, 10, 0.0, seed=1)
    assert_same_draw(got, want)
    check_draw(got, n, 10, rank, 1)
    assert int(got.figures[2]) == 3
    assert bool(torch.isin(torch.tensor([3, 17, 29]), got.rows.cpu()).all())
    w = got.inv_pi.cpu()[~torch.isin(got.rows.cpu(), torch.tensor([3, 17, 29]))]
    torch.testing.assert_close(w, torch.full_like(w, (n - 3) / 7), rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", [57, "tensor"])
def test_row_weight_is_one_over_pi_over_the_normaliser(norm):
    d = difficulties(80, 9, "random", seed=2)
    if norm == "tensor":
        norm = torch.tensor(123.25, dtype=torch.float64, device=DEVICE)
    got, want, n, rank = draw_both(d, 20, 0.2, norm=norm, seed=4)
    assert_same_draw(got, want)
    check_draw(got, n, 20, rank, norm.cpu() if isinstance(norm, torch.Tensor) else norm)


def draw_at_ratio_both(d, ratio, floor, uniform=False, norm=None, seed=0, parts=3, counts_kind="target_counts"):
    """The Triton draw at a ratio and the reference's, from one key per row; the valid count as
    ``parts`` partials: ``target_counts``' int64 (P, 2) (the count in the first row, zeros in the
    rest, as several programs leave them) or ``row_difficulty``'s float64 (P, 5) (the count split
    over the rows, the other columns other sums that must not be read as counts)."""
    N = d.numel()
    n = int((d > -math.inf).sum())
    order, rank = reference.difficulty_rank(d)
    g = torch.Generator().manual_seed(seed)
    perm = torch.sort(torch.rand(N, generator=g), stable=True).indices.to(DEVICE)
    u = torch.rand(1, generator=g, dtype=torch.float64).to(DEVICE)
    if counts_kind == "target_counts":
        counts = torch.zeros(parts, 2, dtype=torch.int64, device=DEVICE)
        counts[0, 0] = n
    else:
        counts = torch.rand(parts, 5, generator=g, dtype=torch.float64).to(DEVICE) * 1000
        counts[:, 0] = 0.0
        counts[0, 0] = float(n - n // 2)
        counts[-1, 0] += float(n // 2)
    capacity = cggr_hook.kernels.spec.keep_count(ratio, N)
    got = K.importance_draw_at_ratio(d, order, rank, perm, u, counts, ratio, capacity, floor, uniform, norm)
    want = reference.importance_draw_at_ratio(d, order, rank, perm, u, counts, ratio, capacity, floor, uniform, norm)
    return got, want, n, order, rank, perm, u


@pytest.mark.parametrize(
    "N, n_ignored, case, ratio",
    [
        (1, 0, "random", 0.25),
        (2, 1, "random", 0.5),
        (9, 2, "ties", 0.3),
        (37, 5, "skewed", 0.25),
        (64, 13, "zeros", 0.5),
        (101, 7, "inf", 0.1),
        (150, 30, "skewed", 0.9),
        (257, 40, "ties", 0.25),
        (1500, 200, "skewed", 0.25),
    ],
)
@pytest.mark.parametrize("counts_kind", ["target_counts", "difficulty_partials"])
def test_draw_at_ratio_is_the_draw_with_n_and_k_counted_on_the_device(N, n_ignored, case, ratio, blocks, counts_kind):
    """n from the counts' partials and k = keep_count(ratio, n) on the device: the same rows,
    weights and key as the draw given n and k, the rows listed in keep_count(ratio, N) slots, the
    drawn ones first and then the first undrawn rows (no weight, 1 / pi 1), and n and k last in the
    figures."""
    if N > 1000 and blocks == "small_blocks":
        pytest.skip("the interpreter's time: the small blocks cross their boundaries at fewer rows")
    d = difficulties(N, n_ignored, case, seed=N)
    for seed in range(2):
        got, want, n, order, rank, perm, u = draw_at_ratio_both(d, ratio, 0.2, seed=seed, counts_kind=counts_kind)
        assert_same_draw(got, want)
        k = cggr_hook.kernels.spec.keep_count(ratio, n)
        capacity = cggr_hook.kernels.spec.keep_count(ratio, N)
        assert got.rows.numel() == got.inv_pi.numel() == capacity >= k
        assert (float(got.figures[-2]), float(got.figures[-1])) == (n, k)
        rows = got.rows.cpu()
        assert rows.unique().numel() == capacity, "a row listed twice"
        key = got.key.cpu()
        assert int((key == 0).sum()) == k and bool((key[rows[:k]] == 0).all()) and bool((key[rows[k:]] == 1).all())
        assert bool((got.inv_pi.cpu()[k:] == 1.0).all()) and bool((got.row_weight.cpu()[rows[k:]] == 0).all())
        if k < n:
            # the draw given n and k on the host, from the valid rows' part of the same order
            host = K.importance_draw(d, order, rank, perm[perm < n], u, n, k, 0.2, False, n)
            assert torch.equal(host.rows, got.rows[:k]) and torch.equal(host.key, got.key)
            torch.testing.assert_close(host.row_weight, got.row_weight, rtol=0, atol=0)
        else:  # every valid row kept, each with weight 1 / n
            assert bool((got.inv_pi.cpu()[:k] == 1.0).all())
            torch.testing.assert_close(got.row_weight.cpu()[rows[:k]], torch.full((k,), 1 / n), rtol=1e-7, atol=0)


def test_draw_at_ratio_with_no_valid_row_draws_nothing():
    d = torch.full((12,), -math.inf, device=DEVICE)
    got, want, n, *_ = draw_at_ratio_both(d, 0.25, 0.1)
    assert_nan_equal = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.key, want.key)
    assert_nan_equal(got.figures, want.figures)
    assert bool((got.key == 1).all()) and bool((got.row_weight == 0).all()) and got.rows.numel() == 3
    assert (float(got.figures[-2]), float(got.figures[-1])) == (0.0, 0.0)


@pytest.mark.parametrize("norm", [None, 1, "tensor"])
def test_draw_at_ratio_weighs_by_the_normaliser(norm):
    """None: the mean's n, counted on the device; an int or a device scalar as given."""
    d = difficulties(90, 17, "random", seed=9)
    if norm == "tensor":
        norm = torch.tensor(31.5, dtype=torch.float64, device=DEVICE)
    got, want, n, *_ = draw_at_ratio_both(d, 0.3, 0.2, norm=norm, seed=2)
    assert_same_draw(got, want)
    k = cggr_hook.kernels.spec.keep_count(0.3, n)
    divisor = n if norm is None else norm.cpu() if isinstance(norm, torch.Tensor) else norm
    rows = got.rows.cpu()[:k]
    torch.testing.assert_close(got.row_weight.cpu()[rows], (got.inv_pi.cpu()[:k] / divisor).float(), rtol=0, atol=0)


def test_draw_at_ratio_arguments_are_checked():
    d = difficulties(10, 2, "random", seed=0)
    order, rank = reference.difficulty_rank(d)
    perm = torch.arange(10, device=DEVICE)
    u = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    counts = torch.tensor([[8, 0]], device=DEVICE)
    with pytest.raises(ValueError, match="perm must be int64 of 10 rows"):
        K.importance_draw_at_ratio(d, order, rank, perm[:8], u, counts, 0.25, 3, 0.2)
    for bad in (counts.float(), counts[0], counts[:, :0]):  # fp32, one dim, no column
        with pytest.raises(ValueError, match="counts must be partial counts"):
            K.importance_draw_at_ratio(d, order, rank, perm, u, bad, 0.25, 3, 0.2)
    for ratio, capacity in ((0.25, 2), (0.25, 11)):
        with pytest.raises(ValueError, match=r"keep_count\(ratio, N\) <= capacity <= N"):
            K.importance_draw_at_ratio(d, order, rank, perm, u, counts, ratio, capacity, 0.2)
    for ratio in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"importance_draw_at_ratio needs a ratio in \[0, 1\]"):
            K.importance_draw_at_ratio(d, order, rank, perm, u, counts, ratio, 10, 0.2)
    on_device = torch.full((1,), 0.25, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"capacity <= N"):  # (a ratio on the device: the caller's bound)
        K.importance_draw_at_ratio(d, order, rank, perm, u, counts, on_device, 11, 0.2)
    with pytest.raises(ValueError, match=r"takes a ratio on the device as one float64"):
        K.importance_draw_at_ratio(d, order, rank, perm, u, counts, on_device.float(), 3, 0.2)


def test_figures_are_the_draw_figures():
    d = difficulties(120, 11, "skewed", seed=6)
    got, _, _, _ = draw_both(d, 30, 0.1, seed=8)
    valid = d.cpu()[d.cpu() > -math.inf].double()
    w = got.inv_pi.cpu()
    m = int(got.figures[2])
    pi, m_ref = reference.inclusion_probabilities(torch.sort(valid, descending=True).values, 30, 0.1)
    assert m == int(m_ref) == int((pi == 1.0).sum())
    want = torch.tensor(
        [
            float(w.sum() ** 2 / (w * w).sum()),
            float(w.max()),
            m,
            float(valid.mean()),
            float((valid * valid).mean()),
            valid.numel(),
            30,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got.figures.cpu(), want, rtol=1e-12, atol=0)
    assert selection.DRAW_FIGURES == (
        "ess",
        "max_weight",
        "n_certain",
        "score_mean",
        "score_sq_mean",
        "n_valid",
        "k",
    )


def test_arguments_are_checked():
    d = difficulties(10, 2, "random", seed=0)
    order, rank = reference.difficulty_rank(d)
    perm = torch.arange(8, device=DEVICE)
    u = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    for k in (0, 8):
        with pytest.raises(ValueError, match="1 <= k < n_valid"):
            K.importance_draw(d, order, rank, perm, u, 8, k, 0.2)
    with pytest.raises(ValueError, match="perm must be int64 of 8 rows"):
        K.importance_draw(d, order, rank, torch.arange(10, device=DEVICE), u, 8, 3, 0.2)
    with pytest.raises(ValueError, match="u must be one float64"):
        K.importance_draw(d, order, rank, perm, u.float(), 8, 3, 0.2)


@pytest.mark.slow
def test_kernel_draws_at_the_inclusion_probabilities():
    """Exactly k distinct rows at frequencies pi (within 4.5 standard deviations), through the
    kernel and ``selection.importance_draw``'s random numbers."""
    n, k, draws = 14, 5, 600
    g0 = torch.Generator().manual_seed(3)
    d = torch.rand(n, generator=g0) ** 3
    d[[2, 9]] = -math.inf
    d = d.to(DEVICE)
    n_valid = n - 2
    ranking = selection.rank_rows(d, None, cggr_hook.GateConfig(selection="importance"), None)
    order = ranking.order.cpu()
    pi_sorted, m = reference.inclusion_probabilities(d.cpu()[order[:n_valid]], k, 0.1)
    assert int(m) >= 1
    pi = torch.zeros(n, dtype=torch.float64)
    pi[order[:n_valid]] = pi_sorted
    counts = torch.zeros(n, dtype=torch.float64)
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    for _ in range(draws):
        rows = selection.importance_draw(ranking, d, n_valid, k, 0.1, gen).rows.cpu()
        assert rows.unique().numel() == k
        counts[rows] += 1
    freq = counts / draws
    sd = torch.sqrt(pi * (1 - pi) / draws)
    certain = pi == 1.0
    assert bool((freq[certain] == 1.0).all()) and bool((freq[pi == 0] == 0).all())
    z = (freq - pi).abs()[~certain & (pi > 0)] / sd[~certain & (pi > 0)]
    assert float(z.max()) < 4.5, (freq, pi)


def test_a_draw_short_of_k_fills_its_slots_with_undrawn_rows(blocks):
    """Rounding can, about once in 1e16 draws, let one row's span hold two points, so that k - 1
    rows are drawn. Forced here with u = 1 (the points then start one unit late): every slot of
    ``rows`` is still written, with the first undrawn rows (key 1, weight zero, 1 / pi taken as 1),
    the same on both backends; nothing is left for the head backward to read out of bounds."""
    d = difficulties(70, 9, "random", 3)
    n = int((d > -math.inf).sum())
    k = 20
    order, rank = reference.difficulty_rank(d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    u = torch.ones(1, dtype=torch.float64, device=DEVICE)
    got = K.importance_draw(d, order, rank, perm, u, n, k, 0.2, False, 1)
    want = reference.importance_draw(d, order, rank, perm, u, n, k, 0.2, False, 1)
    drawn = torch.nonzero(want.key == 0).flatten()
    assert drawn.numel() == k - 1  # the forced short draw
    filler = torch.nonzero(want.key == 1).flatten()[: k - drawn.numel()]
    assert torch.equal(want.rows.sort().values, torch.cat([drawn, filler]).sort().values)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.key, want.key)
    torch.testing.assert_close(got.inv_pi, want.inv_pi, rtol=1e-12, atol=0)
    assert bool((got.row_weight[filler] == 0).all()) and bool((got.inv_pi[-1:] == 1.0).all())


def test_a_nan_difficulty_is_the_largest_score_on_both_backends(blocks):
    """The scoring maps NaN to +inf before the draw, but the draw itself agrees with its reference
    on a NaN too: the largest float, as +inf is (a certain row)."""
    d = difficulties(40, 5, "random", 4)
    d[torch.nonzero(d > -math.inf).flatten()[3]] = math.nan
    got, want, n, rank = draw_both(d, 9, 0.0)
    assert_same_draw(got, want)
    check_draw(got, n, 9, rank, 1)
    assert int(got.figures[2]) >= 1  # the NaN row is certain
