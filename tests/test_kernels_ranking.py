"""Triton difficulty rank (kernels/ranking.py) against the PyTorch reference (a stable sort).

Without CUDA the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1) with
small blocks so that a few hundred rows cross the program and block boundaries: blocks of j wholly
before a program's rows, wholly after them, and the one that holds them (where ties compare row
indices). The ``gpu`` cases run the shipped blocks at full size.
"""

import math

import pytest
import torch

import cggr_hook.kernels as K
from cggr_hook.kernels import force_backend, ranking, reference

from common import DEVICE


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    force_backend("triton")


@pytest.fixture(params=["shipped_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    if request.param == "small_blocks" and DEVICE == "cpu":
        monkeypatch.setattr(ranking, "BLOCK_R", 8)
        monkeypatch.setattr(ranking, "BLOCK_J", 16)
    return request.param


def difficulties(N, seed, n_levels=None):
    """fp32 (N,) difficulties the way the scoring leaves them: -inf for ignored rows, some +inf
    (NaN rows), zeros, and with ``n_levels`` only that many distinct finite values (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(N, generator=gen)
    if n_levels:
        d = torch.randint(0, n_levels, (N,), generator=gen).float() / n_levels
    d[torch.rand(N, generator=gen) < 0.2] = -math.inf
    d[torch.rand(N, generator=gen) < 0.05] = math.inf
    d[torch.rand(N, generator=gen) < 0.05] = 0.0
    return d.to(DEVICE)


def brute_rank(d):
    """rank[r] = #{j : d_j > d_r} + #{j < r : d_j = d_r}, from the definition."""
    v = d.cpu().tolist()
    return torch.tensor([sum(1 for j, x in enumerate(v) if x > v[r] or (x == v[r] and j < r)) for r in range(len(v))])


@pytest.mark.parametrize("N", [1, 2, 3, 31, 33, 257])
@pytest.mark.parametrize("n_levels", [None, 3])
def test_rank_matches_stable_descending_sort(N, n_levels, blocks):
    d = difficulties(N, seed=N, n_levels=n_levels)
    order, rank = K.difficulty_rank(d)
    want_order, want_rank = reference.difficulty_rank(d)
    assert order.dtype == rank.dtype == torch.int64
    assert torch.equal(rank, want_rank)
    assert torch.equal(order, want_order)
    assert torch.equal(rank.cpu(), brute_rank(d))


def test_ties_go_to_the_lower_row_and_ignored_rows_come_last(blocks):
    d = torch.tensor([0.5, 2.0, 0.5, -math.inf, 2.0, math.inf, -math.inf, 0.5, 0.0], device=DEVICE)
    order, rank = K.difficulty_rank(d)
    assert order.tolist() == [5, 1, 4, 0, 2, 7, 8, 3, 6]
    assert rank.tolist() == [3, 1, 4, 7, 2, 0, 8, 5, 6]


def test_a_nan_ranks_as_infinity_and_order_stays_a_permutation(blocks):
    """The difficulty never holds NaN, but a NaN given anyway must not break ``order`` (the dense
    gradient schedules its rows by it): it ranks as +inf, in both backends."""
    d = torch.tensor([1.0, math.nan, 2.0, math.nan, math.inf, -math.inf, 0.5], device=DEVICE)
    order, rank = K.difficulty_rank(d)
    want_order, want_rank = reference.difficulty_rank(d)
    assert order.tolist() == [1, 3, 4, 2, 0, 6, 5]
    assert torch.equal(order, want_order) and torch.equal(rank, want_rank)
    assert sorted(order.tolist()) == list(range(7))


def test_every_row_equal_keeps_row_order(blocks):
    for v in (1.25, -math.inf):
        order, rank = K.difficulty_rank(torch.full((41,), v, device=DEVICE))
        assert order.tolist() == list(range(41)) and rank.tolist() == list(range(41))


def test_empty_and_rejected_inputs():
    order, rank = K.difficulty_rank(torch.zeros(0, device=DEVICE))
    assert order.shape == rank.shape == (0,)
    with pytest.raises(ValueError, match="1-D"):
        ranking.difficulty_rank(torch.zeros(2, 3, device=DEVICE))


def test_past_max_rows_the_dispatch_sorts_and_gives_the_same_order(monkeypatch):
    """Above ``MAX_ROWS`` the dispatcher hands the rows to the sort: same order, no kernel launch."""
    d = difficulties(50, seed=7, n_levels=4)
    want = K.difficulty_rank(d)
    monkeypatch.setattr(ranking, "MAX_ROWS", 49)
    launched = []
    monkeypatch.setattr(ranking, "difficulty_rank", lambda *a: launched.append(1))
    got = K.difficulty_rank(d)
    assert not launched
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("N", [8191, ranking.MAX_ROWS])
@pytest.mark.parametrize("n_levels", [None, 50])
def test_rank_full_size_gpu(N, n_levels):
    d = difficulties(N, seed=N, n_levels=n_levels)
    order, rank = K.difficulty_rank(d)
    want_order, want_rank = reference.difficulty_rank(d)
    assert torch.equal(rank, want_rank) and torch.equal(order, want_order)


def uniform_keys(N, seed, n_levels=None):
    """fp32 (N,) keys as the importance draw makes them (uniform in [0, 1)), zeros included, and
    with ``n_levels`` only that many distinct values (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(N, generator=gen)
    if n_levels:
        u = torch.randint(0, n_levels, (N,), generator=gen).float() / n_levels
    u[torch.rand(N, generator=gen) < 0.05] = 0.0
    return u.to(DEVICE)


@pytest.mark.parametrize("N", [1, 2, 3, 31, 33, 257])
@pytest.mark.parametrize("n_levels", [None, 3])
def test_ascending_order_matches_stable_sort(N, n_levels, blocks):
    """The importance draw's random order: the count with the keys negated equals a stable
    ascending sort, ties (zeros included) by lower index."""
    u = uniform_keys(N, seed=N, n_levels=n_levels)
    order = K.ascending_order(u)
    assert order.dtype == torch.int64
    assert torch.equal(order, reference.ascending_order(u))
    assert torch.equal(order.cpu(), torch.tensor(sorted(range(N), key=lambda r: (u[r].item(), r))))


def test_ascending_order_past_max_rows_sorts(monkeypatch):
    u = uniform_keys(50, seed=3, n_levels=5)
    want = K.ascending_order(u)
    monkeypatch.setattr(ranking, "MAX_ROWS", 49)
    monkeypatch.setattr(ranking, "ascending_order", lambda *a: pytest.fail("launched past MAX_ROWS"))
    assert torch.equal(K.ascending_order(u), want)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [8191, ranking.MAX_ROWS])
def test_ascending_order_full_size_gpu(N):
    u = uniform_keys(N, seed=N, n_levels=None)
    assert torch.equal(K.ascending_order(u), reference.ascending_order(u))
