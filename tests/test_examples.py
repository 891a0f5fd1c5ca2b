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
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
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


def test_python_sources_dedupe_and_split_by_package(tmp_path, monkeypatch):
    """sources='python': the standard library plus installed packages, identical files kept once
    (before the split), and a fine-tuning domain set apart by package name."""
    stdlib_text = _import_example("stdlib_text")
    std, site = tmp_path / "std", tmp_path / "site"
    body = "def f{i}(x):\n    return x * {i} + {j}\n\n" * 30
    for i in range(12):
        (std / "pkg").mkdir(parents=True, exist_ok=True)
        (std / "pkg" / f"m{i}.py").write_text(body.format(i=i, j=0))
    for name in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
        (site / name / "tests").mkdir(parents=True)
        for i in range(10):
            (site / name / f"mod{i}.py").write_text(body.format(i=i, j=name))
        (site / name / "tests" / "test_x.py").write_text("skipped = True\n")
        (site / name / "copy.py").write_text(body.format(i=0, j=0))  # the same bytes as std/pkg/m0.py
    (site / "big.py").write_text("x = 1\n" * 300_000)  # over MAX_FILE_BYTES: generated, skipped
    monkeypatch.setattr(stdlib_text, "stdlib_root", lambda: std)
    monkeypatch.setattr(stdlib_text, "site_roots", lambda: [site])

    roots, files = stdlib_text.list_source_files("python")
    keys = [k for k, _ in files]
    assert not any("/tests/" in k or k.endswith("big.py") for k in keys)
    assert (
        stdlib_text.domain_of("site0/alpha/mod1.py") == "alpha"
        and stdlib_text.domain_of("stdlib/pkg/m1.py") == "stdlib"
    )
    assert stdlib_text.domain_of("site0/six.py") == "six"
    assert not stdlib_text.in_finetune_part("stdlib", 1.0) and stdlib_text.in_finetune_part("alpha", 1.0)
    share = 0.5
    tuned = {
        d for d in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta") if stdlib_text.in_finetune_part(d, share)
    }
    assert 0 < len(tuned) < 6  # this share splits these packages (a fixed hash: the same everywhere)

    corpus = stdlib_text.load_corpus(
        vocab_size=300, cache_dir=tmp_path / "cache", sources="python", finetune_share=share, heldout_every=4
    )
    info = corpus.info
    assert info["duplicates_dropped"] == 6  # the six copies of one file
    assert set(info["finetune_packages"]) == tuned
    pre, tune = corpus.part("pretrain"), corpus.part("finetune")
    assert torch.equal(torch.cat([pre.train_tokens, tune.train_tokens]), corpus.train_tokens)
    assert torch.equal(torch.cat([pre.heldout_tokens, tune.heldout_tokens]), corpus.heldout_tokens)
    assert tune.train_tokens.numel() > 0 and tune.heldout_tokens.numel() > 0
    again = stdlib_text.load_corpus(
        vocab_size=300, cache_dir=tmp_path / "cache", sources="python", finetune_share=share, heldout_every=4
    )
    assert again.info["cached"] and torch.equal(again.part("finetune").train_tokens, tune.train_tokens)
    with pytest.raises(ValueError, match="finetune_share"):
        stdlib_text.load_corpus(vocab_size=300, cache_dir=tmp_path / "cache", sources="python", heldout_every=4).part(
            "finetune"
        )


