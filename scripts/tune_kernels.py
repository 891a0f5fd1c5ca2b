"""Kernel tuning on a CUDA device: bandwidth ceilings, launch-shape sweeps of the large kernels, and
where the time of one gated loss call goes.

    python scripts/tune_kernels.py --out runs/tune [--vocab 128256 32000] [--tokens 8192]

Writes tune.json and tune.md (median ms from ``triton.testing.do_bench`` and GB/s; the rank kernel
against the sort it replaces, by row count), profile.txt (the kernels of one ``CGGRLoss`` forward +
backward from the PyTorch profiler), timeline.txt (back-to-back calls as a benchmark loop runs them:
every kernel of one call with the idle time before it and how long after its launch it started)
and host_profile.txt (the host time of a call and cProfile's view of it). Conclusions go to kernels/NOTES.md. Every swept shape is
checked against the shipped one before it is timed. A development tool: ``python -m cggr_hook.bench``
is the user-facing benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import cggr_hook
from cggr_hook.kernels import gated_ce, importance, ranking, reference, scoring

ROW_STATS_SHAPES = [(512, 1), (1024, 1), (2048, 1), (1024, 2), (2048, 2), (2048, 4), (4096, 4)]
TMA_SHAPES = [(2048, 4), (4096, 3), (4096, 4), (8192, 2), (8192, 3)]
GRAD_SHAPES = [(2048, 8), (4096, 8), (4096, 16), (8192, 16)]


def ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=150, return_mode="median"))


@triton.jit
def _read_rows_kernel(x_ptr, out_ptr, V, stride, BLOCK_V: tl.constexpr):
    """The read ceiling of a program-per-row design: sum of each row, nothing else."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        acc += tl.load(x_ptr + row * stride + cols, mask=cols < V, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def close(a, b, what, rtol=1e-4, atol=1e-4):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def sweep_vocab(N: int, V: int, log) -> dict:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, V, device=dev, dtype=torch.bfloat16, generator=gen).mul_(2.0)
    t = torch.randint(0, V, (N,), device=dev, generator=gen)
    t[::20] = -100
    x3 = x.unsqueeze(0)
    nbytes = x.numel() * x.element_size()
    res: dict = {"N": N, "V": V, "logits_GB": nbytes / 1e9}

    def row(name, t_ms, n_bytes):
        res[name] = {"ms": t_ms, "GBps": n_bytes / t_ms / 1e6}
        log(f"| {V} | {name} | {t_ms:.3f} | {n_bytes / t_ms / 1e6:.0f} |")

    # ---- ceilings
    y = torch.empty_like(x)
    row("copy (read + write)", ms(lambda: y.copy_(x)), 2 * nbytes)
    row("zero_ (write)", ms(lambda: y.zero_()), nbytes)
    sums = torch.empty(N, device=dev, dtype=torch.float32)
    for bv, nw in [(2048, 4), (4096, 4), (4096, 8), (8192, 8)]:
        row(
            f"read-only row sums {bv}x{nw}",
            ms(lambda: _read_rows_kernel[(N,)](x, sums, V, x.stride(0), BLOCK_V=bv, num_warps=nw)),
            nbytes,
        )

    # ---- row_stats launch shapes (shipped kernel)
    want = scoring.row_stats(x3, t, -100)
    shipped = (scoring.MAX_BLOCK_V, scoring.NUM_WARPS)
    scoring.USE_TMA = False  # the plain-load path's shapes
    for bv, nw in ROW_STATS_SHAPES:
        scoring.MAX_BLOCK_V, scoring.NUM_WARPS = bv, nw
        try:
            got = scoring.row_stats(x3, t, -100)
            for f in ("lse", "entropy", "p_top1", "p_top2", "nll"):
                close(getattr(got, f), getattr(want, f), f"row_stats {bv}x{nw} {f}")
            row(f"row_stats plain loads {bv}x{nw}", ms(lambda: scoring.row_stats(x3, t, -100)), nbytes)
        except Exception as e:  # a shape that fails to compile or check is reported, not fatal
            log(f"| {V} | row_stats {bv}x{nw} | failed: {type(e).__name__}: {str(e)[:200]} | |")
    scoring.MAX_BLOCK_V, scoring.NUM_WARPS = shipped
    scoring.USE_TMA = True
    shipped_tma = (scoring.TMA_BLOCK_BYTES, scoring.TMA_STAGES)
    min_bytes, scoring.TMA_MIN_BYTES = scoring.TMA_MIN_BYTES, 0  # the descriptor path at every size
    for nbytes_block, stages in TMA_SHAPES:
        scoring.TMA_BLOCK_BYTES, scoring.TMA_STAGES = nbytes_block, stages
        try:
            got = scoring.row_stats(x3, t, -100)
            for f in ("lse", "entropy", "p_top1", "p_top2", "nll"):
                close(getattr(got, f), getattr(want, f), f"row_stats tma {nbytes_block}B x{stages} {f}")
            row(
                f"row_stats descriptor {nbytes_block} B a block x {stages} stages",
                ms(lambda: scoring.row_stats(x3, t, -100)),
                nbytes,
            )
        except Exception as e:
            log(f"| {V} | row_stats tma {nbytes_block}x{stages} | failed: {type(e).__name__}: {str(e)[:200]} | |")
    scoring.TMA_BLOCK_BYTES, scoring.TMA_STAGES = shipped_tma
    scoring.TMA_MIN_BYTES = min_bytes

    # ---- gradient kernels: dense (25%, 100%, 0% selected) and compact rows (25%)
    k = N // 4
    sel = torch.randperm(N, device=dev, generator=gen)[:k]
    scale = torch.zeros(N, device=dev).index_fill_(0, sel, 1.0 / k)
    full = torch.full((N,), 1.0 / N, device=dev)
    none = torch.zeros(N, device=dev)
    rows = torch.sort(sel).values
    rscale = torch.full((N,), 1.0 / k, device=dev)  # read at the selected rows
    lse = want.lse
    shipped = (gated_ce.MAX_BLOCK_V, gated_ce.NUM_WARPS)
    want_dense = gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, torch.empty_like(x3))
    for bv, nw in GRAD_SHAPES:
        gated_ce.MAX_BLOCK_V, gated_ce.NUM_WARPS = bv, nw
        try:
            got = gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, y.unsqueeze(0))
            close(got.float(), want_dense.float(), f"dense {bv}x{nw}", rtol=1e-2, atol=1e-6)
            row(
                f"dense grad 25% {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, y.unsqueeze(0))),
                nbytes + nbytes * k / N,
            )
            row(
                f"dense grad 0% (zeros) {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, none, None, 0.0, y.unsqueeze(0))),
                nbytes,
            )
            row(
                f"dense grad 100% {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, full, None, 0.0, y.unsqueeze(0))),
                2 * nbytes,
            )
            row(
                f"compact rows 25% {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_rows(x3, t, lse, rows, rscale, None, 0.0, torch.bfloat16)),
                2 * nbytes * k / N,
            )
        except Exception as e:
            log(f"| {V} | grad {bv}x{nw} | failed: {type(e).__name__}: {str(e)[:200]} | |")
    gated_ce.MAX_BLOCK_V, gated_ce.NUM_WARPS = shipped
    # the shipped shape with the rows scheduled zero rows first, selected rows last (what a
    # top-k call passes: its difficulty order, selected rows leading)
    keep = torch.zeros(N, dtype=torch.bool, device=dev).index_fill_(0, sel, True)
    order = torch.cat([sel, torch.nonzero(~keep).flatten()])
    got = gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, y.unsqueeze(0), None, order)
    close(got.float(), want_dense.float(), "dense ordered", rtol=0, atol=0)
    row(
        "dense grad 25% shipped, selected rows last",
        ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, y.unsqueeze(0), None, order)),
        nbytes + nbytes * k / N,
    )

    # ---- the whole call, and its pieces as the call launches them
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False, inplace_backward=True)
    work = x.clone().requires_grad_(True)

    def call():
        work.grad = None
        crit(work, t).backward()

    row("CGGRLoss 25% in place, fwd+bwd (values drift: timing only)", ms(call), 2 * nbytes + 2 * nbytes * k / N)
    return res


