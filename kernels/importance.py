"""Triton importance draw: water-filling, the systematic draw and the Horvitz-Thompson weights in
one launch (``reference.importance_draw`` defines what it computes).

One program walks the rows in blocks of ``BLOCK``, five passes with running carries:

0. every row in row order: the valid ones (``rank < n``) listed ascending by a running count, so
   that the j-th valid row is found from j (``perm`` orders the valid rows by these ordinals);
1. the valid rows in difficulty order (``order[:n]``): the sum of the scores (and of their squares,
   for the figures);
2. the same rows backwards: the tails sum_{i >= j} q_i by a reversed block scan, and m, the first
   j < k with (k - j) q_j <= tail_j, with rest = tail_m;
3. the valid rows in the random order ``perm``: the running sum of pi over the uncertain rows from m
   (the last one's end set to k) and F = min(ceil(cum - u), k), the points below it, stored by
   position, and each row's position in ``perm``;
4. every row in row order: drawn when certain or when F rose at its position; its key, its
   ``row_weight``, and the drawn rows compacted in ascending order by a running count, with 1 / pi
   and the figures' sums (and, only where rounding drew fewer than k, one more pass that fills the
   remaining slots with the first undrawn rows, as the reference's compaction does).

A row's pi is a function of its own score (and of m, rest and the sums), so passes 3 and 4 compute
it from ``diff`` where they need it; certain and valid come from ``rank``. Running sums enter each
block as its first (forward) or last (backward) element before the block scan, which under the
interpreter is exactly the sequential sum the reference takes. Passes 3 and 4 read what the pass
before them wrote at other rows' places, after a barrier (one program: the whole block of threads). The work is
O(N / BLOCK) iterations of a latency-bound walk; the point is one launch instead of ~90 small ones.
"""

# Triton launches (kernel[grid](..., num_warps=...)) and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false
# pyright: reportAttributeAccessIssue=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .counts import device_keep_count, float64_bits, ratio_argument
from .spec import DRAW_FIGURES, ImportanceDraw

__all__ = ["importance_draw", "importance_draw_at_ratio", "BLOCK", "NUM_WARPS"]

# rows a loop iteration and the warps of the one program (the sweep: NOTES.md, "Host time of a call")
BLOCK = 1024
NUM_WARPS = 8

_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # an fp32 value: exact as a constant
_NO_ROW: tl.constexpr = tl.constexpr(2147483647)
# a float constant reaches a kernel as fp32 (0.5 + 5e-10 would be 0.5): the float64 bits instead


@triton.jit
def _score(d, UNIFORM: tl.constexpr):
    if UNIFORM:
        return tl.full(d.shape, 1.0, tl.float64)
    else:
        return tl.minimum(d.to(tl.float64), _FLT_MAX)


@triton.jit
def _share(s, total, share_u, one_minus_a, a_over_n):
    share = tl.where(total > 0, s / tl.where(total > 0, total, 1.0), share_u)
    return one_minus_a * share + a_over_n


@triton.jit
def _last(x, idx, BLOCK: tl.constexpr):
    return tl.sum(tl.where(idx == BLOCK - 1, x, 0))


@triton.jit
def _first(x, idx):
    return tl.sum(tl.where(idx == 0, x, 0))


