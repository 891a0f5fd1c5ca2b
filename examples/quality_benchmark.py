"""Does gating pay? Validation loss at equal wall-clock, against the plain loss and a random control.

Trains a small Llama-style model (``transformers``' ``LlamaForCausalLM``, tied embeddings) on Python
sources already on this machine (``stdlib_text.py``: no download) once per *arm* and seed, and
compares the arms' validation loss over held-out files, measured with the plain loss.

**Equal wall-clock, measured cleanly.** Every arm gets the same time budget. First, a timing phase
runs each arm's real training step alone on the device (after warm-up steps) and records its step
time, at its kept fraction of tokens (at a grid of fractions for arms whose fraction moves). Then
every arm trains on a *virtual clock*: each step advances it by the timed step time at the
fraction that step kept, and training stops when the budget is spent. So a faster arm takes more
steps, the learning-rate schedule (linear warm-up, cosine to 10%) is a function of elapsed
(virtual) time, and evaluations fall at the same virtual times for every arm. Because the clock is
fixed by the clean timing, the training runs themselves may share the device (``--parallel``)
without changing any result. Evaluation time is not counted.

**Regimes.** ``scratch``: from random init. ``finetune``: the corpus is split by package into a
pretraining domain and a new, fine-tuning domain (``finetune_share``); a base model is first
trained with the plain loss on the pretraining domain (``--base-seconds``, cached), and every arm
continues from it on the new domain, evaluated on that domain's held-out files. Many tokens are
then already predicted confidently: where an unbiased sampler can drop work at little cost.

**Arms** (``--arms``):

* ``plain``: no gating, the baseline.
* ``full``: the gate at 100% of tokens: the plain loss's value and gradient, through the gate's
  kernels (no fp32 copy of the logits). It separates what the kernels gain from what dropping
  tokens gains. (``random100`` is the same thing.)
* ``auto``: ``min_tokens_ratio='auto'``, the gate's own choice of fraction (it times its steps on
  the wall clock, so it trains alone, after the arms that share the device).
* ``default``: ``cggr_hook.enable(model)`` with no options (whatever the defaults are: every
  token, through the gate's kernels or the plain loss, whichever it timed faster on the wall
  clock, so it trains alone like ``auto``); ``seed``: ``enable(model, preset="seed")``, the
  original package's configuration.

Every arm at a fixed fraction (``full``, ``random100``, ...) sets ``plain_when_faster=False``: its
steps all run through the gate's kernels, which is what it measures.
* ``random25``, ``random50``: a random fraction of the tokens, plain mean over them: the control.
* ``topk25``, ``stratified25``, ``seqaware25``, ``entropy25``, ``margin25``, ``loss25``: hard-token
  selection at a fixed ratio (combined scoring for the first three); ``-warm`` adds the package's
  curriculum over the first ``--warmup-frac`` of the (estimated) steps, with the dynamic threshold.
* ``imp-gradnorm25``, ``imp-gradnorm50-f0.5``, ``imp-loss50``, ...: importance sampling
  (``selection='importance'``) with that scoring, kept fraction and ``importance_floor`` (``-fA``;
  the package's default floor without it): an unbiased estimate of the plain loss.

**Figures** per arm, mean ± std over seeds: final validation loss (equal wall-clock), the paired
per-seed difference to plain and to the random control at the same fraction, the time to reach
plain's final loss, steps and speed against plain, and the variance figures of importance
sampling: the gain over uniform sampling that the gradnorm scores predict before any training,
rho(f) = (1 - f) m2 / (m1^2 - f m2) with m1, m2 the mean score and squared score, and the
effective sample size measured during training.

**Presets**: ``cpu`` (the default without CUDA: the main job, a tiny model on the standard library,
plain, the default gate and its random control, one seed, about two and a half minutes on two
CPU cores), ``smoke`` (seconds, for tests) and four GPU presets on every Python source of the
machine with a head-heavy model (6 layers, d=512, V=131072, tied: the head and loss dominate a
step, as in Gemma-3-270M): ``scratch-small`` / ``scratch-large`` and ``finetune-small`` /
``finetune-large`` (8 x 512 and 64 x 512 tokens a step). A GPU preset with every arm and three
seeds takes longer than one session on a lent machine: run seeds or arms separately
(``--seeds 0``), and ``--merge`` the result files into one table.

Writes ``results.md`` (the table, also printed), ``results.json`` (configuration, timings, curves,
per-seed figures) and ``val_loss_vs_time.png`` into ``--out`` (default ``runs/quality/``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stdlib_text  # noqa: E402

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook

GPU_ARMS = [
    "plain",
    "full",
    "random25",
    "random50",
    "topk25",
    "stratified25",
    "imp-gradnorm25",
    "imp-gradnorm50",
    "imp-gradnorm50-f0.5",
    "imp-loss50",
    "default",
    "seed",
    "auto",
]
_HEAD_HEAVY = dict(
    layers=6,
    d_model=512,
    heads=8,
    ffn=1536,
    vocab_size=131072,
    seq_len=512,
    sources="python",
    max_bytes=None,
    max_heldout_bytes=8_000_000,
    eval_tokens=1_000_000,
    eval_points=8,
    arms=list(GPU_ARMS),
    seeds=[0, 1, 2],
)
PRESETS = {
    "smoke": dict(
        layers=1,
        d_model=32,
        heads=2,
        ffn=64,
        vocab_size=512,
        seq_len=32,
        batch_size=8,
        budget=4.0,
        regime="scratch",
        sources="stdlib",
        max_bytes=150_000,
        max_heldout_bytes=12_000,
        eval_tokens=4096,
        eval_points=3,
        lr=3e-3,
        arms=["plain", "default", "random25"],
        seeds=[0],
        parallel=1,
    ),
    "cpu": dict(
        layers=2,
        d_model=128,
        heads=4,
        ffn=512,
        vocab_size=4096,
        seq_len=128,
        batch_size=16,
        budget=30.0,
        regime="scratch",
        sources="stdlib",
        max_bytes=3_000_000,
        max_heldout_bytes=150_000,
        eval_tokens=65536,
        eval_points=6,
        lr=2e-3,
        arms=["plain", "default", "imp-gradnorm50", "random50"],
        seeds=[0],
        parallel=1,
    ),
    "scratch-small": dict(_HEAD_HEAVY, batch_size=8, budget=30.0, regime="scratch", lr=1e-3, parallel=4),
    "scratch-large": dict(_HEAD_HEAVY, batch_size=64, budget=45.0, regime="scratch", lr=1e-3, parallel=1),
    "finetune-small": dict(
        _HEAD_HEAVY,
        batch_size=8,
        budget=30.0,
        regime="finetune",
        lr=3e-4,
        parallel=4,
        finetune_share=0.5,
        base_steps=800,
        base_batch_size=64,
        base_lr=1e-3,
    ),
    "finetune-large": dict(
        _HEAD_HEAVY,
        batch_size=64,
        budget=30.0,
        regime="finetune",
        lr=3e-4,
        parallel=1,
        finetune_share=0.5,
        base_steps=800,
        base_batch_size=64,
        base_lr=1e-3,
    ),
}
FRACTION_GRID = (0.25, 0.5, 0.75, 1.0)
# settings that may differ between the invocations whose results --merge combines
RUN_LOCAL = {"seeds", "arms", "out", "parallel", "device", "threads", "cache_dir", "merge", "timing_only"}
# the finetune regime's settings where a preset (a scratch one, --regime finetune) has none
FINETUNE_DEFAULTS = dict(finetune_share=0.5, base_seconds=90.0, base_lr=1e-3)

FIXED_RE = re.compile(r"^(topk|stratified|seqaware|random|entropy|margin|loss|combined)(\d+(?:\.\d+)?)(-warm)?$")
IMP_RE = re.compile(r"^imp-(gradnorm|loss|entropy|margin|combined|random)(\d+(?:\.\d+)?)(?:-f(\d*\.?\d+))?$")


def arm_options(name: str, steps: int = 1000, warmup_frac: float = 0.3) -> dict | None:
    """The ``cggr_hook.enable`` options of an arm (None for ``plain``; {} for ``default``).
    ``steps``: the arm's estimated optimizer steps, which a ``-warm`` curriculum spans a share of."""
    if name == "plain":
        return None
    if name == "default":
        return {}
    if name == "seed":
        return {"preset": "seed"}
    if name == "full":
        return dict(min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
    if name == "auto":
        return dict(min_tokens_ratio="auto")
    m = IMP_RE.match(name)
    if m:
        scoring, pct, floor = m.group(1), float(m.group(2)), m.group(3)
        opts = dict(
            scoring=scoring,
            selection="importance",
            min_tokens_ratio=_fraction(name, pct),
            warmup_steps=0,
            dynamic_threshold=False,
            plain_when_faster=False,
        )
        if floor is not None:
            opts["importance_floor"] = float(floor)
        return opts
    m = FIXED_RE.match(name)
    if not m:
        raise SystemExit(
            f"unknown arm {name!r}: use plain, default, <kind><percent>[-warm] with kind in topk, stratified, "
            "seqaware, random, entropy, margin, loss, combined (e.g. topk25, random50), or "
            "imp-<scoring><percent>[-f<floor>] (e.g. imp-gradnorm25, imp-loss50-f0.5)"
        )
    kind, pct, warm = m.group(1), float(m.group(2)), bool(m.group(3))
    selection = {"stratified": "stratified", "seqaware": "sequence_aware"}.get(kind, "topk")
    scoring = kind if kind in ("random", "entropy", "margin", "loss") else "combined"
    opts = dict(scoring=scoring, selection=selection, min_tokens_ratio=_fraction(name, pct), plain_when_faster=False)
    if warm:
        opts.update(warmup_steps=max(1, round(warmup_frac * steps)), dynamic_threshold=True)
    else:
        opts.update(warmup_steps=0, dynamic_threshold=False)
    return opts


def _fraction(name: str, pct: float) -> float:
    if not 0 < pct <= 100:
        raise SystemExit(f"arm {name!r}: the percentage must be in (0, 100]")
    return pct / 100.0


def arm_config(opts: dict | None) -> cggr_hook.GateConfig | None:
    if opts is None:
        return None
    opts = dict(opts)
    preset = opts.pop("preset", None)
    return cggr_hook.GateConfig.preset(preset, **opts) if preset else cggr_hook.GateConfig().replace(**opts)


def is_auto(opts: dict | None) -> bool:
    """Whether an arm chooses what it runs by measured step time (``'auto'``, and the default's
    choice between the gate's kernels and the plain loss)."""
    cfg = arm_config(opts)
    return cfg is not None and cfg.auto_candidates is not None


def fraction_moves(opts: dict | None) -> bool:
    """Whether an arm's kept fraction changes during training (a curriculum, a dynamic threshold,
    the auto ratio)."""
    cfg = arm_config(opts)
    return cfg is not None and (is_auto(opts) or cfg.warmup_steps > 0 or cfg.dynamic_threshold)


def control_arm(opts: dict | None) -> str | None:
    """The random control at an arm's (final) kept fraction: ``random<pct>``."""
    cfg = arm_config(opts)
    if cfg is None or cfg.min_tokens_ratio == "auto" or cfg.min_tokens_ratio >= 1.0:
        return None
    return f"random{100 * cfg.min_tokens_ratio:g}"


# ----------------------------------------------------------------------------------------------
# model, data, evaluation


def build_model(args, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.d_model,
        intermediate_size=args.ffn or 4 * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def heldout_loss(model, heldout: torch.Tensor, batch_size: int, device) -> float:
    """Plain mean cross entropy of every next-token prediction in ``heldout`` (n, T).
    ``model.eval()`` and ``torch.no_grad()``: a gated model gives the plain loss here."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, heldout.shape[0], batch_size):
        x = heldout[start : start + batch_size].to(device, non_blocking=True)
        with autocast(device):
            logits = model(input_ids=x).logits
        V = logits.shape[-1]
        total += F.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1), reduction="sum").double()
        count += x.shape[0] * (x.shape[1] - 1)
    model.train(was_training)
    return float(total) / count


def make_optimizer(model, lr: float, device):
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **fused)


def lr_at(t: float, budget: float, peak: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Learning rate at elapsed (virtual) time t of a budget: linear warm-up, cosine to floor * peak."""
    warm = warmup_frac * budget
    if t < warm:
        return peak * max(t, 1e-3 * warm) / warm
    progress = min(1.0, (t - warm) / max(budget - warm, 1e-9))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(model, opt, x, device, grad_clip: float = 1.0):
    with autocast(device):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def gate_for(model, opts: dict | None, seed: int):
    """Enable the arm's gate on ``model`` from a fresh schedule (None for plain)."""
    if opts is None:
        return None
    cggr_hook.scheduler.reset()
    return cggr_hook.enable(model, **dict(opts, seed=seed))


# ----------------------------------------------------------------------------------------------
# the corpus and the base model of the finetune regime


def load_data(args):
    corpus = stdlib_text.load_corpus(
        vocab_size=args.vocab_size,
        max_bytes=args.max_bytes,
        max_heldout_bytes=args.max_heldout_bytes,
        cache_dir=args.cache_dir,
        sources=args.sources,
        finetune_share=args.finetune_share if args.regime == "finetune" else 0.0,
    )
    return corpus


def data_for(corpus, args, part: str | None):
    """(training corpus, held-out rows (n, T) capped at --eval-tokens)."""
    c = corpus.part(part)
    held = c.heldout_sequences(args.seq_len)
    n = max(1, min(held.shape[0], args.eval_tokens // args.seq_len))
    return c, held[:n]


def base_path(args, corpus) -> Path:
    spec = json.dumps(
        dict(
            corpus=corpus.info["key"],
            model=model_spec(args),
            seconds=None if args.base_steps else args.base_seconds,
            steps=args.base_steps,
            batch=args.base_batch_size,
            lr=args.base_lr,
        ),
        sort_keys=True,
    )
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else stdlib_text.default_cache_dir()
    return cache / f"base-{hashlib.sha1(spec.encode()).hexdigest()[:16]}.pt"


def model_spec(args) -> dict:
    return dict(
        layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        ffn=args.ffn,
        vocab=args.vocab_size,
        seq_len=args.seq_len,
    )


def train_base(args, corpus, device) -> dict:
    """The finetune regime's starting point: plain training on the pretraining domain for
    --base-steps steps (the learning-rate schedule over steps: the same base on every machine, up
    to the device's rounding), or else --base-seconds of wall-clock; cached by corpus, model shape
    and budget."""
    path = base_path(args, corpus)
    if path.exists():
        info = torch.load(path, map_location="cpu", weights_only=False)
        print(
            f"base model: {path} (cached, {info['steps']} steps, pretrain val {info['pretrain_val']:.3f})", flush=True
        )
        return info
    pre, pre_held = data_for(corpus, args, "pretrain")
    model = build_model(args, corpus.vocab_size, 1234).to(device).train()
    opt = make_optimizer(model, args.base_lr, device)
    batches = pre.batches(args.base_batch_size, args.seq_len, seed=1234)
    steps, t0 = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if (steps >= args.base_steps) if args.base_steps else (elapsed >= args.base_seconds):
            break
        for group in opt.param_groups:
            group["lr"] = (
                lr_at(steps, args.base_steps, args.base_lr)
                if args.base_steps
                else lr_at(elapsed, args.base_seconds, args.base_lr)
            )
        train_step(model, opt, next(batches).to(device, non_blocking=True), device)
        steps += 1
    sync(device)
    seconds = time.perf_counter() - t0
    val = heldout_loss(model, pre_held, args.eval_batch_size, device)
    epochs = steps * args.base_batch_size * args.seq_len / pre.train_tokens.numel()
    info = dict(state=model.state_dict(), steps=steps, seconds=seconds, epochs=epochs, pretrain_val=val)
    torch.save(info, path)
    print(
        f"base model: {steps} plain steps in {seconds:.0f} s ({epochs:.2f} epochs of the pretraining domain), "
        f"held-out loss there {val:.3f} -> {path}",
        flush=True,
    )
    del model, opt
    return info


# ----------------------------------------------------------------------------------------------
# timing phase: each arm's step alone on the device


def time_steps(
    args, corpus, device, opts: dict | None, fraction: float | None, repeats: int = 3, warm: int = 4, steps: int = 8
) -> float:
    """Median seconds of one training step of an arm at a fixed kept fraction (the arm's own
    scoring and selection), timed in chunks of ``steps`` steps after ``warm`` untimed ones."""
    model = build_model(args, corpus.vocab_size, 0).to(device).train()
    opt = make_optimizer(model, 1e-5, device)
    if opts is not None:
        # every step of the timing through the gate's kernels at that fraction
        fixed = dict(opts, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
        if fraction is not None:
            fixed["min_tokens_ratio"] = fraction
        gate_for(model, fixed, 0)
    batches = corpus.batches(args.batch_size, args.seq_len, seed=999)
    for _ in range(warm):
        train_step(model, opt, next(batches).to(device), device)
    chunks = []
    for _ in range(repeats):
        xs = [next(batches) for _ in range(steps)]
        sync(device)
        t0 = time.perf_counter()
        for x in xs:
            train_step(model, opt, x.to(device, non_blocking=True), device)
        sync(device)
        chunks.append((time.perf_counter() - t0) / steps)
    if opts is not None:
        cggr_hook.disable(model)
        cggr_hook.scheduler.reset()
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(chunks)


def timing_phase(args, corpus, device, arm_opts: dict) -> dict:
    """{arm: {fraction: seconds per step}}: the arm's own fraction, or the grid where it moves."""
    timings = {}
    first = next(iter(arm_opts.values()))
    time_steps(args, corpus, device, first, None, repeats=1)  # start-up costs land in no arm's figure
    for arm, opts in sorted(arm_opts.items(), key=lambda kv: kv[0] != "plain"):  # plain first
        if opts is None:
            fractions = [None]
        elif is_auto(opts):
            fractions = sorted(c for c in arm_config(opts).auto_candidates if c != "plain")
        elif fraction_moves(opts):
            fractions = list(FRACTION_GRID)
        else:
            fractions = [arm_config(opts).min_tokens_ratio]
        timings[arm] = {("plain" if f is None else f): time_steps(args, corpus, device, opts, f) for f in fractions}
        if is_auto(opts):
            # the auto ratio may run a step as the plain loss: that step is the plain arm's, so it
            # costs what the plain arm's steps cost (timed once: two timings of one short step can
            # differ by a fifth)
            plain = timings.get("plain", {}).get("plain")
            timings[arm]["plain"] = plain if plain is not None else time_steps(args, corpus, device, None, None)
        shown = ", ".join(f"{k}: {1e3 * v:.1f} ms" for k, v in timings[arm].items())
        print(f"timing {arm}: {shown}", flush=True)
    return timings


def step_seconds(timing: dict, fraction: float | None) -> float:
    """An arm's step time at a kept fraction: its one timing, or linear in the fraction between
    the grid's timings."""
    if len(timing) == 1:
        return next(iter(timing.values()))
    if fraction == "plain":
        return timing["plain"]
    pts = sorted((f, t) for f, t in timing.items() if f != "plain")
    f = min(max(fraction if fraction is not None else pts[-1][0], pts[0][0]), pts[-1][0])
    for (f0, t0), (f1, t1) in zip(pts, pts[1:]):
        if f <= f1:
            return t0 + (t1 - t0) * (f - f0) / (f1 - f0)
    return pts[-1][1]


# ----------------------------------------------------------------------------------------------
# one training run on the virtual clock


@torch.no_grad()
def predicted_gain(model, corpus, args, device, batches: int = 2) -> dict:
    """What the gradnorm scores of the starting model predict before any training: their squared
    coefficient of variation and rho(f), the variance gain of sampling in proportion to them over
    uniform sampling at kept fraction f (capping aside)."""
    from cggr_hook import kernels
    from cggr_hook.kernels import reference

    s_all = []
    it = corpus.batches(args.batch_size, args.seq_len, seed=4242)
    for _ in range(batches):
        x = next(it).to(device)
        with autocast(device):
            logits = model(input_ids=x).logits[:, :-1]
        t = x[:, 1:].reshape(-1)
        stats = kernels.row_stats(logits, t, -100, with_p2=True)
        s_all.append(reference.difficulty(stats, "gradnorm", logits.shape[-1], torch.ones_like(t, dtype=torch.bool)))
    s = torch.cat(s_all).double()
    m1, m2 = float(s.mean()), float((s * s).mean())
    out = {"score_cv2": m2 / (m1 * m1) - 1}
    for f in (0.25, 0.5):
        denom = m1 * m1 - f * m2
        out[f"rho{int(f * 100)}"] = (1 - f) * m2 / denom if denom > 0 else None
    return out


def run_job(job: dict) -> dict:
    """Train one arm for one seed on its virtual clock; returns its curve and figures."""
    args = argparse.Namespace(**job["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    arm, seed, opts, timing = job["arm"], job["seed"], job["opts"], job["timing"]
    corpus = load_data(args)
    part = "finetune" if args.regime == "finetune" else None
    train, held = data_for(corpus, args, part)
    model = build_model(args, corpus.vocab_size, seed)
    if args.regime == "finetune":
        model.load_state_dict(torch.load(job["base"], map_location="cpu", weights_only=False)["state"])
    model.to(device).train()
    opt = make_optimizer(model, args.lr, device)
    prediction = predicted_gain(model, train, args, device)
    gate = gate_for(model, opts, seed)
    moving = fraction_moves(opts)
    fixed_fraction = None if opts is None or moving else arm_config(opts).min_tokens_ratio
    budget = args.budget
    targets = [budget * (i + 1) / args.eval_points for i in range(args.eval_points)]
    curve = [dict(seconds=0.0, step=0, val=heldout_loss(model, held, args.eval_batch_size, device))]
    batches = train.batches(args.batch_size, args.seq_len, seed=seed)
    clock, step, fractions, draws, plain_steps = 0.0, 0, [], [], 0
    wall0 = time.perf_counter()
    while clock < budget - 1e-9:
        for group in opt.param_groups:
            group["lr"] = lr_at(clock, budget, args.lr)
        train_step(model, opt, next(batches).to(device, non_blocking=True), device)
        step += 1
        fraction = fixed_fraction
        if gate is not None and (moving or step % 25 == 1):
            m = cggr_hook.metrics()
            if m.get("auto_plain"):  # the auto ratio ran this step as the plain loss
                fraction = "plain"
                fractions.append(1.0)
                plain_steps += 1
            elif m.get("tokens_total"):
                fraction = m["tokens_selected"] / m["tokens_total"] if moving else fixed_fraction
                fractions.append(m["tokens_selected"] / m["tokens_total"])
                if "ess" in m:
                    draws.append(
                        dict(
                            ess_ratio=m["ess"] / max(m["tokens_selected"], 1),
                            max_weight=m["max_weight"],
                            certain=m["certain_fraction"],
                            cv2=m["score_cv2"],
                        )
                    )
        clock += step_seconds(timing, fraction)
        while targets and clock >= targets[0] - 1e-9:
            targets.pop(0)
            curve.append(dict(seconds=clock, step=step, val=heldout_loss(model, held, args.eval_batch_size, device)))
    auto_state = None
    if gate is not None and is_auto(opts):  # what the auto ratio measured and chose, as it stands at the end
        m = cggr_hook.metrics()
        auto_state = {k: v for k, v in m.items() if k.startswith(("auto_", "step_ms_", "noise_scale"))}
        auto_state["plain_steps"] = plain_steps
    if gate is not None:
        cggr_hook.disable(model)
    tokens = step * args.batch_size * args.seq_len
    result = dict(
        arm=arm,
        seed=seed,
        options=opts,
        curve=curve,
        steps=step,
        final_val=curve[-1]["val"],
        kept_fraction=statistics.fmean(fractions) if fractions else 1.0,
        step_ms=1e3 * clock / max(step, 1),  # the virtual clock's mean step (auto's plain steps at plain's cost)
        tokens=tokens,
        epochs=tokens / train.train_tokens.numel(),
        predicted=prediction,
        draws={k: statistics.fmean(d[k] for d in draws) for k in draws[0]} if draws else None,
        wall_seconds=time.perf_counter() - wall0,
        auto=auto_state,
    )
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------
# figures


def time_to_reach(target: float, xs: list[float], ys: list[float]) -> float | None:
    """First (interpolated) x at which the curve is at or below target; None if never."""
    for i in range(len(ys)):
        if ys[i] <= target:
            if i == 0:
                return xs[0]
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def stats(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return dict(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0, n=len(vals))


def summarize(runs: list[dict], arms: list[str]) -> dict:
    """Per arm: figures over seeds, with differences paired by seed against plain and against the
    random control at the arm's kept fraction."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    out = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        control = control_arm(rs[0]["options"])
        d_plain, d_control, reach = [], [], []
        for r in rs:
            ref = by.get(("plain", r["seed"]))
            if ref is not None:
                d_plain.append(r["final_val"] - ref["final_val"])
                xs = [p["seconds"] for p in r["curve"]]
                t = time_to_reach(ref["final_val"], xs, [p["val"] for p in r["curve"]])
                reach.append(None if t is None else t / xs[-1])
            ctl = by.get((control, r["seed"])) if control and control != arm else None
            if ctl is not None:
                d_control.append(r["final_val"] - ctl["final_val"])
        draws = [r["draws"] for r in rs if r.get("draws")]
        out[arm] = dict(
            seeds=len(rs),
            final_val=stats([r["final_val"] for r in rs]),
            delta_plain=stats(d_plain),
            delta_control=stats(d_control),
            control=control,
            time_to_plain=stats(reach),
            reached_plain=sum(t is not None for t in reach),
            steps=stats([r["steps"] for r in rs]),
            step_ms=stats([r["step_ms"] for r in rs]),
            kept=stats([r["kept_fraction"] for r in rs]),
            epochs=stats([r["epochs"] for r in rs]),
            rho25=stats([r["predicted"].get("rho25") for r in rs]),
            rho50=stats([r["predicted"].get("rho50") for r in rs]),
            cv2=stats([r["predicted"]["score_cv2"] for r in rs]),
            ess_ratio=stats([d["ess_ratio"] for d in draws]) if draws else None,
        )
    plain_all = [r["plain_step_ms"] for r in runs if r.get("plain_step_ms")]
    for arm, s in out.items():
        # plain's step time over the arm's, each run against the plain timing of its own invocation;
        # an arm never timed beside plain gets the mean plain timing of the others (marked)
        ratios = [r["plain_step_ms"] / r["step_ms"] for r in runs if r["arm"] == arm and r.get("plain_step_ms")]
        s["speed_elsewhere"] = not ratios and bool(plain_all)
        if not ratios and plain_all:
            ratios = [statistics.fmean(plain_all) / s["step_ms"]["mean"]]
        s["speed"] = statistics.fmean(ratios) if ratios else None
    return out


def fmt(s: dict | None, digits: int = 3, signed: bool = False) -> str:
    if s is None:
        return "n/a"
    text = f"{s['mean']:+.{digits}f}" if signed else f"{s['mean']:.{digits}f}"
    if s["n"] > 1:
        text += f" ± {s['std']:.{digits}f}"
    return text


def markdown_table(summary: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| arm | seeds | kept | step ms | speed | steps | epochs | final val | Δ vs plain | Δ vs random control "
        "| time to plain's final | rho25 / rho50 predicted | ESS / k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        if s["reached_plain"] == 0 or s["time_to_plain"] is None:
            ttr = "not reached"
        else:
            ttr = f"{s['time_to_plain']['mean']:.2f} of the budget"
            if s["reached_plain"] < s["seeds"]:
                ttr += f" ({s['reached_plain']}/{s['seeds']} seeds)"
        ctl = "n/a" if s["delta_control"] is None else f"{fmt(s['delta_control'], signed=True)} ({s['control']})"
        rho = (
            "n/a"
            if s["rho25"] is None
            else f"{s['rho25']['mean']:.2f} / " + (f"{s['rho50']['mean']:.2f}" if s["rho50"] else "n/a")
        )
        ess = "n/a" if s["ess_ratio"] is None else f"{s['ess_ratio']['mean']:.2f}"
        lines.append(
            f"| {arm} | {s['seeds']} | {s['kept']['mean']:.2f} | {s['step_ms']['mean']:.1f} | "
            f"{'n/a' if s['speed'] is None else format(s['speed'], '.2f') + 'x' + ('*' if s['speed_elsewhere'] else '')}"
            f" | {s['steps']['mean']:.0f} | "
            f"{s['epochs']['mean']:.2f} | {fmt(s['final_val'])} | {fmt(s['delta_plain'], signed=True)} | {ctl} | "
            f"{ttr} | {rho} | {ess} |"
        )
    lines += [
        "",
        "Validation loss: plain mean cross entropy over the held-out tokens (nats), mean ± std over seeds, "
        "at the end of an equal time budget. Δ: paired by seed (the arm minus plain, or minus the random "
        "control at the arm's kept fraction), over the seeds both have; negative is better. *step ms*: each "
        "arm's training step timed alone on the device; *speed*: plain's step time over the arm's, both timed "
        "in the same invocation (*: the arm was never timed beside plain; plain's mean over the others). *time to plain's final*: the "
        "share of the budget the arm needed to reach plain's final loss. *rho*: the variance gain over "
        "uniform sampling that the starting model's gradnorm scores predict at 25% / 50% of tokens; "
        "*ESS / k*: the effective sample size of the importance weights over the tokens drawn, measured "
        "during training.",
    ]
    return "\n".join(lines) + "\n"


def auto_choices(runs: list[dict]) -> str:
    """A line per auto run: what it chose at the end and how many of its steps ran as the plain
    loss (empty where no run recorded it)."""
    lines = []
    for r in runs:
        a = r.get("auto")
        if not a:
            continue
        choice = "the plain loss" if a.get("auto_choice_plain") else f"{a.get('auto_choice')} of the tokens"
        lines.append(
            f"- {r['arm']}, seed {r['seed']}: chose {choice}; {a.get('plain_steps', 0)} of its {r['steps']} steps "
            "ran as the plain loss"
        )
    return "\n\nWhat the auto ratio chose:\n\n" + "\n".join(lines) + "\n" if lines else ""


FULL_ARMS = ("full", "random100")  # every token through the gate's kernels


# a final loss this close to plain's (or within twice the paired deltas' spread over seeds) is no
# verdict either way: two timings of one short step differ by a fifth, and the step counts with them
LEVEL_NATS = 0.005


def conclusion(summary: dict) -> str:
    """What a user should take from the table, in a sentence or two: whether gating paid against
    plain, and whether dropping tokens paid against keeping them all through the same kernels."""
    plain = summary.get("plain")
    gated = {a: s for a, s in summary.items() if a != "plain" and s["delta_plain"] is not None}
    if plain is None or not gated:
        return "No plain arm to compare with: run --arms plain ... for a verdict."
    best = min(gated, key=lambda a: gated[a]["delta_plain"]["mean"])
    d = gated[best]["delta_plain"]["mean"]
    noise = max(2 * (gated[best]["delta_plain"].get("std") or 0.0), LEVEL_NATS)
    if abs(d) <= noise:
        verdict = f"level with plain here (within {noise:.3f} nats)"
    else:
        verdict = "gating paid here" if d < 0 else "gating did not pay here"
    text = f"Verdict at equal wall-clock: {verdict}: the best gated arm, {best}, ended {d:+.3f} nats against plain"
    if "default" in gated and best != "default":
        dd = gated["default"]
        ctl = dd["delta_control"]
        text += f"; the default gate (`cggr_hook.enable(model)`) ended {dd['delta_plain']['mean']:+.3f}" + (
            f" and {ctl['mean']:+.3f} against its random control ({dd['control']})" if ctl else ""
        )
    full = next((a for a in FULL_ARMS if a in gated), None)
    sampled = {a: s for a, s in gated.items() if s["kept"]["mean"] < 0.999}
    if full and sampled:
        f_val = gated[full]["final_val"]["mean"]
        b = min(sampled, key=lambda a: sampled[a]["final_val"]["mean"])
        gap = sampled[b]["final_val"]["mean"] - f_val
        text += (
            f". Against every token through the same kernels ({full}), the best arm that drops tokens, {b}, "
            f"ended {gap:+.3f}: dropping tokens {'paid' if gap <= 0 else 'did not pay'} on top of the faster loss"
        )
    return text + "."


def plot_curves(runs: list[dict], arms: list[str], out: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    lows, highs = [], []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        xs = [statistics.fmean(r["curve"][j]["seconds"] for r in rs) for j in range(1, n)]
        ys = [statistics.fmean(r["curve"][j]["val"] for r in rs) for j in range(1, n)]
        style = dict(color="black", lw=2.2) if arm == "plain" else dict(lw=1.4)
        if arm.startswith("random"):
            style["ls"] = "--"
        elif arm.startswith("imp-"):
            style["marker"] = "s"
        ax.plot(xs, ys, marker=style.pop("marker", "o"), ms=2.5, label=arm, **style)
        lows.append(min(ys))
        highs.append(ys[0])
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.05 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("training seconds (each arm's step timed alone; evaluation excluded)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    name = "val_loss_vs_time.png"
    fig.savefig(out / name)
    plt.close(fig)
    return name


def write_results(result: dict, out: Path) -> str:
    runs, arms = result["runs"], result["arm_order"]
    summary = summarize(runs, arms)
    result["summary"] = summary
    a = result["args"]
    seeds = sorted({r["seed"] for r in runs})
    header = (
        f"## cggr_hook quality benchmark: {a['preset']} ({a['regime']})\n\n"
        f"{result['environment']['device']}; Llama {a['layers']} layers, d={a['d_model']}, V={a['vocab_size']} (tied), "
        f"{result['n_params'] / 1e6:.1f}M parameters; {a['batch_size']} x {a['seq_len']} tokens a step; "
        f"{a['budget']:g} s a run (virtual clock); AdamW peak lr {a['lr']:g}, cosine over the budget; "
        f"seeds {', '.join(map(str, seeds))} (each arm's in the seeds column); held-out: {result['heldout_tokens']:,} tokens"
        + (
            f"; base model: {result['base']['steps']} plain steps, {result['base']['epochs']:.2f} epochs of the "
            f"pretraining domain"
            if result.get("base")
            else ""
        )
        + "."
    )
    table = markdown_table(summary, header) + auto_choices(runs)
    verdict = conclusion(summary)
    (out / "results.md").write_text(table + "\n" + verdict + "\n")
    result["conclusion"] = verdict
    result["files"] = [
        "results.md",
        "results.json",
        plot_curves(runs, arms, out, f"{a['preset']}: held-out loss, mean of {len(seeds)} seed(s)"),
    ]
    with open(out / "results.json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    return table + "\n" + verdict


def _base_id(result: dict) -> str:
    """What tells two base models apart in results.json: a base of a fixed number of steps
    (``--base-steps``) is the same on every machine up to the device's rounding, so its steps;
    one timed in seconds, its steps and its held-out loss."""
    base = result["base"]
    if result["args"].get("base_steps"):
        return f"{base['steps']} steps"
    return f"{base['steps']} steps, pretrain val {base['pretrain_val']:.4f}"


def merge(paths: list[str], out: Path) -> int:
    """Combine the runs of several results.json files of one preset into one table."""
    results = []
    for p in paths:
        p = Path(p)
        results.append(json.loads((p / "results.json" if p.is_dir() else p).read_text()))
    presets = {r["args"]["preset"] for r in results}
    if len(presets) != 1:
        raise SystemExit(f"--merge: results of one preset only, got {sorted(presets)}")
    first = results[0]["args"]
    for path, r in zip(paths, results):
        differ = sorted(
            k for k in set(first) | set(r["args"]) if k not in RUN_LOCAL and first.get(k) != r["args"].get(k)
        )
        if differ:
            raise SystemExit(f"--merge: {path} was run with other settings ({', '.join(differ)}) than {paths[0]}")
        corpus, corpus0 = r.get("corpus", {}), results[0].get("corpus", {})
        if corpus.get("key") != corpus0.get("key"):
            # the corpus is every Python source of the machine that ran it: another image, with
            # other packages installed, makes another corpus (and another held-out set)
            raise SystemExit(
                f"--merge: {path} trained on another corpus ({corpus.get('key')}, {corpus.get('files_found')} "
                f"files found) than {paths[0]} ({corpus0.get('key')}, {corpus0.get('files_found')} files): the "
                "machines' Python sources differ, so their runs are not comparable; merge each corpus's files apart"
            )
        if r.get("base") and results[0].get("base") and _base_id(r) != _base_id(results[0]):
            raise SystemExit(
                f"--merge: {path} started from another base model ({_base_id(r)}) than {paths[0]} "
                f"({_base_id(results[0])}): runs from different bases are not comparable; merge each "
                "base's files apart"
            )
        plain = r["timings"].get("plain", {}).get("plain")
        for run in r["runs"]:
            run.setdefault("plain_step_ms", 1e3 * plain if plain else None)
    merged = copy.deepcopy(results[0])
    seen = set()
    merged["runs"], merged["sources"] = [], [str(p) for p in paths]
    for r in results:
        for run in r["runs"]:
            key = (run["arm"], run["seed"])
            if key in seen:
                raise SystemExit(f"--merge: arm {run['arm']} seed {run['seed']} appears twice")
            seen.add(key)
            merged["runs"].append(run)
        for arm in r["arm_order"]:
            if arm not in merged["arm_order"]:
                merged["arm_order"].append(arm)
    if "plain" in merged["arm_order"]:  # the baseline leads the table, whichever file had it
        merged["arm_order"].remove("plain")
        merged["arm_order"].insert(0, "plain")
    merged["timings"] = {i: r["timings"] for i, r in enumerate(results)}
    out.mkdir(parents=True, exist_ok=True)
    print(write_results(merged, out))
    return 0


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: cpu without CUDA, finetune-large with it"
    )
    p.add_argument("--arms", nargs="+", default=None, help=f"arm names (GPU presets: {' '.join(GPU_ARMS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of (virtual) training an arm")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--regime", choices=("scratch", "finetune"), default=None)
    p.add_argument("--base-seconds", type=float, default=None, help="finetune: plain training of the base model")
    p.add_argument(
        "--base-steps",
        type=int,
        default=None,
        help="finetune: plain steps of the base model (the GPU presets: 800; without it, --base-seconds)",
    )
    p.add_argument("--base-lr", type=float, default=None, help="finetune: the base model's peak learning rate")
    p.add_argument("--base-batch-size", type=int, default=None, help="finetune: the base model's batch size")
    p.add_argument(
        "--sources",
        choices=stdlib_text.SOURCES,
        default=None,
        help="stdlib: the standard library's sources; python: every Python source of the machine",
    )
    p.add_argument(
        "--finetune-share", type=float, default=None, help="finetune: share of the packages that form the new domain"
    )
    p.add_argument(
        "--timing-only", action="store_true", help="time every arm's step alone on the device, print the table and stop"
    )
    p.add_argument("--warmup-frac", type=float, default=0.3, help="curriculum share of the -warm arms")
    p.add_argument("--eval-points", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens evaluated (the first ones)")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None, help="training-text byte budget (0: every file)")
    p.add_argument("--max-heldout-bytes", type=int, default=None, help="held-out byte budget (0: every file)")
    p.add_argument("--parallel", type=int, default=None, help="training runs at once (the timing is not shared)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="tokenizer, token and base-model cache "
        "(default $CGGR_HOOK_CACHE, else $XDG_CACHE_HOME/cggr_hook, else ~/.cache/cggr_hook)",
    )
    p.add_argument("--out", default="runs/quality", help="output folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RESULTS",
        help="only combine these results.json files (or folders) of one preset into --out",
    )
    args = p.parse_args(argv)
    if args.merge:
        return args
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("finetune-large" if cuda else "cpu")
    preset = dict(PRESETS[args.preset])
    if args.base_seconds is not None and args.base_steps is None:
        preset.pop("base_steps", None)  # a base timed in seconds, as asked, not the preset's steps
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, copy.deepcopy(v))
    finetune = dict(FINETUNE_DEFAULTS, base_batch_size=args.batch_size)
    for k, default in finetune.items():
        if getattr(args, k, None) is None:
            setattr(args, k, preset.get(k, default))
    if args.regime == "finetune" and args.sources != "python":
        p.error("the finetune regime needs --sources python: it splits the installed packages into two domains")
    if args.max_bytes == 0:
        args.max_bytes = None
    if args.max_heldout_bytes == 0:
        args.max_heldout_bytes = None
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.eval_batch_size = args.eval_batch_size or min(32, max(8, args.batch_size))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return merge(args.merge, out)
    wall0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arms = list(dict.fromkeys(["plain"] + args.arms)) if "plain" in args.arms else list(dict.fromkeys(args.arms))
    for a in arms:
        arm_options(a)  # validate names before any work

    corpus = load_data(args)
    part = "finetune" if args.regime == "finetune" else None
    train, held = data_for(corpus, args, part)
    base = train_base(args, corpus, device) if args.regime == "finetune" else None
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    n_params = sum(p.numel() for p in build_model(args, corpus.vocab_size, 0).parameters())
    print(
        f"preset {args.preset} ({args.regime}) on {device_name}: {args.layers} layers, d={args.d_model}, "
        f"V={corpus.vocab_size}, {n_params / 1e6:.1f}M parameters, {args.batch_size} x {args.seq_len} tokens a "
        f"step, {args.budget:g} s an arm, seeds {args.seeds}; training stream {train.train_tokens.numel():,} tokens, "
        f"held-out {held.numel():,} tokens",
        flush=True,
    )

    # timing: every arm alone on the device; the estimated step count sizes -warm curricula
    timings = timing_phase(args, train, device, {a: arm_options(a) for a in arms})
    if args.timing_only:
        plain = timings.get("plain", {}).get("plain")
        print("\n| arm | step ms | tokens/s | speed vs plain |\n|---|---|---|---|")
        for a, t in timings.items():
            ms = 1e3 * min(t.values())
            speed = f"{plain / min(t.values()):.2f}x" if plain else "n/a"
            print(f"| {a} | {ms:.1f} | {args.batch_size * args.seq_len / (ms / 1e3):,.0f} | {speed} |")
        print(
            f"\n{device_name}, {args.preset}: {args.batch_size} x {args.seq_len} tokens a step "
            "(an arm whose fraction moves: its fastest fraction)"
        )
        return 0
    arm_opts = {}
    for a in arms:
        est = max(1, int(args.budget / min(timings[a].values())))
        arm_opts[a] = arm_options(a, est, args.warmup_frac)
    job_args = {k: v for k, v in vars(args).items() if k != "merge"}
    path = None
    if base is not None:
        path = str(base_path(args, corpus))
    jobs = [
        dict(args=job_args, arm=a, seed=s, opts=arm_opts[a], timing=timings[a], base=path)
        for s in args.seeds
        for a in arms
    ]
    runs = []
    result = dict(
        args=job_args,
        arm_order=arms,
        timings={a: {str(k): v for k, v in t.items()} for a, t in timings.items()},
        n_params=n_params,
        corpus=corpus.info,
        heldout_tokens=int(held.numel()),
        base={k: v for k, v in base.items() if k != "state"} if base else None,
        environment=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=__import__("transformers").__version__,
            cggr_hook=getattr(cggr_hook, "__version__", None),
            device=device_name,
            threads=torch.get_num_threads(),
            defaults=dict(vars(cggr_hook.GateConfig())) if hasattr(cggr_hook, "GateConfig") else None,
        ),
        runs=runs,
    )

    plain_ms = timings.get("plain", {}).get("plain")

    def finished(r: dict) -> None:
        r["plain_step_ms"] = 1e3 * plain_ms if plain_ms else None
        runs.append(r)
        print(f"{r['arm']} seed {r['seed']}: {r['steps']} steps, final val {r['final_val']:.4f}", flush=True)
        write_results(result, out)  # the files hold every finished run, should the rest be cut short

    # an auto-ratio arm times its own steps on the wall clock: it trains alone, after the others
    alone = [j for j in jobs if is_auto(j["opts"])]
    shared = [j for j in jobs if not is_auto(j["opts"])]
    if args.parallel > 1 and len(shared) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.parallel, mp_context=mp.get_context("spawn")) as pool:
            for r in pool.map(run_job, shared):
                finished(r)
    else:
        for job in shared:
            finished(run_job(job))
    for job in alone:
        finished(run_job(job))
    print()
    print(write_results(result, out))
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'val_loss_vs_time.png'} in "
        f"{time.perf_counter() - wall0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
