"""Triton dynamic threshold: a call's ratio from its confidence, on the device, in one launch.

With the curriculum's ratio r, sensitivity s, c the batch's mean top-1 probability over its valid
targets and a the running average of earlier batches (``spec.dynamic_ratio``):

    r' = r (1 + s clamp((a - c) / a, -1, 1)),   clamped to [r (1 - s), min(1, r (1 + s))]

and then a <- c (the first batch) or 0.9 a + (1 - 0.9) c (``spec.running_confidence``), unless
the batch has no valid target or a bad one (a call that raises moves nothing). The host
computes the same from the partial sums it reads; this kernel lets a call that reads nothing
(``pipeline._at_ratio``) take its ratio from its own batch: c from the scoring pass's partial sums,
a from a float64 (2,) device tensor [a, present] that the kernel updates in place, and r' written
to a float64 scalar that the selection kernels read (``counts.device_keep_count``'s ``RATIO_PTR``).

The sums are added row after row, in the order ``spec.sum_in_order`` adds them on the host, and the
kernel is launched without FMA contraction, so that r' and a are bit for bit the host's.
"""

# Triton launches and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .counts import float64_bits
from .spec import EMA_MOMENTUM, SUM_FIELDS, dynamic_ratio_bound

__all__ = ["dynamic_ratio"]

_CONFIDENCE = SUM_FIELDS.index("p_top1")
_BAD = SUM_FIELDS.index("n_bad")


@triton.jit
def _as_float64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _dynamic_ratio_kernel(
    sums_ptr,
    n_parts,
    sums_stride,
    col_stride,
    avg_ptr,
    out_ptr,
    r_bits,
    s_bits,
    lo_bits,
    hi_bits,
    m_bits,
    m1_bits,
    CONFIDENCE: tl.constexpr,
    BAD: tl.constexpr,
):
    r = _as_float64(r_bits)
    s = _as_float64(s_bits)
    # n, the bad targets and the confidences' sum, one partial row after another (the host's order)
    n = tl.zeros([], tl.float64)
    n_bad = tl.zeros([], tl.float64)
    c_sum = tl.zeros([], tl.float64)
    for p in range(0, n_parts):
        n += tl.load(sums_ptr + p * sums_stride)
        n_bad += tl.load(sums_ptr + p * sums_stride + BAD * col_stride)
        c_sum += tl.load(sums_ptr + p * sums_stride + CONFIDENCE * col_stride)
    c = c_sum / tl.maximum(n, 1.0)
    finite = (n > 0) & (c == c) & (tl.abs(c) < float("inf"))
    avg = tl.load(avg_ptr)
    present = tl.load(avg_ptr + 1) != 0
    moves = present & (avg > 0) & finite
    deviation = tl.maximum(-1.0, tl.minimum(1.0, (avg - c) / tl.where(moves, avg, 1.0)))
    adjusted = r * (1.0 + s * deviation)
    moved = tl.maximum(_as_float64(lo_bits), tl.minimum(adjusted, _as_float64(hi_bits)))
    tl.store(out_ptr, tl.where(moves, moved, r))
    # a batch with a bad target raises (where its counts are read) and leaves the average as it was
    ema = _as_float64(m_bits) * avg + _as_float64(m1_bits) * c
    update = finite & (n_bad == 0)
    tl.store(avg_ptr, tl.where(update, tl.where(present, ema, c), avg))
    tl.store(avg_ptr + 1, tl.where(update | present, 1.0, 0.0).to(tl.float64))


def dynamic_ratio(sums: Tensor, ratio: float, sensitivity: float, average: Tensor) -> Tensor:
    """float64 (1,): the dynamic threshold's ratio of the batch whose scoring pass gave the partial
    sums ``sums`` (float64 (P, 5), ``spec.SUM_FIELDS``), from the curriculum's ``ratio`` and
    ``sensitivity``; ``average`` (float64 (2,): the running confidence and whether there is one)
    is updated in place. One program, one launch, no host read."""
    out = torch.empty(1, dtype=torch.float64, device=sums.device)
    _dynamic_ratio_kernel[(1,)](
        sums,
        sums.shape[0],
        sums.stride(0),
        sums.stride(1),
        average,
        out,
        float64_bits(ratio),
        float64_bits(sensitivity),
        float64_bits(ratio * (1.0 - sensitivity)),
        float64_bits(dynamic_ratio_bound(ratio, sensitivity)),
        float64_bits(EMA_MOMENTUM),
        float64_bits(1 - EMA_MOMENTUM),
        CONFIDENCE=_CONFIDENCE,
        BAD=_BAD,
        num_warps=1,
        enable_fp_fusion=False,  # every product and sum rounded as the host rounds them
    )
    return out