@triton.jit
def _importance_kernel(
    diff_ptr,
    order_ptr,
    rank_ptr,
    perm_ptr,
    u_ptr,
    norm_ptr,
    counts_ptr,
    vrows_ptr,
    F_ptr,
    pos_ptr,
    rows_ptr,
    inv_pi_ptr,
    row_weight_ptr,
    key_ptr,
    fig_ptr,
    N,
    n_arg,
    k_arg,
    norm_int,
    n_parts,
    counts_stride,
    ratio_bits,
    n_perm,
    capacity,
    FLOOR_BITS: tl.constexpr,
    UNIFORM: tl.constexpr,
    NORM_MODE: tl.constexpr,
    DEVICE_K: tl.constexpr,
    BLOCK: tl.constexpr,
    RATIO_PTR: tl.constexpr = False,
):
    idx = tl.arange(0, BLOCK)
    zero = tl.zeros([], tl.float64)
    floor = tl.full([], FLOOR_BITS, tl.int64).to(tl.float64, bitcast=True)
    if DEVICE_K:
        # n and k = keep_count(ratio, n) from the partial counts: nothing read on the host
        n64, k64 = device_keep_count(counts_ptr, n_parts, counts_stride, ratio_bits, BLOCK, RATIO_PTR)
        n = n64.to(tl.int32)
        k = k64.to(tl.int32)
    else:
        n = n_arg
        k = k_arg
    nf = zero + n
    kf = zero + k
    one_minus_a = 1.0 - floor
    a_over_n = floor / nf
    share_u = 1.0 / nf

    # 0. the valid rows, ascending
    n_seen = tl.zeros([], tl.int32)
    for start in range(0, N, BLOCK):
        r = start + idx
        inb = r < N
        valid = inb & (tl.load(rank_ptr + r, mask=inb, other=N) < n)
        v = valid.to(tl.int32)
        tl.store(vrows_ptr + n_seen + tl.cumsum(v, 0) - 1, r, mask=valid)
        n_seen += tl.sum(v)
    tl.debug_barrier()

    # 1. the sum of the scores, sequential through the blocks
    total = zero
    sq = zero
    for start in range(0, n, BLOCK):
        j = start + idx
        inb = j < n
        r = tl.load(order_ptr + j, mask=inb, other=0)
        s = tl.where(inb, _score(tl.load(diff_ptr + r, mask=inb, other=0.0), UNIFORM), 0.0)
        sq += tl.sum(s * s)
        run = tl.cumsum(tl.where(idx == 0, s + total, s), 0)
        total = _last(run, idx, BLOCK)

    # 2. tails from the end, and m: the first j < k that fits (j = k - 1 always does)
    m = tl.zeros([], tl.int32) + (k - 1)
    rest = zero
    carry = zero
    n_blocks = tl.cdiv(n, BLOCK)
    for b in range(0, n_blocks):
        j = (n_blocks - 1 - b) * BLOCK + idx
        inb = j < n
        r = tl.load(order_ptr + j, mask=inb, other=0)
        s = tl.where(inb, _score(tl.load(diff_ptr + r, mask=inb, other=0.0), UNIFORM), 0.0)
        q = tl.where(inb, _share(s, total, share_u, one_minus_a, a_over_n), 0.0)
        tail = tl.cumsum(tl.where(idx == BLOCK - 1, q + carry, q), 0, reverse=True)
        carry = _first(tail, idx)
        fits = (j < k) & (((k - j).to(tl.float64) * q <= tail) | (j == k - 1))
        jm = tl.min(tl.where(fits, j, _NO_ROW))
        found = jm < _NO_ROW
        rest = tl.where(found, tl.sum(tl.where(j == jm, tail, 0.0)), rest)
        m = tl.where(found, jm, m)

    # every valid row kept (k = n, only where k is counted here): all certain
    m = tl.where(k >= n, n, m)
    left = (k - m).to(tl.float64)
    c = left / tl.where(rest > 0, rest, 1.0)
    spread = left / (n - m).to(tl.float64)
    n_unc = n - m

    # 3. the random order of the valid rows: running pi of the uncertain ones from m, F by position
    u = tl.load(u_ptr)
    cum_carry = m.to(tl.float64)
    cnt_carry = tl.zeros([], tl.int32)
    for start in range(0, n_perm, BLOCK):
        i = start + idx
        inb = i < n_perm
        o = tl.load(perm_ptr + i, mask=inb, other=0)
        # ordinals past n (``perm`` over one key per row of the call) are no valid row: they take
        # no room on the line, and F runs on through them unchanged
        live = inb & (o < n)
        r = tl.load(vrows_ptr + o, mask=live, other=0)
        rk = tl.load(rank_ptr + r, mask=live, other=N)
        unc = live & (rk >= m)
        s = tl.where(unc, _score(tl.load(diff_ptr + r, mask=unc, other=0.0), UNIFORM), 0.0)
        q = _share(s, total, share_u, one_minus_a, a_over_n)
        pi = tl.where(rest > 0, tl.minimum(c * q, 1.0), spread)
        x = tl.where(unc, pi, 0.0)
        cum = tl.cumsum(tl.where(idx == 0, x + cum_carry, x), 0)
        cum_carry = _last(cum, idx, BLOCK)
        cnt = cnt_carry + tl.cumsum(unc.to(tl.int32), 0)
        cnt_carry = _last(cnt, idx, BLOCK)
        cum = tl.where(cnt == n_unc, kf, cum)
        F = tl.minimum(tl.ceil(cum - u), kf).to(tl.int32)
        tl.store(F_ptr + i, F, mask=inb)
        tl.store(pos_ptr + r, i, mask=live)
    tl.debug_barrier()

    # 4. row order: drawn rows, their keys and weights, compacted ascending
    if NORM_MODE == 1:
        norm = tl.load(norm_ptr).to(tl.float64)
    elif NORM_MODE == 2:  # the plain mean's n (1 where n = 0: then nothing is drawn)
        norm = zero + tl.maximum(n, 1)
    else:
        norm = zero + norm_int
    n_drawn = tl.zeros([], tl.int32)
    sum_w = zero
    sum_w2 = zero
    max_w = zero
    for start in range(0, N, BLOCK):
        r = start + idx
        inb = r < N
        rk = tl.load(rank_ptr + r, mask=inb, other=N)
        certain = inb & (rk < m)
        unc = inb & (rk < n) & (rk >= m)
        p = tl.load(pos_ptr + r, mask=unc, other=0)
        F = tl.load(F_ptr + p, mask=unc, other=0)
        F_prev = tl.load(F_ptr + p - 1, mask=unc & (p > 0), other=m)
        drawn = certain | (unc & (F > F_prev))
        s = tl.where(unc, _score(tl.load(diff_ptr + r, mask=unc, other=0.0), UNIFORM), 0.0)
        q = _share(s, total, share_u, one_minus_a, a_over_n)
        pi = tl.where(certain, 1.0, tl.where(rest > 0, tl.minimum(c * q, 1.0), spread))
        w = tl.where(drawn, 1.0 / tl.where(drawn, pi, 1.0), 0.0)
        tl.store(row_weight_ptr + r, (w / norm).to(tl.float32), mask=inb)
        tl.store(key_ptr + r, tl.where(drawn, 0, 1).to(tl.int64), mask=inb)
        d = drawn.to(tl.int32)
        slot = n_drawn + tl.cumsum(d, 0) - 1
        keep = drawn & (slot < capacity)
        tl.store(rows_ptr + slot, r.to(tl.int64), mask=keep)
        tl.store(inv_pi_ptr + slot, w, mask=keep)
        n_drawn += tl.sum(d)
        sum_w += tl.sum(w)
        sum_w2 += tl.sum(w * w)
        max_w = tl.maximum(max_w, tl.max(w))

    # fewer than k drawn only where rounding let one row's span hold two points (|error| ~1e-16
    # of the line): the missing slots take the first undrawn rows (key 1: weight and gradient
    # zero), as the reference's compaction does, so that no slot is left unwritten
    # (where k is counted here, the rows past it up to ``capacity`` are filled the same way)
    if n_drawn < capacity:
        tl.debug_barrier()
        n_fill = tl.zeros([], tl.int32)
        for start in range(0, N, BLOCK):
            r = start + idx
            inb = r < N
            und = inb & (tl.load(key_ptr + r, mask=inb, other=0) == 1)
            slot = n_drawn + n_fill + tl.cumsum(und.to(tl.int32), 0) - 1
            put = und & (slot < capacity)
            tl.store(rows_ptr + slot, r.to(tl.int64), mask=put)
            tl.store(inv_pi_ptr + slot, tl.full([BLOCK], 1.0, tl.float64), mask=put)
            n_fill += tl.sum(und.to(tl.int32))

    f = tl.arange(0, 8)
    fig = tl.where(f == 0, sum_w * sum_w / sum_w2, max_w)
    fig = tl.where(f == 2, m.to(tl.float64), fig)
    fig = tl.where(f == 3, total / nf, fig)
    fig = tl.where(f == 4, sq / nf, fig)
    fig = tl.where(f == 5, nf, fig)
    fig = tl.where(f == 6, kf, fig)
    tl.store(fig_ptr + f, fig, mask=f < 7)


