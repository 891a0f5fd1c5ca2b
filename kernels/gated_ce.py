"""Triton cross-entropy gradient rows (see ``reference.ce_grad_rows`` / ``reference.ce_grad_dense_``).

Row r's gradient, p_j = exp(x_j - lse_r), w = 1 without class weights:

    g_j = scale_r * ((1 - eps) w_t (p_j - [j == t]) + (eps / V) (sum(w) p_j - w_j))

A row is split into chunks of ``CHUNK_BLOCKS`` blocks of ``BLOCK_V`` columns, one program a chunk
(the chunks of a row are neighbours in the launch). A program loops over its chunk a block at a
time, reading each block before writing it, so the dense form can write into the logits themselves.

A row whose target is outside [0, V) (an ignored token; the reference never selects one and has
no value for it) is treated as torch treats an ignored target: its gradient is exact zeros, and
neither its target, as an address, nor its logits are read.
"""

# Triton launches (kernel[grid](..., num_warps=...)) and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .counts import device_keep_count, ratio_argument
from .spec import REDUCTIONS, check_reduction, check_row_scale, check_weight, flat_upstream

__all__ = ["selected_loss", "ce_grad_rows", "ce_grad_dense_", "MAX_BLOCK_V", "NUM_WARPS"]

# Launch shape: the largest block of a row per loop iteration and the warps of one program.
MAX_BLOCK_V = 4096
NUM_WARPS = 16
# Blocks of a row one program writes: a row of V columns is split into cdiv(V, CHUNK_BLOCKS *
# BLOCK_V) programs, so that programs are short and the last ones of the launch (the tail, where
# the card is not kept busy) are short too. Both sweeps: NOTES.md ("Constants of the code").
CHUNK_BLOCKS = 4


def _block_v(V: int) -> int:
    return launch.block_v(V, MAX_BLOCK_V)


def _num_warps(block_v: int) -> int:
    return launch.num_warps(block_v, NUM_WARPS)


def _chunk(V: int, block_v: int) -> tuple[int, int]:
    """(columns a program writes, programs a row): whole blocks, at least one program a row."""
    chunk = block_v * max(1, min(CHUNK_BLOCKS, triton.cdiv(max(V, 1), block_v)))  # never past the row
    return chunk, triton.cdiv(max(V, 1), chunk)


LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _grad_block(
    x,
    cols,
    tgt,
    lse,
    scale,
    w_ptr,
    wt,
    wsum_ptr,
    mask,
    c_main,
    c_smooth,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
):
    """scale * gradient of one block ``cols`` of a row (fp32)."""
    # exp through exp2: one flush-to-zero ex2 instruction an element, where tl.exp adds three to
    # keep results below 2^-126 (~1e-38): such probabilities become exact zeros
    p = tl.exp2((x - lse) * LOG2E)
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
def _write_row(
    x_row,
    o_row,
    keep,
    col0,
    col1,
    V,
    stride_v,
    stride_ov,
    tgt,
    lse,
    scale,
    w_ptr,
    wsum_ptr,
    c_main,
    c_smooth,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    UNIT_STRIDE_V: tl.constexpr,
    UNIT_STRIDE_OV: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Columns [col0, col1) of row ``o_row`` of the output (col0 a multiple of BLOCK_V, col1 one
    too or V): scale * the gradient of row ``x_row`` where ``keep``; else zeros, with the row never
    read and no arithmetic (stores only)."""
    offs = tl.arange(0, BLOCK_V)
    if keep:
        if HAS_WEIGHT:
            wt = tl.load(w_ptr + tgt).to(tl.float32)
        else:
            wt = 1.0
        for start in range(col0, col1, BLOCK_V):
            cols = start + offs
            mask = cols < V
            if UNIT_STRIDE_V:
                ptrs = x_row + cols
            else:
                ptrs = x_row + cols.to(tl.int64) * stride_v
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            g = _grad_block(
                x, cols, tgt, lse, scale, w_ptr, wt, wsum_ptr, mask, c_main, c_smooth, eps, HAS_WEIGHT, HAS_SMOOTH
            )
            if UNIT_STRIDE_OV:
                optrs = o_row + cols
            else:
                optrs = o_row + cols.to(tl.int64) * stride_ov
            tl.store(optrs, g.to(o_row.dtype.element_ty), mask=mask)
    else:
        zeros = tl.zeros([BLOCK_V], tl.float32).to(o_row.dtype.element_ty)
        for start in range(col0, col1, BLOCK_V):
            cols = start + offs
            if UNIT_STRIDE_OV:
                optrs = o_row + cols
            else:
                optrs = o_row + cols.to(tl.int64) * stride_ov
            tl.store(optrs, zeros, mask=cols < V)


@triton.jit
def _ce_grad_rows_kernel(
    x_ptr,
    tgt_ptr,
    lse_ptr,
    rows_ptr,
    scale_ptr,
    gout_ptr,
    w_ptr,
    wsum_ptr,
    out_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    stride_tgt,
    stride_lse,
    stride_rows,
    stride_scale,
    stride_gout,
    stride_out,
    c_main,
    c_smooth,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    UNIT_STRIDE_V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # program = (output row k, chunk of CHUNK columns), the chunks of a row side by side
    pid = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(V, CHUNK)
    k = pid // n_chunks
    col0 = (pid - k * n_chunks) * CHUNK
    row = tl.load(rows_ptr + k * stride_rows).to(tl.int64)
    b = row // T
    t = row - b * T
    tgt = tl.load(tgt_ptr + row * stride_tgt).to(tl.int64)
    lse = tl.load(lse_ptr + row * stride_lse).to(tl.float32)
    row_scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    scale = row_scale
    if HAS_GOUT:  # the upstream gradient: one element (stride 0) or one per row
        scale = scale * tl.load(gout_ptr + row * stride_gout).to(tl.float32)
    # a listed row off the selection (scale 0: an importance draw's slots past k) is exact zeros,
    # whatever the upstream gradient there, as in the dense kernel
    _write_row(
        x_ptr + (b * stride_b + t * stride_t),
        out_ptr + k * stride_out,
        (row_scale != 0) & (tgt >= 0) & (tgt < V),
        col0,
        tl.minimum(col0 + CHUNK, V),
        V,
        stride_v,
        1,
        tgt,
        lse,
        scale,
        w_ptr,
        wsum_ptr,
        c_main,
        c_smooth,
        eps,
        HAS_WEIGHT,
        HAS_SMOOTH,
        UNIT_STRIDE_V,
        True,
        BLOCK_V,
    )


@triton.jit
def _ce_grad_dense_kernel(
    x_ptr,
    tgt_ptr,
    lse_ptr,
    scale_ptr,
    gout_ptr,
    w_ptr,
    wsum_ptr,
    out_ptr,
    order_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    stride_tgt,
    stride_lse,
    stride_scale,
    stride_gout,
    stride_ob,
    stride_ot,
    stride_ov,
    c_main,
    c_smooth,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    UNIT_STRIDE_V: tl.constexpr,
    UNIT_STRIDE_OV: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # program = (row slot i, chunk of CHUNK columns), the chunks of a row side by side
    pid = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(V, CHUNK)
    i = pid // n_chunks
    col0 = (pid - i * n_chunks) * CHUNK
    if HAS_ORDER:
        # row slots take the rows in reverse of the given order (see ce_grad_dense_)
        row = tl.load(order_ptr + (tl.num_programs(0) // n_chunks - 1 - i)).to(tl.int64)
    else:
        row = i
    b = row // T
    t = row - b * T
    row_scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    # the upstream gradient: one element (stride 0) or one per row
    scale = row_scale * tl.load(gout_ptr + row * stride_gout).to(tl.float32)
    tgt = tl.load(tgt_ptr + row * stride_tgt).to(tl.int64)
    lse = tl.load(lse_ptr + row * stride_lse).to(tl.float32)
    _write_row(
        x_ptr + (b * stride_b + t * stride_t),
        out_ptr + (b * stride_ob + t * stride_ot),
        (row_scale != 0) & (tgt >= 0) & (tgt < V),
        col0,
        tl.minimum(col0 + CHUNK, V),
        V,
        stride_v,
        stride_ov,
        tgt,
        lse,
        scale,
        w_ptr,
        wsum_ptr,
        c_main,
        c_smooth,
        eps,
        HAS_WEIGHT,
        HAS_SMOOTH,
        UNIT_STRIDE_V,
        UNIT_STRIDE_OV,
        BLOCK_V,
    )


def _weight_args(weight: Tensor | None, V: int, label_smoothing: float, like: Tensor):
    """(weight pointer, sum(weight) pointer) for the kernels; the logits stand in for unused ones."""
    if weight is None:
        return like, like
    check_weight(weight, V)
    weight = weight.contiguous()
    wsum = weight.float().sum().reshape(1) if label_smoothing else like
    return weight, wsum


def _consts(label_smoothing: float, V: int):
    eps = float(label_smoothing)
    return 1.0 - eps, eps / V, eps


def ce_grad_rows(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    rows: Tensor,
    row_scale: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    out_dtype: torch.dtype,
    grad_output: Tensor | None = None,
) -> Tensor:
    """Compact gradient (K, V) in ``out_dtype``: row k is ``row_scale[rows[k]] * grad_output``
    times the gradient of row ``rows[k]``'s cross entropy (logits (B, T, V), any strides; rows
    int64 (K,); row_scale (N,); grad_output one element or one per row (N,), None = 1): the
    scale's gather and product happen in the kernel, not in two more launches. A row whose target
    is outside [0, V) gets zeros."""
    if logits.dim() != 3:
        raise ValueError(f"cggr_hook: ce_grad_rows needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    K = rows.numel()
    out = torch.empty(K, V, dtype=out_dtype, device=logits.device)
    check_row_scale(row_scale, B * T)
    g_out = flat_upstream(grad_output, B * T)
    if K == 0 or V == 0:
        return out
    w, wsum = _weight_args(weight, V, label_smoothing, logits)
    c_main, c_smooth, eps = _consts(label_smoothing, V)
    block_v = _block_v(V)
    sb, st, sv = logits.stride()
    chunk, n_chunks = _chunk(V, block_v)
    _ce_grad_rows_kernel[(K * n_chunks,)](
        logits,
        targets,
        lse,
        rows,
        row_scale,
        g_out if g_out is not None else lse,
        w,
        wsum,
        out,
        T,
        V,
        sb,
        st,
        sv,
        targets.stride(0),
        lse.stride(0),
        rows.stride(0),
        row_scale.stride(0),
        0 if g_out is None or g_out.numel() == 1 else g_out.stride(0),
        out.stride(0),
        c_main,
        c_smooth,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTH=bool(label_smoothing),
        HAS_GOUT=g_out is not None,
        UNIT_STRIDE_V=(sv == 1),
        BLOCK_V=block_v,
        CHUNK=chunk,
        num_warps=_num_warps(block_v),
        enable_fp_fusion=True,  # FMA contraction, as the shapes were chosen (NOTES.md)
    )
    return out


def ce_grad_dense_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    row_scale: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    out: Tensor,
    grad_output: Tensor | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """Dense gradient written into ``out`` (B, T, V), which may be ``logits`` itself: row r gets
    ``row_scale[r] * grad_output`` times its cross-entropy gradient where ``row_scale[r] != 0``
    and exact zeros elsewhere (also where the target is outside [0, V)); a row whose scale is 0 is
    never read. ``grad_output``: one element or one per row (N,); None = 1.

    ``order`` (int64 (N,), a permutation of the rows; only the schedule, never the values): the
    programs take the rows in its reverse. With the difficulty order of a top-k selection, whose
    first k rows are the selected ones, the zero rows stream out first and the selected rows are
    read and written after them, instead of the two kinds of traffic interleaving row by row."""
    if logits.dim() != 3:
        raise ValueError(f"cggr_hook: ce_grad_dense_ needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    if out.shape != logits.shape:
        raise ValueError(f"cggr_hook: out has shape {tuple(out.shape)}, logits {tuple(logits.shape)}")
    B, T, V = logits.shape
    N = B * T
    check_row_scale(row_scale, N)
    g_out = flat_upstream(grad_output, N)
    if N == 0 or V == 0:
        return out
    w, wsum = _weight_args(weight, V, label_smoothing, logits)
    c_main, c_smooth, eps = _consts(label_smoothing, V)
    block_v = _block_v(V)
    sb, st, sv = logits.stride()
    ob, ot, ov = out.stride()
    if g_out is None:
        g_out = torch.ones(1, dtype=torch.float32, device=logits.device)
    chunk, n_chunks = _chunk(V, block_v)
    _ce_grad_dense_kernel[(N * n_chunks,)](
        logits,
        targets,
        lse,
        row_scale,
        g_out,
        w,
        wsum,
        out,
        order.contiguous() if order is not None else lse,
        T,
        V,
        sb,
        st,
        sv,
        targets.stride(0),
        lse.stride(0),
        row_scale.stride(0),
        0 if g_out.numel() == 1 else g_out.stride(0),
        ob,
        ot,
        ov,
        c_main,
        c_smooth,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTH=bool(label_smoothing),
        UNIT_STRIDE_V=(sv == 1),
        UNIT_STRIDE_OV=(ov == 1),
        HAS_ORDER=order is not None,
        BLOCK_V=block_v,
        CHUNK=chunk,
        num_warps=_num_warps(block_v),
        enable_fp_fusion=True,  # FMA contraction, as the shapes were chosen (NOTES.md)
    )
    return out


# The loss of the selected rows: one program walks all N rows in blocks of LOSS_BLOCK, so the sums
# are taken in one fixed order (deterministic) and no second launch is needed to finish them. The
# walk is latency-bound, so wide blocks pay (NOTES.md, "Constants of the code").
LOSS_BLOCK = 8192
LOSS_WARPS = 16


@triton.jit
def _selected_loss_kernel(
    nll_ptr,
    lse_ptr,
    wsum_row_ptr,
    tgt_ptr,
    w_ptr,
    w_total_ptr,
    key_ptr,
    rw_ptr,
    count_ptr,
    counts_ptr,
    selected_ptr,
    loss_ptr,
    scale_ptr,
    N,
    V,
    stride_tgt,
    sel_k_arg,
    c_main,
    c_smooth,
    w_total,
    factor_arg,
    n_parts,
    counts_stride,
    ratio_bits,
    REDUCTION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    DEVICE_K: tl.constexpr,
    COUNT_SELECTED: tl.constexpr,
    BLOCK: tl.constexpr,
    RATIO_PTR: tl.constexpr = False,
):
    offs = tl.arange(0, BLOCK)
    total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    denom = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    if DEVICE_K:
        # top-k at a ratio the host knows: n from the partial counts' first column, k =
        # keep_count(ratio, n) in float64 as spec.keep_count computes it, the sum's factor n / k
        # rounded once to fp32 as the host's float argument would be: nothing read on the host
        n64, k64 = device_keep_count(counts_ptr, n_parts, counts_stride, ratio_bits, BLOCK, RATIO_PTR)
        sel_k = k64
        factor = tl.where(k64 > 0, n64.to(tl.float64) / tl.maximum(k64, 1).to(tl.float64), 0.0).to(tl.float32)
    else:
        n64 = tl.zeros([], tl.int64)
        sel_k = sel_k_arg
        factor = factor_arg
    if HAS_WEIGHT:
        if HAS_SMOOTH:
            w_total = tl.load(w_total_ptr)
    for start in range(0, N, BLOCK):
        rows = start + offs
        inside = rows < N
        sel = inside & (tl.load(key_ptr + rows, mask=inside, other=0) < sel_k)
        if HAS_WEIGHT:
            tgt = tl.load(tgt_ptr + rows.to(tl.int64) * stride_tgt, mask=sel, other=0).to(tl.int64)
            w_t = tl.load(w_ptr + tgt, mask=sel, other=0.0).to(tl.float32)
        else:
            w_t = tl.where(sel, 1.0, 0.0)
        # same operations, same order as reference.selected_loss (launched without FMA contraction)
        ce = c_main * w_t * tl.load(nll_ptr + rows, mask=sel, other=0.0)
        if HAS_SMOOTH:
            lse = tl.load(lse_ptr + rows, mask=sel, other=0.0)
            ws = tl.load(wsum_row_ptr + rows, mask=sel, other=0.0)
            ce = ce + c_smooth * (w_total * lse - ws)
        ce = tl.where(sel, ce, 0.0)
        if HAS_ROW_WEIGHT:
            # each selected row's own factor (importance sampling): a weighted sum, no denominator
            rho = tl.load(rw_ptr + rows, mask=sel, other=0.0)
            ce = ce * rho
            tl.store(scale_ptr + rows, rho, mask=inside)
            if REDUCTION == 2:
                tl.store(loss_ptr + rows, ce, mask=inside)
            else:
                total += tl.sum(ce, axis=0)
        elif REDUCTION == 2:
            tl.store(loss_ptr + rows, ce, mask=inside)
            tl.store(scale_ptr + rows, tl.where(sel, 1.0, 0.0), mask=inside)
        else:
            total += tl.sum(ce, axis=0)
            denom += tl.sum(w_t, axis=0)
            if REDUCTION == 1:  # (with COUNT_SELECTED, written again below: this walk stays as it is)
                tl.store(scale_ptr + rows, tl.where(sel, factor, 0.0), mask=inside)
    if COUNT_SELECTED:
        # sequence_aware: the rows every sequence keeps joined the top k (their key below any k),
        # a selection whose size the host does not know: counted in a walk of its own, which
        # leaves the loss's walk (and its sums' order) that of a selection by key alone; the
        # sum's factor is n over that size
        n_sel = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
        for start in range(0, N, BLOCK):
            rows = start + offs
            inside = rows < N
            n_sel += tl.sum((inside & (tl.load(key_ptr + rows, mask=inside, other=0) < sel_k)).to(tl.int64), axis=0)
        tl.store(selected_ptr, n_sel)
        if REDUCTION == 1:
            factor = tl.where(n_sel > 0, n64.to(tl.float64) / tl.maximum(n_sel, 1).to(tl.float64), 0.0).to(tl.float32)
    if HAS_ROW_WEIGHT:
        if REDUCTION == 0 and HAS_COUNT:  # the mean over no valid row: NaN, as torch gives
            total = tl.where(tl.load(count_ptr) == 0, float("nan"), total)
        if REDUCTION != 2:
            tl.store(loss_ptr, total)
    elif REDUCTION == 0 or (REDUCTION == 1 and COUNT_SELECTED):
        if REDUCTION == 0:
            tl.store(loss_ptr, total / denom)
            inv = 1.0 / denom
        else:
            tl.store(loss_ptr, total * factor)
            inv = factor
        # a second walk writes the scale now that the denominator (the factor) is known
        for start in range(0, N, BLOCK):
            rows = start + offs
            inside = rows < N
            sel = inside & (tl.load(key_ptr + rows, mask=inside, other=0) < sel_k)
            tl.store(scale_ptr + rows, tl.where(sel, inv, 0.0), mask=inside)
    elif REDUCTION == 1:
        tl.store(loss_ptr, total * factor)


def selected_loss(
    stats,
    targets: Tensor,
    vocab: int,
    sel_key: Tensor,
    sel_k: int,
    n_selected: int,
    n_valid: int,
    reduction: str,
    label_smoothing: float,
    weight: Tensor | None,
    row_weight: Tensor | None = None,
    count: Tensor | None = None,
    counts: Tensor | None = None,
    ratio: float | Tensor = 0.0,
    keep: Tensor | None = None,
    selected: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated loss of the selected rows (``sel_key < sel_k``) and ``row_scale`` (N,), each
    selected row weighted by ``row_weight`` when given: see ``reference.selected_loss``. With
    ``counts`` (partial counts whose first column counts the valid targets), n, k =
    ``spec.keep_count(ratio, n)`` and the sum's factor n / k are taken on the device in place of
    ``n_valid``, ``sel_k`` and ``n_selected``; ``keep`` (bool (N,)) adds its rows to those, the
    union's size written to ``selected`` (int64 (1,)). One program, one launch; sums in a fixed
    order."""
    if keep is not None and (counts is None or selected is None or row_weight is not None):
        raise ValueError(
            "cggr_hook: selected_loss takes keep only with counts and a selected buffer, and without row_weight"
        )
    check_reduction(reduction)
    N = targets.numel()
    dev = stats.lse.device
    loss = torch.empty(N if reduction == "none" else (), dtype=torch.float32, device=dev)
    row_scale = torch.empty(N, dtype=torch.float32, device=dev)
    ls = float(label_smoothing)
    has_weight = weight is not None
    if has_weight:
        check_weight(weight, vocab)
        weight = weight.contiguous()
        w_total_t = weight.float().sum().reshape(1) if ls else stats.lse
    else:
        w_total_t = stats.lse
    if ls and stats.wsum is None:
        raise ValueError("cggr_hook: label smoothing needs the statistics' wsum (row_stats(with_wsum=True))")
    factor = n_valid / n_selected if n_selected else 0.0
    ratio_arg, ratio_ptr = ratio_argument(ratio)
    if row_weight is not None and (row_weight.numel() != N or row_weight.dtype != torch.float32):
        raise ValueError(
            f"cggr_hook: row_weight must be fp32 of {N} rows, got {row_weight.dtype} of shape {tuple(row_weight.shape)}"
        )
    _selected_loss_kernel[(1,)](
        stats.nll,
        stats.lse,
        stats.wsum if ls else stats.lse,
        targets,
        weight if has_weight else stats.lse,
        w_total_t,
        # the kept rows' key below any k: selected whatever the top k is
        (sel_key if keep is None else torch.where(keep, -1, sel_key)).contiguous(),
        row_weight.contiguous() if row_weight is not None else stats.lse,
        count if count is not None else stats.lse,
        counts if counts is not None else stats.lse,
        selected if selected is not None else stats.lse,
        loss,
        row_scale,
        N,
        vocab,
        targets.stride(0),
        int(sel_k),
        1.0 - ls,
        ls / vocab,
        float(vocab),
        factor,
        counts.shape[0] if counts is not None else 0,
        counts.stride(0) if counts is not None else 0,
        ratio_arg,
        REDUCTION=REDUCTIONS[reduction],
        HAS_WEIGHT=has_weight,
        HAS_SMOOTH=bool(ls),
        HAS_ROW_WEIGHT=row_weight is not None,
        HAS_COUNT=count is not None,
        DEVICE_K=counts is not None,
        COUNT_SELECTED=keep is not None,
        BLOCK=LOSS_BLOCK,
        RATIO_PTR=ratio_ptr,
        num_warps=LOSS_WARPS,
        enable_fp_fusion=False,
    )
    return loss, row_scale
