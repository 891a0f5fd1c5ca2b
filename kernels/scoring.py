"""Triton row statistics: one streaming pass over each logits row (see ``reference.row_stats``).

One program per row walks the row's V logits in blocks of ``BLOCK_V`` with an online softmax:
running max ``m``, ``s = sum exp(x - m)`` and ``a = sum exp(x - m) (x - m)``, so that
``lse = m + log s`` and the entropy ``H = log s - a / s`` need no second pass. The largest logit
is ``m``; the second largest ``t2`` comes from one reduction of each block to its top two
(``_top2_combine``: a value equal to the largest counts, so a tied maximum gives ``top2 == top1``).
All state is scalar and accumulates in fp32 whatever the logits' dtype.

Two load paths, same arithmetic (``load_path`` picks): large aligned bf16 / fp16 logits come through
a tensor descriptor, several blocks in flight in shared memory (``_row_stats_tma_kernel``);
everything else through plain loads with the next block prefetched in registers
(``_row_stats_kernel``).

-inf logits: a -inf (and a lane past the end of the row) is replaced by -FLT_MAX, which contributes
exp(-FLT_MAX - m) = 0 to ``s`` and 0 to ``a`` (no 0 * inf) once the row has a finite logit. A row
whose logits are all -inf gives what the reference gives: lse = -inf, NaN entropy and
probabilities (p_top2 = 0 when V = 1), a NaN nll for a valid target. A NaN logit makes its row's
statistics NaN (nll stays 0 for an ignored target, p_top2 0 when V = 1), as in the reference.
"""

# Triton launches (kernel[grid](..., num_warps=...)) and @triton.jit bodies are not Python that pyright can type:
# pyright: reportCallIssue=false, reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # host-side tensor descriptors (Triton 3.4 and newer); without them every call takes plain loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from . import launch, spec
from .spec import RowStats, check_weight

__all__ = [
    "row_stats",
    "load_path",
    "row_difficulty",
    "target_counts",
    "MAX_BLOCK_V",
    "NUM_WARPS",
    "DIFFICULTY_BLOCK",
    "COUNT_BLOCK",
    "COUNT_PROGRAMS",
]

# Launch shape of the plain-load path: the largest block of a row read per loop iteration, and the
# warps of one program (one row). One warp a row keeps each iteration's block reductions inside the
# warp (no barrier); the sweep behind both is in NOTES.md ("Constants of the code").
MAX_BLOCK_V = 2048
NUM_WARPS = 1


def _block_v(V: int) -> int:
    return launch.block_v(V, MAX_BLOCK_V)


def _num_warps(block_v: int) -> int:
    return launch.num_warps(block_v, NUM_WARPS)


LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _load_block(x_row, cols, V, stride_v, UNIT_STRIDE_V: tl.constexpr):
    """Columns ``cols`` of a row, -inf past its end; int64 offsets unless the stride is 1."""
    if UNIT_STRIDE_V:
        ptrs = x_row + cols
    else:
        ptrs = x_row + cols.to(tl.int64) * stride_v
    return tl.load(ptrs, mask=cols < V, other=float("-inf"))


