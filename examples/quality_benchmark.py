"""Does hard-token gating train a better model? A quality benchmark on real text.

Trains a small Llama-style model (``transformers``' ``LlamaForCausalLM``, random init, tied
embeddings) on the Python standard library's own sources (``stdlib_text.py``: no download) once per
*arm*, with the same initial weights and the same data order for every arm of a seed, and compares
the arms' validation loss, measured over every held-out token with the plain loss.

Arms (``--arms``), each a name:

* ``plain``: no gating, the baseline.
* ``topk25``, ``topk50``, ``stratified25``, ``seqaware25``: ``cggr_hook.enable(model, ...)`` with
  ``selection`` = topk / stratified / sequence_aware and ``min_tokens_ratio`` = the number / 100,
  combined scoring, a fixed ratio (``warmup_steps=0, dynamic_threshold=False``).
* the same with ``-warm`` (``topk25-warm``): the package's curriculum, from all tokens down to the
  ratio over the first ``--warmup-frac`` of the steps, with the dynamic threshold on.
* ``random25``, ``random50``: ``scoring='random'``, a random fraction of the tokens: the control.
  Hard-token selection earns its keep only if it beats this arm.
* also accepted: ``entropy25``, ``margin25``, ``loss25`` (topk on that score), any percentage.

Figures per arm (mean and spread over ``--seeds``): final validation loss (all arms run the same
steps, so this is also the loss at equal steps), the loss half-way, the loss at equal wall-clock
(the plain arm's training time, curves interpolated), the training time to reach the plain run's
final loss, and the loss on the *easy half* of the held-out tokens (those the plain model finds
easiest at the end, below its median per-token loss; a rise there is forgetting) and on the hard
half. Training time excludes evaluation.

Presets: ``--preset cpu`` (the default without CUDA: a tiny model, ``plain`` and ``topk25``, one
seed, about two minutes on two idle CPU cores), ``--preset gpu`` (the default with CUDA: 8 layers,
d=512, T=512, every arm, three seeds, 1000 steps an arm: about 40 s of training an arm on one H100, some 25
minutes in all; size it with ``--steps``, ``--minutes-per-arm`` or ``--budget-minutes`` for the whole
run) and ``--preset smoke`` (seconds, for tests). Any size flag overrides the preset. Before the
first arm a few untimed steps under every arm's options absorb CUDA start-up and kernel
compilation, so they count in no arm's time.

The standard library is small: a few million tokens (about 2.4M with Python 3.12 on Ubuntu, which
ships no ``test`` package; about 9M where the tests are installed). The header states how many
epochs a run is; every arm sees the same data in the same order, so the comparison stays fair, but
long runs repeat the data.

Writes ``results.md`` (the table, also printed), ``results.json`` (everything: configuration,
curves, per-seed figures, summary) and ``val_loss_vs_step.png`` / ``val_loss_vs_time.png`` (mean
over seeds) into ``--out`` (default ``runs/quality/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import statistics
import sys
import time
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
    try:
        import cggr_hook
    except ImportError:
        cggr_hook = None

ALL_ARMS = [
    "plain",
    "topk25", "topk25-warm",
    "topk50", "topk50-warm",
    "stratified25", "stratified25-warm",
    "seqaware25", "seqaware25-warm",
    "random25", "random50",
]

PRESETS = {
    "smoke": dict(
        layers=1, d_model=32, heads=2, seq_len=32, vocab_size=512, batch_size=8, steps=12,
        eval_points=3, max_bytes=150_000, max_heldout_bytes=12_000, include_tests=False,
        lr=3e-3, arms=["plain", "topk25", "random25"], seeds=[0],
    ),
    "cpu": dict(
        layers=2, d_model=128, heads=4, seq_len=128, vocab_size=4096, batch_size=16, steps=400,
        eval_points=8, max_bytes=3_000_000, max_heldout_bytes=150_000, include_tests=False,
        lr=2e-3, arms=["plain", "topk25"], seeds=[0],
    ),
    "gpu": dict(
        layers=8, d_model=512, heads=8, seq_len=512, vocab_size=16384, batch_size=32, steps=1000,
        eval_points=10, max_bytes=None, max_heldout_bytes=None, include_tests=True,
        lr=1e-3, arms=list(ALL_ARMS), seeds=[0, 1, 2],
    ),
}

ARM_RE = re.compile(r"^(topk|stratified|seqaware|random|entropy|margin|loss|combined)(\d+(?:\.\d+)?)(-warm)?$")


def arm_options(name: str, steps: int, warmup_frac: float) -> dict | None:
    """The ``cggr_hook.enable`` options of an arm (None for ``plain``)."""
    if name == "plain":
        return None
    m = ARM_RE.match(name)
    if not m:
        raise SystemExit(
            f"unknown arm {name!r}: use plain, or <kind><percent>[-warm] with kind in "
            "topk, stratified, seqaware, random, entropy, margin, loss (e.g. topk25, random50, seqaware25-warm)"
        )
    kind, pct, warm = m.group(1), float(m.group(2)), bool(m.group(3))
    if not 0 < pct <= 100:
        raise SystemExit(f"arm {name!r}: the percentage must be in (0, 100]")
    selection = {"stratified": "stratified", "seqaware": "sequence_aware"}.get(kind, "topk")
    scoring = kind if kind in ("random", "entropy", "margin", "loss") else "combined"
    opts = dict(scoring=scoring, selection=selection, min_tokens_ratio=pct / 100.0)
    if warm:
        opts.update(warmup_steps=max(1, round(warmup_frac * steps)), dynamic_threshold=True)
    else:
        opts.update(warmup_steps=0, dynamic_threshold=False)
    return opts


# ----------------------------------------------------------------------------------------------
# the gate's global schedule: every arm starts from step 0

_FRESH_SCHEDULE = None


def _remember_fresh_schedule() -> None:
    global _FRESH_SCHEDULE
    sched = getattr(cggr_hook, "scheduler", None)
    if sched is not None and hasattr(sched, "state_dict"):
        _FRESH_SCHEDULE = copy.deepcopy(sched.state_dict())


def reset_schedule() -> None:
    sched = cggr_hook.scheduler
    if _FRESH_SCHEDULE is not None and hasattr(sched, "load_state_dict"):
        sched.load_state_dict(copy.deepcopy(_FRESH_SCHEDULE))
    else:
        sched.reset()


def schedule_steps() -> int | None:
    sched = getattr(cggr_hook, "scheduler", None)
    return None if sched is None else int(getattr(sched, "step_count", -1))


# ----------------------------------------------------------------------------------------------
# model, evaluation, one training run


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
    model = LlamaForCausalLM(cfg)
    return model, cfg


@torch.no_grad()
def heldout_token_losses(model, heldout: torch.Tensor, batch_size: int, device, amp) -> torch.Tensor:
    """Plain per-token cross entropy of every next-token prediction in ``heldout``: (n, T - 1), fp32, CPU.

    ``model.eval()`` and ``torch.no_grad()``: a gated model gives the plain loss here.
    """
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, heldout.shape[0], batch_size):
        x = heldout[start : start + batch_size].to(device, non_blocking=True)
        with amp():
            logits = model(input_ids=x).logits
        V = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(x.shape[0], -1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def lr_lambda(total: int, warmup: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def eval_schedule(steps: int, points: int) -> list[int]:
    points = max(1, min(points, steps))
    return sorted({round(i * steps / points) for i in range(1, points + 1)})


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_arm(arm, opts, seed, corpus, heldout, args, device, amp, bar) -> dict:
    model, _ = build_model(args, corpus.vocab_size, seed)
    model.to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, **fused
    )
    warmup = max(1, round(args.lr_warmup_frac * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, warmup))

    gate = None
    if opts is not None:
        reset_schedule()
        gate = cggr_hook.enable(model, seed=seed, **opts)

    evals = set(eval_schedule(args.steps, args.eval_points))
    losses0 = heldout_token_losses(model, heldout, args.eval_batch_size, device, amp)
    curve_steps, curve_times, curve_val = [0], [0.0], [losses0.mean().item()]
    train_loss_sum, train_loss_n, train_curve = torch.zeros((), device=device), 0, []
    fractions = []
    metric_every = max(1, args.steps // 200)
    train_time = 0.0
    batches = corpus.batches(args.batch_size, args.seq_len, seed=seed, steps=args.steps)

    sync(device)
    t0 = time.perf_counter()
    for step, x in enumerate(batches, start=1):
        x = x.to(device, non_blocking=True)
        with amp():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_loss_sum += loss.detach().float()
        train_loss_n += 1
        if gate is not None and (step % metric_every == 0 or step == 1):
            m = cggr_hook.metrics()
            if m and m.get("tokens_total"):
                fractions.append((step, float(m["tokens_selected"]) / float(m["tokens_total"])))
        bar.update(1)
        if step in evals:
            sync(device)
            train_time += time.perf_counter() - t0
            train_curve.append((step, (train_loss_sum / train_loss_n).item()))
            train_loss_sum.zero_()
            train_loss_n = 0
            val = heldout_token_losses(model, heldout, args.eval_batch_size, device, amp)
            curve_steps.append(step)
            curve_times.append(train_time)
            curve_val.append(val.mean().item())
            bar.set_postfix(arm=arm, seed=seed, train=f"{train_curve[-1][1]:.3f}", val=f"{curve_val[-1]:.3f}")
            sync(device)
            t0 = time.perf_counter()

    final_losses = val  # the last eval point is the last step
    sched_steps = schedule_steps() if gate is not None else None
    if gate is not None:
        cggr_hook.disable(model)
    run = dict(
        arm=arm,
        seed=seed,
        options=opts,
        steps=curve_steps,
        seconds=curve_times,
        val_loss=curve_val,
        train_loss=train_curve,
        token_fraction=fractions,
        mean_token_fraction=(sum(f for _, f in fractions) / len(fractions)) if fractions else 1.0,
        train_seconds=train_time,
        tokens_per_second=args.steps * args.batch_size * args.seq_len / max(train_time, 1e-9),
        final_val=curve_val[-1],
        schedule_step_count=sched_steps,
    )
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run, final_losses


# ----------------------------------------------------------------------------------------------
# figures


def interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of the curve (xs ascending) at x; None beyond its end."""
    if x > xs[-1] + 1e-12:
        return None
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def time_to_reach(target: float, xs: list[float], ys: list[float]) -> float | None:
    """First (interpolated) x at which the curve is at or below target; None if never."""
    for i in range(len(ys)):
        if ys[i] <= target:
            if i == 0:
                return xs[0]
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def per_seed_figures(runs: dict, finals: dict, reference: str | None, args) -> None:
    """Adds the comparison figures to each run in place (runs[(arm, seed)])."""
    seeds = sorted({s for _, s in runs})
    for seed in seeds:
        ref = runs.get((reference, seed)) if reference else None
        mask = None
        if ref is not None:
            ref_losses = finals[(reference, seed)]
            mask = ref_losses < ref_losses.median()
        for (arm, s), run in runs.items():
            if s != seed:
                continue
            half = args.steps / 2
            run["val_at_half_steps"] = interp(half, run["steps"], run["val_loss"])
            run["val_at_equal_steps"] = run["final_val"]
            if ref is None:
                continue
            t_eq = ref["train_seconds"]
            v = interp(t_eq, run["seconds"], run["val_loss"])
            run["equal_time_seconds"] = t_eq
            run["val_at_equal_time"] = v if v is not None else run["final_val"]
            run["ended_before_equal_time"] = v is None
            t = time_to_reach(ref["final_val"], run["seconds"], run["val_loss"])
            run["time_to_reference_final"] = t
            run["time_to_reference_final_ratio"] = None if t is None else t / max(ref["train_seconds"], 1e-9)
            losses = finals[(arm, seed)]
            run["easy_half_val"] = losses[mask].mean().item()
            run["hard_half_val"] = losses[~mask].mean().item()
            run["delta_final_vs_reference"] = run["final_val"] - ref["final_val"]
        for (arm, s), run in runs.items():
            if s == seed:
                flat = finals[(arm, seed)].flatten()
                run["worst_quarter_val"] = flat.topk(max(1, flat.numel() // 4)).values.mean().item()


def stats(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return dict(
        mean=statistics.fmean(vals),
        std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
        min=min(vals),
        max=max(vals),
        n=len(vals),
    )


SUMMARY_KEYS = [
    "final_val", "val_at_half_steps", "val_at_equal_time", "time_to_reference_final",
    "time_to_reference_final_ratio", "easy_half_val", "hard_half_val", "delta_final_vs_reference",
    "worst_quarter_val", "train_seconds", "tokens_per_second", "mean_token_fraction",
]


def summarize(runs: dict, arms: list[str], seeds: list[int]) -> dict:
    out = {}
    for arm in arms:
        rs = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
        summ = {k: stats([r.get(k) for r in rs]) for k in SUMMARY_KEYS}
        summ["seeds"] = len(rs)
        summ["reached_reference_final"] = sum(r.get("time_to_reference_final") is not None for r in rs)
        summ["ended_before_equal_time"] = sum(bool(r.get("ended_before_equal_time")) for r in rs)
        out[arm] = summ
    return out


def fmt(s: dict | None, digits: int = 3, spread: bool = True) -> str:
    if s is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f}"
    if spread and s["n"] > 1:
        text += f" ± {s['std']:.{digits}f}"
    return text


def markdown_table(summary: dict, arms: list[str], reference: str | None, header: str) -> str:
    ref = reference or "reference"
    lines = [
        header,
        "",
        f"| arm | tokens in loss | final val (= equal steps) | Δ vs {ref} | val @ ½ steps | val @ {ref}'s time "
        f"| time to {ref}'s final | easy-half val | hard-half val | worst-25% val | train s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for arm in arms:
        s = summary[arm]
        n = s["seeds"]
        eq = fmt(s["val_at_equal_time"])
        if s["ended_before_equal_time"]:
            eq += " †"
            notes.append("†")
        reached = s["reached_reference_final"]
        if not reference:
            ttr = "n/a"
        elif reached == 0:
            ttr = "not reached"
        else:
            ttr = f"{s['time_to_reference_final']['mean']:.3g} s ({s['time_to_reference_final_ratio']['mean']:.2f}×)"
            if reached < n:
                ttr += f", {reached}/{n} seeds"
        delta = s["delta_final_vs_reference"]
        delta_txt = "n/a" if delta is None else (f"{delta['mean']:+.3f}" + (f" ± {delta['std']:.3f}" if delta["n"] > 1 else ""))
        lines.append(
            f"| {arm} | {fmt(s['mean_token_fraction'], 2, spread=False)} | {fmt(s['final_val'])} | {delta_txt} "
            f"| {fmt(s['val_at_half_steps'])} | {eq} | {ttr} | {fmt(s['easy_half_val'])} | {fmt(s['hard_half_val'])} "
            f"| {fmt(s['worst_quarter_val'])} | {s['train_seconds']['mean']:.3g} | {fmt(s['tokens_per_second'], 0, spread=False)} |"
        )
    lines.append("")
    lines.append(
        "Validation losses: plain mean cross entropy over every held-out token (nats), mean ± std over seeds. "
        "*tokens in loss*: mean fraction of tokens the gate kept. "
        f"*easy half* / *hard half*: held-out tokens below / above the median per-token loss of the final {ref} "
        "model of the same seed. *worst-25%*: mean of the quarter of held-out tokens with the highest loss under "
        "the arm's own final model (the tail that hard-token training aims at). Training time excludes evaluation."
    )
    if notes:
        lines.append(
            f"† this arm's training ended before {ref}'s training time (it is faster): its final loss is shown."
        )
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict, arms: list[str], seeds: list[int], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for xkey, xlabel, fname in (("steps", "optimizer step", "val_loss_vs_step.png"),
                                ("seconds", "training seconds (evaluation excluded)", "val_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
        lows, highs = [], []
        for i, arm in enumerate(arms):
            rs = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
            if not rs:
                continue
            n = min(len(r["val_loss"]) for r in rs)
            xs = [statistics.fmean(r[xkey][j] for r in rs) for j in range(1, n)]
            ys = [statistics.fmean(r["val_loss"][j] for r in rs) for j in range(1, n)]
            style = dict(color="black", lw=2.2) if arm == "plain" else dict(lw=1.5)
            if arm.startswith("random"):
                style["ls"] = "--"
            elif arm.endswith("-warm"):
                style["ls"] = "-."
            ax.plot(xs, ys, marker="o", ms=2.5, label=arm, **style)
            lows.append(min(ys))
            highs.append(ys[0])
        if lows:
            lo, hi = min(lows), max(highs)
            pad = 0.05 * max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / token)")
        title = "held-out loss" + (f", mean of {len(seeds)} seeds" if len(seeds) > 1 else f", seed {seeds[0]}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        written.append(fname)
    return written


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a small Llama on the standard library's sources with and without cggr_hook gating "
        "and compare validation losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: gpu with CUDA, cpu without")
    p.add_argument("--arms", nargs="+", default=None, help=f"arm names (gpu preset: {' '.join(ALL_ARMS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm")
    p.add_argument("--minutes-per-arm", type=float, default=None,
                   help="size --steps from a short timing of plain steps so one arm trains about this long")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="size --steps so the whole run (every arm and seed, evaluations included) takes about this long")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="MLP width (default 4 * d-model)")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--lr-warmup-frac", type=float, default=0.05, help="linear learning-rate warmup, fraction of steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup-frac", type=float, default=0.3, help="curriculum length of the -warm arms, fraction of steps")
    p.add_argument("--eval-points", type=int, default=None, help="evaluations per arm, evenly spaced")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None, help="training-text byte budget (0: every file)")
    p.add_argument("--max-heldout-bytes", type=int, default=None, help="held-out byte budget (0: every held-out file)")
    p.add_argument("--reference", default="plain", help="the arm the others are compared with")
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default $CGGR_HOOK_CACHE, else "
                   "$XDG_CACHE_HOME/cggr_hook, else ~/.cache/cggr_hook)")
    p.add_argument("--out", default="runs/quality", help="output folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up steps (CUDA start-up, kernel compilation) before the first arm")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    preset = PRESETS[args.preset]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, copy.deepcopy(v))
    if args.max_bytes == 0:
        args.max_bytes = None
    if args.max_heldout_bytes == 0:
        args.max_heldout_bytes = None
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size if args.device.startswith("cuda") else max(8, 2 * args.batch_size)
    return args


