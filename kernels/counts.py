"""k = ``spec.keep_count(ratio, n)`` on the device, n summed from partial counts: what a kernel
selecting at a ratio the host knows computes instead of reading n back (``importance``,
``gated_ce``)."""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from .spec import KEEP_HALF

# Triton launches and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false

KEEP_HALF_BITS: tl.constexpr = tl.constexpr(struct.unpack("<q", struct.pack("<d", KEEP_HALF))[0])


def float64_bits(x: float) -> int:
    """The bits of float64 ``x`` as an int: a float argument would reach a kernel as fp32."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def ratio_argument(ratio: float | Tensor) -> tuple[int | Tensor, bool]:
    """What a kernel taking ``device_keep_count``'s ratio is passed: a float's bits, or a float64
    device scalar the kernel reads (a ratio computed on the device, ``dynamic.dynamic_ratio``),
    and whether it is the latter (the kernel's ``RATIO_PTR``)."""
    if isinstance(ratio, Tensor):
        if ratio.dtype != torch.float64 or ratio.numel() != 1:
            raise ValueError(
                f"cggr_hook: a ratio on the device must be one float64 value, got {ratio.dtype} of shape {tuple(ratio.shape)}"
            )
        return ratio, True
    return float64_bits(ratio), False


@triton.jit
def device_keep_count(counts_ptr, n_parts, counts_stride, ratio_bits, BLOCK: tl.constexpr, RATIO_PTR: tl.constexpr):
    """(n, k) int64: n the sum of the first column of ``n_parts`` rows of partial counts
    (``counts_stride`` apart; int64, or float64 holding whole numbers), k = clamp(floor(fl(ratio
    n) + KEEP_HALF), 1, n) in float64 (``ratio`` from its bits, or loaded from ``ratio_bits`` as a
    pointer with ``RATIO_PTR``), as ``spec.keep_count`` computes it on the host; the kernel is
    launched without FMA contraction."""
    offs = tl.arange(0, BLOCK)
    n64 = tl.zeros([], tl.int64)
    for p0 in range(0, n_parts, BLOCK):
        p = p0 + offs
        n64 += tl.sum(tl.load(counts_ptr + counts_stride * p, mask=p < n_parts, other=0).to(tl.int64))
    if RATIO_PTR:
        ratio = tl.load(ratio_bits)
    else:
        ratio = ratio_bits.to(tl.int64).to(tl.float64, bitcast=True)
    half = tl.full([], KEEP_HALF_BITS, tl.int64).to(tl.float64, bitcast=True)
    k64 = tl.floor(ratio * n64.to(tl.float64) + half).to(tl.int64)
    k64 = tl.minimum(tl.maximum(k64, 1), n64)
    return n64, k64
