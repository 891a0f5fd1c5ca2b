"""Smoke tests of the benchmarks: ``python -m cggr_hook.bench --quick`` and the throughput example's
smoke preset run, exit 0 and write JSON with the expected rows and finite figures; the bench's
correctness guard refuses to time a wrong result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cggr_hook import bench

ROOT = Path(__file__).resolve().parents[1]
OURS = [f"loss/cggr_hook_{p}{s}" for p in (25, 50, 100) for s in ("", "_inplace")] + [
    f"head/cggr_hook_{p}" for p in (25, 50, 100)
]
PEERS = ["loss/cggr050_25", "loss/liger_ce", "head/cggr050_25", "head/liger_flce", "head/cce"]


def _run(args, timeout=240):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only contend on a shared CPU
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def _finite_pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_quick_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["-m", "cggr_hook.bench", "--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    meta, results = data["meta"], data["results"]
    for k in ("device_name", "torch", "triton", "date", "peers"):
        assert meta[k], k
    assert meta["failed"] == []
    vocabs = meta["vocabs"]
    assert len(vocabs) == 2
    for vocab in vocabs:
        rows = {r["key"]: r for r in results if r["vocab"] == vocab}
        timed = ["loss/torch_fp32", "loss/torch_bf16", "head/torch", "head/matmul", *OURS]
        assert set(timed + PEERS) <= set(rows), sorted(rows)
        for key in timed:
            r = rows[key]
            assert r["status"] == "ok", r
            assert _finite_pos(r["ms"]), r
            assert r["ratio"], r  # against the baselines of the same run
            assert all(_finite_pos(v) for v in r["ratio"].values()), r
        for key in OURS:  # each gated row passed its check before it was timed
            assert rows[key]["check"] and math.isfinite(rows[key]["loss"]), rows[key]
        for key in ("loss/torch_fp32", "loss/torch_bf16"):
            assert rows["loss/cggr_hook_25"]["ratio"][key] > 0
        assert set(rows["head/cggr_hook_25"]["ratio"]) == {"head/torch"}
        for key in PEERS:  # listed either way; run where installed
            assert rows[key]["status"] in ("ok", "not installed", "error"), rows[key]
    # the table names the rows and the card
    assert "cggr_hook CGGRLoss 25% (gradient in place)" in proc.stdout
    assert meta["device_name"] in proc.stdout


def test_bench_only_keeps_the_baselines():
    I = bench.Inputs(16, 32, 8, torch.bfloat16, torch.device("cpu"), 0)
    rows = bench.build_rows(I, bench.load_peers(), "bf16")
    keys = [r.key for r in bench.select_rows(rows, ["in place"], "bf16")]
    assert keys == [
        "loss/torch_fp32",
        "loss/torch_bf16",
        "loss/cggr_hook_25_inplace",
        "loss/cggr_hook_50_inplace",
        "loss/cggr_hook_100_inplace",
        "loss/cggr_hook_imp25_inplace",
        "loss/cggr_hook_25_inplace_nographs",
        "loss/cggr_hook_imp25_inplace_nographs",
        "loss/liger_ce",
    ]
    keys = [r.key for r in bench.select_rows(rows, ["head/cggr_hook_25"], "bf16")]
    assert keys == ["head/torch", "head/cggr_hook_25"]


def test_bench_guard_refuses_a_wrong_result():
    """A 'gated' 25% row that is really the full loss, and a 100% row off by 10%, are not timed."""
    cpu = torch.device("cpu")
    I = bench.Inputs(64, 50, 8, torch.bfloat16, cpu, 0)
    x, t = I.logits, I.targets

    def full():
        return F.cross_entropy(x, t, ignore_index=bench.IGNORE_INDEX)

    not_gated = bench.Row(
        "loss/fake_25",
        "full loss posing as 25%",
        "loss",
        ours=True,
        fn=bench._fwd_bwd(full),
        grads=(x,),
        check=lambda loss: bench._check_gated(I, loss, x.grad, 0.25, "fake 25%"),
    )
    res = bench.run_row(not_gated, I, cpu, 1.0, 1.0, force=False)
    assert res.status == "wrong result" and res.ms is None, res
    assert "expected k" in res.check

    off = bench.Row(
        "loss/fake_100",
        "loss off by 10%",
        "loss",
        ours=True,
        fn=bench._fwd_bwd(lambda: 1.1 * full()),
        grads=(x,),
        check=lambda loss: bench._check_full_loss(I, loss, x.grad, "fake 100%", strict=True),
    )
    res = bench.run_row(off, I, cpu, 1.0, 1.0, force=False)
    assert res.status == "wrong result" and res.ms is None, res

    right = bench.Row(
        "loss/plain",
        "the plain loss, fp32",
        "loss",
        fn=bench._fwd_bwd(lambda: F.cross_entropy(x.float(), t, ignore_index=bench.IGNORE_INDEX)),
        grads=(x,),
        check=lambda loss: bench._check_full_loss(I, loss, x.grad, "plain", strict=True),
    )
    res = bench.run_row(right, I, cpu, 1.0, 1.0, force=False)
    assert res.status == "ok" and _finite_pos(res.ms), res


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    out = tmp_path / "tp"
    proc = _run(["examples/throughput_benchmark.py", "--preset", "smoke", "--out", str(out)])
    data = json.loads((out / "throughput.json").read_text())
    recs = data["results"]
    shapes = data["meta"]["shapes"]
    assert len(shapes) == 2
    for shape in shapes:
        by = {r["variant"]: r for r in recs if r["shape"] == shape}
        assert set(by) == {"hf", "cggr25", "cggr50", "cggr100", "cggrdefault", "cggrauto", "no_head"}
        for r in by.values():
            assert r["status"] == "ok", r
            assert _finite_pos(r["step_ms"]) and _finite_pos(r["tokens_per_s"]), r
            assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]), r
        # same seed, same weights and data: the 100% gate's first loss is hf's
        assert abs(by["cggr100"]["first_loss"] - by["hf"]["first_loss"]) < 1e-3
        # auto's first step keeps every token too; after its probe window it names its choice
        assert abs(by["cggrauto"]["first_loss"] - by["hf"]["first_loss"]) < 1e-3
        assert by["cggrauto"]["auto_choice"] in (0.25, 0.5, 0.75, 1.0, "plain"), by["cggrauto"]
        # the default keeps every token: its first step is the gate's kernels, its choice 1.0 or plain
        assert abs(by["cggrdefault"]["first_loss"] - by["hf"]["first_loss"]) < 1e-3
        assert by["cggrdefault"]["auto_choice"] in (1.0, "plain"), by["cggrdefault"]
    assert "| cggr25 |" in proc.stdout and "vs hf" in proc.stdout


def test_loss_check_allows_the_rounding_of_a_low_precision_loss():
    """A peer that returns its loss in bf16 (13.7355 comes back as 13.75) is not a mismatch; one
    that is a bf16 step further off still is, and an fp32 loss keeps the tight tolerance."""
    ref = 13.735490
    assert bench._close(13.75, ref, bench.LOSS_RTOL_FP32, torch.bfloat16)
    assert not bench._close(13.875, ref, bench.LOSS_RTOL_FP32, torch.bfloat16)
    assert not bench._close(13.75, ref, bench.LOSS_RTOL_FP32)
    assert bench._close(ref * (1 + 0.5 * bench.LOSS_RTOL_FP32), ref, bench.LOSS_RTOL_FP32)
    assert not bench._close(math.nan, ref, bench.LOSS_RTOL_FP32, torch.bfloat16)


def _throughput_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput_benchmark", ROOT / "examples" / "throughput_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_repeats_combine_medians_and_a_failed_run_has_no_timing():
    """``--repeats``: a variant's step time is the median of its runs' medians, every timed step
    kept; a variant with a failed run is reported as failed, without the other runs' timing, and
    is then no baseline."""
    tb = _throughput_module()
    args = type("A", (), {"batch": 2, "seq": 8})()

    def ok(variant, ms, choice=None):
        return {
            "shape": "s",
            "variant": variant,
            "status": "ok",
            "step_ms": ms,
            "step_ms_all": [ms, ms + 1],
            "tokens_per_s": 16 / (ms / 1e3),
            "first_loss": ms,
            "auto_choice": choice,
        }

    rec = tb.combine_runs([ok("hf", 30.0), ok("hf", 10.0), ok("hf", 20.0)], args)
    assert rec["status"] == "ok" and rec["step_ms"] == 20.0 and rec["step_ms_runs"] == [30.0, 10.0, 20.0]
    assert rec["tokens_per_s"] == 16 / 0.02 and rec["first_loss"] == 30.0
    assert rec["step_ms_all"] == [30.0, 31.0, 10.0, 11.0, 20.0, 21.0]
    assert tb.combine_runs([ok("d", 5.0, 1.0), ok("d", 5.0, "plain")], args)["auto_choice"] == "1.0, plain"

    failed = {"shape": "s", "variant": "hf", "status": "error", "error": "RuntimeError: boom"}
    rec = tb.combine_runs([ok("hf", 20.0), failed], args)
    assert rec["status"] == "error" and "boom" in rec["error"]
    assert "step_ms" not in rec and "tokens_per_s" not in rec and rec["step_ms_runs"] == [20.0, None]
    meta = {k: "x" for k in ("device_name", "torch", "triton", "transformers", "cggr_hook", "python", "date")}
    meta.update(batch=2, seq=8, steps=3, warmup=1, repeats=2, shapes=["s"])
    tb.SHAPES["s"] = {"vocab_size": 10}
    try:
        table = tb.render(meta, [rec, tb.combine_runs([ok("cggr25", 10.0), ok("cggr25", 12.0)], args)])
    finally:
        del tb.SHAPES["s"]
    row = next(line for line in table.splitlines() if line.startswith("| cggr25 |"))
    assert "| 11.0 | 10.0-12.0 |" in row and "| - |" in row  # no ratio: the failed hf is no baseline
    assert "error: RuntimeError: boom" in table


def test_host_profiles_show_the_operators_and_the_python_of_the_calls():
    """``bench.host_profiles``: torch.profiler's operator table and cProfile's functions, each
    over the given number of calls of the callable."""
    x = torch.randn(8, 8)
    calls = []

    def a_python_step(i):
        calls.append(i)
        torch.mm(x, x)

    ops, python = bench.host_profiles(a_python_step, 3, torch.device("cpu"))
    assert calls == [0, 1, 2, 0, 1, 2]  # profiled twice, apart
    assert "aten::mm" in ops and ops.startswith("3 calls")
    assert "a_python_step" in python and "by cumulative time" in python
