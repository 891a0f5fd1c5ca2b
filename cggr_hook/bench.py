"""Speed and memory of the gated loss against PyTorch and the peers: ``python -m cggr_hook.bench``.

For each vocabulary size, at N tokens, every row is one forward + backward:

- loss rows, on random bf16 logits (N, V) with ~5% ``ignore_index`` targets: torch cross entropy on
  fp32-upcast logits (what Hugging Face does), on the bf16 logits, ``cggr_hook.CGGRLoss`` at 25%,
  50% and 100% (combined scoring, topk, fixed ratio), each with the gradient in a new buffer and
  written in place (``inplace_backward=True``), and the peers where installed;
- head rows, on hidden states (N, D) and an LM head (V, D): torch (linear, fp32 upcast, cross
  entropy), the head gated by ``cggr_hook.enable`` at 25%, 50%, 100%, the bare head matmul forward +
  backward, and the fused peers where installed.

Before a row is timed its first run is checked: the 100% gated loss and gradients must match
torch's, the 25% / 50% ones must be finite with exactly k non-zero gradient rows. A row that fails
is not timed, and the command exits 1.

Times: median ms, ``triton.testing.do_bench`` on CUDA (L2 flushed before each run, gradients set to
None outside the timed region). Rows that write their gradient into the logits buffer (Liger's
cross entropy, ``inplace_backward=True``) need fresh logits before every run: they are timed by a
loop built like ``do_bench`` whose per-run refill of the logits buffer (a copy from an untouched
source) happens before the L2 flush, outside the timed region. On the CPU: a perf_counter median.

Memory: extra peak MiB, ``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
``memory_allocated()`` just before the call, with the inputs already allocated; the gradients the
call produces count. CUDA only.

Ratios are row time / baseline time from the same run (below 1: faster): loss rows against both
torch rows, head rows against LM head + torch cross entropy.
"""

# The inputs are freed (None) between vocabulary sizes, and the peers are optional imports:
# pyright: reportOptionalMemberAccess=false, reportArgumentType=false, reportOptionalCall=false, reportMissingImports=false

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
IGNORE_FRACTION = 0.05
LOGIT_SCALE = 2.0
RATIOS = (0.25, 0.5, 1.0)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MiB = float(2**20)
L2_FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench: larger than any GPU's L2
FP32_BASELINE, HEAD_BASELINE = "loss/torch_fp32", "head/torch"

# tolerances of the correctness guard
LOSS_RTOL_FP32 = 1e-3  # gated 100% loss vs torch on fp32-upcast logits
LOSS_RTOL_LOWP = 2e-2  # vs torch on bf16 logits, whose loss is rounded to bf16
GRAD_RTOL = 2e-2  # relative L2 error of gradients against torch's


class CheckFailed(AssertionError):
    """A row's result is wrong: it is not timed."""


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _do_bench_median(fn, warmup_ms: float, rep_ms: float, grads) -> float:
    import triton.testing

    kwargs = dict(warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="median")
    accepted = inspect.signature(triton.testing.do_bench).parameters
    return float(triton.testing.do_bench(fn, **{k: v for k, v in kwargs.items() if k in accepted}))


