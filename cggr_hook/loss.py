"""The gated loss: cross entropy over the selected rows, gradient only on those rows.

For a selected row r with target t (class weights w, 1 without ``weight``; smoothing eps):

    ce_r = (1 - eps) * w_t * (lse_r - x_rt) + (eps / V) * (sum_v w_v * lse_r - sum_v w_v x_rv)

Reductions over the K selected rows S of the n valid ones:

    mean:  sum_S ce_r / sum_S w_t          (K = 0: NaN, as torch gives for an all-ignored batch)
    sum:   sum_S ce_r * n / K               (so Hugging Face's sum / num_items_in_batch weighs as mean)
    none:  ce_r on selected rows, exact 0 elsewhere

``selection='importance'`` draws S with inclusion probabilities pi_r and weighs each drawn row by
1 / pi_r (Horvitz-Thompson), an unbiased estimate of the plain loss (pi held constant):

    mean:  (1 / n) sum_S ce_r / pi_r        (class weights: sum_S ce_r / pi_r / sum_valid w_t)
    sum:   sum_S ce_r / pi_r
    none:  ce_r / pi_r on drawn rows, exact 0 elsewhere

The gradient is exactly the gradient of that loss: unselected rows get exact zeros. Two autograd
nodes carry it:

- ``GatedCrossEntropy``: input logits -> loss, dense gradient on the logits (``CGGRLoss``);
- ``GatedHeadCrossEntropy``: (hidden, W, b) of a tapped LM head -> loss; its backward multiplies
  the K selected rows only: dW = G^T h_S (V x K by K x D), dh_S = G W (K x V by V x D).

Both call ``plan`` once in forward: one pass of the scoring kernel, the difficulty, the scheduler's
ratio, the selection and the loss of the selected rows, around a single host synchronisation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import auto as auto_mod
from . import kernels, score, select
from .config import OPTION_NAMES, GateConfig, check_zero_floor
from .schedule import Scheduler, tokens_to_keep

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossSpec:
    """The ``F.cross_entropy`` arguments that shape the loss."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    weight: Tensor | None = None

    def __post_init__(self) -> None:
        # NumPy scalars and other number types mean what torch takes them to mean
        if isinstance(self.ignore_index, numbers.Integral) and not isinstance(self.ignore_index, bool):
            object.__setattr__(self, "ignore_index", int(self.ignore_index))
        if isinstance(self.label_smoothing, numbers.Real) and not isinstance(self.label_smoothing, bool):
            object.__setattr__(self, "label_smoothing", float(self.label_smoothing))

    def check(self, vocab: int) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"cggr_hook: reduction={self.reduction!r} is not valid; use 'mean', 'sum' or 'none'")
        ls = self.label_smoothing
        if not isinstance(ls, numbers.Real) or isinstance(ls, bool) or not 0.0 <= ls <= 1.0:
            raise ValueError(f"cggr_hook: label_smoothing={ls!r} must be a number in [0, 1]")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise ValueError(f"cggr_hook: ignore_index={self.ignore_index!r} must be an int")
        w = self.weight
        if w is not None and (not isinstance(w, Tensor) or w.dim() != 1 or w.numel() != vocab or not w.is_floating_point()):
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"cggr_hook: weight of shape {shape} must be a float tensor of shape ({vocab},), one weight per class")


@dataclass
class Plan:
    """What the forward decided; the backward replays the gradient from it."""

    lse: Tensor  # (N,) fp32
    row_scale: Tensor  # (N,) fp32, d loss / d ce_r: 0 off the selection ('none': 1 on it)
    loss: Tensor  # reduced loss (scalar) or (N,) with zeros at unselected rows
    rows: Tensor | None = None  # (K,) int64 ascending, the selected rows (when asked for)
    metrics: dict = field(default_factory=dict)
    order: Tensor | None = None  # (N,) int64 whose first K rows are the selected ones, when known
    # min_tokens_ratio='auto' on a step that measures the noise: every row's |p - y|^2 (fp32 (N,)),
    # from which the head backward estimates the gradient noise (auto.noise_parts)
    noise_sq: Tensor | None = None


def _generator(device: torch.device, seed: int, step: int, call: int) -> torch.Generator:
    g = torch.Generator(device=device)
    # a function of (seed, step, call) alone (the hash of a tuple of ints is not salted): a
    # resumed run draws what the uninterrupted one drew
    g.manual_seed(hash((seed, step, call)) & ((1 << 63) - 1))
    return g


