"""End-to-end training throughput with and without the gate, on Hugging Face models.

Shapes (random init, bf16 weights, tied embeddings, ``attn_implementation='sdpa'``):

* ``llama1b``: Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
  V = 128256). The rope settings are left at the library's defaults: they do not change the cost.
* ``gemma270m``: Gemma-3-270M-like (``Gemma3ForCausalLM``: hidden 640, 18 layers, 4 heads, 1 KV
  head, head_dim 256, intermediate 2048, sliding window 512, V = 262144). Where this
  ``transformers`` has no Gemma 3, a ``LlamaConfig`` of the same sizes stands in, and the output
  says so.
* ``small`` (``--preset small``: 16 x 256 tokens a step): a 4-layer Llama with d = 256 and
  V = 32768, where a gated call's fixed host cost is a large part of a step.

Variants, each on a fresh model and optimizer (same seed, so the same initial weights and data) and
a fresh schedule (``cggr_hook.scheduler.reset()``: a timed choice probes its own model):

* ``hf``: ``model(input_ids, labels=input_ids).loss``, the library's own loss (fp32-upcast logits);
* ``cggr25`` / ``cggr50`` / ``cggr100``: the same call after ``cggr_hook.enable(model,
  min_tokens_ratio=r, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)``: every
  step through the gate's kernels; ``cggr25_nographs`` the same as ``cggr25`` with
  ``cuda_graphs=False`` (every launch from Python);
* ``cggrdefault``: the same call after ``cggr_hook.enable(model)``: every token, through the gate's
  kernels or the plain loss, whichever it timed faster;
* ``cggrauto``: the same call after ``cggr_hook.enable(model, min_tokens_ratio='auto')``: the
  gate times every candidate fraction (and the plain loss) for a few steps, then keeps the one with
  the most expected progress per second;

  the probe steps of these two are added to the warm-up, so the timed steps run the choice, which
  the table names;
* ``no_head``: the decoder alone with a trivial loss on its last hidden state, no LM head, no
  cross entropy: the ceiling for anything saved on the head side.

A step is forward, backward, ``AdamW(fused=True)`` step and ``zero_grad``, timed with CUDA events
(perf_counter on the CPU); figures are the median over the timed steps after the warm-up steps.
With ``--repeats R`` (3 in the small preset, where a step is host-bound and a variant's figure moves
by 10% between fresh models) the list of variants runs R times in turn and a variant's figure is
the median of its runs' medians, their range beside it.
Peak memory is ``torch.cuda.max_memory_allocated()`` over all steps of the variant, reset once the
model and optimizer exist (weights included, optimizer state created by the first step).

Checks before a gated variant is timed (its first step): the loss is finite, the gate saw the
B * (T - 1) labelled tokens and kept k = max(1, floor(r * n + 0.5)) of them
(``cggr_hook.metrics()``), and at 100% the first loss equals ``hf``'s first loss.

    python examples/throughput_benchmark.py --out runs/throughput            # both shapes
    python examples/throughput_benchmark.py --shapes gemma270m --steps 30
    python examples/throughput_benchmark.py --preset smoke --out /tmp/tp     # CPU, seconds
    python examples/throughput_benchmark.py --preset small --profile hf cggr25   # where a step's host time goes

Prints a markdown table (ratios against ``hf`` of the same run) and writes ``throughput.json``
into ``--out`` (or to ``--out`` itself when it ends in ``.json``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook

VARIANTS = ("hf", "cggr25", "cggr25_nographs", "cggr50", "cggr100", "cggrdefault", "cggrauto", "no_head")
# what runs unless --variants says otherwise (cggr25_nographs only when asked: it measures the graphs)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "cggr25_nographs")
GATED = {"cggr25": 0.25, "cggr25_nographs": 0.25, "cggr50": 0.5, "cggr100": 1.0}
# the variants that choose by measured step time: their enable() options
TIMED = {"cggrdefault": {}, "cggrauto": {"min_tokens_ratio": "auto"}}
# their probe windows (every candidate for a few steps) run before the timed steps
PROBE_STEPS = {
    v: len(cggr_hook.GateConfig(**o).auto_candidates) * (cggr_hook.auto.PROBE_STEPS + 1) for v, o in TIMED.items()
}
IGNORE_INDEX = -100

SHAPES = {
    "llama1b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "gemma270m": dict(
        arch="gemma3",
        vocab_size=262144,
        hidden_size=640,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        intermediate_size=2048,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    # a small model at a small batch (16 x 256 tokens): where a call's fixed cost is most of a step
    "small": dict(
        arch="llama",
        vocab_size=32768,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1024,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # tiny versions of both, for the smoke preset
    "smoke_llama": dict(
        arch="llama",
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "smoke_gemma": dict(
        arch="gemma3",
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        sliding_window=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
}
PRESETS = {
    "full": dict(shapes=["llama1b", "gemma270m"], batch=4, seq=2048, steps=20, warmup=5, repeats=1),
    "small": dict(shapes=["small"], batch=16, seq=256, steps=50, warmup=10, repeats=3),
    "smoke": dict(shapes=["smoke_llama", "smoke_gemma"], batch=2, seq=64, steps=3, warmup=1, repeats=1),
}


def make_config(shape: str):
    """The ``transformers`` config of a shape, and a note when a stand-in was used."""
    import transformers

    fields = dict(SHAPES[shape])
    arch = fields.pop("arch")
    note = ""
    if arch == "gemma3":
        cls = getattr(transformers, "Gemma3TextConfig", None)
        if cls is None:
            note = "Gemma3TextConfig not in this transformers: a LlamaConfig of the same sizes stands in"
            for k in ("sliding_window", "query_pre_attn_scalar"):
                fields.pop(k)
            cls = transformers.LlamaConfig
    else:
        cls = transformers.LlamaConfig
    cfg = cls(**fields, use_cache=False)
    return cfg, note


def build(shape: str, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM

    cfg, note = make_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, opt, note


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self):
        if self.cuda:
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        """Returns a callable giving ms once the device has finished (no sync per step)."""
        if self.cuda:
            s, e = self.s, self.e
            e.record()
            return lambda: s.elapsed_time(e)
        ms = (time.perf_counter() - self.t0) * 1e3
        return lambda: ms


def train_step(model, opt, ids, variant):
    if variant == "no_head":
        hidden = model.base_model(input_ids=ids).last_hidden_state
        loss = hidden.float().pow(2).mean()
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def profile_steps(model, opt, batches, variant, device, steps: int = 5) -> str:
    """``steps`` more steps under torch.profiler, then ``steps`` more under cProfile
    (``cggr_hook.bench.host_profiles``): the operator table misses the Python between operators,
    which is most of a host-bound gated step."""
    from cggr_hook.bench import host_profiles

    ops, python = host_profiles(lambda i: train_step(model, opt, batches[i % len(batches)], variant), steps, device)
    return f"torch.profiler, {ops}\ncProfile, {python}"


def probe_times(m: dict) -> str:
    """The step times a timed choice measured in its last probe window (``metrics()``'s
    ``step_ms_*``), as 'plain 20.1, 1.0 19.5': what its choice rested on."""
    parts = []
    for key, value in m.items():
        if key.startswith("step_ms_") and isinstance(value, (int, float)) and math.isfinite(value):
            name = key[len("step_ms_") :]
            label = str(int(name) / 100) if name.isdigit() else name
            parts.append(f"{label} {value:.1f}")
    return ", ".join(parts)


def k_of(ratio: float, n: int) -> int:
    return 0 if n == 0 else min(n, max(1, math.floor(ratio * n + 0.5)))


def check_gated(variant, loss0, batch, seq, hf_loss0):
    """Problems with a gated variant's first step, as a list of strings (empty: fine)."""
    problems = []
    r = GATED.get(variant, 1.0)  # auto's and the default's first step keep every token
    if not math.isfinite(loss0):
        problems.append(f"loss {loss0} is not finite")
    try:
        m = cggr_hook.metrics()
    except Exception as e:
        m = {}
        problems.append(f"cggr_hook.metrics() raised {type(e).__name__}: {e}")
    n = batch * (seq - 1)
    if not m.get("auto_plain"):  # (the default's probe starts with the plain loss: no gate figures)
        if m.get("tokens_total") != n:
            problems.append(f"gate saw tokens_total={m.get('tokens_total')}, expected {n} (was the loss gated?)")
        if m.get("tokens_selected") != k_of(r, n):
            problems.append(f"gate kept tokens_selected={m.get('tokens_selected')}, expected k={k_of(r, n)}")
    if r == 1.0 and hf_loss0 is not None and not abs(loss0 - hf_loss0) <= 1e-3 * max(1.0, abs(hf_loss0)):
        problems.append(f"first loss {loss0:.6f} != hf's {hf_loss0:.6f}")
    return problems


