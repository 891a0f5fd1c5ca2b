"""Where a gated call's host time goes: inclusive host time of the gate's own functions and of
the kernel wrappers, and the host cost of the primitives a call is built from.

With the device idle before each call (``synchronize``), every named function of the gate is
wrapped with a ``perf_counter`` pair (about 1 us a wrapper) and the median over ``--reps`` calls is
reported for each, with the share of the whole call. A second table times the primitives alone in
tight loops (a torch allocation, an elementwise launch, an event, the side-stream copy, a Triton
launch through Triton's own path and the same compiled kernel launched directly, without Triton's
dispatch, through Triton's internal launcher: a measurement only, of what a launch path of our own
could save).

    python scripts/host_breakdown.py --out runs/breakdown     # CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

if importlib.util.find_spec("cggr_hook") is None:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cggr_hook import (
    capture,
    difficulty,
    functions,
    head,
    kernels,
    loss,
    pipeline,
    registry,
    route,
    schedule,
    selection,
    trace,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # host_time.py beside this script
import host_time  # noqa: E402

# (owner, attribute): inclusive host time of each call of it
WRAPPED = [
    (kernels, name)
    for name in (
        "target_counts",
        "row_stats",
        "row_difficulty",
        "difficulty_rank",
        "ascending_order",
        "importance_draw_at_ratio",
        "selected_loss",
        "ce_grad_rows",
        "ce_grad_dense_",
    )
] + [
    (pipeline, "gated_forward"),
    (pipeline, "_at_ratio"),
    (pipeline, "_at_ratio_kernels"),
    (capture, "replayed"),
    (pipeline, "_generator"),
    (pipeline, "_horvitz_thompson_norm"),
    (pipeline.PendingTargetCheck, "poll"),
    (pipeline.HostRead, "__init__"),
    (selection, "rank_rows"),
    (selection, "random_keys"),
    (selection, "importance_draw_at_ratio"),
    (difficulty, "score_rows"),
    (schedule.Scheduler, "begin_call"),
    (loss.CGGRLoss, "forward"),
    (functions.GatedCrossEntropy, "forward"),
    (functions.GatedCrossEntropy, "backward"),
    (functions.GatedHeadCrossEntropy, "forward"),
    (functions.GatedHeadCrossEntropy, "backward"),
    (route.Route, "__call__"),
    (route.Route, "_gated_loss"),
    (route, "_consume"),
    (trace, "trace"),
    (registry.Registry, "record"),
    (head, "tap_output"),
    (head.HeadTap, "backward"),
    (torch.autograd, "backward"),
]


@contextlib.contextmanager
def timing(totals: dict):
    """Wrap every function of WRAPPED, in every cggr_hook module that holds it, adding its
    inclusive time of the current call to ``totals[label]``."""
    undo = []
    for owner, name in WRAPPED:
        raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if raw is None:
            continue
        is_static = isinstance(raw, staticmethod)
        fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        label = f"{getattr(owner, '__name__', owner)}.{name}".replace("cggr_hook.", "")

        def make(fn=fn, label=label):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    totals[label] += time.perf_counter() - t0

            return wrapper

        new = make()
        if is_static:
            new = staticmethod(new)
        elif isinstance(raw, classmethod):
            new = classmethod(make(fn))
        holders = [(owner, raw)]
        if not isinstance(owner, type):  # names imported into other modules
            for mod in list(sys.modules.values()):
                if mod is not None and getattr(mod, "__name__", "").startswith("cggr_hook") and mod is not owner:
                    if getattr(mod, name, None) is raw:
                        holders.append((mod, raw))
        for holder, old in holders:
            setattr(holder, name, new)
            undo.append((holder, name, old))
    try:
        yield
    finally:
        for holder, name, old in reversed(undo):
            setattr(holder, name, old)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def breakdown(run, clear, dev, reps: int, warmup: int) -> list[tuple[str, float, float]]:
    for _ in range(warmup):
        run()
        clear()
    per_call: dict[str, list[float]] = defaultdict(list)
    whole = []
    for _ in range(reps):
        totals: dict[str, float] = defaultdict(float)
        _sync(dev)
        with timing(totals):
            t0 = time.perf_counter()
            run()
            whole.append(time.perf_counter() - t0)
        clear()
        for k, v in totals.items():
            per_call[k].append(v)
    total = statistics.median(whole) * 1e6
    rows = [("(whole call, instrumented)", total, 100.0)]
    for k, v in sorted(per_call.items(), key=lambda kv: -statistics.median(kv[1])):
        us = statistics.median(v) * 1e6
        rows.append((k, us, 100 * us / total))
    return rows


def primitives(dev, reps: int) -> list[tuple[str, float]]:
    from cggr_hook.kernels import scoring

    out = []

    def loop(label, f, n=reps):
        for _ in range(20):
            f()
        _sync(dev)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            samples.append(time.perf_counter() - t0)
            if len(samples) % 50 == 0:
                _sync(dev)
        out.append((label, statistics.median(samples) * 1e6))

    x = torch.randn(8192, device=dev)
    tg = torch.randint(0, 32000, (8192,), device=dev)
    loop("torch.empty(8192)", lambda: torch.empty(8192, device=dev))
    loop("x + 1 (one elementwise launch)", lambda: x + 1)
    loop("x.contiguous() (no copy)", lambda: x.contiguous())
    loop("x.reshape(-1)", lambda: x.reshape(-1))
    loop("torch.Generator(dev).manual_seed", lambda: torch.Generator(device=dev).manual_seed(1))
    part = torch.empty(8, 2, dtype=torch.int64, device=dev)
    if dev.type == "cuda":
        loop("torch.cuda.Event() + record", lambda: torch.cuda.Event().record())
        loop("torch.cuda.current_device()", torch.cuda.current_device)
        loop("HostRead(now=True) of 128 int64", lambda: pipeline.HostRead(tg[:128]))
        loop("HostRead(now=False)", lambda: pipeline.HostRead(x, now=False))
        loop("kernels.target_counts (wrapper + Triton launch)", lambda: kernels.target_counts(tg, 32000, -100))
        loop(
            "scoring._target_counts_kernel[grid] (Triton's launch alone)",
            lambda: scoring._target_counts_kernel[(8,)](
                tg, part, 8192, 32000, 1, -100, BLOCK=scoring.COUNT_BLOCK, num_warps=4
            ),
        )
        # the compiled kernel launched directly, without Triton's dispatch (argument binding,
        # specialisation, cache key): what a launch path of our own could at best save
        compiled = scoring._target_counts_kernel[(8,)](
            tg, part, 8192, 32000, 1, -100, BLOCK=scoring.COUNT_BLOCK, num_warps=4
        )
        run = compiled.run
        loop(
            "the same compiled kernel launched directly (no dispatch)",
            lambda: run(
                8,
                1,
                1,
                torch.cuda.current_stream(dev).cuda_stream,
                compiled.function,
                compiled.packed_metadata,
                None,
                None,
                None,
                tg,
                part,
                8192,
                32000,
                1,
                -100,
                scoring.COUNT_BLOCK,
            ),
        )
        # the backward's kernel alone, as the head's backward launches it (K = N / 4 rows)
        rows_in = torch.randn(1, 8192, 32000, device=dev, dtype=torch.bfloat16)
        lse, scale = torch.randn(8192, device=dev), torch.ones(8192, device=dev)
        sel = torch.arange(0, 8192, 4, device=dev)
        loop(
            "kernels.ce_grad_rows alone (K = 2048 of 8192 rows, V = 32000)",
            lambda: kernels.ce_grad_rows(rows_in, tg, lse, sel, scale, None, 0.0, torch.bfloat16),
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    host_time.add_call_arguments(p)  # the same calls as host_time.py's
    p.add_argument("--out", default=None, help="a folder: host_breakdown.md inside")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # host_time.py's calls: the same inputs, gates and baselines
    all_cases, tensors = host_time._cases(args, dev)
    cases = {name: all_cases[name] for name in ("loss/cggr25 gradnorm importance", "head/enable 25%", "head/torch")}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [
        f"# Host time by function: {name}, N = {args.tokens}, V = {args.vocab}, D = {args.hidden}, bf16, "
        "device idle before each call",
        "",
    ]
    for case, (run, ctx) in cases.items():
        with ctx():
            rows = breakdown(run, lambda: host_time._clear(tensors), dev, args.reps, args.warmup)
        lines += [f"## {case}", "", "| function (inclusive) | host us | % of call |", "|---|---:|---:|"]
        lines += [f"| {k} | {us:.0f} | {pct:.0f} |" for k, us, pct in rows]
        lines.append("")
    lines += ["## Primitives (median host us a call)", "", "| primitive | host us |", "|---|---:|"]
    lines += [f"| {k} | {us:.1f} |" for k, us in primitives(dev, max(200, args.reps * 4))]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "host_breakdown.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
