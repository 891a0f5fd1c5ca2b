"""Kernel tuning on a CUDA device: bandwidth ceilings, launch-shape sweeps of the large kernels, and
where the time of one gated loss call goes.

    python scripts/tune_kernels.py --out runs/tune [--vocab 128256 32000] [--tokens 8192]

Writes tune.json and tune.md (median ms from ``triton.testing.do_bench`` and GB/s), profile.txt
(the kernels of one ``CGGRLoss`` forward + backward from the PyTorch profiler) and host_profile.txt
(the host time of a call and cProfile's view of it). Conclusions go to kernels/NOTES.md. Every swept shape is
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
from cggr_hook.kernels import gated_ce, scoring

ROW_STATS_SHAPES = [(1024, 1), (2048, 1), (2048, 2), (2048, 4), (4096, 1), (4096, 4)]
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
        row(f"read-only row sums {bv}x{nw}",
            ms(lambda: _read_rows_kernel[(N,)](x, sums, V, x.stride(0), BLOCK_V=bv, num_warps=nw)), nbytes)

    # ---- row_stats launch shapes (shipped kernel)
    want = scoring.row_stats(x3, t, -100)
    shipped = (scoring.MAX_BLOCK_V, scoring.NUM_WARPS)
    for bv, nw in ROW_STATS_SHAPES:
        scoring.MAX_BLOCK_V, scoring.NUM_WARPS = bv, nw
        try:
            got = scoring.row_stats(x3, t, -100)
            for f in ("lse", "entropy", "p_top1", "p_top2", "nll"):
                close(getattr(got, f), getattr(want, f), f"row_stats {bv}x{nw} {f}")
            row(f"row_stats {bv}x{nw}", ms(lambda: scoring.row_stats(x3, t, -100)), nbytes)
        except Exception as e:  # a shape that fails to compile or check is reported, not fatal
            log(f"| {V} | row_stats {bv}x{nw} | failed: {type(e).__name__}: {str(e)[:200]} | |")
    scoring.MAX_BLOCK_V, scoring.NUM_WARPS = shipped

    # ---- gradient kernels: dense (25%, 100%, 0% selected) and compact rows (25%)
    k = N // 4
    sel = torch.randperm(N, device=dev, generator=gen)[:k]
    scale = torch.zeros(N, device=dev).index_fill_(0, sel, 1.0 / k)
    full = torch.full((N,), 1.0 / N, device=dev)
    none = torch.zeros(N, device=dev)
    rows = torch.sort(sel).values
    rscale = torch.full((k,), 1.0 / k, device=dev)
    lse = want.lse
    shipped = (gated_ce.MAX_BLOCK_V, gated_ce.NUM_WARPS)
    want_dense = gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, torch.empty_like(x3))
    for bv, nw in GRAD_SHAPES:
        gated_ce.MAX_BLOCK_V, gated_ce.NUM_WARPS = bv, nw
        try:
            got = gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, y.unsqueeze(0))
            close(got.float(), want_dense.float(), f"dense {bv}x{nw}", rtol=1e-2, atol=1e-6)
            row(f"dense grad 25% {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, y.unsqueeze(0))),
                nbytes + nbytes * k / N)
            row(f"dense grad 0% (zeros) {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, none, None, 0.0, y.unsqueeze(0))), nbytes)
            row(f"dense grad 100% {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_dense_(x3, t, lse, full, None, 0.0, y.unsqueeze(0))), 2 * nbytes)
            row(f"compact rows 25% {bv}x{nw}",
                ms(lambda: gated_ce.ce_grad_rows(x3, t, lse, rows, rscale, None, 0.0, torch.bfloat16)),
                2 * nbytes * k / N)
        except Exception as e:
            log(f"| {V} | grad {bv}x{nw} | failed: {type(e).__name__}: {str(e)[:200]} | |")
    gated_ce.MAX_BLOCK_V, gated_ce.NUM_WARPS = shipped

    # ---- the whole call, and its pieces as the call launches them
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False,
                              inplace_backward=True)
    work = x.clone().requires_grad_(True)

    def call():
        work.grad = None
        crit(work, t).backward()

    row("CGGRLoss 25% in place, fwd+bwd (values drift: timing only)", ms(call), 2 * nbytes + 2 * nbytes * k / N)
    return res


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
        crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False,
                                  inplace_backward=inplace)
        w = x.detach().clone().requires_grad_(True)

        def call():
            w.grad = None
            crit(w, t).backward()

        log(f"host: CGGRLoss 25% fwd+bwd (inplace={inplace}) at V={V}: {per_call_us(call, 200)[1]:.0f} us a call")

    def launches(name, fn):
        log(f"host: {name}: {per_call_us(fn, 500)[0]:.1f} us a launch")

    launches("ce_grad_dense_", lambda: gated_ce.ce_grad_dense_(x3, t, lse, scale, None, 0.0, o3))
    launches("row_stats", lambda: scoring.row_stats(x3, t, -100))
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
    host_profile(a.tokens, os.path.join(a.out, "host_profile.txt"), log)
    if a.host:
        with open(os.path.join(a.out, "tune.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    log("")
    log("| V | what | median ms | GB/s |")
    log("|---|---|---|---|")
    results = [sweep_vocab(a.tokens, V, log) for V in a.vocab]
    profile_call(a.tokens, a.vocab[0], os.path.join(a.out, "profile.txt"))
    with open(os.path.join(a.out, "tune.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    with open(os.path.join(a.out, "tune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