class _HostRead:
    """A small device tensor for the host. ``now=True`` (the call's own read) starts the copy at
    once, without blocking, into pinned memory, on a side stream of the tensor's device that waits
    only for the kernels queued so far: the compute stream goes on with the next kernel instead of
    waiting for the copy engine (~10 us of idle GPU on an H100). ``now=False`` (figures read only if
    somebody asks) just marks, with an event, when the kernels that wrote it are done. The event
    sits on the stream of the tensor's device, whichever device is current; ``values()`` waits
    for that event alone."""

    def __init__(self, t: Tensor, now: bool = True) -> None:
        self._event = None
        self._host = t
        if t.is_cuda:
            self._event = torch.cuda.Event()
            stream = torch.cuda.current_stream(t.device)
            if now:
                side = _copy_stream(t.device)
                side.wait_stream(stream)
                with torch.cuda.stream(side):
                    self._host = t.to("cpu", non_blocking=True)
                t.record_stream(side)  # the allocator keeps t's memory until the copy is done
                stream = side
            self._event.record(stream)

    def values(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for the calls' host reads (made on first use)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    stream = _COPY_STREAMS.get(idx)
    if stream is None:
        stream = _COPY_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return stream


def _valid_and_bad(host: list) -> tuple[int, int]:
    """(valid, bad) target counts from ``kernels.target_counts``'s (P, 2) partials read row by row."""
    return sum(host[0::2]), sum(host[1::2])


def _averages(sums: list, n_valid: int) -> dict:
    """The metric averages over valid tokens from the host sums (``kernels.reference.SUM_FIELDS``)."""
    avg = (lambda x: x / n_valid) if n_valid else (lambda x: math.nan)
    return {"avg_confidence": avg(sums[2]), "avg_entropy": avg(sums[3]), "avg_difficulty": avg(sums[4])}


def _add_partials(host: list, n_part: int) -> list:
    """The (P, 5) partial sums, read row by row, added in a fixed order."""
    n_fields = len(kernels.reference.SUM_FIELDS)
    return [sum(host[j:n_part:n_fields]) for j in range(n_fields)]


def resolve_metrics(m: dict) -> dict:
    """A call's metrics with the averages filled in (a new dict; ``m`` itself when it has them): a
    call that did not need them on the host left its sums (``"_sums"``) and its importance draw's
    figures (``"_draw"``) on the device, as ``_HostRead``s whose events follow the kernels that
    wrote them, and they are read now, when somebody asks."""
    if "_sums" not in m and "_draw" not in m:
        return m
    m = dict(m)
    if "_sums" in m:
        host = m.pop("_sums").values()
        m.update(_averages(_add_partials(host, len(host)), m["tokens_total"]))
    if "_draw" in m:
        m.update(_draw_figures(m.pop("_draw").values(), m["tokens_total"]))
    return m


def _draw_figures(values: list, n_valid: int) -> dict:
    """An importance draw's figures for ``metrics()`` (``select.DRAW_FIGURES`` read on the host):
    the effective sample size of the Horvitz-Thompson weights w = 1 / pi, (sum w)^2 / sum w^2, the
    largest weight, the fraction of valid tokens kept with certainty (pi = 1), and the squared
    coefficient of variation of the scores, m2 / m1^2 - 1 (m1, m2: the mean score and squared
    score over valid tokens), from which the variance gain over uniform sampling at kept fraction
    f is predicted: (1 - f) (1 + cv2) / (1 - f (1 + cv2)) while no token is capped."""
    ess, max_w, n_certain, m1, m2 = values
    return {
        "ess": ess,
        "max_weight": max_w,
        "certain_fraction": n_certain / n_valid if n_valid else 0.0,
        "score_cv2": m2 / (m1 * m1) - 1.0 if m1 > 0 else math.nan,
    }


def _horvitz_thompson(draw: "select.Draw", targets: Tensor, n_valid: int, vocab: int, spec: LossSpec) -> Tensor:
    """fp32 (N,) factor of each drawn row, 0 elsewhere: 1 / pi_r, over the plain loss's
    normaliser for 'mean' (n, or the valid rows' summed class weight), so that the weighted sum
    of the drawn rows' cross entropies is an unbiased estimate of the plain loss."""
    factor = draw.inv_pi
    if spec.reduction == "mean":
        if spec.weight is None:
            factor = factor / n_valid
        else:
            valid, safe = kernels.reference.safe_targets(targets, spec.ignore_index, vocab)
            total = torch.where(valid, spec.weight.to(device=targets.device, dtype=torch.float64)[safe], 0.0).sum()
            factor = factor / total
    out = torch.zeros(targets.numel(), dtype=torch.float32, device=targets.device)
    return out.index_put_((draw.rows,), factor.float())


def plan(logits: Tensor, targets: Tensor, seq: int | tuple[Tensor, int] | None, config: GateConfig, scheduler: Scheduler,
         key: str, spec: LossSpec, param_ids: frozenset[int] = frozenset(), need_rows: bool = False) -> Plan:
    """Score, select and compute the loss of rows of ``logits`` (B, T, V) with ``targets`` (B*T,).

    ``seq``: the sequences of the rows for ``sequence_aware`` (``select.prepare``); ``need_rows``:
    also list the selected rows (a gradient over K rows needs them).

    Work on the device, in order: the scoring pass over the logits (``kernels.row_stats``), the
    difficulty and the metric sums (``score.score_rows``), the difficulty order (``select.prepare``),
    then one launch for the loss of the selected rows and every row's gradient scale
    (``kernels.selected_loss``). The host needs k, hence the number of valid tokens, and reads it
    once (the call's one host synchronisation). Where the ratio cannot depend on the logits (no
    dynamic threshold, not sequence_aware), that read is of target counts taken before the scoring
    pass and waits for nothing else, so the host stays ahead of the device; the metric averages
    then stay on the device until ``metrics()`` asks. Otherwise the read follows the scoring pass
    and brings the valid and bad-target counts, the confidence and the metric sums (and
    sequence_aware's kept ranks) together.
    """
    if spec.label_smoothing:
        check_zero_floor(config, float(spec.label_smoothing))  # before any work
    V = logits.shape[-1]
    N = targets.numel()
    dev = logits.device
    ii = spec.ignore_index
    auto = config.min_tokens_ratio == "auto"
    early = (auto or not config.dynamic_threshold) and config.selection != "sequence_aware"
    counts = _HostRead(kernels.target_counts(targets, V, ii).reshape(-1)) if early else None
    # an auto gate's noise-measuring step needs every row's gradient norm, whatever the scoring
    probe = auto and scheduler.auto_state(key).measures_noise()
    stats = kernels.row_stats(logits, targets, ii, spec.weight, with_wsum=spec.label_smoothing > 0,
                              with_p2=config.scoring == "gradnorm" or probe)
    step, call = scheduler.step_count, scheduler.calls_in_step
    needs_draws = config.scoring == "random" or config.selection in ("stratified", "importance")
    gen = _generator(dev, config.seed, step, call) if needs_draws else None
    diff, partial = score.score_rows(stats, targets, V, ii, config.scoring, gen, spec.label_smoothing)
    valid = None
    if config.selection == "sequence_aware":
        valid = (targets != ii) & (targets >= 0) & (targets < V)
    prep = select.prepare(diff, valid, config, seq)

    keep_ranks = None
    if early:
        n_valid, n_bad = _valid_and_bad(counts.values())  # the one host synchronisation of the call
        sums = None
    else:
        n_part = partial.numel()
        to_host = partial.reshape(-1)
        if prep.keep_ranks is not None:
            to_host = torch.cat([to_host, prep.keep_ranks.double()])
        host = to_host.tolist()  # the one host synchronisation of the call
        sums = _add_partials(host, n_part)
        n_valid, n_bad = int(sums[0]), int(sums[1])
        if prep.keep_ranks is not None:
            keep_ranks = [int(r) for r in host[n_part:]]
    if n_bad:
        raise ValueError(
            f"cggr_hook: target has {n_bad} value(s) outside [0, {V}) that are not ignore_index={ii}; "
            f"targets must be class indices below the vocabulary size {V} or ignore_index"
        )
    confidence = sums[2] / n_valid if sums is not None and n_valid else math.nan

    ratio, step, call = scheduler.begin_call(config, key, confidence, param_ids)
    k = tokens_to_keep(ratio, n_valid)
    n_sel = select.count_selected(config, k, N, keep_ranks)
    draw = row_weight = None
    if config.selection == "importance" and 0 < k < n_valid:
        draw = select.importance_draw(prep, diff, n_valid, k, config.importance_floor, gen,
                                      uniform=config.scoring == "random")
        rows, threshold = draw.rows, 1
        sel_key = torch.ones_like(prep.rank).index_fill_(0, rows, 0)
        row_weight = _horvitz_thompson(draw, targets, n_valid, V, spec)
    else:
        sel_key, threshold, rows = select.selection_key(prep, n_valid, k, n_sel, config, gen)
        if need_rows and rows is None:
            rows = select.finish(prep, n_valid, k, n_sel, config, gen)
    loss, row_scale = kernels.selected_loss(stats, targets, V, sel_key, threshold, n_sel, n_valid, spec.reduction,
                                            float(spec.label_smoothing), spec.weight, row_weight)
    noise_sq = None
    if auto:
        state = scheduler.auto_state(key)
        state.add_tokens(n_valid)
        # the estimate needs every row at one shared scale: the plain mean or sum, no class weights
        if probe and n_sel == n_valid >= 2 and spec.weight is None and spec.reduction != "none":
            noise_sq = score.gradnorm_sq(stats, V, float(spec.label_smoothing))

    metrics = {
        "step": step + 1,  # the optimizer step this loss belongs to, counting from 1
        "token_ratio": n_sel / n_valid if n_valid else 0.0,
        "tokens_selected": n_sel,
        "tokens_total": n_valid,
        "selection": config.selection,
        "scoring": config.scoring,
    }
    if sums is not None:
        metrics.update(_averages(sums, n_valid))
    else:
        # read when metrics() asks, once the kernels of this stream have written them
        metrics["_sums"] = _HostRead(partial.reshape(-1), now=False)
    if draw is not None:
        metrics["_draw"] = _HostRead(draw.figures, now=False)
    if auto:
        metrics.update(auto_figures(scheduler.auto_state(key), ratio))
    # top-k (and every strategy at k = 0 or k >= n valid) selects the first k rows of the
    # difficulty order: the dense gradient schedules its rows by it (zero rows first)
    order = prep.order if sel_key is prep.rank else None
    return Plan(stats.lse, row_scale, loss, rows, metrics, order, noise_sq)


def auto_figures(state: "auto_mod.AutoState", fraction: float | str) -> dict:
    """An auto gate's figures for ``metrics()``: the fraction this call ran (``auto_fraction``, 1.0
    for the plain loss too, with ``auto_plain``), the current choice, the noise scale (NaN before
    the first estimate) and the step times of the last probe window (``step_ms_<candidate>``)."""
    b = state.noise_scale()
    out = {
        "auto_fraction": 1.0 if fraction == auto_mod.PLAIN else float(fraction),
        "auto_plain": fraction == auto_mod.PLAIN,
        "auto_choice": 1.0 if state.choice == auto_mod.PLAIN else float(state.choice),
        "auto_choice_plain": state.choice == auto_mod.PLAIN,
        "noise_scale": math.nan if b is None else b,
    }
    for c, t in state.step_seconds.items():
        out[f"step_ms_{'plain' if c == auto_mod.PLAIN else round(100 * c)}"] = 1e3 * t
    return out


def _row_scale(p: Plan, grad_output: Tensor, reduction: str) -> Tensor:
    """d total / d ce_r for the selected rows ``p.rows``, fp32 (K,)."""
    if reduction == "none":
        return grad_output.reshape(-1).float()[p.rows] * p.row_scale[p.rows]
    return p.row_scale[p.rows] * grad_output.float()


@dataclass
class Request:
    """A gated call's inputs that are not autograd inputs."""

    config: GateConfig
    scheduler: Scheduler
    key: str
    spec: LossSpec
    seq: int | tuple[Tensor, int] | None = None  # sequences of the rows (select.prepare)
    on_metrics: object = None  # callable(dict) receiving the call's metrics
    param_ids: frozenset = frozenset()  # the gated model's parameters (their optimizer's step counts)
    plan: Plan | None = None


class GatedCrossEntropy(torch.autograd.Function):
    """logits (..., V) -> gated loss; dense gradient on the logits (in place if asked)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, req: Request, inplace: bool) -> Tensor:
        rows3d = kernels.as_rows(logits)
        p = plan(rows3d, targets.reshape(-1), req.seq, req.config, req.scheduler, req.key, req.spec,
                 req.param_ids)
        req.plan = p
        if req.on_metrics is not None:
            req.on_metrics(p.metrics)
        ctx.req = req
        if inplace:
            # a detached alias: returned as the gradient with no other reference, so autograd
            # takes it as is instead of copying it (the gradient lives in the logits' buffer)
            ctx.alias = logits.detach()
            ctx.save_for_backward(targets)
        else:
            ctx.alias = None
            ctx.save_for_backward(targets, logits)
        return p.loss if req.spec.reduction != "none" else p.loss.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        targets, *saved = ctx.saved_tensors
        logits, ctx.alias = (ctx.alias if ctx.alias is not None else saved[0]), None
        req: Request = ctx.req
        p = req.plan
        out = logits if not saved else torch.empty_like(logits)
        # one launch: every row is written, selected rows scaled by row_scale * grad_output
        kernels.ce_grad_dense_(kernels.as_rows(logits), targets.reshape(-1), p.lse, p.row_scale, req.spec.weight,
                               float(req.spec.label_smoothing), kernels.as_rows(out), grad_output, p.order)
        return out, None, None, None


def _measure_head_noise(req: "Request", p: Plan, grad_w: Tensor, scale: Tensor, hidden: Tensor) -> None:
    """An auto gate's noise-measuring step (every valid row, one shared scale c): token i's gradient
    on the head weight is g_i = (p_i - y_i) h_i^T, so |g_i|^2 = |p_i - y_i|^2 |h_i|^2, and the
    mean gradient is grad_w / (c n). Their figures go to the gate's auto state, on the device."""
    n = p.rows.numel()
    h = hidden[p.rows].float()
    per_token = (p.noise_sq[p.rows] * h.pow(2).sum(-1)).mean()
    mean_grad = grad_w.float() / (scale[0] * n)
    req.scheduler.auto_state(req.key).add_noise(auto_mod.noise_parts(per_token, mean_grad.pow(2).sum(), n))


class GatedHeadCrossEntropy(torch.autograd.Function):
    """(hidden, W, b) of a tapped LM head -> gated loss; backward over the selected rows only.

    ``head_out`` (..., V) holds the head's logits (the tap's output); ``targets`` are in head-row
    order with unmapped rows ignored; ``ce_rows`` maps the loss's rows to head rows (for 'none').
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, head_out: Tensor, targets: Tensor,
                ce_rows: Tensor, ce_shape: torch.Size, req: Request) -> Tensor:
        p = plan(kernels.as_rows(head_out), targets, req.seq, req.config, req.scheduler, req.key, req.spec,
                 req.param_ids, need_rows=True)
        req.plan = p
        if req.on_metrics is not None:
            req.on_metrics(p.metrics)
        ctx.req, ctx.has_bias = req, bias is not None
        ctx.save_for_backward(hidden, weight, bias, head_out, targets, ce_rows)
        if req.spec.reduction == "none":
            return p.loss[ce_rows].view(ce_shape)
        return p.loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        hidden, weight, bias, head_out, targets, ce_rows = ctx.saved_tensors
        req: Request = ctx.req
        p = req.plan
        if req.spec.reduction == "none":
            # the loss's rows back to head rows
            g = torch.zeros(targets.numel(), dtype=torch.float32, device=grad_output.device)
            g[ce_rows] = grad_output.reshape(-1).float()
            scale = g[p.rows] * p.row_scale[p.rows]
        else:
            scale = _row_scale(p, grad_output, req.spec.reduction)
        cd = head_out.dtype  # the dtype the head's matmul ran in (autocast included)
        G = kernels.ce_grad_rows(kernels.as_rows(head_out), targets, p.lse, p.rows, scale, req.spec.weight,
                                 float(req.spec.label_smoothing), cd)  # (K, V)
        D = hidden.shape[-1]
        h2 = hidden.reshape(-1, D)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.zeros_like(h2)
            if p.rows.numel():
                grad_h[p.rows] = (G @ weight.to(cd)).to(h2.dtype)
            grad_h = grad_h.view(hidden.shape)
        if ctx.needs_input_grad[1] or p.noise_sq is not None:
            gw = G.t() @ h2[p.rows].to(cd)  # (V, D): the head weight's gradient
            if p.noise_sq is not None:
                _measure_head_noise(req, p, gw, scale, h2)
            if ctx.needs_input_grad[1]:
                grad_w = gw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = G.float().sum(0).to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


class CGGRLoss(torch.nn.Module):
    """The standalone gated cross entropy (the original package's API).

    ``criterion(logits, targets)`` with logits (B, T, V) and targets (B, T) (rows of a sequence
    for ``sequence_aware``), or (N, V) and (N,) (one sequence); contiguous or not, any float dtype.
    Options are GateConfig's plus the cross-entropy arguments; ``.step()`` advances its own
    curriculum once per optimizer step.

    inplace_backward: write the gradient into the logits' buffer during backward (no second
        logits-sized buffer); the logits must not be read after ``backward()``.
    """

    def __init__(self, scoring: str = "combined", selection: str = "topk", min_tokens_ratio: float = 0.25,
                 warmup_steps: int = 1000, dynamic_threshold: bool = True, threshold_sensitivity: float = 0.5,
                 num_strata: int = 4, min_tokens_per_sequence: int = 1, seed: int = 0,
                 importance_floor: float = GateConfig.importance_floor, *,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 weight: Tensor | None = None, inplace_backward: bool = False, **unknown: Any) -> None:
        if unknown:  # a ValueError naming them, as enable() and GateConfig give, not Python's TypeError
            known = OPTION_NAMES + ("ignore_index", "reduction", "label_smoothing", "weight", "inplace_backward")
            raise ValueError(f"cggr_hook.CGGRLoss: unknown option(s) {', '.join(sorted(unknown))}; "
                             f"the options are {', '.join(known)}")
        super().__init__()
        self.config = GateConfig(scoring=scoring, selection=selection, min_tokens_ratio=min_tokens_ratio,
                                 warmup_steps=warmup_steps, dynamic_threshold=dynamic_threshold,
                                 threshold_sensitivity=threshold_sensitivity, num_strata=num_strata,
                                 min_tokens_per_sequence=min_tokens_per_sequence, seed=seed,
                                 importance_floor=importance_floor)
        self.spec = LossSpec(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                             weight=None)
        if reduction not in REDUCTIONS:
            raise ValueError(f"cggr_hook: reduction={reduction!r} is not valid; use 'mean', 'sum' or 'none'")
        self.register_buffer("weight", weight, persistent=False)
        self.inplace_backward = bool(inplace_backward)
        self.scheduler = Scheduler()
        self._metrics: dict = {}

    @property
    def step_count(self) -> int:
        return self.scheduler.step_count

    def step(self) -> None:
        """Advance the curriculum by one optimizer step."""
        self.scheduler.step()

    def get_metrics(self) -> dict:
        """The last call's figures (same keys as ``cggr_hook.metrics()``)."""
        m = self._metrics
        resolved = resolve_metrics(m)
        if self._metrics is m:  # keep the resolved figures unless a newer call replaced them
            self._metrics = resolved
        return dict(resolved)

    def _set_metrics(self, m: dict) -> None:
        self._metrics = m

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if not isinstance(logits, Tensor) or logits.dim() not in (2, 3) or not logits.is_floating_point():
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"cggr_hook.CGGRLoss: logits of shape {shape} must be a float tensor (B, T, V) or (N, V)")
        if not isinstance(targets, Tensor) or tuple(targets.shape) != tuple(logits.shape[:-1]):
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"cggr_hook.CGGRLoss: targets of shape {shape} must match logits of shape {tuple(logits.shape)} "
                f"without the vocabulary dim: {tuple(logits.shape[:-1])}"
            )
        if targets.is_floating_point():
            raise ValueError("cggr_hook.CGGRLoss: targets must be integer class indices (use .long())")
        if logits.device.type == "meta" or targets.device.type == "meta":
            raise ValueError(
                "cggr_hook.CGGRLoss: logits and targets on the meta device have no values to score and select "
                "by; compute the loss on real tensors, or use torch.nn.functional.cross_entropy for a meta run"
            )
        spec = LossSpec(self.spec.ignore_index, self.spec.reduction, self.spec.label_smoothing, self.weight)
        spec.check(logits.shape[-1])
        seq = logits.shape[1] if logits.dim() == 3 else None
        req = Request(self.config, self.scheduler, "loss", spec, seq=seq, on_metrics=self._set_metrics)
        targets = targets.to(device=logits.device, dtype=torch.long)
        return GatedCrossEntropy.apply(logits, targets, req, self.inplace_backward)

    def extra_repr(self) -> str:
        return f"{self.config}, reduction={self.spec.reduction!r}"