def _event_loop_median(fn, setup, warmup_ms: float, rep_ms: float, grads, device) -> float:
    """do_bench's method with a per-run ``setup`` outside the timed region (before the L2 flush)."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def prepare():
        _clear_grads(grads)
        if setup is not None:
            setup()
        flush.zero_()

    est = []
    for _ in range(5):
        prepare()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize(device)
        est.append(s.elapsed_time(e))
    estimate = max(statistics.median(est), 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate))
    n_repeat = max(1, int(rep_ms / estimate))
    for _ in range(n_warmup):
        prepare()
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for i in range(n_repeat):
        prepare()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _cpu_median(fn, setup, warmup_ms: float, rep_ms: float, grads) -> float:
    def once():
        _clear_grads(grads)
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    estimate = max(once(), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        once()
    n = min(1000, max(3, int(rep_ms / estimate)))
    return statistics.median(once() for _ in range(n))


def time_ms(fn, setup, grads, device, warmup_ms, rep_ms) -> tuple[float, str]:
    """Median ms of ``fn()`` and the name of the timer used."""
    if device.type != "cuda":
        return _cpu_median(fn, setup, warmup_ms, rep_ms, grads), "perf_counter"
    if setup is None:
        return _do_bench_median(fn, warmup_ms, rep_ms, grads), "do_bench"
    return _event_loop_median(fn, setup, warmup_ms, rep_ms, grads, device), "event_loop"


def host_profiles(call: Callable[[int], Any], reps: int, device: torch.device) -> tuple[str, str]:
    """Where the host's time goes in ``reps`` calls of ``call(i)``, profiled twice (each profiler
    distorts the other): torch.profiler's table of operators, CUDA runtime and driver calls and
    autograd Functions by their own host time (their device time on CUDA), then cProfile's Python
    functions by own and by cumulative time, which holds what the table does not (the Python
    between operators, Triton's launcher)."""
    import cProfile
    import io
    import pstats

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(reps):
            call(i)
        _sync(device)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    pr = cProfile.Profile()
    pr.enable()
    for i in range(reps):
        call(i)
    _sync(device)
    pr.disable()
    out = io.StringIO()
    stats = pstats.Stats(pr, stream=out)
    out.write(f"{reps} calls, by own time\n")
    stats.sort_stats("tottime").print_stats(30)
    out.write(f"{reps} calls, by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(50)
    return f"{reps} calls\n{ops}", out.getvalue()


def extra_peak_mib(fn, setup, grads, device) -> float | None:
    """Peak memory of one ``fn()`` above what was allocated before it (inputs included there)."""
    if device.type != "cuda":
        return None
    _clear_grads(grads)
    if setup is not None:
        setup()
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _clear_grads(grads)
    return (peak - before) / MiB


# --------------------------------------------------------------------------------------------
# inputs, references and checks
# --------------------------------------------------------------------------------------------


class _Head(nn.Module):
    """The smallest model with an LM head: hidden states in, logits out."""

    def __init__(self, hidden: int, vocab: int, device, dtype):
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, h):
        return self.lm_head(h)


class Inputs:
    """Random inputs of one vocabulary size, and lazily the references the checks compare with."""

    def __init__(self, n: int, vocab: int, hidden: int, dtype, device, seed: int):
        self.n, self.vocab, self.hidden, self.dtype, self.device = n, vocab, hidden, dtype, device
        gen = torch.Generator(device=device).manual_seed(seed)
        self.logits = torch.randn(n, vocab, device=device, dtype=dtype, generator=gen).mul_(LOGIT_SCALE)
        self.logits.requires_grad_(True)
        t = torch.randint(0, vocab, (n,), device=device, generator=gen)
        drop = torch.rand(n, device=device, generator=gen) < IGNORE_FRACTION
        self.targets = t.masked_fill(drop, IGNORE_INDEX)
        self.n_valid = int((self.targets != IGNORE_INDEX).sum())
        self.head = _Head(hidden, vocab, device, dtype)
        self.W = self.head.lm_head.weight
        self.h = torch.randn(n, hidden, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        # rows that overwrite their logits run on this copy, refilled from self.logits before each run
        self.work = torch.empty_like(self.logits).requires_grad_(True)
        self._gout = None
        self._refs: dict[str, Any] = {}

    def refill_work(self):
        with torch.no_grad():
            self.work.copy_(self.logits)

    @property
    def gout(self):
        if self._gout is None:
            gen = torch.Generator(device=self.device).manual_seed(1)
            self._gout = torch.randn(self.n, self.vocab, device=self.device, dtype=self.dtype, generator=gen)
            self._gout.mul_(1.0 / self.n)
        return self._gout

    def loss_ref(self):
        """torch's loss on fp32-upcast logits, its gradient (in the logits' dtype), its loss on bf16."""
        if "loss" not in self._refs:
            x = self.logits.detach().requires_grad_(True)
            loss32 = F.cross_entropy(x.float(), self.targets, ignore_index=IGNORE_INDEX)
            loss32.backward()
            with torch.no_grad():
                lossl = F.cross_entropy(self.logits, self.targets, ignore_index=IGNORE_INDEX)
            self._refs["loss"] = (float(loss32.detach()), x.grad, float(lossl))
        return self._refs["loss"]

    def head_ref(self):
        """torch's LM head loss and the gradients of h and W."""
        if "head" not in self._refs:
            h = self.h.detach().requires_grad_(True)
            W = self.W.detach().requires_grad_(True)
            loss = F.cross_entropy(F.linear(h, W).float(), self.targets, ignore_index=IGNORE_INDEX)
            loss.backward()
            self._refs["head"] = (float(loss.detach()), h.grad, W.grad)
        return self._refs["head"]

    def k(self, ratio: float) -> int:
        """Tokens a fixed-ratio gate keeps: k = max(1, floor(r * n_valid + 0.5)), at most n_valid."""
        n = self.n_valid
        return 0 if n == 0 else min(n, max(1, math.floor(ratio * n + 0.5)))

    def free(self):
        self.logits = self.work = self.targets = self.head = self.W = self.h = self._gout = None
        self._refs.clear()


def _rel_err(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> float:
    """||a - b|| / ||b|| in fp32, a few rows at a time (no full-size fp32 copy)."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    num = den = 0.0
    for i in range(0, a.shape[0], chunk):
        x, y = a[i : i + chunk].float(), b[i : i + chunk].float()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _nonzero_rows(g: torch.Tensor) -> int:
    return int((g.reshape(g.shape[0], -1) != 0).any(dim=1).sum())


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def _close(got: float, want: float, rtol: float, out_dtype: torch.dtype = torch.float32) -> bool:
    """|got - want| within rtol, plus half a unit in the last place of ``out_dtype`` at ``want``
    (a loss returned in bf16 is rounded to 8 significant bits: 13.7355 comes back as 13.75)."""
    rounding = torch.finfo(out_dtype).eps * abs(want) / 2
    return math.isfinite(got) and abs(got - want) <= rtol * max(abs(want), 1.0) + rounding


def _check_full_loss(
    I: Inputs, loss: float, grad: torch.Tensor | None, what: str, strict: bool, out_dtype: torch.dtype = torch.float32
) -> str:
    """A full (100%) loss against torch's; strict: raise on a mismatch, else only report it.
    ``out_dtype``: the dtype the loss comes back in (its rounding is allowed on top of rtol)."""
    ref32, gref, refl = I.loss_ref()
    notes = [f"loss {loss:.6f} vs torch fp32 {ref32:.6f}, torch lowp {refl:.6f}"]
    ok = _close(loss, ref32, LOSS_RTOL_FP32, out_dtype) and _close(loss, refl, LOSS_RTOL_LOWP)
    if grad is not None:
        err = _rel_err(grad, gref)
        notes.append(f"grad rel err {err:.2e}")
        ok = ok and err <= GRAD_RTOL
    detail = "; ".join(notes)
    if strict:
        _expect(ok, f"{what}: does not match torch: {detail}")
    return detail if ok else f"MISMATCH: {detail}"


def _check_gated(I: Inputs, loss: float, grad: torch.Tensor, ratio: float, what: str) -> str:
    """A gated loss at ``ratio``: finite, exactly k non-zero gradient rows, none on ignored targets."""
    k = I.k(ratio)
    _expect(math.isfinite(loss), f"{what}: loss {loss} is not finite")
    _expect(grad is not None, f"{what}: no gradient")
    rows = _nonzero_rows(grad)
    _expect(rows == k, f"{what}: {rows} rows have a gradient, expected k = {k} of {I.n_valid} valid")
    ignored = I.targets == IGNORE_INDEX
    if bool(ignored.any()):
        _expect(
            not bool((grad.reshape(grad.shape[0], -1)[ignored] != 0).any()),
            f"{what}: ignore_index rows have a gradient",
        )
    _expect(bool(torch.isfinite(grad).all()), f"{what}: non-finite gradient")
    return f"loss {loss:.6f}; {rows} rows with gradient = k"


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str  # stable id, used by --only and in the JSON
    label: str
    group: str  # "loss" | "head"
    ours: bool = False  # a cggr_hook row: its failure fails the command
    fn: Callable[[], Any] | None = None  # forward + backward, returns the loss
    grads: tuple = ()
    setup: Callable[[], None] | None = None  # per-run, outside the timed region
    check: Callable[[Any], str] | None = None  # after the first run: raises CheckFailed, or notes
    context: Callable[[], Any] = contextlib.nullcontext  # around all runs of the row
    unavailable: str | None = None  # peer not installed: listed, not run


@dataclass
class Result:
    vocab: int
    key: str
    label: str
    group: str
    status: str = "ok"  # ok | not installed | wrong result | error
    ms: float | None = None
    extra_peak_mib: float | None = None
    timer: str | None = None
    loss: float | None = None
    check: str | None = None
    error: str | None = None
    ratio: dict = field(default_factory=dict)


def _pct(r: float) -> str:
    return f"{round(r * 100)}"


def _loss_value(out) -> float | None:
    return float(out.detach().float()) if isinstance(out, torch.Tensor) else None


def _fwd_bwd(forward):
    def fn():
        loss = forward()
        loss.backward()
        return loss

    return fn


def lowp_key(dtype_name: str) -> str:
    """Key of the torch row on the logits as they are (no upcast)."""
    return "loss/torch_fp32_nocast" if dtype_name == "fp32" else f"loss/torch_{dtype_name}"


def baselines(group: str, dtype_name: str) -> tuple[str, ...]:
    """Keys of the rows a group's times are divided by."""
    return (FP32_BASELINE, lowp_key(dtype_name)) if group == "loss" else (HEAD_BASELINE,)


def _fixed_ratio(loss_cls, r, **kw):
    """A loss at a fixed ratio, of the original configuration (combined scoring, top-k) unless
    ``kw`` says otherwise."""
    kw = dict(scoring="combined", selection="topk") | kw
    return loss_cls(min_tokens_ratio=r, warmup_steps=0, dynamic_threshold=False, **kw)


@dataclass
class _Rows:
    """What every row definition reads: the inputs of one vocabulary size, the peers, the dtype."""

    I: Inputs
    peers: dict
    dtype_name: str

    def ce(self, x):
        return F.cross_entropy(x, self.I.targets, ignore_index=IGNORE_INDEX)

    def peer_row(self, key, label, group, peer, make, **kw) -> Row:
        if not peer.available:
            return Row(key, label.format(v=""), group, unavailable=peer.why)
        return Row(key, label.format(v=f" {peer.version}"), group, fn=_LazyFn(make), **kw)

    def check_head_full(self, loss, what, strict=True) -> str:
        I = self.I
        ref, gh, gw = I.head_ref()
        eh, ew = _rel_err(I.h.grad, gh), _rel_err(I.W.grad, gw)
        detail = f"loss {loss:.6f} vs torch {ref:.6f}; dh rel err {eh:.2e}, dW rel err {ew:.2e}"
        ok = _close(loss, ref, LOSS_RTOL_FP32) and eh <= GRAD_RTOL and ew <= GRAD_RTOL
        if strict:
            _expect(ok, f"{what}: does not match torch: {detail}")
        return detail if ok else f"MISMATCH: {detail}"


# ---- loss level, on logits (N, V)
def _torch_fp32_row(c: _Rows) -> list[Row]:
    I, logits = c.I, c.I.logits
    return [
        Row(
            "loss/torch_fp32",
            "torch cross_entropy, fp32-upcast logits (HF)",
            "loss",
            fn=_fwd_bwd(lambda: c.ce(logits.float())),
            grads=(logits,),
            check=lambda loss: _check_full_loss(I, loss, logits.grad, "torch fp32", strict=True),
        )
    ]


def _torch_lowp_row(c: _Rows) -> list[Row]:
    I, logits = c.I, c.I.logits
    return [
        Row(
            lowp_key(c.dtype_name),
            f"torch cross_entropy, {c.dtype_name} logits",
            "loss",
            fn=_fwd_bwd(lambda: c.ce(logits)),
            grads=(logits,),
            check=lambda loss: f"loss {loss:.6f} (on fp32-upcast logits {I.loss_ref()[0]:.6f})",
        )
    ]


def _cggr_loss_rows(c: _Rows) -> list[Row]:
    import cggr_hook

    I, t = c.I, c.I.targets
    rows = []
    # the original configuration (combined, top-k) at every ratio; importance sampling (the
    # selection of every fraction below 1 by default) at 25%, which counts n and k on the device
    # the in-place rows at 25% once more with every launch from Python: what the CUDA graphs save
    cases = [(r, "topk", True) for r in RATIOS] + [(0.25, "importance", True)]
    cases += [(0.25, "topk", False), (0.25, "importance", False)]
    for r, sel, graphs in cases:
        for inplace in (False, True) if graphs else (True,):
            x = I.work if inplace else I.logits
            what = f"cggr_hook CGGRLoss {_pct(r)}%" + (" importance" if sel == "importance" else "")
            what += " (gradient in place)" if inplace else ""
            what += "" if graphs else ", no CUDA graphs"

            def make(r=r, inplace=inplace, x=x, sel=sel, graphs=graphs):
                kw = dict(scoring="gradnorm", selection="importance") if sel == "importance" else {}
                crit = _fixed_ratio(
                    cggr_hook.CGGRLoss,
                    r,
                    ignore_index=IGNORE_INDEX,
                    reduction="mean",
                    inplace_backward=inplace,
                    plain_when_faster=False,  # every call through the gate's kernels, which is what is timed
                    cuda_graphs=graphs,
                    **kw,
                )
                return _fwd_bwd(lambda: crit(x, t))

            def check(loss, r=r, x=x, what=what):
                if r == 1.0:
                    return _check_full_loss(I, loss, x.grad, what, strict=True)
                return _check_gated(I, loss, x.grad, r, what)

            rows.append(
                Row(
                    f"loss/cggr_hook_{'imp' if sel == 'importance' else ''}{_pct(r)}"
                    + ("_inplace" if inplace else "")
                    + ("" if graphs else "_nographs"),
                    what,
                    "loss",
                    ours=True,
                    fn=_LazyFn(make),
                    grads=(x,),
                    setup=I.refill_work if inplace else None,
                    check=check,
                )
            )
    return rows


def _cggr050_loss_row(c: _Rows) -> list[Row]:
    orig, logits, t = c.peers["cggr"], c.I.logits, c.I.targets

    def make_orig():
        crit = _fixed_ratio(orig.obj, 0.25)
        return _fwd_bwd(lambda: crit(logits, t))

    return [
        c.peer_row(
            "loss/cggr050_25",
            "cggr{v} CGGRLoss 25% (combined, topk)",
            "loss",
            orig,
            make_orig,
            grads=(logits,),
            check=lambda loss: f"loss {loss:.6f}",
        )
    ]


def _liger_ce_row(c: _Rows) -> list[Row]:
    I, liger, work, t = c.I, c.peers["liger"], c.I.work, c.I.targets

    def make_liger_ce():
        crit = liger.obj["ce"](ignore_index=IGNORE_INDEX)
        return _fwd_bwd(lambda: crit(work, t))

    return [
        c.peer_row(
            "loss/liger_ce",
            "Liger{v} cross entropy (gradient in place)",
            "loss",
            liger,
            make_liger_ce,
            grads=(work,),
            setup=I.refill_work,
            check=lambda loss: _check_full_loss(I, loss, work.grad, "liger ce", strict=False, out_dtype=work.dtype),
        )
    ]


# ---- LM head + loss, on hidden states (N, D) and the head's weight (V, D)
def _torch_head_row(c: _Rows) -> list[Row]:
    h, W = c.I.h, c.I.W
    return [
        Row(
            HEAD_BASELINE,
            "LM head + torch cross_entropy (fp32 upcast)",
            "head",
            fn=_fwd_bwd(lambda: c.ce(F.linear(h, W).float())),
            grads=(h, W),
            check=lambda loss: c.check_head_full(loss, "torch head"),
        )
    ]


def _gated_head_rows(c: _Rows) -> list[Row]:
    I, h, W, head = c.I, c.I.h, c.I.W, c.I.head
    rows = []
    for r in RATIOS:
        what = f"LM head gated by cggr_hook.enable, {_pct(r)}%"

        def check(loss, r=r, what=what):
            if r == 1.0:
                return c.check_head_full(loss, what)
            note = _check_gated(I, loss, h.grad, r, what)
            _expect(W.grad is not None and bool(torch.isfinite(W.grad).all()), f"{what}: dW missing or not finite")
            return note

        rows.append(
            Row(
                f"head/cggr_hook_{_pct(r)}",
                what,
                "head",
                ours=True,
                fn=_fwd_bwd(lambda: c.ce(head(h).float())),
                grads=(h, W),
                check=check,
                context=lambda r=r: _gated(head, r),
            )
        )
    return rows


def _matmul_row(c: _Rows) -> list[Row]:
    I, h, W = c.I, c.I.h, c.I.W

    def bare():
        torch.autograd.backward(F.linear(h, W), I.gout)

    return [Row("head/matmul", "bare LM-head matmul forward + backward", "head", fn=bare, grads=(h, W))]


def _cggr050_head_row(c: _Rows) -> list[Row]:
    orig, h, W, t = c.peers["cggr"], c.I.h, c.I.W, c.I.targets

    def make_orig_head():
        crit = _fixed_ratio(orig.obj, 0.25)
        return _fwd_bwd(lambda: crit(F.linear(h, W), t))

    return [
        c.peer_row(
            "head/cggr050_25",
            "LM head + cggr{v} CGGRLoss 25%",
            "head",
            orig,
            make_orig_head,
            grads=(h, W),
            check=lambda loss: f"loss {loss:.6f}",
        )
    ]


def _liger_flce_row(c: _Rows) -> list[Row]:
    liger, h, W, t = c.peers["liger"], c.I.h, c.I.W, c.I.targets

    def make_flce():
        crit = liger.obj["flce"](ignore_index=IGNORE_INDEX)
        return _fwd_bwd(lambda: crit(W, h, t))

    return [
        c.peer_row(
            "head/liger_flce",
            "Liger{v} fused linear cross entropy",
            "head",
            liger,
            make_flce,
            grads=(h, W),
            check=lambda loss: c.check_head_full(loss, "liger flce", strict=False),
        )
    ]


def _cce_row(c: _Rows) -> list[Row]:
    cce, h, W, t = c.peers["cce"], c.I.h, c.I.W, c.I.targets

    def make_cce():
        return _fwd_bwd(lambda: cce.obj(h, W, t, ignore_index=IGNORE_INDEX))

    return [
        c.peer_row(
            "head/cce",
            "cut-cross-entropy{v} linear_cross_entropy",
            "head",
            cce,
            make_cce,
            grads=(h, W),
            check=lambda loss: c.check_head_full(loss, "cce", strict=False),
        )
    ]


# every row definition, in table order
ROWS = (
    _torch_fp32_row,
    _torch_lowp_row,
    _cggr_loss_rows,
    _cggr050_loss_row,
    _liger_ce_row,
    _torch_head_row,
    _gated_head_rows,
    _matmul_row,
    _cggr050_head_row,
    _liger_flce_row,
    _cce_row,
)


def build_rows(I: Inputs, peers: dict, dtype_name: str) -> list[Row]:
    """Every row of one vocabulary size, in table order (``ROWS``). Objects are built on a row's
    first call."""
    c = _Rows(I, peers, dtype_name)
    return [row for define in ROWS for row in define(c)]


class _LazyFn:
    """A row function whose objects are built on first call, so a constructor error is the row's error."""

    def __init__(self, make):
        self._make, self._fn = make, None

    def __call__(self):
        if self._fn is None:
            self._fn = self._make()
        return self._fn()


@contextlib.contextmanager
def _gated(module: nn.Module, ratio: float):
    import cggr_hook

    cggr_hook.enable(module, min_tokens_ratio=ratio, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
    try:
        module.train()
        yield
    finally:
        cggr_hook.disable(module)


def select_rows(rows: list[Row], only: list[str] | None, dtype_name: str) -> list[Row]:
    """Rows matching any --only pattern (substring of key or label), plus the baselines they need."""
    if not only:
        return rows
    pats = [p.lower() for p in only]
    chosen = {r.key for r in rows if any(p in r.key.lower() or p in r.label.lower() for p in pats)}
    for group in {r.group for r in rows if r.key in chosen}:
        chosen.update(baselines(group, dtype_name))
    return [r for r in rows if r.key in chosen]


def run_row(row: Row, I: Inputs, device, warmup_ms, rep_ms, force: bool) -> Result:
    res = Result(I.vocab, row.key, row.label, row.group)
    if row.unavailable is not None:
        res.status, res.error = "not installed", row.unavailable
        return res
    try:
        # the references the checks compare with, computed before any gate is enabled
        I.loss_ref() if row.group == "loss" else I.head_ref()
        with row.context():
            _clear_grads(row.grads)
            if row.setup is not None:
                row.setup()
            out = row.fn()
            _sync(device)
            res.loss = _loss_value(out)
            del out
            if row.check is not None:
                try:
                    res.check = row.check(res.loss)
                except CheckFailed as e:
                    res.status, res.check = "wrong result", str(e)
                    if not force:
                        return res
            _clear_grads(row.grads)
            res.ms, res.timer = time_ms(row.fn, row.setup, row.grads, device, warmup_ms, rep_ms)
            res.extra_peak_mib = extra_peak_mib(row.fn, row.setup, row.grads, device)
    except Exception as e:  # one row's failure (an OOM, a missing option) must not stop the others
        res.status = "error"
        res.error = f"{type(e).__name__}: {e}".strip()[:500]
        print(f"[bench] V={I.vocab} {row.key} failed:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        _clear_grads(row.grads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------------


@dataclass
class Peer:
    obj: Any = None
    version: str | None = None
    why: str | None = None

    @property
    def available(self) -> bool:
        return self.obj is not None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_peers() -> dict[str, Peer]:
    peers: dict[str, Peer] = {}
    hint = "pip install --no-deps {}"

    # the original package turns on TF32 for all of torch when imported: put the flags back
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        from cggr import CGGRLoss as OrigLoss

        peers["cggr"] = Peer(OrigLoss, _version("cggr"))
    except Exception as e:
        peers["cggr"] = Peer(why=f"not installed ({type(e).__name__}: {e}; {hint.format('cggr==0.5.0')})")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

        peers["liger"] = Peer(
            {"ce": LigerCrossEntropyLoss, "flce": LigerFusedLinearCrossEntropyLoss},
            _version("liger-kernel") or _version("liger_kernel"),
        )
    except Exception as e:
        peers["liger"] = Peer(why=f"not installed ({type(e).__name__}: {e}; {hint.format('liger-kernel==0.8.5')})")

    try:
        from cut_cross_entropy import linear_cross_entropy

        peers["cce"] = Peer(linear_cross_entropy, _version("cut-cross-entropy") or _version("cut_cross_entropy"))
    except Exception as e:
        peers["cce"] = Peer(why=f"not installed ({type(e).__name__}: {e}; {hint.format('cut-cross-entropy==25.1.1')})")
    return peers


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def add_ratios(results: list[Result], dtype_name: str) -> None:
    by = {(r.vocab, r.key): r for r in results}
    for r in results:
        for b in baselines(r.group, dtype_name):
            base = by.get((r.vocab, b))
            if r.ms is not None and base is not None and base.ms:
                r.ratio[b] = r.ms / base.ms


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def render(meta: dict, results: list[Result]) -> str:
    out = [
        "# cggr_hook benchmark: forward + backward",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, cggr_hook {meta['cggr_hook']}, python {meta['python']}",
        f"- date: {meta['date']}",
        f"- N = {meta['tokens']} tokens, D = {meta['hidden']}, {meta['dtype']} logits / weights, "
        f"{meta['ignore_fraction']:.0%} ignore_index targets, logits ~ N(0, {meta['logit_scale']}^2)",
        f"- time: median ms ({meta['timer']}); ratio = row time / baseline time of the same run (< 1: faster)",
        "- extra peak MiB: peak allocated during the call minus allocated before it (inputs excluded, "
        "gradients included)",
        "",
    ]
    lowp = meta["dtype"]
    for vocab in meta["vocabs"]:
        rows = [r for r in results if r.vocab == vocab]
        if not rows:
            continue
        out += [
            f"## V = {vocab}",
            "",
            f"| row | ms | vs torch fp32 CE | vs torch {lowp} CE | vs LM head + torch CE | extra peak MiB | status |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            if r.status == "ok":
                status = r.check if (r.check or "").startswith("MISMATCH") else "ok"
            elif r.status == "not installed":
                status = "not installed"
            else:
                status = f"{r.status.upper()}: {(r.check if r.status == 'wrong result' else r.error) or ''}"
            status = status.replace("|", "/")
            out.append(
                f"| {r.label} | {_fmt(r.ms, '.3f')} | {_fmt(r.ratio.get(FP32_BASELINE), '.2f')} | "
                f"{_fmt(r.ratio.get(lowp_key(lowp)), '.2f')} | {_fmt(r.ratio.get(HEAD_BASELINE), '.2f')} | "
                f"{_fmt(r.extra_peak_mib, '.1f')} | {status} |"
            )
        out.append("")
    checks = meta.get("timer_check")
    if checks:
        out.append(
            "Timer cross-check (torch low-precision CE row timed both ways): "
            + ", ".join(
                f"V={c['vocab']}: do_bench {c['do_bench_ms']:.3f} ms, event loop {c['event_loop_ms']:.3f} ms"
                for c in checks
            )
        )
        out.append("")
    missing = [f"{k}: {v}" for k, v in meta["peers"].items() if v.startswith("not installed")]
    if missing:
        out.append("Peers not installed (rows listed, not run): " + "; ".join(missing))
        out.append("")
    return "\n".join(out)


def _meta(args, device, dtype_name, peers) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        name = f"{name} ({total:.0f} GiB)"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device_name": name,
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_v,
        "cggr_hook": _version("cggr_hook") or "unknown",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocabs": args.vocab,
        "dtype": dtype_name,
        "ignore_fraction": IGNORE_FRACTION,
        "logit_scale": LOGIT_SCALE,
        "timer": (
            "triton.testing.do_bench(return_mode='median'); rows refilling their logits buffer: "
            "the same method with the refill outside the timed region"
        )
        if device.type == "cuda"
        else "time.perf_counter median",
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "backend_env": os.environ.get("CGGR_HOOK_BACKEND", ""),
        "peers": {k: (f"{p.version}" if p.available else p.why) for k, p in peers.items()},
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "quick": args.quick,
    }


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m cggr_hook.bench",
        description="Forward + backward time and extra peak memory of the gated loss, torch and the peers.",
    )
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes (default 32000 128256)")
    p.add_argument("--tokens", type=int, default=None, help="N tokens (default 8192)")
    p.add_argument("--hidden", type=int, default=None, help="D of the LM head (default 2048)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short timing: a smoke run (CPU is fine)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        help="rows whose key or label contains any PATTERN (case-insensitive), plus their baselines",
    )
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per row (default 100, quick 5)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed time per row (default 500, quick 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="time rows whose correctness check failed too")
    p.add_argument("--list", action="store_true", help="list the row keys and exit")
    args = p.parse_args(argv)
    if not args.quick and args.device is None and not torch.cuda.is_available():
        # the full sizes are GPU figures (minutes a row on a CPU): without a GPU, a smoke run
        print(
            "[bench] no CUDA device: running the --quick smoke sizes (pass --device cpu for full sizes)",
            file=sys.stderr,
        )
        args.quick = True
    big, small = dict(vocab=[32000, 128256], tokens=8192, hidden=2048), dict(vocab=[1000, 2048], tokens=256, hidden=64)
    for k, v in (small if args.quick else big).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup_ms is None:
        args.warmup_ms = 5.0 if args.quick else 100.0
    if args.rep_ms is None:
        args.rep_ms = 20.0 if args.quick else 500.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    peers = load_peers()
    meta = _meta(args, device, args.dtype, peers)

    results: list[Result] = []
    timer_check = []
    failed = []
    for vocab in args.vocab:
        if args.list:  # tiny inputs: only the row names are wanted
            rows = select_rows(build_rows(Inputs(4, 8, 4, dtype, device, 0), peers, args.dtype), args.only, args.dtype)
            print("\n".join(f"{r.key:24s} {r.label}" for r in rows))
            return 0
        torch.manual_seed(args.seed)
        I = Inputs(args.tokens, vocab, args.hidden, dtype, device, args.seed)
        rows = select_rows(build_rows(I, peers, args.dtype), args.only, args.dtype)
        print(f"[bench] V={vocab}: {len(rows)} rows on {meta['device_name']}", file=sys.stderr)
        for row in rows:
            res = run_row(row, I, device, args.warmup_ms, args.rep_ms, args.force)
            results.append(res)
            print(
                f"[bench] V={vocab} {row.key}: {res.status} {_fmt(res.ms, '.3f')} ms "
                f"{_fmt(res.extra_peak_mib, '.1f')} MiB {res.check or res.error or ''}",
                file=sys.stderr,
            )
            if row.ours and res.status != "ok":
                failed.append(f"V={vocab} {row.key}: {res.status}: {res.check or res.error}")
            if row.key == lowp_key(args.dtype) and res.status == "ok" and device.type == "cuda":
                # the event loop that times the in-place rows, against do_bench on the same row
                loop = _event_loop_median(row.fn, None, args.warmup_ms, args.rep_ms, row.grads, device)
                _clear_grads(row.grads)
                timer_check.append({"vocab": vocab, "do_bench_ms": res.ms, "event_loop_ms": loop})
        I.free()
        del I, rows
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    add_ratios(results, args.dtype)
    meta["timer_check"] = timer_check
    meta["failed"] = failed
    print(render(meta, results))
    if failed:
        print("FAILED (cggr_hook rows): " + "; ".join(failed))
    if args.json:
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": [r.__dict__ for r in results]}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