CHUNK_SWEEP = [10**6, 16, 8, 4, 2]  # blocks a gradient program writes (10**6: the whole row)


def chunk_sweep(N: int, V: int, log) -> dict:
    """The gradient kernels with rows split into programs of CHUNK_BLOCKS blocks, each checked
    bit for bit against the whole-row launch before it is timed."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, N, V, device=dev, generator=gen).mul_(2.0).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device=dev, generator=gen)
    nbytes = x.numel() * x.element_size()
    k = N // 4
    sel = torch.randperm(N, device=dev, generator=gen)[:k]
    keep = torch.zeros(N, dtype=torch.bool, device=dev).index_fill_(0, sel, True)
    order = torch.cat([sel, torch.nonzero(~keep).flatten()])
    scale = torch.zeros(N, device=dev).index_fill_(0, sel, 1.0 / k)
    full = torch.full((N,), 1.0 / N, device=dev)
    rows = torch.sort(sel).values
    rscale = torch.full((N,), 1.0 / k, device=dev)  # read at the selected rows
    lse = torch.logsumexp(x.float(), -1).reshape(-1)
    y = torch.empty_like(x)
    shipped = gated_ce.CHUNK_BLOCKS
    out = {}
    log("")
    log("| V | gradient kernel | blocks a program | median ms | GB/s |")
    log("|---|---|---|---|---|")
    gated_ce.CHUNK_BLOCKS = 10**6
    want = gated_ce.ce_grad_dense_(x, t, lse, scale, None, 0.0, torch.empty_like(x), None, order)
    want_rows = gated_ce.ce_grad_rows(x, t, lse, rows, rscale, None, 0.0, torch.bfloat16)
    cases = {
        "dense 25%, selected rows last": (
            lambda: gated_ce.ce_grad_dense_(x, t, lse, scale, None, 0.0, y, None, order),
            nbytes + nbytes * k / N,
        ),
        "dense 100%": (lambda: gated_ce.ce_grad_dense_(x, t, lse, full, None, 0.0, y), 2 * nbytes),
        "compact rows 25%": (
            lambda: gated_ce.ce_grad_rows(x, t, lse, rows, rscale, None, 0.0, torch.bfloat16),
            2 * nbytes * k / N,
        ),
    }
    for cb in CHUNK_SWEEP:
        gated_ce.CHUNK_BLOCKS = cb
        got = gated_ce.ce_grad_dense_(x, t, lse, scale, None, 0.0, y, None, order)
        close(got.float(), want.float(), f"dense chunk {cb}", rtol=0, atol=0)
        close(
            gated_ce.ce_grad_rows(x, t, lse, rows, rscale, None, 0.0, torch.bfloat16).float(),
            want_rows.float(),
            f"rows chunk {cb}",
            rtol=0,
            atol=0,
        )
        for name, (fn, nb) in cases.items():
            t_ms = ms(fn)
            out[f"{name}/{cb}"] = t_ms
            log(f"| {V} | {name} | {'row' if cb >= 10**6 else cb} | {t_ms:.3f} | {nb / t_ms / 1e6:.0f} |")
    gated_ce.CHUNK_BLOCKS = shipped
    return out


def row_stats_paths(N: int, V: int, log) -> dict:
    """The shipped row_stats through both load paths, bf16 and fp32 logits (the fp32 upcast
    that Hugging Face models hand to cross_entropy), checked against each other."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    t = torch.randint(0, V, (N,), device=dev, generator=gen)
    out = {}
    # both paths at any size and for fp32 too (which ships with the plain loads: this shows why)
    min_bytes, scoring.TMA_MIN_BYTES = scoring.TMA_MIN_BYTES, 0
    dtypes, scoring._TMA_DTYPES = scoring._TMA_DTYPES, (torch.bfloat16, torch.float16, torch.float32)
    log("")
    log("| V | logits | load path | median ms | GB/s |")
    log("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, N, V, device=dev, generator=gen).mul_(2.0).to(dtype)
        nbytes = x.numel() * x.element_size()
        results = {}
        for use_tma in (False, True):
            scoring.USE_TMA = use_tma
            path = scoring.load_path(x)
            results[path] = scoring.row_stats(x, t, -100)
            t_ms = ms(lambda x=x: scoring.row_stats(x, t, -100))
            out[f"{dtype}/{path}"] = t_ms
            log(f"| {V} | {str(dtype).split('.')[-1]} | {path} | {t_ms:.3f} | {nbytes / t_ms / 1e6:.0f} |")
        scoring.USE_TMA = True
        if len(results) == 2:
            for f in ("lse", "entropy", "p_top1", "p_top2", "nll"):
                close(getattr(results["tma"], f), getattr(results["pointer"], f), f"paths {dtype} {f}")
        del x
    scoring.TMA_MIN_BYTES, scoring._TMA_DTYPES = min_bytes, dtypes
    return out


RANK_SHAPES = [
    (16, 256, 4),
    (8, 512, 4),
    (8, 1024, 4),
    (4, 1024, 4),
    (16, 512, 4),
    (16, 512, 8),
    (32, 256, 8),
    (8, 256, 2),
]


def rank_sweep(log) -> dict:
    """The counting rank kernel (each launch shape) against the sort + scatter it replaces, by row
    count: the dispatcher's ``ranking.MAX_ROWS`` and the shipped shape come from here."""
    res: dict = {}
    shipped = (ranking.BLOCK_R, ranking.BLOCK_J, ranking.NUM_WARPS)
    log("")
    log("| N | sort + scatter ms | " + " | ".join(f"rank {r}x{j}x{w} ms" for r, j, w in RANK_SHAPES) + " |")
    log("|---|---|" + "---|" * len(RANK_SHAPES))
    for N in (2048, 8192, 16384, 32768, 65536):
        gen = torch.Generator(device="cuda").manual_seed(N)
        d = torch.randint(0, 1000, (N,), device="cuda", generator=gen).float()
        d[::7] = float("-inf")
        want = reference.difficulty_rank(d)
        res[N] = {"sort_ms": ms(lambda: reference.difficulty_rank(d))}
        cells = []
        for r, j, w in RANK_SHAPES:
            ranking.BLOCK_R, ranking.BLOCK_J, ranking.NUM_WARPS = r, j, w
            try:
                got = ranking.difficulty_rank(d)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    cells.append("MISMATCH")
                    continue
                t_ms = ms(lambda: ranking.difficulty_rank(d))
                res[N][f"{r}x{j}x{w}"] = t_ms
                cells.append(f"{t_ms:.4f}")
            except Exception as e:  # reported, not fatal
                cells.append(f"failed: {type(e).__name__}")
        ranking.BLOCK_R, ranking.BLOCK_J, ranking.NUM_WARPS = shipped
        log(f"| {N} | {res[N]['sort_ms']:.4f} | " + " | ".join(cells) + " |")
    return res


def _shape_table_head(log, what: str, shapes) -> None:
    """The head of a table of one kernel's times by (block, warps), a row per N."""
    log("")
    log("| N | " + " | ".join(f"{what} {b}x{w} us" for b, w in shapes) + " |")
    log("|---|" + "---|" * len(shapes))


LOSS_SHAPES = [(1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]


def loss_sweep(log) -> dict:
    """``selected_loss`` (one program; 'mean' walks the rows twice) by block and warps, 25% selected."""
    res: dict = {}
    shipped = (gated_ce.LOSS_BLOCK, gated_ce.LOSS_WARPS)
    _shape_table_head(log, "selected_loss", LOSS_SHAPES)
    for N in (8192, 65536):
        gen = torch.Generator(device="cuda").manual_seed(N)
        stats = reference.RowStats(*(torch.rand(N, device="cuda", generator=gen) for _ in range(5)))
        t = torch.randint(0, 1000, (N,), device="cuda", generator=gen)
        key = torch.randperm(N, device="cuda", generator=gen)
        want = gated_ce.selected_loss(stats, t, 1000, key, N // 4, N // 4, N, "mean", 0.0, None)
        cells = []
        for b, w in LOSS_SHAPES:
            gated_ce.LOSS_BLOCK, gated_ce.LOSS_WARPS = b, w
            got = gated_ce.selected_loss(stats, t, 1000, key, N // 4, N // 4, N, "mean", 0.0, None)
            close(got[0], want[0], f"selected_loss {b}x{w}", rtol=1e-5, atol=0)
            t_us = 1000 * ms(lambda: gated_ce.selected_loss(stats, t, 1000, key, N // 4, N // 4, N, "mean", 0.0, None))
            res[f"{N} {b}x{w}"] = t_us
            cells.append(f"{t_us:.1f}")
        gated_ce.LOSS_BLOCK, gated_ce.LOSS_WARPS = shipped
        log(f"| {N} | " + " | ".join(cells) + " |")
    return res


DRAW_SHAPES = [(256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8), (2048, 16), (4096, 16)]


def draw_sweep(log) -> dict:
    """The importance draw at a ratio (one program, five passes over the rows) by block and warps,
    25% of 7/8 valid rows: each shape checked against the shipped one bit for bit on 20 inputs
    (half of them with tied scores), then timed on the first."""
    res: dict = {}
    shipped = (importance.BLOCK, importance.NUM_WARPS)
    _shape_table_head(log, "draw", DRAW_SHAPES)
    for N in (8192, 65536):
        cases = []  # 20 inputs: uniform scores, and ties (scores on a coarse grid)
        for seed in range(20):
            gen = torch.Generator(device="cuda").manual_seed(N + seed)
            d = torch.rand(N, device="cuda", generator=gen)
            if seed % 2:
                d = (d * 8).floor()
            d[seed % 8 :: 8] = float("-inf")
            order, rank = reference.difficulty_rank(d)
            perm = torch.sort(torch.rand(N, device="cuda", generator=gen), stable=True).indices
            u = torch.rand(1, device="cuda", generator=gen, dtype=torch.float64)
            counts = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
            counts[0, 0] = int((d > float("-inf")).sum())
            cases.append((d, order, rank, perm, u, counts))

        def draw(case):
            d, order, rank, perm, u, counts = case
            return importance.importance_draw_at_ratio(d, order, rank, perm, u, counts, 0.25, N // 4, 0.1, False, None)

        wants = [draw(c) for c in cases]
        cells = []
        for b, w in DRAW_SHAPES:
            importance.BLOCK, importance.NUM_WARPS = b, w
            try:
                same = all(
                    torch.equal(getattr(got, f), getattr(want, f))
                    for want, got in zip(wants, (draw(c) for c in cases), strict=True)
                    for f in ("rows", "inv_pi", "row_weight", "key", "figures")
                )
                if not same:
                    cells.append("MISMATCH")
                    continue
                t_us = 1000 * ms(lambda: draw(cases[0]))
                res[f"{N} {b}x{w}"] = t_us
                cells.append(f"{t_us:.1f}")
            except Exception as e:  # reported, not fatal
                cells.append(f"failed: {type(e).__name__}")
        importance.BLOCK, importance.NUM_WARPS = shipped
        log(f"| {N} | " + " | ".join(cells) + " |")
    return res


def timeline(N: int, V: int, path: str, log, iters: int = 40, **options) -> None:
    """Back-to-back ``CGGRLoss`` 25% calls as ``do_bench`` runs them (an L2 flush, the call):
    from the profiler's trace, the cycle per call, the kernels' share of it, and for the median
    call every kernel with the GPU's idle time before it and its start minus its launch (small:
    the GPU was waiting for the host)."""
    import statistics
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(2.0).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda", generator=gen)
    t[::20] = -100
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False, **options)
    what = ", ".join(f"{k}={v}" for k, v in options.items()) or "CGGRLoss's defaults"
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int, device="cuda")

    def one():
        x.grad = None
        flush.zero_()
        crit(x, t).backward()

    for _ in range(10):
        one()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            one()
        torch.cuda.synchronize()
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        ev = json.load(f)["traceEvents"]
    os.remove(trace)
    kern = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"])
    launch = {
        e["args"]["correlation"]: e["ts"]
        for e in ev
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    # a call starts with the flush: the one fill kernel that runs for tens of microseconds
    starts = [i for i, e in enumerate(kern) if "fill" in e["name"].lower() and e["dur"] > 30]
    cycles = []
    for a, b in zip(starts[2:], starts[3:]):
        ks = kern[a:b]
        rows, prev_end = [], ks[0]["ts"]
        for e in ks:
            lag = e["ts"] - launch.get(e.get("args", {}).get("correlation"), e["ts"])
            rows.append((e["ts"] - prev_end, e["dur"], lag, e["name"][:70]))
            prev_end = max(prev_end, e["ts"] + e["dur"])
        rows.append((kern[b]["ts"] - prev_end, 0.0, 0.0, "(next call's flush)"))
        cycles.append((kern[b]["ts"] - ks[0]["ts"], sum(e["dur"] for e in ks), rows))
    if not cycles:
        log(f"timeline V={V} ({what}): no calls found in the trace")
        return
    cyc = statistics.median(c[0] for c in cycles)
    busy = statistics.median(c[1] for c in cycles)
    mid = sorted(cycles, key=lambda c: c[0])[len(cycles) // 2]
    log(
        f"timeline V={V} ({what}): {cyc:.0f} us a call (flush included), kernels {busy:.0f} us, idle {cyc - busy:.0f} us, "
        f"{len(mid[2]) - 1} kernels a call"
    )
    with open(path, "a") as f:
        f.write(
            f"V = {V}, N = {N} ({what}): median cycle {cyc:.0f} us, kernels {busy:.0f} us over {len(cycles)} calls\n"
        )
        f.write("  idle_us   dur_us  start-launch_us  kernel\n")
        for gap, dur, lag, name in mid[2]:
            f.write(f"  {gap:7.1f} {dur:8.1f} {lag:12.1f}     {name}\n")
        f.write("\n")


def profile_call(N: int, V: int, path: str) -> None:
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(2.0).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda")
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    for _ in range(3):
        x.grad = None
        crit(x, t).backward()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            x.grad = None
            crit(x, t).backward()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def host_profile(N: int, path: str, log) -> None:
    """Host time of one gated call: at V = 256 the kernels take microseconds, so the wall time per
    call is the Python and launch work around them; cProfile says where it goes."""
    import cProfile
    import io
    import pstats
    import time

    V = 256
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda")
    lse = torch.zeros(N, device="cuda")
    scale = torch.zeros(N, device="cuda")
    out = torch.empty_like(x)
    x3, o3 = x.detach().unsqueeze(0), out.unsqueeze(0)

    def per_call_us(fn, n):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6

    for inplace in (False, True):
        crit = cggr_hook.CGGRLoss(
            min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False, inplace_backward=inplace
        )
        w = x.detach().clone().requires_grad_(True)

        def call():
            w.grad = None
            crit(w, t).backward()

        log(f"host: CGGRLoss 25% fwd+bwd (inplace={inplace}) at V={V}: {per_call_us(call, 200)[1]:.0f} us a call")

    def launches(name, fn):
        log(f"host: {name}: {per_call_us(fn, 500)[0]:.1f} us a launch")

    launches("ce_grad_dense_", lambda: gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, o3))
    min_bytes, scoring.TMA_MIN_BYTES = scoring.TMA_MIN_BYTES, 0  # the descriptor's host cost at any size
    launches(f"row_stats ({scoring.load_path(x3)} path)", lambda: scoring.row_stats(x3, t, -100))
    scoring.TMA_MIN_BYTES = min_bytes
    scoring.USE_TMA = False
    launches(f"row_stats ({scoring.load_path(x3)} path)", lambda: scoring.row_stats(x3, t, -100))
    scoring.USE_TMA = True
    launches("torch add", lambda: lse.add(1.0))
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        x.grad = None
        crit(x, t).backward()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(60)
    with open(path, "w") as f:
        f.write(buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--vocab", type=int, nargs="+", default=[128256, 32000])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--host", action="store_true", help="only the host-time profile")
    p.add_argument("--quick", action="store_true", help="no launch-shape sweep: host, rank, timeline")
    p.add_argument("--draw", action="store_true", help="only the importance draw's sweep and the timelines")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    lines: list[str] = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"# Kernel sweep: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    log("")
    if a.draw:
        draws = draw_sweep(log)
        log("")
        open(os.path.join(a.out, "timeline.txt"), "w").close()
        for V in a.vocab:
            timeline(a.tokens, V, os.path.join(a.out, "timeline.txt"), log)
            timeline(a.tokens, V, os.path.join(a.out, "timeline.txt"), log, scoring="gradnorm", selection="importance")
        with open(os.path.join(a.out, "tune.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "importance_draw": draws}, f, indent=1)
        with open(os.path.join(a.out, "tune.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    host_profile(a.tokens, os.path.join(a.out, "host_profile.txt"), log)
    if a.host:
        with open(os.path.join(a.out, "tune.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    results = []
    if not a.quick:
        log("")
        log("| V | what | median ms | GB/s |")
        log("|---|---|---|---|")
        results = [sweep_vocab(a.tokens, V, log) for V in a.vocab]
    paths = {V: row_stats_paths(a.tokens, V, log) for V in a.vocab}
    chunks = {V: chunk_sweep(a.tokens, V, log) for V in a.vocab}
    ranks = rank_sweep(log)
    losses = loss_sweep(log)
    log("")
    open(os.path.join(a.out, "timeline.txt"), "w").close()
    for V in a.vocab:
        timeline(a.tokens, V, os.path.join(a.out, "timeline.txt"), log)
    profile_call(a.tokens, a.vocab[0], os.path.join(a.out, "profile.txt"))
    with open(os.path.join(a.out, "tune.json"), "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "results": results,
                "row_stats_paths": paths,
                "chunks": chunks,
                "rank": ranks,
                "selected_loss": losses,
            },
            f,
            indent=1,
        )
    with open(os.path.join(a.out, "tune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