def importance_draw(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    n_valid: int,
    k: int,
    floor: float,
    uniform: bool,
    norm: int | Tensor | None,
) -> ImportanceDraw:
    """k rows drawn from the ``n_valid`` valid ones, their weights, key and figures: see
    ``reference.importance_draw``. One program, one launch."""
    return _launch(diff, order, rank, perm, u, floor, uniform, norm, n_valid=n_valid, k=k)


def importance_draw_at_ratio(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    counts: Tensor,
    ratio: float | Tensor,
    capacity: int,
    floor: float,
    uniform: bool,
    norm: int | Tensor | None,
) -> ImportanceDraw:
    """The draw with n and k counted on the device from the partial counts ``counts`` (their first
    column) and ``ratio``: see ``reference.importance_draw_at_ratio``. One program, one launch, and nothing
    read on the host."""
    return _launch(diff, order, rank, perm, u, floor, uniform, norm, counts=counts, ratio=ratio, capacity=capacity)


def _launch(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    floor: float,
    uniform: bool,
    norm: int | Tensor | None,
    n_valid: int = 0,
    k: int = 0,
    counts: Tensor | None = None,
    ratio: float | Tensor = 0.0,
    capacity: int = 0,
) -> ImportanceDraw:
    N = diff.numel()
    dev = diff.device
    if N >= 2**31:
        raise ValueError(f"cggr_hook: importance_draw indexes in int32 and takes fewer than 2^31 rows, got {N}")
    device_k = counts is not None
    n_rows = N if device_k else n_valid  # rows of the valid list and of the random order
    slots = capacity if device_k else k
    # the valid rows ascending, F by position in ``perm``, each valid row's position there
    work = torch.empty(2 * n_rows + N, dtype=torch.int32, device=dev)
    rows = torch.empty(slots, dtype=torch.int64, device=dev)
    inv_pi = torch.empty(slots, dtype=torch.float64, device=dev)
    row_weight = torch.empty(N, dtype=torch.float32, device=dev)
    key = torch.empty(N, dtype=torch.int64, device=dev)
    figures = torch.empty(len(DRAW_FIGURES), dtype=torch.float64, device=dev)
    norm_mode = 2 if norm is None else 1 if isinstance(norm, Tensor) else 0
    floor_bits = float64_bits(floor)
    ratio_arg, ratio_ptr = ratio_argument(ratio)
    _importance_kernel[(1,)](
        diff.contiguous(),
        order.contiguous(),
        rank.contiguous(),
        perm.contiguous(),
        u,
        norm if isinstance(norm, Tensor) else u,
        counts if counts is not None else u,
        work[:n_rows],
        work[n_rows : 2 * n_rows],
        work[2 * n_rows :],
        rows,
        inv_pi,
        row_weight,
        key,
        figures,
        N,
        n_valid,
        k,
        norm if isinstance(norm, int) else 1,
        counts.shape[0] if counts is not None else 0,
        counts.stride(0) if counts is not None else 0,
        ratio_arg,
        perm.numel(),
        slots,
        FLOOR_BITS=floor_bits,
        UNIFORM=bool(uniform),
        NORM_MODE=norm_mode,
        DEVICE_K=device_k,
        BLOCK=BLOCK,
        RATIO_PTR=ratio_ptr,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return ImportanceDraw(rows, inv_pi, row_weight, key, figures)
