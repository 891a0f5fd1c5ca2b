"""Host time of one gated call (forward + backward), measured with the device idle.

A call's host time is what the Python side and the launches cost before the host can queue the
next work: at small batches and V = 32000 it, not the kernels, sets the speed (kernels/NOTES.md).
Each case runs ``--reps`` times; before each the device is drained (``synchronize``), so the host
never waits on earlier work; the figure is the median perf_counter time from the call to the
return of ``backward()`` (device work may still be running then). The device time of the same
call (CUDA events, median) and the launches and host synchronisations one call makes (from the
profiler's runtime and driver events) are listed beside it. ``--profile`` adds, for the gated
head calls, cProfile's top functions (by own and by cumulative time) and torch.profiler's host
time by operator.

    python scripts/host_time.py --vocab 32000 --tokens 8192 --out runs/host   # CUDA
    python scripts/host_time.py --tokens 256 --vocab 512                      # CPU: Python cost alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook
from cggr_hook import bench

LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _cases(args, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    N, V, D = args.tokens, args.vocab, args.hidden
    logits = (torch.randn(N, V, generator=g) * 2).to(dev, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    targets[torch.rand(N, generator=g).to(dev) < 0.05] = -100
    h = (torch.randn(N, D, generator=g) * 0.5).to(dev, torch.bfloat16).requires_grad_()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(D, V, bias=False)

    model = Model().to(dev, torch.bfloat16)

    def fwd_bwd(f):
        def run():
            f().backward()

        return run

    def loss_case(**kw):
        # plain_when_faster=False: every call through the gate's kernels, which is what is measured
        kw = {"dynamic_threshold": False, **kw}
        crit = cggr_hook.CGGRLoss(warmup_steps=0, plain_when_faster=False, **kw)
        return fwd_bwd(lambda: crit(logits, targets)), contextlib.nullcontext

    def head_case(ratio, **kw):
        @contextlib.contextmanager
        def gated():
            cggr_hook.enable(
                model, min_tokens_ratio=ratio, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False, **kw
            )
            model.train()
            try:
                yield
            finally:
                cggr_hook.disable(model)

        return fwd_bwd(lambda: F.cross_entropy(model.lm_head(h).float(), targets)), gated

    plain_loss = fwd_bwd(lambda: F.cross_entropy(logits.float(), targets))
    plain_head = fwd_bwd(lambda: F.cross_entropy(model.lm_head(h).float(), targets))
    return {
        "loss/torch_fp32": (plain_loss, contextlib.nullcontext),
        "loss/cggr25 combined topk": loss_case(scoring="combined", selection="topk", min_tokens_ratio=0.25),
        "loss/cggr25 combined topk, no graphs": loss_case(
            scoring="combined", selection="topk", min_tokens_ratio=0.25, cuda_graphs=False
        ),
        "loss/cggr25 combined topk, dynamic threshold": loss_case(
            scoring="combined", selection="topk", min_tokens_ratio=0.25, dynamic_threshold=True
        ),
        "loss/cggr25 combined stratified": loss_case(scoring="combined", selection="stratified", min_tokens_ratio=0.25),
        "loss/cggr25 combined sequence_aware": loss_case(
            scoring="combined", selection="sequence_aware", min_tokens_ratio=0.25
        ),
        "loss/cggr25 gradnorm importance": loss_case(scoring="gradnorm", selection="importance", min_tokens_ratio=0.25),
        "loss/cggr25 gradnorm importance, no graphs": loss_case(
            scoring="gradnorm", selection="importance", min_tokens_ratio=0.25, cuda_graphs=False
        ),
        "loss/cggr100 gradnorm importance": loss_case(scoring="gradnorm", selection="importance", min_tokens_ratio=1.0),
        "head/torch": (plain_head, contextlib.nullcontext),
        "head/enable 25%": head_case(0.25),
        "head/enable 25%, no graphs": head_case(0.25, cuda_graphs=False),
        "head/enable 100%": head_case(1.0),
    }, (logits, h, model)


def _clear(tensors) -> None:
    logits, h, model = tensors
    logits.grad = None
    h.grad = None
    model.zero_grad(set_to_none=True)


def _profile_counts(run, dev) -> tuple[int, int]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run()
        _sync(dev)
    names = [e.name for e in prof.events()]
    return sum(n in LAUNCH_EVENTS for n in names), sum(n in SYNC_EVENTS for n in names)


def measure(args) -> dict:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases, tensors = _cases(args, dev)
    out = {}
    for name, (run, ctx) in cases.items():
        with ctx():
            for _ in range(args.warmup):
                run()
                _clear(tensors)
            _sync(dev)
            host, device = [], []
            for _ in range(args.reps):
                _sync(dev)
                if dev.type == "cuda":
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                t0 = time.perf_counter()
                run()
                host.append((time.perf_counter() - t0) * 1e6)
                if dev.type == "cuda":
                    e1.record()
                    e1.synchronize()
                    device.append(e0.elapsed_time(e1) * 1e3)
                _clear(tensors)
            launches, syncs = _profile_counts(run, dev)
            _clear(tensors)
            row = {
                "host_us": statistics.median(host),
                "device_us": statistics.median(device) if device else None,
                "launches": launches,
                "syncs": syncs,
            }
            if args.profile and name.startswith("head/enable"):
                # torch.profiler's table, then cProfile's functions, of 20 calls each
                row["ops"], row["profile"] = bench.host_profiles(lambda i: (run(), _clear(tensors)), 20, dev)
        out[name] = row
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "cases": out}


def add_call_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that shape the measured calls (``_cases``) and their repetitions."""
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_call_arguments(p)
    p.add_argument(
        "--profile",
        action="store_true",
        help="for the gated head calls: cProfile (by own and cumulative time) and torch.profiler's operator table",
    )
    p.add_argument("--out", default=None, help="a folder: host_time.json and host_time.md inside")
    args = p.parse_args(argv)
    res = measure(args)
    lines = [
        f"## Host time of a call: {res['device']}, N = {args.tokens}, V = {args.vocab}, D = {args.hidden}, bf16",
        "",
        "| case | host us | device us | launches | host syncs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in res["cases"].items():
        dev_us = f"{r['device_us']:.0f}" if r["device_us"] is not None else "n/a"
        lines.append(f"| {name} | {r['host_us']:.0f} | {dev_us} | {r['launches']} | {r['syncs']} |")
    text = "\n".join(lines)
    print(text)
    for name, r in res["cases"].items():
        if "profile" in r:
            print(f"\n### cProfile, {name}\n\n```\n{r['profile']}\n```")
        if "ops" in r:
            print(f"\n### torch.profiler, {name}: host time by operator\n\n```\n{r['ops']}\n```")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "host_time.json").write_text(json.dumps({"args": vars(args), **res}, indent=1))
        (out / "host_time.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