def test_quality_benchmark_arms_clock_and_figures():
    qb = _import_example("quality_benchmark")
    assert qb.arm_options("plain") is None and qb.arm_options("default") == {}
    assert qb.arm_options("topk25") == dict(
        scoring="combined",
        selection="topk",
        min_tokens_ratio=0.25,
        warmup_steps=0,
        dynamic_threshold=False,
        plain_when_faster=False,
    )
    # a fixed arm runs every step through the gate's kernels; the default and auto choose by time
    assert qb.arm_options("full")["plain_when_faster"] is False
    assert qb.is_auto(qb.arm_options("default")) and qb.is_auto(qb.arm_options("auto"))
    assert not qb.is_auto(qb.arm_options("random100")) and not qb.is_auto(qb.arm_options("full"))
    warm = qb.arm_options("seqaware25-warm", 200, 0.3)
    assert warm["selection"] == "sequence_aware" and warm["warmup_steps"] == 60 and warm["dynamic_threshold"]
    imp = qb.arm_options("imp-gradnorm50-f0.5")
    assert imp == dict(
        scoring="gradnorm",
        selection="importance",
        min_tokens_ratio=0.5,
        warmup_steps=0,
        dynamic_threshold=False,
        plain_when_faster=False,
        importance_floor=0.5,
    )
    assert "importance_floor" not in qb.arm_options("imp-loss25")
    for bad in ("topk", "imp-gradnorm", "imp-foo25", "random0", "topk150"):
        with pytest.raises(SystemExit):
            qb.arm_options(bad)
    for preset in qb.PRESETS.values():
        for name in preset["arms"] or []:
            qb.arm_options(name)
    assert qb.control_arm(qb.arm_options("imp-gradnorm50")) == "random50" and qb.control_arm(None) is None
    assert qb.fraction_moves(qb.arm_options("topk25-warm")) and not qb.fraction_moves(qb.arm_options("topk25"))

    # the learning rate is a function of elapsed (virtual) time: warm-up, then cosine to 10%
    assert qb.lr_at(0.5, 100, 1.0) == pytest.approx(0.1)
    assert qb.lr_at(5, 100, 1.0) == pytest.approx(1.0) and qb.lr_at(100, 100, 1.0) == pytest.approx(0.1)
    # a step's time: the one timing, or linear in the kept fraction between the grid's
    assert qb.step_seconds({"plain": 0.02}, None) == 0.02
    grid = {0.25: 0.01, 0.5: 0.02, 1.0: 0.04}
    assert qb.step_seconds(grid, 0.75) == pytest.approx(0.03) and qb.step_seconds(grid, 0.1) == 0.01

    xs, ys = [0.0, 10.0, 20.0], [8.0, 6.0, 5.0]
    assert qb.time_to_reach(5.5, xs, ys) == pytest.approx(15.0) and qb.time_to_reach(4.0, xs, ys) is None

    def run(arm, seed, final, opts, ms=10.0):
        return dict(
            arm=arm,
            seed=seed,
            options=opts,
            final_val=final,
            steps=100,
            step_ms=ms,
            plain_step_ms=10.0,
            kept_fraction=0.5,
            epochs=0.1,
            predicted={"score_cv2": 0.1, "rho25": 1.2, "rho50": 1.5},
            draws=None,
            curve=[dict(seconds=0.0, val=9.0), dict(seconds=10.0, val=final)],
        )

    runs = [run("plain", s, 5.0 + s, None) for s in (0, 1)]
    runs += [run("random50", s, 5.2 + s, qb.arm_options("random50"), 8.0) for s in (0, 1)]
    runs += [run("imp-gradnorm50", s, 4.9 + s + 0.02 * s, qb.arm_options("imp-gradnorm50"), 5.0) for s in (0, 1)]
    summary = qb.summarize(runs, ["plain", "random50", "imp-gradnorm50"])
    imp_s = summary["imp-gradnorm50"]
    assert imp_s["delta_plain"]["mean"] == pytest.approx(-0.09) and imp_s["delta_plain"]["std"] == pytest.approx(
        0.0141421, rel=1e-4
    )  # paired by seed: the seeds' own spread (1.0) cancels
    assert imp_s["delta_control"]["mean"] == pytest.approx(-0.29) and imp_s["control"] == "random50"
    assert imp_s["speed"] == pytest.approx(2.0) and imp_s["reached_plain"] == 2
    assert "gating paid here" in qb.conclusion(summary) and "imp-gradnorm50" in qb.conclusion(summary)
    # a best arm within the noise of plain is no verdict either way
    level = [run("plain", s, 5.0 + s, None) for s in (0, 1)]
    level += [run("default", s, 4.998 + s, {}, 10.0) for s in (0, 1)]
    text = qb.conclusion(qb.summarize(level, ["plain", "default"]))
    assert "level with plain here" in text and "paid" not in text


def test_quality_table_says_what_the_auto_ratio_chose():
    qb = _import_example("quality_benchmark")
    runs = [
        dict(arm="plain", seed=0, steps=216, auto=None),
        dict(arm="auto", seed=0, steps=210, auto=dict(auto_choice=1.0, auto_choice_plain=True, plain_steps=199)),
        dict(arm="auto", seed=1, steps=395, auto=dict(auto_choice=1.0, auto_choice_plain=False, plain_steps=0)),
    ]
    text = qb.auto_choices(runs)
    assert "auto, seed 0: chose the plain loss; 199 of its 210 steps ran as the plain loss" in text
    assert "auto, seed 1: chose 1.0 of the tokens; 0 of its 395 steps" in text
    assert qb.auto_choices(runs[:1]) == ""


