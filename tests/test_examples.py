"""The example scripts run end to end at their smallest settings.

Each script runs as its own process (``sys.executable``), the way a user runs it, with a temporary
tokenizer cache and output folder. One thread per process keeps them quick and steady on a small,
shared CPU machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# one small corpus for every script: the tokenizer is trained once per test session
SMALL_TEXT = ["--vocab-size", "512", "--max-bytes", "150000"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cggr_cache")


def run_example(script: str, args: list[str], cache: Path, timeout: float = 180) -> str:
    env = dict(os.environ)
    env.update(CGGR_HOOK_CACHE=str(cache), OMP_NUM_THREADS="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def _import_example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_stdlib_text_split_cache_and_order(tmp_path):
    stdlib_text = _import_example("stdlib_text")

    files = stdlib_text.list_stdlib_files()
    assert files and all(rel.endswith(".py") and "site-packages" not in rel for rel, _ in files)
    train, held = stdlib_text.split_files(files, heldout_every=10, max_bytes=100_000)
    assert train and held and not {r for r, _ in train} & {r for r, _ in held}
    bigger, _ = stdlib_text.split_files(files, heldout_every=10, max_bytes=200_000)
    assert {r for r, _ in train} <= {r for r, _ in bigger}  # a larger budget is a superset

    corpus = stdlib_text.load_corpus(vocab_size=300, max_bytes=100_000, cache_dir=tmp_path)
    assert not corpus.info["cached"]
    again = stdlib_text.load_corpus(vocab_size=300, max_bytes=100_000, cache_dir=tmp_path)
    assert again.info["cached"] and torch.equal(again.train_tokens, corpus.train_tokens)
    assert int(corpus.train_tokens.max()) < 300 and corpus.tokenizer.get_vocab_size() == 300

    a = list(corpus.batches(4, 32, seed=0, steps=5))
    b = list(corpus.batches(4, 32, seed=0, steps=5))
    c = list(corpus.batches(4, 32, seed=1, steps=5))
    assert len(a) == 5 and all(x.shape == (4, 32) and x.dtype == torch.int64 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    held_rows = corpus.heldout_sequences(32)
    assert held_rows.shape[1] == 32 and held_rows.numel() > corpus.heldout_tokens.numel() - 32


def test_quality_benchmark_arms_and_curves():
    qb = _import_example("quality_benchmark")
    assert qb.arm_options("plain", 100, 0.3) is None
    assert qb.arm_options("topk25", 100, 0.3) == dict(
        scoring="combined", selection="topk", min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    warm = qb.arm_options("seqaware25-warm", 200, 0.3)
    assert warm["selection"] == "sequence_aware" and warm["warmup_steps"] == 60 and warm["dynamic_threshold"]
    assert qb.arm_options("random50", 100, 0.3)["scoring"] == "random"
    assert qb.arm_options("stratified25", 100, 0.3)["selection"] == "stratified"
    with pytest.raises(SystemExit):
        qb.arm_options("topk", 100, 0.3)
    for names in (qb.ALL_ARMS, *(p["arms"] for p in qb.PRESETS.values())):
        for name in names:
            qb.arm_options(name, 100, 0.3)

    xs, ys = [0.0, 10.0, 20.0], [8.0, 6.0, 5.0]
    assert qb.interp(5.0, xs, ys) == pytest.approx(7.0)
    assert qb.interp(20.0, xs, ys) == 5.0 and qb.interp(20.5, xs, ys) is None
    assert qb.time_to_reach(5.5, xs, ys) == pytest.approx(15.0)
    assert qb.time_to_reach(4.0, xs, ys) is None
    assert qb.eval_schedule(12, 3) == [4, 8, 12] and qb.eval_schedule(5, 10) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path, cache_dir):
    out = tmp_path / "quality"
    arms = ["plain", "topk25", "topk25-warm", "random25"]
    stdout = run_example("quality_benchmark.py",
                         ["--preset", "smoke", "--arms", *arms, "--out", str(out), "--no-progress"], cache_dir)

    table = (out / "results.md").read_text()
    assert table.strip() in stdout.replace("\r", "")
    for arm in arms:
        assert f"| {arm} |" in table
    for png in ("val_loss_vs_step.png", "val_loss_vs_time.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    result = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in result["runs"]] == arms
    assert set(result["summary"]) == set(arms)
    steps = result["args"]["steps"]
    for run in result["runs"]:
        assert run["steps"][-1] == steps
        assert all(math.isfinite(v) for v in run["val_loss"])
        for key in ("final_val", "val_at_equal_time", "easy_half_val", "hard_half_val"):
            assert math.isfinite(run[key]), (run["arm"], key)
        assert run["easy_half_val"] < run["hard_half_val"]
        if run["arm"] != "plain":
            assert run["schedule_step_count"] == steps  # counted from optimizer.step()
            assert 0 < run["mean_token_fraction"] < 1
    plain = result["runs"][0]
    assert plain["delta_final_vs_reference"] == 0 and plain["time_to_reference_final"] is not None


@pytest.mark.slow
def test_legacy_loop(cache_dir):
    out = run_example("legacy_loop.py", ["--steps", "6", "--eval-every", "3", "--eval-batches", "2", *SMALL_TEXT],
                      cache_dir)
    assert "gated run" in out and "final val" in out and "scheduler step count 6" in out
    out = run_example("legacy_loop.py", ["--shift", "--data", "random", "--steps", "4", "--eval-every", "2",
                                         "--eval-batches", "2", "--warmup-steps", "2"], cache_dir)
    assert "loss shifted in the loop" in out and "final val" in out


@pytest.mark.slow
def test_hf_trainer(cache_dir):
    out = run_example("hf_trainer.py", ["--max-steps", "4", "--eval-rows", "8", "--batch-size", "4", *SMALL_TEXT],
                      cache_dir)
    assert "train: 4 optimizer steps" in out
    assert "scheduler step count 4" in out
    assert "(identical)" in out


@pytest.mark.parametrize("env, expected", [
    ({}, ("home", ".cache", "cggr_hook")),
    ({"XDG_CACHE_HOME": "xdg"}, ("xdg", "cggr_hook")),
    ({"XDG_CACHE_HOME": "relative"}, ("home", ".cache", "cggr_hook")),  # the XDG rule: a relative path is ignored
    ({"XDG_CACHE_HOME": "xdg", "CGGR_HOOK_CACHE": "own"}, ("own",)),
])
def test_the_corpus_cache_honours_xdg_cache_home(tmp_path, monkeypatch, env, expected):
    stdlib_text = _import_example("stdlib_text")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("XDG_CACHE_HOME", "CGGR_HOOK_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value if value == "relative" else str(tmp_path / value))
    assert stdlib_text.default_cache_dir() == tmp_path.joinpath(*expected)


def _readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix`` (its ``#`` comment dropped)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(prefix):
            return line.split("#")[0].split()
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_readme_cpu_torchrun_command(wrapper):
    """The README's CPU-sized torchrun run (gloo), with either wrapper; FSDP2 gives no view warning."""
    import socket

    cmd = _readme_command("torchrun --nproc_per_node 2 examples/torchrun_train.py --wrapper fsdp --hidden")
    args = cmd[1:]
    args[args.index("--wrapper") + 1] = wrapper
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--master_port", str(port), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{wrapper}: 2 x cpu" in proc.stdout and "cggr25" in proc.stdout, proc.stdout
    assert "returned a view tensor" not in proc.stderr, proc.stderr[-4000:]
