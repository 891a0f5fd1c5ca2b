"""Triton quotas of stratified selection at a ratio (kernels/strata.py) against the host's
``spec.strata_quotas`` and the PyTorch reference, and stratified's draw with n counted on the
device (``selection.stratified_at_ratio``) against the draw with n read on the host.

Without CUDA the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

import random

import pytest
import torch

import cggr_hook.kernels as K
from cggr_hook import selection
from cggr_hook.config import GateConfig
from cggr_hook.kernels import force_backend, reference, spec, strata

from common import DEVICE


@pytest.fixture(autouse=True)
def triton_backend():
    force_backend("triton")


def partial_counts(n: int, parts: int, kind: str, seed: int) -> torch.Tensor:
    """n valid rows split over ``parts`` partial rows: ``target_counts``' int64 (P, 2) or the
    scoring pass's float64 (P, 5) sums, whose other columns must not be read as counts."""
    rng = random.Random(seed)
    split = [0] * parts
    for _ in range(n):
        split[rng.randrange(parts)] += 1
    if kind == "target_counts":
        counts = torch.zeros(parts, 2, dtype=torch.int64)
        counts[:, 0] = torch.tensor(split)
        counts[:, 1] = 7  # bad targets: not valid ones
    else:
        counts = torch.rand(parts, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 1000
        counts[:, 0] = torch.tensor(split, dtype=torch.float64)
    return counts.to(DEVICE)


def host_quotas(n: int, ratio: float, S: int) -> list[int]:
    if n == 0:
        return [0] * S
    q = spec.strata_quotas(n, spec.keep_count(ratio, n), S)
    return q + [0] * (S - len(q))


@pytest.mark.parametrize("S", [1, 4, 13, spec.MAX_STRATA])
@pytest.mark.parametrize("n", [0, 2, 11, 4099])
@pytest.mark.parametrize("kind", ["target_counts", "difficulty_partials"])
def test_quotas_are_the_hosts_with_n_counted_on_the_device(S, n, kind):
    """Every ratio's quotas, and n, as the host computes them from the count it reads, for bucket
    counts above, at and below n."""
    counts = partial_counts(n, parts=3, kind=kind, seed=n * 31 + S)
    for ratio in (0.0, 0.1, 0.45, 1.0):
        got = K.strata_at_ratio(counts, ratio, S)
        assert got.dtype == torch.int64 and got.shape == (S + 1,)
        assert got.tolist() == host_quotas(n, ratio, S) + [n], ratio
        torch.testing.assert_close(got, reference.strata_at_ratio(counts, ratio, S), rtol=0, atol=0)


def test_quotas_match_on_random_cases():
    """Random (n, ratio, buckets), the fractional-part ties of the last round included."""
    rng = random.Random(0)
    for case in range(60):
        S = rng.choice([2, 3, 4, 5, 6, 8, 10, 16])
        n = rng.randrange(1, 3000)
        ratio = rng.random() if case % 3 else rng.choice([0.2, 0.25, 0.4, 0.6])
        counts = partial_counts(n, parts=rng.randrange(1, 6), kind="difficulty_partials", seed=case)
        assert K.strata_at_ratio(counts, ratio, S).tolist() == host_quotas(n, ratio, S) + [n], (n, ratio, S)


def test_quota_arguments_are_checked():
    counts = partial_counts(10, parts=2, kind="target_counts", seed=0)
    with pytest.raises(ValueError, match="ratio in \\[0, 1\\]"):
        K.strata_at_ratio(counts, 1.5, 4)
    for backend in ("torch", "triton"):  # the same limit on both backends
        force_backend(backend)
        for bad in (0, spec.MAX_STRATA + 1):
            with pytest.raises(ValueError, match=f"num_strata from 1 to {spec.MAX_STRATA}, got {bad}"):
                K.strata_at_ratio(counts, 0.5, bad)
    force_backend("triton")
    with pytest.raises(ValueError, match=f"1 to {spec.MAX_STRATA} buckets"):
        strata.strata_at_ratio(counts, 0.5, spec.MAX_STRATA + 1)
    with pytest.raises(ValueError, match="cggr_hook: counts"):
        K.strata_at_ratio(counts.reshape(-1), 0.5, 4)


@pytest.mark.parametrize(
    "N, n_ignored, S, ratio", [(1, 0, 4, 0.5), (9, 2, 4, 0.3), (40, 7, 3, 0.25), (301, 50, 6, 0.4)]
)
def test_the_device_draw_puts_the_hosts_draw_first(N, n_ignored, S, ratio):
    """``stratified_at_ratio``'s first k rows are the rows ``choose_rows`` draws with n and k on the
    host and the same keys, and its rank is the inverse of its order."""
    g = torch.Generator().manual_seed(N)
    d = torch.rand(N, generator=g)
    d[torch.randperm(N, generator=g)[:n_ignored]] = float("-inf")
    d, n = d.to(DEVICE), N - n_ignored
    order, rank = reference.difficulty_rank(d)
    ranking = selection.Ranking(order, rank)
    config = GateConfig(selection="stratified", num_strata=S)
    k = spec.keep_count(ratio, n)
    keys_seed = 5
    host = selection.choose_rows(ranking, n, k, k, config, torch.Generator(DEVICE).manual_seed(keys_seed))
    keys = selection.stratified_keys(N, d.device, torch.Generator(DEVICE).manual_seed(keys_seed))
    counts = partial_counts(n, parts=2, kind="target_counts", seed=1)
    s_order, s_rank = selection.stratified_at_ratio(ranking, K.strata_at_ratio(counts, ratio, S), keys, S)
    assert torch.equal(torch.sort(s_order[:k]).values, host)
    assert torch.equal(torch.sort(s_order).values, torch.arange(N, device=d.device))
    assert torch.equal(s_rank[s_order], torch.arange(N, device=d.device))
    # the drawn rows are valid ones, and each bucket gave its quota
    assert bool((d[s_order[:k]] > float("-inf")).all())
    bucket_of_position = torch.repeat_interleave(torch.arange(min(S, n)), torch.tensor(spec.strata_sizes(n, S))).to(
        DEVICE
    )
    drawn_positions = rank[s_order[:k]]
    per_bucket = torch.bincount(bucket_of_position[drawn_positions], minlength=min(S, n)).tolist()
    assert per_bucket == spec.strata_quotas(n, k, S)