@triton.jit
def _top2_combine(a1, a2, b1, b2):
    """The two largest of {a1, a2, b1, b2} given a1 >= a2 and b1 >= b2 (ties kept: the top-2 of
    {3, 3} is (3, 3)); associative and commutative, so any reduction order gives the same pair."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _target_masks(tgt, V, ignore_index):
    """(valid, bad) targets: the rule of ``spec.target_masks`` (in [0, V) and not ignored; neither)."""
    not_ignored = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    return not_ignored & in_range, not_ignored & (~in_range)


@triton.jit
def _stats_init(BLOCK_V: tl.constexpr):
    """The running state of a row, all scalars: softmax (m = -FLT_MAX, s = 0, a = 0), the
    second-largest logit t2 (the largest is m), sum_v w_v x_v and s2 = sum exp(2 (x - m)).
    Per-lane vectors would hold BLOCK_V / 32 registers each a thread (a per-lane top-1 / top-2
    took the kernel to 255 registers, 8 warps an SM; scalars: under 100)."""
    m = tl.max(tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32), axis=0)
    zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    return m, m, zero, zero, zero, zero


@triton.jit
def _stats_step(
    x,
    cols,
    V,
    m,
    t2,
    s,
    a,
    ws,
    s2,
    w_ptr,
    HAS_WEIGHT: tl.constexpr,
    WITH_WSUM: tl.constexpr,
    WITH_P2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold one block ``x`` (fp32, -inf past the end of the row) into the running row state."""
    if WITH_WSUM:
        mask = cols < V
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            ws += tl.sum(tl.where(mask, x, 0.0) * w, axis=0)
        else:
            ws += tl.sum(tl.where(mask, x, 0.0), axis=0)
    # -inf -> -FLT_MAX; a NaN logit stays NaN (one max instruction that propagates NaN)
    xc = tl.maximum(x, -3.4028234663852886e38, propagate_nan=tl.PropagateNan.ALL)
    # the block's two largest values in one reduction (b1 is also the block max the softmax
    # needs), merged into the row's: a value equal to the largest counts as the second
    b1, b2 = tl.reduce((xc, tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)), 0, _top2_combine)
    t2 = tl.maximum(tl.minimum(m, b1), tl.maximum(t2, b2))
    # online softmax, block at a time
    m_new = tl.maximum(m, b1)
    # the old state's weight; d is -FLT_MAX on the first block (m starts there): any d below
    # -1000 gives alpha = 0 all the same, and the floor keeps d * LOG2E finite (NaN stays NaN)
    d = tl.maximum(m - m_new, -1000.0, propagate_nan=tl.PropagateNan.ALL)
    # exp through exp2: one flush-to-zero ex2 instruction a logit, where tl.exp adds three
    # to keep results below 2^-126 (terms that vanish next to the row maximum's 1 anyway)
    alpha = tl.exp2(d * LOG2E)
    xm = xc - m_new
    e = tl.exp2(xm * LOG2E)
    # (alpha * d) * s, not alpha * (d * s): alpha * d is 0 whenever alpha is
    a = alpha * a + (alpha * d) * s + tl.sum(e * xm, axis=0)
    if WITH_P2:
        # sum p^2 = s2 / s^2, rescaled by alpha^2 as the max moves (e^2 underflows to 0 first)
        s2 = (alpha * alpha) * s2 + tl.sum(e * e, axis=0)
    s = alpha * s + tl.sum(e, axis=0)
    return m_new, t2, s, a, ws, s2


@triton.jit
def _stats_store(
    m,
    t2,
    s,
    a,
    ws,
    s2,
    x_row,
    row,
    N,
    V,
    tgt_ptr,
    stride_tgt,
    stride_v,
    ignore_index,
    out_ptr,
    WITH_WSUM: tl.constexpr,
    WITH_P2: tl.constexpr,
    HAS_TOP2: tl.constexpr,
    UNIT_STRIDE_V: tl.constexpr,
):
    """The row's statistics from its final state, and the target's NLL (one more logit read)."""
    # every logit -inf: the max stayed at -FLT_MAX (and s is not NaN: a NaN logit wins)
    no_mass = (m == -3.4028234663852886e38) & (s == s)
    log_s = tl.log(s)
    lse = tl.where(no_mass, float("-inf"), m + log_s)
    ent = tl.where(no_mass, float("nan"), log_s - a / s)
    p1 = tl.where(no_mass, float("nan"), tl.exp(m - lse))
    if HAS_TOP2:
        p2 = tl.where(no_mass, float("nan"), tl.exp(t2 - lse))
    else:
        p2 = tl.zeros_like(p1)

    tgt = tl.load(tgt_ptr + row * stride_tgt).to(tl.int64)
    valid, _bad = _target_masks(tgt, V, ignore_index)
    safe = tl.where(valid, tgt, 0)
    if UNIT_STRIDE_V:
        xt_ptr = x_row + safe
    else:
        xt_ptr = x_row + safe * stride_v
    xt = tl.load(xt_ptr, mask=valid, other=0.0).to(tl.float32)
    nll = tl.where(valid, lse - xt, 0.0)

    # out is (5 to 7, N): one step of N between the statistics
    o = out_ptr + row
    tl.store(o, lse)
    o += N
    tl.store(o, ent)
    o += N
    tl.store(o, p1)
    o += N
    tl.store(o, p2)
    o += N
    tl.store(o, nll)
    if WITH_WSUM:
        o += N
        tl.store(o, ws)
    if WITH_P2:
        o += N
        tl.store(o, tl.where(no_mass, float("nan"), s2 / (s * s)))