def warm_up(args, corpus, heldout, arm_opts: dict, device, amp) -> None:
    """A few untimed steps of a throwaway model, plain and under each arm's gate, and one evaluation
    batch, so CUDA start-up and kernel compilation (Triton's too) count in no arm's training time."""
    model, _ = build_model(args, corpus.vocab_size, 0)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, **({"fused": True} if device.type == "cuda" else {}))
    it = corpus.batches(args.batch_size, args.seq_len, seed=54321)
    for opts in [None, *{json.dumps(o, sort_keys=True): o for o in arm_opts.values() if o}.values()]:
        if opts is not None:
            reset_schedule()
            cggr_hook.enable(model, **opts)
        for _ in range(2):
            x = next(it).to(device)
            with amp():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if opts is not None:
            cggr_hook.disable(model)
    heldout_token_losses(model, heldout[: args.eval_batch_size], args.eval_batch_size, device, amp)
    sync(device)
    del model, opt
    if cggr_hook is not None and hasattr(cggr_hook, "scheduler") and any(arm_opts.values()):
        reset_schedule()


def calibrate_steps(args, corpus, device, amp) -> int:
    """Steps per arm so that a plain arm trains about --minutes-per-arm (gated arms may differ)."""
    model, _ = build_model(args, corpus.vocab_size, 0)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = corpus.batches(args.batch_size, args.seq_len, seed=12345)
    times = []
    for i in range(13):
        x = next(it).to(device)
        sync(device)
        t = time.perf_counter()
        with amp():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    per_step = statistics.median(times)
    del model, opt
    return max(10, int(args.minutes_per_arm * 60 / per_step))


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        amp = nullcontext

    gated = [a for a in args.arms if a != "plain"]
    for a in args.arms:
        arm_options(a, 100, args.warmup_frac)  # validate names early
    if gated and (cggr_hook is None or not hasattr(cggr_hook, "enable")):
        print("cggr_hook is not importable here (pip install -e . from the repository root); "
              f"cannot run the gated arms {gated}", file=sys.stderr)
        return 2
    if gated:
        _remember_fresh_schedule()
    reference = args.reference if args.reference in args.arms else None
    arms = ([reference] if reference else []) + [a for a in args.arms if a != reference]

    corpus = stdlib_text.load_corpus(
        vocab_size=args.vocab_size, max_bytes=args.max_bytes, max_heldout_bytes=args.max_heldout_bytes,
        include_tests=args.include_tests, cache_dir=args.cache_dir,
    )
    heldout = corpus.heldout_sequences(args.seq_len)
    if args.budget_minutes and not args.minutes_per_arm:
        # evaluations, start-up and the gate's overhead: keep about a quarter of the budget for them
        args.minutes_per_arm = 0.75 * args.budget_minutes / (len(arms) * len(args.seeds))
    if args.minutes_per_arm:
        args.steps = calibrate_steps(args, corpus, device, amp)
    arm_opts = {a: arm_options(a, args.steps, args.warmup_frac) for a in arms}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_tmp, cfg = build_model(args, corpus.vocab_size, 0)
    n_params = sum(p.numel() for p in model_tmp.parameters())
    del model_tmp
    n_tokens_heldout = heldout.shape[0] * (heldout.shape[1] - 1)
    epochs = args.steps * args.batch_size * args.seq_len / corpus.train_tokens.numel()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"preset {args.preset} on {device_name}: {args.layers} layers, d={args.d_model}, T={args.seq_len}, "
        f"V={corpus.vocab_size}, batch {args.batch_size}, {args.steps} steps ({epochs:.2g} epochs), seeds {args.seeds}; "
        f"train {corpus.train_tokens.numel():,} tokens ({corpus.info['train_files']} files), "
        f"held-out {n_tokens_heldout:,} predicted tokens ({corpus.info['heldout_files']} files)",
        flush=True,
    )

    from tqdm.auto import tqdm

    if not args.no_warmup:
        warm_up(args, corpus, heldout, arm_opts, device, amp)
    runs, finals = {}, {}
    bar = tqdm(total=len(arms) * len(args.seeds) * args.steps, unit="step", disable=args.no_progress,
               dynamic_ncols=True, mininterval=1.0)
    for seed in args.seeds:
        for arm in arms:
            bar.set_description(f"{arm} s{seed}")
            run, losses = train_arm(arm, arm_opts[arm], seed, corpus, heldout, args, device, amp, bar)
            runs[(arm, seed)] = run
            finals[(arm, seed)] = losses
            sc = run["schedule_step_count"]
            if sc is not None and sc != args.steps:
                print(f"\nnote: cggr_hook.scheduler.step_count was {sc} after {args.steps} optimizer steps "
                      f"of arm {arm}", file=sys.stderr)
    bar.close()

    per_seed_figures(runs, finals, reference, args)
    summary = summarize(runs, arms, args.seeds)
    header = (
        f"## cggr_hook quality benchmark ({args.preset} preset)\n\n"
        f"{device_name}; Llama {args.layers} layers, d={args.d_model}, {args.heads} heads, T={args.seq_len}, "
        f"vocab {corpus.vocab_size} (tied), {n_params / 1e6:.2f}M parameters; AdamW lr {args.lr:g} cosine, "
        f"{args.steps} steps × {args.batch_size} × {args.seq_len} tokens ({epochs:.2g} epochs of "
        f"{corpus.train_tokens.numel():,} training tokens); "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; seeds {', '.join(map(str, args.seeds))}; "
        f"held-out: {n_tokens_heldout:,} tokens of {corpus.info['heldout_files']} standard-library files."
    )
    table = markdown_table(summary, arms, reference, header)
    print()
    print(table)
    (out / "results.md").write_text(table)
    pngs = plot_curves(runs, arms, args.seeds, out)

    result = dict(
        args=vars(args),
        arms={a: arm_opts[a] for a in arms},
        reference=reference,
        model_config=cfg.to_dict(),
        n_params=n_params,
        corpus=corpus.info,
        heldout_predicted_tokens=n_tokens_heldout,
        environment=dict(
            python=platform.python_version(), torch=torch.__version__,
            transformers=__import__("transformers").__version__,
            cggr_hook=getattr(cggr_hook, "__version__", None) if cggr_hook else None,
            device=device_name, threads=torch.get_num_threads(),
        ),
        runs=[runs[(a, s)] for s in args.seeds for a in arms],
        summary=summary,
        wall_seconds=time.perf_counter() - wall0,
        files=["results.md", "results.json", *pngs],
    )
    with open(out / "results.json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(str(out / p) for p in pngs)
          + f" in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
