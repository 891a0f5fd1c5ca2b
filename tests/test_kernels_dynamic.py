"""The dynamic threshold's ratio on the device (kernels/dynamic.py) against the host's formula
(``spec.dynamic_ratio``, ``spec.running_confidence``) and the PyTorch reference, and the selection
kernels taking their ratio from the device (``RATIO_PTR``) against the same ratio as a float.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

import math
import random

import pytest
import torch

import cggr_hook.kernels as K
from cggr_hook.kernels import force_backend, spec

from common import DEVICE

CONF = spec.SUM_FIELDS.index("p_top1")


def scoring_sums(parts: int, seed: int, empty: bool = False) -> torch.Tensor:
    """Partial sums shaped as the scoring pass's float64 (P, 5): whole counts of valid rows, no bad
    target, their summed top-1 probabilities (the confidence's numerator), odd values elsewhere."""
    g = torch.Generator().manual_seed(seed)
    sums = torch.rand(parts, len(spec.SUM_FIELDS), dtype=torch.float64, generator=g) * 50
    counts = torch.randint(0, 700, (parts,), generator=g).double()
    if empty:
        counts.zero_()
    sums[:, 0] = counts
    sums[:, spec.SUM_FIELDS.index("n_bad")] = 0.0
    sums[:, CONF] = counts * torch.rand(parts, dtype=torch.float64, generator=g)
    return sums.to(DEVICE)


def host_figures(sums: torch.Tensor, ratio: float, s: float, average: float | None) -> tuple[float, float | None]:
    """The ratio and the new running confidence as the host computes them from the sums it reads."""
    rows = sums.tolist()
    n = spec.sum_in_order(r[0] for r in rows)
    c = spec.sum_in_order(r[CONF] for r in rows) / n if n else math.nan
    return spec.dynamic_ratio(ratio, c, average, s), spec.running_confidence(average, c)


def average_tensor(average: float | None) -> torch.Tensor:
    return torch.tensor([average or 0.0, 0.0 if average is None else 1.0], dtype=torch.float64, device=DEVICE)


CASES = [
    # (parts, ratio, sensitivity, average, empty)
    (1, 0.25, 0.5, None, False),  # the first batch: r itself, the average starts at c
    (3, 0.25, 0.5, 0.9, False),  # less confident than usual: up to r (1 + s)
    (5, 0.3, 0.5, 0.05, False),  # more confident: down to r (1 - s)
    (8, 0.45, 0.2, 0.4, False),
    (2, 0.8, 1.0, 0.3, False),  # r (1 + s) past 1: at most 1
    (4, 1.0, 0.5, 0.6, False),
    (3, 0.25, 0.0, 0.6, False),  # no sensitivity: r
    (6, 0.25, 0.5, 0.0, False),  # an average of 0: r
    (3, 0.25, 0.5, 0.7, True),  # no valid row: r, the average unchanged
    (3, 0.25, 0.5, None, True),
    (67, 0.1, 0.5, 0.5, False),  # more partial rows than a warp
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("parts, ratio, s, average, empty", CASES)
def test_dynamic_ratio_is_the_hosts_bit_for_bit(backend, parts, ratio, s, average, empty):
    """The ratio and the updated running confidence are those the host computes from the sums it
    reads, to the last bit: the partial rows added in the host's order, every rounding the host's."""
    force_backend(backend)
    for seed in range(4):
        sums = scoring_sums(parts, seed=seed * 7 + parts, empty=empty)
        avg = average_tensor(average)
        got = K.dynamic_ratio(sums, ratio, s, avg)
        want_ratio, want_avg = host_figures(sums, ratio, s, average)
        assert got.dtype == torch.float64 and got.shape == (1,) and got.device == sums.device
        assert got.item() == want_ratio, (seed, got.item(), want_ratio)
        assert avg.tolist() == ([want_avg, 1.0] if want_avg is not None else [0.0, 0.0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dynamic_ratio_over_a_run_follows_the_hosts_scheduler(backend):
    """Call after call, the ratio on the device and the average it keeps are the host's, for
    random batches and ratios that land on keep_count's half-way points."""
    force_backend(backend)
    rng = random.Random(3)
    avg_t = average_tensor(None)
    avg: float | None = None
    for call in range(40):
        sums = scoring_sums(rng.randint(1, 12), seed=call, empty=call % 13 == 5)
        ratio, s = rng.choice([0.25, 0.45, 0.3, rng.random()]), rng.choice([0.5, rng.random()])
        got = K.dynamic_ratio(sums, ratio, s, avg_t).item()
        want, avg = host_figures(sums, ratio, s, avg)
        assert got == want, call
        n = int(sums[:, 0].sum())
        assert spec.keep_count(got, n) == spec.keep_count(want, n)
    assert avg_t.tolist() == [avg, 1.0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_with_a_bad_target_leaves_the_average_and_sums_read_at_any_stride(backend):
    """A batch whose sums count a bad target (its call raises where the counts are read) gives
    its ratio but leaves the running confidence as it was, as the host's read path, which raises
    first; sums laid out column-major give what the contiguous ones give."""
    force_backend(backend)
    sums = scoring_sums(5, seed=2)
    avg = average_tensor(0.3)
    want = K.dynamic_ratio(sums, 0.25, 0.5, avg.clone())
    bad = sums.clone()
    bad[3, spec.SUM_FIELDS.index("n_bad")] = 1.0
    kept = average_tensor(0.3)
    torch.testing.assert_close(K.dynamic_ratio(bad, 0.25, 0.5, kept), want, rtol=0, atol=0)
    assert kept.tolist() == [0.3, 1.0]
    fresh = average_tensor(None)
    K.dynamic_ratio(bad, 0.25, 0.5, fresh)
    assert fresh.tolist() == [0.0, 0.0]
    column_major = sums.t().contiguous().t()
    assert column_major.stride() != sums.stride()
    a, b = average_tensor(0.3), average_tensor(0.3)
    torch.testing.assert_close(K.dynamic_ratio(column_major, 0.25, 0.5, a), K.dynamic_ratio(sums, 0.25, 0.5, b))
    assert a.tolist() == b.tolist()


def test_dynamic_ratio_rejects_what_it_cannot_read():
    sums = scoring_sums(3, seed=0)
    avg = average_tensor(0.5)
    with pytest.raises(ValueError, match=r"dynamic_ratio needs row_difficulty's float64 \(P, 5\) partial sums"):
        K.dynamic_ratio(sums[:, :2], 0.25, 0.5, avg)
    with pytest.raises(ValueError, match=r"dynamic_ratio needs row_difficulty's float64"):
        K.dynamic_ratio(sums.float(), 0.25, 0.5, avg)
    with pytest.raises(
        ValueError, match=r"dynamic_ratio's average must be a contiguous float64 tensor of shape \(2,\)"
    ):
        K.dynamic_ratio(sums, 0.25, 0.5, avg[:1])
    with pytest.raises(ValueError, match=r"dynamic_ratio's average must be a contiguous float64"):
        K.dynamic_ratio(sums, 0.25, 0.5, avg.float())
    strided = torch.zeros(4, dtype=torch.float64, device=DEVICE)[::2]
    with pytest.raises(ValueError, match=r"must be a contiguous float64 tensor .*updated in place"):
        K.dynamic_ratio(sums, 0.25, 0.5, strided)
    with pytest.raises(ValueError, match=r"a ratio and a sensitivity in \[0, 1\], got 1.5, 0.5"):
        K.dynamic_ratio(sums, 1.5, 0.5, avg)
    with pytest.raises(ValueError, match=r"a ratio and a sensitivity in \[0, 1\], got 0.25, -0.1"):
        K.dynamic_ratio(sums, 0.25, -0.1, avg)


# --------------------------------------------------------------------------------------------------
# the selection kernels with their ratio on the device
# --------------------------------------------------------------------------------------------------
def _ratio_on_device(r: float) -> torch.Tensor:
    return torch.tensor([r], dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.45, 0.3333333333333333, 1.0])
def test_strata_and_the_loss_take_a_ratio_on_the_device_as_the_float(backend, ratio):
    """``strata_at_ratio`` and ``selected_loss`` with the ratio as a float64 device scalar give what
    they give with it as a float (k = keep_count(ratio, n) read from the device)."""
    force_backend(backend)
    g = torch.Generator().manual_seed(11)
    N, V = 211, 17
    logits = (torch.randn(N, V, generator=g) * 2).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.2] = -100
    targets = targets.to(DEVICE)
    stats = K.row_stats(logits.unsqueeze(0), targets, -100)
    diff, partial = K.row_difficulty(stats, targets, V, -100, "combined")
    order, rank = K.difficulty_rank(diff)
    for S in (1, 5):
        want = K.strata_at_ratio(partial, ratio, S)
        torch.testing.assert_close(K.strata_at_ratio(partial, _ratio_on_device(ratio), S), want, rtol=0, atol=0)
    for reduction in ("mean", "sum", "none"):
        want = K.selected_loss(stats, targets, V, rank, 0, 0, 0, reduction, 0.0, None, counts=partial, ratio=ratio)
        got = K.selected_loss(
            stats, targets, V, rank, 0, 0, 0, reduction, 0.0, None, counts=partial, ratio=_ratio_on_device(ratio)
        )
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_importance_draw_takes_a_ratio_on_the_device_as_the_float(backend):
    force_backend(backend)
    g = torch.Generator().manual_seed(5)
    N = 300
    diff = torch.rand(N, generator=g).to(DEVICE)
    valid = torch.rand(N, generator=g) > 0.3
    diff = torch.where(valid.to(DEVICE), diff, torch.full_like(diff, -1.0))
    counts = torch.tensor([[int(valid.sum()), 0]], dtype=torch.int64, device=DEVICE)
    order, rank = K.difficulty_rank(diff)
    perm = torch.randperm(N, generator=g).to(DEVICE)
    u = torch.rand(1, generator=g, dtype=torch.float64).to(DEVICE)
    for ratio in (0.1, 0.45, 1.0):
        cap = spec.keep_count(min(1.0, ratio * 1.5), N)
        want = K.importance_draw_at_ratio(diff, order, rank, perm, u, counts, ratio, cap, 0.1)
        got = K.importance_draw_at_ratio(diff, order, rank, perm, u, counts, _ratio_on_device(ratio), cap, 0.1)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_ratio_on_the_device_must_be_one_float64_there():
    counts = torch.tensor([[5, 0]], dtype=torch.int64, device=DEVICE)
    for bad in (
        torch.tensor([0.25], dtype=torch.float32, device=DEVICE),
        torch.zeros(2, dtype=torch.float64, device=DEVICE),
    ):
        with pytest.raises(ValueError, match=r"strata_at_ratio takes a ratio on the device as one float64"):
            K.strata_at_ratio(counts, bad, 3)
    with pytest.raises(ValueError, match=r"strata_at_ratio needs a ratio in \[0, 1\], got 1.2"):
        K.strata_at_ratio(counts, 1.2, 3)