@triton.jit
def _row_stats_kernel(
    x_ptr,
    addr_ptr,
    tgt_ptr,
    w_ptr,
    out_ptr,
    N,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    stride_tgt,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    WITH_WSUM: tl.constexpr,
    WITH_P2: tl.constexpr,
    HAS_TOP2: tl.constexpr,
    UNIT_STRIDE_V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    INDIRECT: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Any layout: plain loads, the next block's in flight (in registers) while one is reduced.
    ``INDIRECT``: the logits' address is read from ``addr_ptr`` (int64), ``x_ptr`` gives only
    their dtype (a replayed graph reads whatever logits the call has); ``ALIGNED``: that address
    is 16-byte aligned, as Triton would have found of ``x_ptr`` itself (the same loads, so the
    same sums)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    if INDIRECT:
        x_ptr = tl.load(addr_ptr).to(tl.pointer_type(x_ptr.dtype.element_ty))
        if ALIGNED:
            x_ptr = tl.multiple_of(x_ptr, 16)
    x_row = x_ptr + (b * stride_b + t * stride_t)

    offs = tl.arange(0, BLOCK_V)
    m, t2, s, a, ws, s2 = _stats_init(BLOCK_V)

    x_next = _load_block(x_row, offs, V, stride_v, UNIT_STRIDE_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = x_next.to(tl.float32)
        # the next block's load is in flight while this one is reduced (past the end: no load)
        x_next = _load_block(x_row, cols + BLOCK_V, V, stride_v, UNIT_STRIDE_V)
        m, t2, s, a, ws, s2 = _stats_step(
            x, cols, V, m, t2, s, a, ws, s2, w_ptr, HAS_WEIGHT, WITH_WSUM, WITH_P2, BLOCK_V
        )
    _stats_store(
        m,
        t2,
        s,
        a,
        ws,
        s2,
        x_row,
        row,
        N,
        V,
        tgt_ptr,
        stride_tgt,
        stride_v,
        ignore_index,
        out_ptr,
        WITH_WSUM,
        WITH_P2,
        HAS_TOP2,
        UNIT_STRIDE_V,
    )


@triton.jit
def _row_stats_tma_kernel(
    x_desc,
    x_ptr,
    tgt_ptr,
    w_ptr,
    out_ptr,
    N,
    T,
    V,
    V_FULL,
    stride_b,
    stride_t,
    stride_tgt,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    WITH_WSUM: tl.constexpr,
    WITH_P2: tl.constexpr,
    HAS_TOP2: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Aligned layouts (``load_path``): the blocks come through a tensor descriptor, ``STAGES``
    of them in flight in shared memory (the copy engine of the SM moves them, no registers
    held). The full blocks need no mask; the last, partial one (columns from ``V_FULL``) is
    read past the row's end, filled with zeros by the descriptor, and masked to -inf."""
    pid = tl.program_id(0)
    b = pid // T
    t = pid - b * T
    row = pid.to(tl.int64)
    x_row = x_ptr + (b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t)

    offs = tl.arange(0, BLOCK_V)
    m, t2, s, a, ws, s2 = _stats_init(BLOCK_V)

    for start in tl.range(0, V_FULL, BLOCK_V, num_stages=STAGES):
        x = x_desc.load([b, t, start]).reshape(BLOCK_V).to(tl.float32)
        m, t2, s, a, ws, s2 = _stats_step(
            x, start + offs, V, m, t2, s, a, ws, s2, w_ptr, HAS_WEIGHT, WITH_WSUM, WITH_P2, BLOCK_V
        )
    if V_FULL < V:
        cols = V_FULL + offs
        x = tl.where(cols < V, x_desc.load([b, t, V_FULL]).reshape(BLOCK_V).to(tl.float32), float("-inf"))
        m, t2, s, a, ws, s2 = _stats_step(
            x, cols, V, m, t2, s, a, ws, s2, w_ptr, HAS_WEIGHT, WITH_WSUM, WITH_P2, BLOCK_V
        )
    _stats_store(
        m,
        t2,
        s,
        a,
        ws,
        s2,
        x_row,
        row,
        N,
        V,
        tgt_ptr,
        stride_tgt,
        1,
        ignore_index,
        out_ptr,
        WITH_WSUM,
        WITH_P2,
        HAS_TOP2,
        True,
    )


# The descriptor path: bytes of a row per block, blocks in flight a program, the dtypes it serves
# (fp32 reads faster with plain loads) and the logits' size from which a descriptor's extra host
# time a launch is worth its device time (NOTES.md, "Constants of the code").
USE_TMA = True
TMA_BLOCK_BYTES = 4096
TMA_STAGES = 3
TMA_MIN_BYTES = 2**30
TMA_MIN_BLOCK_BYTES = 128
_TMA_DTYPES = (torch.bfloat16, torch.float16)


def load_path(logits: Tensor) -> str:
    """``"tma"`` where the descriptor path reads ``logits`` (B, T, V): bf16 or fp16, at least
    ``TMA_MIN_BYTES`` of them, unit stride along V, 16-byte aligned base and row strides (a tensor
    descriptor's rules), a Hopper or newer GPU (or Triton's CPU interpreter), a Triton with host
    descriptors; ``"pointer"`` otherwise. Both give the same statistics."""
    if not USE_TMA or TensorDescriptor is None or logits.dtype not in _TMA_DTYPES or logits.dim() != 3:
        return "pointer"
    if logits.numel() * logits.element_size() < TMA_MIN_BYTES:
        return "pointer"
    if logits.is_cuda:
        if torch.cuda.get_device_capability(logits.device)[0] < 9:
            return "pointer"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return "pointer"
    sb, st, sv = _descriptor_strides(logits)
    es = logits.element_size()
    if sv != 1 or logits.data_ptr() % 16 or (sb * es) % 16 or (st * es) % 16:
        return "pointer"
    return "tma"


def _descriptor_strides(logits: Tensor) -> tuple[int, int, int]:
    """The strides a descriptor is given: a dim of size 1 is never stepped along, so its stride
    is replaced by one that satisfies the alignment rule whatever the view's own says."""
    B, T, V = logits.shape
    sb, st, sv = logits.stride()
    align = 16 // logits.element_size()
    if T == 1:
        st = -(-max(V, 1) // align) * align
    if B == 1:
        sb = T * st
    return sb, st, sv


def row_stats(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int,
    weight: Tensor | None = None,
    with_wsum: bool = False,
    with_p2: bool = False,
    address: Tensor | None = None,
) -> RowStats:
    """Per-row lse, entropy, top-1/top-2 probabilities, target NLL (and sum_v w_v x_v, sum_v p_v^2).

    logits: (B, T, V) fp32/bf16/fp16, any strides; targets: (B*T,) integer. Outputs fp32 (B*T,).
    Same semantics as ``reference.row_stats``. ``address``: int64 (1,) on the logits' device, the
    address the kernel reads the logits at instead of ``logits``' own (which then gives only the
    dtype, shape, strides and alignment): a captured launch that reads the logits of each replay.
    It takes the plain-load path (a tensor descriptor holds its address on the host).
    """
    if logits.dim() != 3:
        raise ValueError(f"cggr_hook: row_stats needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    N = B * T
    if targets.dim() != 1 or targets.numel() != N:
        raise ValueError(f"cggr_hook: row_stats needs {N} targets, got shape {tuple(targets.shape)}")
    n_out = 5 + int(with_wsum) + int(with_p2)
    out = torch.empty(n_out, N, dtype=torch.float32, device=logits.device)
    if N > 0:
        if V == 0:
            raise ValueError("cggr_hook: row_stats needs at least one logit a row")
        has_weight = weight is not None
        if has_weight:
            check_weight(weight, V)
            weight = weight.contiguous()
        sb, st, sv = logits.stride()
        flags = dict(HAS_WEIGHT=has_weight, WITH_WSUM=with_wsum, WITH_P2=with_p2, HAS_TOP2=(V > 1))
        if address is not None and (address.dtype != torch.int64 or address.numel() != 1):
            raise ValueError(
                f"cggr_hook: address must be one int64, got {address.dtype} of shape {tuple(address.shape)}"
            )
        if address is None and load_path(logits) == "tma":
            es = logits.element_size()
            # a block of at least 128 bytes: smaller boxes, multi-buffered, fault with a misaligned
            # address once the loop runs twice (NOTES.md)
            block_v = max(launch.block_v(V, min(MAX_BLOCK_V, TMA_BLOCK_BYTES // es)), TMA_MIN_BLOCK_BYTES // es)
            db, dt, _ = _descriptor_strides(logits)
            # load_path returned "tma": TensorDescriptor is there
            desc = TensorDescriptor(logits, [B, T, V], [db, dt, 1], [1, 1, block_v])  # pyright: ignore[reportOptionalCall]
            _row_stats_tma_kernel[(N,)](
                desc,
                logits,
                targets,
                weight if has_weight else logits,
                out,
                N,
                T,
                V,
                V // block_v * block_v,
                sb,
                st,
                targets.stride(0),
                int(ignore_index),
                **flags,
                BLOCK_V=block_v,
                STAGES=TMA_STAGES,
                num_warps=1,
                enable_fp_fusion=True,  # FMA contraction, as the shapes were chosen (NOTES.md)
            )
        else:
            block_v = _block_v(V)
            _row_stats_kernel[(N,)](
                logits,
                address if address is not None else targets,  # (not read without INDIRECT)
                targets,
                weight if has_weight else logits,
                out,
                N,
                T,
                V,
                sb,
                st,
                sv,
                targets.stride(0),
                int(ignore_index),
                **flags,
                UNIT_STRIDE_V=(sv == 1),
                BLOCK_V=block_v,
                INDIRECT=address is not None,
                ALIGNED=address is not None and logits.data_ptr() % 16 == 0,
                num_warps=_num_warps(block_v),
                enable_fp_fusion=True,  # FMA contraction, as the shapes were chosen (NOTES.md)
            )
    return RowStats(
        out[0], out[1], out[2], out[3], out[4], out[5] if with_wsum else None, out[n_out - 1] if with_p2 else None
    )


# Rows of the difficulty pass handled by one program; its partial sums are one row of the
# (programs, 5) float64 output that the host adds up.
DIFFICULTY_BLOCK = 1024


@triton.jit
def _row_difficulty_kernel(
    lse_ptr,
    ent_ptr,
    p1_ptr,
    p2_ptr,
    nll_ptr,
    noise_ptr,
    p2sum_ptr,
    tgt_ptr,
    d_ptr,
    part_ptr,
    N,
    V,
    stride_tgt,
    ignore_index,
    inv_log_v,
    c_y,
    c_0,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    inside = rows < N
    tgt = tl.load(tgt_ptr + rows.to(tl.int64) * stride_tgt, mask=inside, other=0).to(tl.int64)
    valid, bad = _target_masks(tgt, V, ignore_index)
    valid = inside & valid
    bad = inside & bad

    ent = tl.load(ent_ptr + rows, mask=inside, other=0.0)
    p1 = tl.load(p1_ptr + rows, mask=inside, other=0.0)
    # the same operations in the same order as reference.difficulty (launched without FMA
    # contraction), so both backends rank rows identically
    if MODE == 0:
        d = ent
    elif MODE == 1:
        d = 1.0 - (p1 - tl.load(p2_ptr + rows, mask=inside, other=0.0))
    elif MODE == 2:
        d = tl.load(nll_ptr + rows, mask=inside, other=0.0)
    elif MODE == 3:
        nll = tl.load(nll_ptr + rows, mask=inside, other=0.0)
        p2 = tl.load(p2_ptr + rows, mask=inside, other=0.0)
        d = (ent + nll) * inv_log_v + (1.0 - (p1 - p2))
    elif MODE == 4:
        d = tl.load(noise_ptr + rows, mask=inside, other=0.0)
    else:
        nll = tl.load(nll_ptr + rows, mask=inside, other=0.0)
        sq = tl.load(p2sum_ptr + rows, mask=inside, other=0.0) - c_y * tl.exp(-nll) + c_0
        d = tl.sqrt(tl.maximum(sq, 0.0, propagate_nan=tl.PropagateNan.ALL))
        d = tl.where(nll == float("inf"), float("inf"), d)  # an infinite loss is always kept
    d = tl.where(d != d, float("inf"), d)  # NaN -> +inf: such a row is taken first
    d = tl.where(d == 0.0, 0.0, d)  # -0 -> +0: a radix sort would put -0 after +0, a comparison not
    d = tl.where(valid, d, float("-inf"))
    tl.store(d_ptr + rows, d, mask=inside)

    # partial sums in float64, in a fixed order: the same inputs give the same host figures
    part = part_ptr + pid * 5
    tl.store(part, tl.sum(valid.to(tl.float64), axis=0))
    tl.store(part + 1, tl.sum(bad.to(tl.float64), axis=0))
    tl.store(part + 2, tl.sum(tl.where(valid, p1, 0.0).to(tl.float64), axis=0))
    tl.store(part + 3, tl.sum(tl.where(valid, ent, 0.0).to(tl.float64), axis=0))
    tl.store(part + 4, tl.sum(tl.where(valid, d, 0.0).to(tl.float64), axis=0))


def row_difficulty(
    stats: RowStats,
    targets: Tensor,
    vocab: int,
    ignore_index: int,
    scoring: str,
    noise: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Difficulty of every row and the partial sums for the host (see ``reference.row_difficulty``).

    stats: fp32 (N,) vectors of ``row_stats``; targets (N,) integer. Returns (fp32 (N,), float64
    (P, 5)) with one row of partial sums per block of ``DIFFICULTY_BLOCK`` rows.
    """
    from .reference import gradnorm_constants, inv_log_vocab

    mode = spec.scoring(scoring)
    if mode.random and noise is None:
        raise ValueError("cggr_hook: random scoring needs its noise")
    if mode.needs_p2sum and stats.p2sum is None:
        raise ValueError("cggr_hook: gradnorm scoring needs the statistics' p2sum (row_stats(with_p2=True))")
    N = targets.numel()
    dev = stats.lse.device
    n_prog = triton.cdiv(N, DIFFICULTY_BLOCK)
    d = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return d, torch.zeros(1, 5, dtype=torch.float64, device=dev)
    part = torch.empty(n_prog, 5, dtype=torch.float64, device=dev)  # every program writes its row
    vecs = [v.contiguous() for v in (stats.lse, stats.entropy, stats.p_top1, stats.p_top2, stats.nll)]
    noise_arg = noise.contiguous() if noise is not None else vecs[0]
    p2sum_arg = stats.p2sum.contiguous() if stats.p2sum is not None else vecs[0]
    c_y, c_0 = gradnorm_constants(vocab, label_smoothing)
    _row_difficulty_kernel[(n_prog,)](
        *vecs,
        noise_arg,
        p2sum_arg,
        targets,
        d,
        part,
        N,
        vocab,
        targets.stride(0),
        int(ignore_index),
        inv_log_vocab(vocab),
        c_y,
        c_0,
        MODE=mode.code,
        BLOCK=DIFFICULTY_BLOCK,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return d, part


# Targets counted by one program per loop iteration, and at most this many programs (the host
# adds one row of partial counts per program).
COUNT_BLOCK = 1024
COUNT_PROGRAMS = 64


@triton.jit(do_not_specialize=["N"])  # N = 1 would become a constant, which has no .to()
def _target_counts_kernel(tgt_ptr, part_ptr, N, V, stride_tgt, ignore_index, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    n_valid = tl.zeros([BLOCK], tl.int64)
    n_bad = tl.zeros([BLOCK], tl.int64)
    # int64 positions: a grid stride past 2^31 targets must not wrap
    for start in range(pid.to(tl.int64) * BLOCK, N.to(tl.int64), tl.num_programs(0) * BLOCK):
        rows = start + offs
        inside = rows < N
        tgt = tl.load(tgt_ptr + rows * stride_tgt, mask=inside, other=0).to(tl.int64)
        valid, bad = _target_masks(tgt, V, ignore_index)
        n_valid += (inside & valid).to(tl.int64)
        n_bad += (inside & bad).to(tl.int64)
    tl.store(part_ptr + pid * 2, tl.sum(n_valid, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(n_bad, axis=0))


def target_counts(targets: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """int64 (P, 2) partial counts of valid targets (in [0, V), not ``ignore_index``) and bad ones
    (neither), one row per program (at most ``COUNT_PROGRAMS``); the host adds the rows up. One
    launch, so it can run ahead of the scoring pass at little cost (``reference.target_counts``)."""
    N = targets.numel()
    if N == 0:
        return torch.zeros(1, 2, dtype=torch.int64, device=targets.device)
    n_prog = min(triton.cdiv(N, COUNT_BLOCK), COUNT_PROGRAMS)
    part = torch.empty(n_prog, 2, dtype=torch.int64, device=targets.device)
    _target_counts_kernel[(n_prog,)](
        targets, part, N, vocab, targets.stride(0), int(ignore_index), BLOCK=COUNT_BLOCK, num_warps=4
    )
    return part
