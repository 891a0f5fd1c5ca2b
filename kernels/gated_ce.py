"""Triton cross-entropy gradient rows (see ``reference.ce_grad_rows`` / ``reference.ce_grad_dense_``).

Row r's gradient, p_j = exp(x_j - lse_r), w = 1 without class weights:

    g_j = scale_r * ((1 - eps) w_t (p_j - [j == t]) + (eps / V) (sum(w) p_j - w_j))

One program per row loops over the row in blocks of ``BLOCK_V``, reading each block before
writing it, so the dense form can write into the logits themselves.

A row whose target is outside [0, V) (an ignored token; the reference never selects one and has
no value for it) is treated as torch treats an ignored target: its gradient is exact zeros, and
neither its target, as an address, nor its logits are read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

__all__ = ["ce_grad_rows", "ce_grad_dense_", "MAX_BLOCK_V", "NUM_WARPS"]

# Tunables: the largest block of a row per loop iteration and the warps of one program (one row).
# Measured on an H100 (bf16, N = 8192, V = 32000..262144, a quarter of the rows selected): every
# block of 1024..8192 with 8 or 16 warps ran within a few % of 2.7 TB/s (a copy: 3.0 TB/s);
# 4096 x 16 was at the top for the dense form at every V.
MAX_BLOCK_V = 4096
NUM_WARPS = 16


def _block_v(V: int) -> int:
    return launch.block_v(V, MAX_BLOCK_V)


def _num_warps(block_v: int) -> int:
    return launch.num_warps(block_v, NUM_WARPS)


@triton.jit
def _grad_block(x, cols, tgt, lse, scale, w_ptr, wt, wsum_ptr, mask, c_main, c_smooth, eps,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """scale * gradient of one block ``cols`` of a row (fp32)."""
    p = tl.exp(x - lse)
    onehot = (cols == tgt).to(tl.float32)
    if HAS_WEIGHT:
        g = (c_main * wt) * (p - onehot)
        if HAS_SMOOTH:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            wsum = tl.load(wsum_ptr)
            g = g + c_smooth * (wsum * p - w)
    else:
        g = c_main * (p - onehot)
        if HAS_SMOOTH:
            g = g + eps * p - c_smooth
    return g * scale


@triton.jit
def _ce_grad_rows_kernel(
    x_ptr, tgt_ptr, lse_ptr, rows_ptr, scale_ptr, w_ptr, wsum_ptr, out_ptr,
    T, V,
    stride_b, stride_t, stride_v, stride_tgt, stride_lse, stride_rows, stride_scale, stride_out,
    c_main, c_smooth, eps,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, UNIT_STRIDE_V: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + k * stride_rows).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = x_ptr + (b * stride_b + t * stride_t)
    o_row = out_ptr + k * stride_out

    tgt = tl.load(tgt_ptr + row * stride_tgt).to(tl.int64)
    keep = (tgt >= 0) & (tgt < V)
    lse = tl.load(lse_ptr + row * stride_lse).to(tl.float32)
    scale = tl.load(scale_ptr + k * stride_scale).to(tl.float32)
    if HAS_WEIGHT:
        wt = tl.load(w_ptr + tl.where(keep, tgt, 0), mask=keep, other=0.0).to(tl.float32)
    else:
        wt = 1.0
    n_read = tl.where(keep, V, 0)  # columns of this row to read: all, or none

    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        if UNIT_STRIDE_V:
            ptrs = x_row + cols
        else:
            ptrs = x_row + cols.to(tl.int64) * stride_v
        read = cols < n_read
        x = tl.load(ptrs, mask=read, other=0.0).to(tl.float32)
        g = _grad_block(x, cols, tgt, lse, scale, w_ptr, wt, wsum_ptr, read, c_main, c_smooth, eps,
                        HAS_WEIGHT, HAS_SMOOTH)
        g = tl.where(keep, g, 0.0)
        tl.store(o_row + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_grad_dense_kernel(
    x_ptr, tgt_ptr, lse_ptr, scale_ptr, w_ptr, wsum_ptr, out_ptr,
    T, V,
    stride_b, stride_t, stride_v, stride_tgt, stride_lse, stride_scale,
    stride_ob, stride_ot, stride_ov,
    c_main, c_smooth, eps,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, UNIT_STRIDE_V: tl.constexpr,
    UNIT_STRIDE_OV: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = x_ptr + (b * stride_b + t * stride_t)
    o_row = out_ptr + (b * stride_ob + t * stride_ot)

    scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    tgt = tl.load(tgt_ptr + row * stride_tgt).to(tl.int64)
    keep = (scale != 0) & (tgt >= 0) & (tgt < V)
    lse = tl.load(lse_ptr + row * stride_lse).to(tl.float32)
    if HAS_WEIGHT:
        wt = tl.load(w_ptr + tl.where(keep, tgt, 0), mask=keep, other=0.0).to(tl.float32)
    else:
        wt = 1.0
    n_read = tl.where(keep, V, 0)  # columns of this row to read: all, or none

    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        if UNIT_STRIDE_V:
            ptrs = x_row + cols
        else:
            ptrs = x_row + cols.to(tl.int64) * stride_v
        # a row whose scale is 0 is never read: its loads are masked off
        read = cols < n_read
        x = tl.load(ptrs, mask=read, other=0.0).to(tl.float32)
        g = _grad_block(x, cols, tgt, lse, scale, w_ptr, wt, wsum_ptr, read, c_main, c_smooth,
                        eps, HAS_WEIGHT, HAS_SMOOTH)
        g = tl.where(keep, g, 0.0)
        if UNIT_STRIDE_OV:
            optrs = o_row + cols
        else:
            optrs = o_row + cols.to(tl.int64) * stride_ov
        tl.store(optrs, g.to(out_ptr.dtype.element_ty), mask=mask)


def _weight_args(weight: Tensor | None, V: int, label_smoothing: float, like: Tensor):
    """(weight pointer, sum(weight) pointer) for the kernels; the logits stand in for unused ones."""
    if weight is None:
        return like, like
    if weight.numel() != V:
        raise ValueError(f"cggr_hook: weight has {weight.numel()} entries for {V} classes")
    weight = weight.contiguous()
    wsum = weight.float().sum().reshape(1) if label_smoothing else like
    return weight, wsum


def _consts(label_smoothing: float, V: int):
    eps = float(label_smoothing)
    return 1.0 - eps, eps / V, eps


def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, rows: Tensor, scale: Tensor,
                 weight: Tensor | None, label_smoothing: float, out_dtype: torch.dtype) -> Tensor:
    """Compact gradient (K, V) in ``out_dtype``: row k is ``scale[k]`` times the gradient of row
    ``rows[k]``'s cross entropy (logits (B, T, V), any strides; rows int64 (K,)). A row whose
    target is outside [0, V) gets zeros."""
    if logits.dim() != 3:
        raise ValueError(f"cggr_hook: ce_grad_rows needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    K = rows.numel()
    out = torch.empty(K, V, dtype=out_dtype, device=logits.device)
    if K == 0 or V == 0:
        return out
    w, wsum = _weight_args(weight, V, label_smoothing, logits)
    c_main, c_smooth, eps = _consts(label_smoothing, V)
    block_v = _block_v(V)
    sb, st, sv = logits.stride()
    _ce_grad_rows_kernel[(K,)](
        logits, targets, lse, rows, scale, w, wsum, out,
        T, V, sb, st, sv, targets.stride(0), lse.stride(0), rows.stride(0), scale.stride(0), out.stride(0),
        c_main, c_smooth, eps,
        HAS_WEIGHT=weight is not None, HAS_SMOOTH=bool(label_smoothing), UNIT_STRIDE_V=(sv == 1),
        BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )
    return out


def ce_grad_dense_(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor,
                   weight: Tensor | None, label_smoothing: float, out: Tensor) -> Tensor:
    """Dense gradient written into ``out`` (B, T, V), which may be ``logits`` itself: row r gets
    ``row_scale[r]`` times its cross-entropy gradient where ``row_scale[r] != 0`` and exact zeros
    elsewhere (also where the target is outside [0, V)); a row whose scale is 0 is never read."""
    if logits.dim() != 3:
        raise ValueError(f"cggr_hook: ce_grad_dense_ needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    if out.shape != logits.shape:
        raise ValueError(f"cggr_hook: out has shape {tuple(out.shape)}, logits {tuple(logits.shape)}")
    B, T, V = logits.shape
    N = B * T
    if N == 0 or V == 0:
        return out
    w, wsum = _weight_args(weight, V, label_smoothing, logits)
    c_main, c_smooth, eps = _consts(label_smoothing, V)
    block_v = _block_v(V)
    sb, st, sv = logits.stride()
    ob, ot, ov = out.stride()
    _ce_grad_dense_kernel[(N,)](
        logits, targets, lse, row_scale, w, wsum, out,
        T, V, sb, st, sv, targets.stride(0), lse.stride(0), row_scale.stride(0), ob, ot, ov,
        c_main, c_smooth, eps,
        HAS_WEIGHT=weight is not None, HAS_SMOOTH=bool(label_smoothing), UNIT_STRIDE_V=(sv == 1),
        UNIT_STRIDE_OV=(ov == 1), BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )
    return out
