"""Triton difficulty rank: every row's place in the hardest-first order, in one launch.

The selection needs, before the host knows k, each row's position in the stable descending order
of difficulty (top-k is then ``rank < k``). A sort does that in about twenty launches (copies,
memsets, radix passes, the inverse permutation). Counting does it in one:

    rank[r] = #{j : d_j > d_r} + #{j < r : d_j = d_r}

which is the stable descending order exactly, ties by lower row index (the difficulty has no NaN
and no -0: ``reference.difficulty``; a NaN would rank as +inf). Each program ranks ``BLOCK_R`` rows
against all N in blocks of ``BLOCK_J``; a block of j entirely before the program's rows counts
``d_j >= d_r``, one entirely after counts ``d_j > d_r``, and only the block that holds the rows
themselves compares indices.
The program then scatters its rows into ``order[rank[r]] = r`` (ranks are a permutation, so every
slot is written once). O(N^2) compares: used up to ``MAX_ROWS`` rows, past which the sort is faster
on the device (``kernels.difficulty_rank`` switches; both give the same order).
"""

# Triton launches (kernel[grid](..., num_warps=...)) and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["difficulty_rank", "ascending_order", "MAX_ROWS", "BLOCK_R", "BLOCK_J", "NUM_WARPS"]

# Rows ranked by one program, the block of other rows compared per loop iteration, and the warps
# (the sweep: NOTES.md, "Constants of the code").
BLOCK_R = 16
BLOCK_J = 256
NUM_WARPS = 4
# Up to this many rows the counting rank beats torch's sort + scatter on the device; past it the
# sort does (O(N^2) compares against O(N log N); NOTES.md).
MAX_ROWS = 8192


@triton.jit
def _load_key(ptrs, mask, ASCENDING: tl.constexpr):
    """Keys to rank descending: the values, or their negation for an ascending order (ties stay
    ties, a +0 / -0 pair included); -inf where masked either way."""
    if ASCENDING:
        return -tl.load(ptrs, mask=mask, other=float("inf"))
    return tl.load(ptrs, mask=mask, other=float("-inf"))


@triton.jit
def _rank_kernel(d_ptr, rank_ptr, order_ptr, N, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, ASCENDING: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = rows < N
    d_r = _load_key(d_ptr + rows, inside, ASCENDING)
    # NaN ranks as +inf (the difficulty never holds one; this keeps ``order`` a permutation)
    d_r = tl.where(d_r != d_r, float("inf"), d_r)[:, None]
    cols = tl.arange(0, BLOCK_J)
    # hits accumulate element-wise and are summed once at the end: no reduction per block of j
    hits = tl.zeros([BLOCK_R, BLOCK_J], tl.int32)
    lo = pid * BLOCK_R  # first row of this program
    hi = lo + BLOCK_R
    # padding lanes past N load -inf: never greater than d_r, and equal only to a -inf d_r whose
    # row index is below theirs, which neither the index test nor the "after" rule counts
    d_next = _load_key(d_ptr + cols, cols < N, ASCENDING)
    for start in range(0, N, BLOCK_J):
        j = start + cols
        d_j = tl.where(d_next != d_next, float("inf"), d_next)[None, :]
        # the next block's load is issued before this one is compared
        d_next = _load_key(d_ptr + j + BLOCK_J, j + BLOCK_J < N, ASCENDING)
        if start + BLOCK_J <= lo:  # every j before every row here: ties count
            hit = d_j >= d_r
        elif start >= hi:  # every j after: ties do not
            hit = d_j > d_r
        else:
            hit = (d_j > d_r) | ((d_j == d_r) & (j[None, :] < rows[:, None]))
        hits += hit.to(tl.int32)
    rank = tl.sum(hits, axis=1).to(tl.int64)
    tl.store(rank_ptr + rows, rank, mask=inside)
    tl.store(order_ptr + rank, rows.to(tl.int64), mask=inside)


def _ranked(d: Tensor, ascending: bool, name: str) -> tuple[Tensor, Tensor]:
    if d.dim() != 1:
        raise ValueError(f"cggr_hook: {name} needs a 1-D tensor, got shape {tuple(d.shape)}")
    N = d.numel()
    if N > 2**30:
        raise ValueError(f"cggr_hook: {name} indexes in int32 and takes at most 2^30 rows, got {N}")
    d = d.contiguous()
    rank = torch.empty(N, dtype=torch.int64, device=d.device)
    order = torch.empty(N, dtype=torch.int64, device=d.device)
    if N:
        _rank_kernel[(triton.cdiv(N, BLOCK_R),)](
            d, rank, order, N, BLOCK_R=BLOCK_R, BLOCK_J=BLOCK_J, ASCENDING=ascending, num_warps=NUM_WARPS
        )
    return order, rank


def difficulty_rank(diff: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank) int64 (N,) of fp32 difficulties ``diff`` (N,): see ``reference.difficulty_rank``."""
    return _ranked(diff, False, "difficulty_rank")


def ascending_order(keys: Tensor) -> Tensor:
    """int64 (N,): the stable ascending order of fp32 ``keys`` (N,) without NaN, ties by lower index
    (``reference.ascending_order``): the same count, each key negated."""
    return _ranked(keys, True, "ascending_order")[0]