def run_variant(shape, variant, args, device, batches, hf_loss0, profile: bool = False):
    rec = {"shape": shape, "variant": variant, "status": "ok"}
    model = opt = None
    try:
        model, opt, note = build(shape, device, args.seed)
        rec["config_note"] = note
        rec["model_class"] = type(model).__name__
        rec["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        rec["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        gated = variant in GATED or variant in TIMED
        # a fresh schedule: a timed choice keeps its state in the global scheduler, by the model's
        # kind, across disable() and enable() (what a resumed run restores), so without this a
        # repeat would reuse the first run's probe instead of probing its own model
        cggr_hook.scheduler.reset()
        if variant in GATED:
            cggr_hook.enable(
                model,
                min_tokens_ratio=GATED[variant],
                warmup_steps=0,
                dynamic_threshold=False,
                plain_when_faster=False,
                cuda_graphs=not variant.endswith("_nographs"),
            )
        elif variant in TIMED:
            cggr_hook.enable(model, **TIMED[variant])
        warmup = args.warmup + PROBE_STEPS.get(variant, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            rec["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30

        timer = Timer(device)
        losses, times = [], []
        for i in range(warmup + args.steps):
            ids = batches[i % len(batches)]
            timer.start()
            loss = train_step(model, opt, ids, variant)
            t = timer.stop()
            losses.append(loss)
            if i >= warmup:
                times.append(t)
            if i == 0:
                rec["first_loss"] = float(loss)
                if gated:
                    problems = check_gated(variant, rec["first_loss"], args.batch, args.seq, hf_loss0)
                    if problems:
                        rec["status"] = "check failed"
                        rec["check"] = "; ".join(problems)
                        if not args.force:
                            return rec
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        ms = [t() for t in times]
        rec["step_ms_all"] = ms
        rec["step_ms"] = statistics.median(ms)
        rec["tokens_per_s"] = args.batch * args.seq / (rec["step_ms"] / 1e3)
        rec["last_loss"] = float(losses[-1])
        if variant in TIMED:
            m = cggr_hook.metrics()
            rec["auto"] = {k: v for k, v in m.items() if k.startswith(("auto_", "noise_scale", "step_ms_"))}
            rec["auto_choice"] = "plain" if m.get("auto_choice_plain") else m.get("auto_choice")
            rec["probe_ms"] = probe_times(m)
        if profile:  # after the timed choice's figures were read: the profiled steps are not in them
            rec["profile"] = profile_steps(model, opt, batches, variant, device)
        if not all(math.isfinite(float(x)) for x in losses):
            rec["status"] = "check failed"
            rec["check"] = "non-finite loss during training"
    except Exception as e:
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"[throughput] {shape} {variant} failed:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        if model is not None and (variant in GATED or variant in TIMED):
            try:
                cggr_hook.disable(model)
            except Exception as e:
                print(f"[throughput] cggr_hook.disable raised {type(e).__name__}: {e}", file=sys.stderr)
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def combine_runs(runs: list[dict], args) -> dict:
    """One record of a variant's runs. Where every run passed: the last run's record, with
    ``step_ms`` the median of the runs' medians, ``step_ms_runs`` each run's, ``step_ms_all``
    every timed step of every run in order, and the peak the largest. Where one failed (the runs
    after it are skipped): that run's record, its status and error, and no timing, as a variant
    that fails in its only run."""
    failed = next((r for r in runs if r["status"] != "ok"), None)
    rec = dict(failed if failed is not None else runs[-1])
    if len(runs) > 1:
        rec["step_ms_runs"] = [r.get("step_ms") for r in runs]
    if failed is not None:
        for k in ("step_ms", "tokens_per_s", "step_ms_all", "peak_gib"):
            rec.pop(k, None)
        return rec
    rec["step_ms_all"] = [t for r in runs for t in r.get("step_ms_all") or []]
    rec["step_ms"] = statistics.median(r["step_ms"] for r in runs)
    rec["tokens_per_s"] = args.batch * args.seq / (rec["step_ms"] / 1e3)
    peaks = [r["peak_gib"] for r in runs if r.get("peak_gib") is not None]
    if peaks:
        rec["peak_gib"] = max(peaks)
    rec["first_loss"] = runs[0].get("first_loss")
    rec["profile"] = next((r["profile"] for r in runs if r.get("profile")), None)
    probes = [r["probe_ms"] for r in runs if r.get("probe_ms")]
    if len(runs) > 1 and probes:
        rec["probe_ms"] = "; ".join(probes)
    choices = [r["auto_choice"] for r in runs if r.get("auto_choice") is not None]
    if len(set(map(str, choices))) > 1:
        rec["auto_choice"] = ", ".join(map(str, choices))  # the runs chose differently: every choice, in turn
    return rec


def render(meta, records) -> str:
    out = [
        "# cggr_hook end-to-end training throughput",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
        f"cggr_hook {meta['cggr_hook']}, python {meta['python']}",
        f"- date: {meta['date']}",
        f"- {meta['batch']} x {meta['seq']} tokens a step, bf16 weights, AdamW (fused on CUDA), random init, "
        f"sdpa attention; median of {meta['steps']} steps after {meta['warmup']} warm-up steps"
        + (
            f"; the list of variants run {meta['repeats']} times in turn, a fresh model each time: a variant's "
            "step time is the median of its runs' medians (the range of the runs' medians beside it)"
            if meta.get("repeats", 1) > 1
            else ""
        ),
        "- ratio: tokens/s of the variant / tokens/s of hf in the same call (> 1: faster; with repeats, of the "
        "medians over the runs); peak: "
        "max_memory_allocated over the variant's steps, weights included",
        "",
    ]
    for shape in meta["shapes"]:
        recs = [r for r in records if r["shape"] == shape]
        if not recs:
            continue
        hf = next((r for r in recs if r["variant"] == "hf" and r.get("tokens_per_s")), None)
        cls = next((r.get("model_class") for r in recs if r.get("model_class")), "?")
        params = next((r.get("params_m") for r in recs if r.get("params_m")), None)
        title = f"## {shape}: {cls}, V = {SHAPES[shape]['vocab_size']}"
        if params:
            title += f", {params:.1f}M parameters"
        out += [title, ""]
        notes = {r.get("config_note") for r in recs if r.get("config_note")}
        out += [f"Note: {n}" for n in notes] + ([""] if notes else [])
        out += [
            "| variant | step ms | runs' range ms | tokens/s | vs hf | peak GiB | vs hf peak | first loss | status |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in recs:
            tps = r.get("tokens_per_s")
            ratio = tps / hf["tokens_per_s"] if (tps and hf) else None
            peak = r.get("peak_gib")
            pratio = peak / hf["peak_gib"] if (peak and hf and hf.get("peak_gib")) else None
            status = r["status"]
            if r.get("check"):
                status += f": {r['check']}"
            if r.get("error"):
                status += f": {r['error']}"
            if r.get("auto_choice") is not None:
                probe = f"; its probe's step ms: {r['probe_ms']}" if r.get("probe_ms") else ""
                status += f" (its choice: {r['auto_choice']}{probe})"
            ms_runs = [x for x in r.get("step_ms_runs") or [] if x is not None]
            spread = f"{min(ms_runs):.1f}-{max(ms_runs):.1f}" if len(ms_runs) > 1 else "-"
            out.append(
                f"| {r['variant']} | {_f(r.get('step_ms'), '.1f')} | {spread} | {_f(tps and tps / 1e3, '.1f')}k | "
                f"{_f(ratio, '.3f')} | {_f(peak, '.2f')} | {_f(pratio, '.2f')} | {_f(r.get('first_loss'), '.4f')} | "
                f"{status.replace('|', '/')} |"
            )
        out.append("")
    return "\n".join(out)


def _f(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return "not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of the whole list of variants, in turn (a fresh model each); a variant's figure is the median "
        "of its runs' medians (presets: small 3, full and smoke 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        nargs="+",
        choices=VARIANTS,
        default=[],
        help="after these variants' timed steps, profile 5 more with torch.profiler (host time by operator) and 5 "
        "with cProfile (Python functions), printed after the table",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="runs/throughput", help="a folder (throughput.json inside) or a .json path")
    p.add_argument("--force", action="store_true", help="time a gated variant whose first-step check failed")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seq < 2:
        p.error("--seq must be at least 2 (the labels are shifted by one)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        name = f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    meta = {
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cggr_hook": getattr(cggr_hook, "__version__", "?"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": args.preset,
        "shapes": args.shapes,
        "variants": args.variants,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
    }

    records = []
    for shape in args.shapes:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        V = SHAPES[shape]["vocab_size"]
        batches = [torch.randint(0, V, (args.batch, args.seq), device=device, generator=gen) for _ in range(4)]
        hf_loss0 = None
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        # the whole list in turn, repeats times: a drift of the machine over the run (clocks, other
        # load on the host) reaches every variant alike instead of whichever ran last
        for rep in range(args.repeats):
            for variant in args.variants:
                if runs[variant] and runs[variant][-1]["status"] != "ok":
                    continue  # a failed variant is not run again
                tag = f" (run {rep + 1} of {args.repeats})" if args.repeats > 1 else ""
                print(f"[throughput] {shape} {variant}{tag} ...", file=sys.stderr, flush=True)
                # profiled once, in the last run
                profile = variant in args.profile and rep == args.repeats - 1
                rec = run_variant(shape, variant, args, device, batches, hf_loss0, profile)
                if variant == "hf" and rec["status"] == "ok" and hf_loss0 is None:
                    hf_loss0 = rec.get("first_loss")
                print(
                    f"[throughput] {shape} {variant}: {rec['status']} {_f(rec.get('step_ms'), '.1f')} ms/step "
                    f"{_f(rec.get('tokens_per_s'), '.0f')} tokens/s {rec.get('check') or rec.get('error') or ''}",
                    file=sys.stderr,
                    flush=True,
                )
                runs[variant].append(rec)
        records += [combine_runs(rs, args) for rs in runs.values() if rs]
        del batches

    print(render(meta, records))
    for r in records:
        if r.get("profile"):
            print(f"\n### Profiles, {r['shape']} {r['variant']}\n\n```\n{r['profile']}\n```")
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / "throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": records}, indent=1, default=str))
    return 1 if any(r["status"] != "ok" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