@pytest.mark.slow
def test_quality_benchmark_smoke_and_merge(tmp_path, cache_dir):
    out = tmp_path / "quality"
    arms = ["plain", "default", "random25", "imp-gradnorm50"]
    stdout = run_example(
        "quality_benchmark.py",
        ["--preset", "smoke", "--arms", *arms, "--budget", "1.5", "--seeds", "0", "--out", str(out)],
        cache_dir,
    )
    table = (out / "results.md").read_text()
    assert table.strip() in stdout.replace("\r", "")
    for arm in arms:
        assert f"| {arm} |" in table
    assert "Verdict at equal wall-clock" in table
    data = (out / "val_loss_vs_time.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    result = json.loads((out / "results.json").read_text())
    # the default chooses by measured time, so it trains alone, after the arms that share the device
    assert [r["arm"] for r in result["runs"]] == [a for a in arms if a != "default"] + ["default"]
    assert set(result["summary"]) == set(arms)
    for r in result["runs"]:
        assert r["curve"][-1]["seconds"] >= 1.5 - 1e-9 > r["curve"][-1]["seconds"] - r["step_ms"] / 1e3 - 1e-9
        assert all(math.isfinite(p["val"]) for p in r["curve"])
    imp = next(r for r in result["runs"] if r["arm"] == "imp-gradnorm50")
    assert imp["draws"] and 0 < imp["draws"]["ess_ratio"] <= 1 and abs(imp["kept_fraction"] - 0.5) < 0.05

    # a second call with another seed, merged: one table over both
    out2 = tmp_path / "quality2"
    run_example(
        "quality_benchmark.py",
        ["--preset", "smoke", "--arms", "plain", "random25", "--budget", "1.5", "--seeds", "1", "--out", str(out2)],
        cache_dir,
    )
    merged = tmp_path / "merged"
    run_example(
        "quality_benchmark.py", ["--merge", str(out), str(out2 / "results.json"), "--out", str(merged)], cache_dir
    )
    m = json.loads((merged / "results.json").read_text())
    assert m["summary"]["plain"]["seeds"] == 2 and m["summary"]["default"]["seeds"] == 1
    assert "| default | 1 |" in (merged / "results.md").read_text()  # each arm's seed count is shown
    # runs made with other settings are not merged into one table
    out3 = tmp_path / "quality3"
    run_example(
        "quality_benchmark.py",
        [
            "--preset",
            "smoke",
            "--arms",
            "plain",
            "--budget",
            "1.5",
            "--batch-size",
            "4",
            "--seeds",
            "2",
            "--out",
            str(out3),
        ],
        cache_dir,
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "quality_benchmark.py"),
            "--merge",
            str(out),
            str(out3),
            "--out",
            str(tmp_path / "m2"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "batch_size" in proc.stderr
    # runs on another corpus (another machine's Python sources) are not merged either
    r = json.loads((out2 / "results.json").read_text())
    r["corpus"]["key"] = "python-v512-0000000000000000"
    (tmp_path / "other_corpus.json").write_text(json.dumps(r))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quality_benchmark.py"), "--merge", str(out)]
        + [str(tmp_path / "other_corpus.json"), "--out", str(tmp_path / "m5")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "another corpus (python-v512-0000000000000000" in proc.stderr, proc.stderr
    # runs that started from different base models (the finetune regime) are not merged either:
    # their deltas would pair runs of different starting points
    for i, (src, base) in enumerate([(out / "results.json", 800), (out2 / "results.json", 805)]):
        r = json.loads(src.read_text())
        r["base"] = dict(steps=base, seconds=90.0, epochs=0.5, pretrain_val=2.8)
        (tmp_path / f"b{i}.json").write_text(json.dumps(r))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quality_benchmark.py"), "--merge", str(tmp_path / "b0.json")]
        + [str(tmp_path / "b1.json"), "--out", str(tmp_path / "m3")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "another base model (805 steps" in proc.stderr, proc.stderr
    # a base of a fixed number of steps is the same base on every machine, up to the device's
    # rounding of its held-out loss: those merge
    for i, val in enumerate([2.8, 2.8003]):
        r = json.loads((tmp_path / f"b{i}.json").read_text())
        r["base"] = dict(steps=800, seconds=88.0 + i, epochs=0.5, pretrain_val=val)
        r["args"]["base_steps"] = 800
        (tmp_path / f"s{i}.json").write_text(json.dumps(r))
    run_example(
        "quality_benchmark.py",
        ["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(tmp_path / "m4")],
        cache_dir,
    )
    assert json.loads((tmp_path / "m4" / "results.json").read_text())["summary"]["plain"]["seeds"] == 2


@pytest.mark.slow
def test_legacy_loop(cache_dir):
    out = run_example(
        "legacy_loop.py", ["--steps", "6", "--eval-every", "3", "--eval-batches", "2", *SMALL_TEXT], cache_dir
    )
    assert "gated run" in out and "final val" in out and "scheduler step count 6" in out
    out = run_example(
        "legacy_loop.py",
        [
            "--shift",
            "--data",
            "random",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--eval-batches",
            "2",
            "--min-tokens-ratio",
            "0.5",
            "--warmup-steps",
            "2",
        ],
        cache_dir,
    )
    assert "loss shifted in the loop" in out and "final val" in out


@pytest.mark.slow
def test_hf_trainer(cache_dir):
    out = run_example(
        "hf_trainer.py", ["--max-steps", "4", "--eval-rows", "8", "--batch-size", "4", *SMALL_TEXT], cache_dir
    )
    assert "train: 4 optimizer steps" in out
    assert "scheduler step count 4" in out
    assert "(identical)" in out


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ("home", ".cache", "cggr_hook")),
        ({"XDG_CACHE_HOME": "xdg"}, ("xdg", "cggr_hook")),
        ({"XDG_CACHE_HOME": "relative"}, ("home", ".cache", "cggr_hook")),  # the XDG rule: a relative path is ignored
        ({"XDG_CACHE_HOME": "xdg", "CGGR_HOOK_CACHE": "own"}, ("own",)),
    ],
)
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
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--master_port", str(port), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{wrapper}: 2 x cpu" in proc.stdout and "cggr25" in proc.stdout, proc.stdout
    assert "returned a view tensor" not in proc.stderr, proc.stderr[-4000:]
