"""Triton quotas of ``stratified`` selection at a ratio the host knows, in one launch.

``stratified`` splits the n valid rows, in difficulty order, into S = min(num_strata, n)
equal-count buckets and takes ``spec.strata_quotas(n, k, num_strata)`` rows from each, k =
``spec.keep_count(ratio, n)``. Where the ratio is fixed the host knows it but not n, which the
scoring pass counts on the device: this kernel sums n from the partial counts and computes k and
the quotas there, so the call reads nothing back (``selection.stratified_at_ratio`` takes them on).

The quotas are ``spec.strata_quotas``' water-filling, operation for operation: each round shares
the remaining rows in proportion to (S - b) * size_b (an int64 product, exact in float64 up to
2^53, divided in float64 as Python divides two ints), fills the buckets whose share reaches their
size, and otherwise floors the shares and gives the rows left one each to the largest fractional
parts (ties: the harder bucket), by each bucket's place among them. At most S rounds.
"""

# Triton launches and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .counts import device_keep_count, ratio_argument
from .spec import MAX_STRATA

__all__ = ["strata_at_ratio", "MAX_STRATA"]

COUNT_BLOCK = 128  # partial-count rows summed per loop iteration


@triton.jit
def _strata_kernel(
    counts_ptr,
    n_parts,
    counts_stride,
    ratio_bits,
    out_ptr,
    S,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    RATIO_PTR: tl.constexpr = False,
):
    n, k = device_keep_count(counts_ptr, n_parts, counts_stride, ratio_bits, BLOCK, RATIO_PTR)
    b = tl.arange(0, BLOCK_S).to(tl.int64)
    s_eff = tl.maximum(tl.minimum(n, S), 1)
    q = n // s_eff
    r = n % s_eff
    sizes = tl.where(b < s_eff, q + (b < r).to(tl.int64), 0)
    weight = s_eff - b
    quotas = tl.zeros([BLOCK_S], tl.int64)
    remaining = tl.minimum(k, n)
    is_open = (b < s_eff) & (sizes > 0)
    finished = remaining <= 0
    for _ in range(0, S):
        n_open = tl.sum(is_open.to(tl.int32), axis=0)
        live = (remaining > 0) & (n_open > 0) & (finished == 0)
        wsz = tl.where(is_open, weight * sizes, 0)
        total = tl.maximum(tl.sum(wsz, axis=0), 1)
        share = (remaining * wsz).to(tl.float64) / total.to(tl.float64)
        full = is_open & (share >= sizes.to(tl.float64)) & live
        n_full = tl.sum(full.to(tl.int32), axis=0)
        # a round that fills buckets: they give every row, the rest is shared again
        quotas = tl.where(full, sizes, quotas)
        remaining -= tl.sum(tl.where(full, sizes, 0), axis=0)
        is_open = is_open & (full == 0)
        # else the last round: floors, then the rows left to the largest fractional parts
        last = live & (n_full == 0)
        floors = share.to(tl.int64)
        quotas = tl.where(is_open & last, floors, quotas)
        left = tl.where(last, remaining - tl.sum(tl.where(is_open, floors, 0), axis=0), 0)
        frac = share - floors.to(tl.float64)
        cand = is_open & last
        # each candidate's place by fractional part, descending, ties to the harder bucket: the
        # first ``left`` places get one more row
        before = cand[None, :] & (
            (frac[None, :] > frac[:, None]) | ((frac[None, :] == frac[:, None]) & (b[None, :] < b[:, None]))
        )
        place = tl.sum(before.to(tl.int32), axis=1)
        quotas += (cand & (place < left)).to(tl.int64)
        finished = finished | last
    tl.store(out_ptr + b, quotas, mask=b < S)
    tl.store(out_ptr + S, n)


def strata_at_ratio(counts: Tensor, ratio: float | Tensor, num_strata: int) -> Tensor:
    """int64 (num_strata + 1,): the quotas of the buckets (hardest first; 0 past min(num_strata, n))
    and then n, the sum of ``counts``' first column, with k = keep_count(ratio, n) (``ratio`` a
    float, or a float64 device scalar). No host read."""
    if not 1 <= num_strata <= MAX_STRATA:
        raise ValueError(f"cggr_hook: strata_at_ratio handles 1 to {MAX_STRATA} buckets, got num_strata={num_strata}")
    out = torch.empty(num_strata + 1, dtype=torch.int64, device=counts.device)
    ratio_arg, ratio_ptr = ratio_argument(ratio)
    _strata_kernel[(1,)](
        counts,
        counts.shape[0],
        counts.stride(0),
        ratio_arg,
        out,
        num_strata,
        BLOCK=COUNT_BLOCK,
        BLOCK_S=max(2, triton.next_power_of_2(num_strata)),
        RATIO_PTR=ratio_ptr,
        num_warps=1,
        enable_fp_fusion=False,  # keep_count's product and sum rounded as the host rounds them
    )
    return out
