"""The gated forward: count, score, ratio, select and the loss of the selected rows, around the
call's one host read.

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

``gated_forward`` returns the loss, the call's figures and the ``BackwardPlan`` that the autograd
Functions (``functions.py``) replay the gradient from.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from . import capture, difficulty, figures, kernels, selection
from .config import GateConfig, check_zero_floor
from .kernels.spec import SCORINGS, check_reduction, target_masks
from .schedule import Scheduler, tokens_to_keep


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
        check_reduction(self.reduction)
        ls = self.label_smoothing
        if not isinstance(ls, numbers.Real) or isinstance(ls, bool) or not 0.0 <= ls <= 1.0:
            raise ValueError(f"cggr_hook: label_smoothing={ls!r} must be a number in [0, 1]")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise ValueError(f"cggr_hook: ignore_index={self.ignore_index!r} must be an int")
        w = self.weight
        if w is not None and (
            not isinstance(w, Tensor) or w.dim() != 1 or w.numel() != vocab or not w.is_floating_point()
        ):
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(
                f"cggr_hook: weight of shape {shape} must be a float tensor of shape ({vocab},), one weight per class"
            )


@dataclass(frozen=True)
class NoiseProbe:
    """Where an auto gate's noise-measuring call sends the head's gradient noise (``auto.py``): every
    row's |p - y|^2 (fp32 (N,)), from which the head backward estimates it, and the gate's state,
    looked up when the backward runs."""

    sq: Tensor
    scheduler: Scheduler
    key: str
    candidates: tuple


# on Triton, a head gradient over selected rows runs over every row instead where it leaves out
# at most one row in DENSE_ROWS (their gradient rows are exact zeros): fewer launches than
# gathering and scattering the selected rows, for at most 0.4% more rows in the matrix products
DENSE_ROWS = 256


def dense_rows(logits: Tensor, n_rows: int, n_selected: int) -> bool:
    """Whether a head gradient over ``n_selected`` of ``n_rows`` rows of ``logits`` runs over every
    row (the rest weighted zero): at most one row in ``DENSE_ROWS`` left out, as where every valid
    row is kept and a few are ignored (each sequence's last position), on the Triton backend. The
    torch backend (the CPU) keeps the selected rows: its dense gradient is a scatter of every row,
    slower than the launches it would save."""
    return n_rows - n_selected <= n_rows // DENSE_ROWS and kernels.backend_for(logits) == "triton"


@dataclass
class BackwardPlan:
    """What the forward decided that the backward replays the gradient from."""

    lse: Tensor  # (N,) fp32
    row_scale: Tensor  # (N,) fp32, d loss / d ce_r: 0 off the selection ('none': 1 on it)
    # (K,) int64, the selected rows, when asked for (ascending, except top-k at a ratio counted on
    # the device: the difficulty order's first rows, some past the selection with a scale of 0);
    # None where the gradient runs over every row (``dense``) and nothing else needs them
    rows: Tensor | None = None
    order: Tensor | None = None  # (N,) int64 whose first K rows are the selected ones, when known
    noise: NoiseProbe | None = None  # min_tokens_ratio='auto' on a step that measures the noise
    dense: bool = False  # the head gradient runs over every row (``dense_rows``), zeros off the selection


@dataclass
class GatedForward:
    """``gated_forward``'s result."""

    loss: Tensor  # reduced loss (scalar) or (N,) with zeros at unselected rows
    figures: dict  # the call's figures (``figures.py``; some still on the device)
    plan: BackwardPlan


class HostRead:
    """A small device tensor for the host. ``now=True`` (the call's own read) starts the copy at
    once, without blocking, into pinned memory, on a side stream of the tensor's device that waits
    only for the kernels queued so far: the compute stream goes on with the next kernel instead of
    waiting for the copy engine (kernels/NOTES.md). ``now=False`` (figures read only if somebody
    asks) just marks, with an event, when the kernels that wrote it are done. The event sits on the
    stream of the tensor's device, whichever device is current; ``values()`` waits for that event
    alone."""

    # one side stream per device for the calls' host reads (made on first use)
    _copy_streams: ClassVar[dict] = {}

    def __init__(self, t: Tensor, now: bool = True) -> None:
        self._event = None
        self._host = t
        if t.is_cuda:
            self._event = torch.cuda.Event()
            stream = torch.cuda.current_stream(t.device)
            if now:
                side = HostRead._copy_stream(t.device)
                side.wait_stream(stream)
                with torch.cuda.stream(side):
                    self._host = t.to("cpu", non_blocking=True)
                t.record_stream(side)  # the allocator keeps t's memory until the copy is done
                stream = side
            self._event.record(stream)

    def done(self) -> bool:
        """Whether ``values()`` would return without waiting."""
        return self._event is None or self._event.query()

    def values(self) -> list:
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        return self._host.tolist()

    @staticmethod
    def _copy_stream(device: torch.device) -> torch.cuda.Stream:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        stream = HostRead._copy_streams.get(idx)
        if stream is None:
            stream = HostRead._copy_streams[idx] = torch.cuda.Stream(device=idx)
        return stream


def _valid_and_bad(host: list, width: int = 2) -> tuple[int, int]:
    """(valid, bad) target counts from partials read row by row, ``width`` values a row whose first
    two are those counts: ``kernels.target_counts``' (P, 2), or the scoring pass's (P, 5) partial
    sums (``_N_SUMS``), whose float64 counts are whole numbers."""
    return int(sum(host[0::width])), int(sum(host[1::width]))


def _raise_if_bad(n_bad: int, vocab: int, ignore_index: int) -> None:
    if n_bad:
        raise ValueError(
            f"cggr_hook: target has {n_bad} value(s) outside [0, {vocab}) that are not ignore_index={ignore_index}; "
            f"targets must be class indices below the vocabulary size {vocab} or ignore_index"
        )


def check_targets(targets: Tensor, vocab: int, ignore_index: int) -> int:
    """The gated forward's check of the targets, alone (one host read): a ValueError for a value
    outside [0, vocab) that is not ``ignore_index``, as ``gated_forward`` gives; else the number of
    valid targets."""
    n_valid, n_bad = _valid_and_bad(HostRead(kernels.target_counts(targets, vocab, ignore_index).reshape(-1)).values())
    _raise_if_bad(n_bad, vocab, ignore_index)
    return n_valid


def call_seed(seed: int, step: int, call: int) -> int:
    """The seed of a call's draws: a function of (seed, step, call) alone (the hash of a tuple of
    ints is not salted), so that a resumed run draws what the uninterrupted one drew."""
    return hash((seed, step, call)) & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int, step: int, call: int) -> torch.Generator:
    return capture.seeded(device, call_seed(seed, step, call))


def _horvitz_thompson_norm(targets: Tensor, n_valid: int | None, vocab: int, spec: LossSpec) -> int | Tensor | None:
    """What a drawn row's 1 / pi_r is divided by in its ``row_weight``: the plain loss's normaliser
    for 'mean' (n, or the valid rows' summed class weight, a float64 device scalar), 1 for 'sum'
    and 'none', so that the weighted sum of the drawn rows' cross entropies is an unbiased estimate
    of the plain loss. ``n_valid`` None (counted on the device): n is None too, for the kernel to
    take its own count."""
    if spec.reduction != "mean":
        return 1
    if spec.weight is None:
        return n_valid
    valid, safe = kernels.reference.safe_targets(targets, spec.ignore_index, vocab)
    return torch.where(valid, spec.weight.to(device=targets.device, dtype=torch.float64)[safe], 0.0).sum()


def gated_forward(
    logits: Tensor,
    targets: Tensor,
    *,
    config: GateConfig,
    scheduler: Scheduler,
    key: str,
    spec: LossSpec,
    seq: int | tuple[Tensor, int] | None = None,
    param_ids: frozenset[int] = frozenset(),
    need_rows: bool = False,
    loss_rows: int | None = None,
) -> GatedForward:
    """Score, select and compute the loss of rows of ``logits`` (B, T, V) with ``targets`` (B*T,).

    ``scheduler`` and ``key``: the step counter and the gate's name in it (its ratio, its running
    confidence); ``param_ids``: the gated model's parameters, whose optimizer's next step counts;
    ``seq``: the sequences of the rows for ``sequence_aware`` (``selection.rank_rows``);
    ``need_rows``: a head gradient will follow: list the selected rows it runs over, unless it
    runs over every row (``dense_rows``); ``loss_rows``: the rows of the loss as its caller gave
    them (default: every row of ``targets``), what an auto gate books as the size of its steps, as
    its plain steps do (the head route's targets cover every head row, read by the loss or not).

    Work on the device, in order: the scoring pass over the logits (``kernels.row_stats``), the
    difficulty and the metric sums (``difficulty.score_rows``), the difficulty order
    (``selection.rank_rows``), then one launch for the loss of the selected rows and every row's
    gradient scale (``kernels.selected_loss``). Importance, top-k, sequence_aware and stratified at
    a ratio the host knows, or that the dynamic threshold moves on the device, read nothing: their
    kernels take n, k (and the dynamic ratio) from the scoring pass's partial sums on the device
    (``_at_ratio``, where they may run as one replayed CUDA graph), whose copy to the host, queued
    behind them, is read by a later call's target check (``PendingTargetCheck``) and by
    ``metrics()``. Every other call needs k, hence the number of valid tokens, on the host and
    reads it once (the call's one host synchronisation). Where the ratio cannot depend on the
    logits (no dynamic threshold; sequence_aware only where it keeps every row), that read is of
    target counts taken before the scoring pass and waits for nothing else, so the host stays
    ahead of the device; the metric averages then stay on the device until ``metrics()`` asks.
    Otherwise the read follows the scoring pass and brings the valid and bad-target counts, the
    confidence and the metric sums (and sequence_aware's kept ranks) together.
    """
    if spec.label_smoothing:
        check_zero_floor(config, float(spec.label_smoothing))  # before any work
    scoring = SCORINGS[config.scoring]
    strategy = selection.SELECTIONS[config.selection]
    V = logits.shape[-1]
    N = targets.numel()
    dev = logits.device
    ignore_index = spec.ignore_index
    cands = config.auto_candidates
    auto = cands is not None  # the fraction is chosen by measured step time (auto.py)
    # the host's one read is of target counts queued before the scoring pass, when the ratio cannot
    # depend on what that pass finds
    # where this call keeps every valid row whatever the counts say, the selection needs no
    # difficulty order (nor sequence_aware's kept rows: the top n holds them)
    every_row = scheduler.keeps_every_row(config, key)
    counts_first = (auto or not config.dynamic_threshold) and (every_row or not strategy.per_sequence)
    # a selection at a ratio the host knows reads nothing: its kernels count n from the scoring
    # pass's partial sums, which also carry the bad targets, so it needs no counts of its own
    device_k = (
        at_ratio(config, strategy, auto, every_row)
        and N > 0
        and (not need_rows or device_k_pays(key, need_rows, _spread(config, scheduler, key, N, seq)))
    )
    PendingTargetCheck.poll()  # an earlier call's bad targets, where the copy of its counts is in
    if device_k:
        # n and k are counted on the device, nothing is read, and the kernels may run as one
        # replayed CUDA graph
        return _at_ratio(logits, targets, config, scheduler, key, spec, param_ids, need_rows, seq, loss_rows)
    counts_t = kernels.target_counts(targets, V, ignore_index) if counts_first and not device_k else None
    counts = HostRead(counts_t.reshape(-1)) if counts_t is not None else None
    # an auto gate's noise-measuring step needs every row's gradient norm, whatever the scoring
    probe = auto and scheduler.auto_state(key, cands).measures_noise()
    stats = kernels.row_stats(
        logits,
        targets,
        ignore_index,
        spec.weight,
        with_wsum=spec.label_smoothing > 0,
        with_p2=scoring.needs_p2sum or probe,
    )
    step, call = scheduler.step_count, scheduler.calls_in_step
    gen = _generator(dev, config.seed, step, call) if scoring.random or strategy.draws else None
    diff, partial = difficulty.score_rows(stats, targets, V, ignore_index, config.scoring, gen, spec.label_smoothing)
    ranking = None
    if not every_row:
        valid = None
        if strategy.per_sequence:
            valid, _ = target_masks(targets, V, ignore_index)
        ranking = selection.rank_rows(diff, valid, config, seq)

    keep_ranks = None
    if counts is not None:
        n_valid, n_bad = _valid_and_bad(counts.values())  # the one host synchronisation of the call
        sums = None
    else:
        n_part = partial.numel()
        to_host = partial.reshape(-1)
        if ranking is not None and ranking.keep_ranks is not None:
            to_host = torch.cat([to_host, ranking.keep_ranks.double()])
        host = to_host.tolist()  # the one host synchronisation of the call
        sums = figures.add_partials(host, n_part)
        n_valid, n_bad = int(sums[0]), int(sums[1])
        if ranking is not None and ranking.keep_ranks is not None:
            keep_ranks = [int(r) for r in host[n_part:]]
    ValidShare.record(key, n_valid, N)
    _raise_if_bad(n_bad, V, ignore_index)
    confidence = sums[2] / n_valid if sums is not None and n_valid else math.nan

    ratio, step, call = scheduler.begin_call(config, key, confidence, param_ids)
    k = tokens_to_keep(ratio, n_valid)
    n_sel = selection.count_selected(config, k, N, keep_ranks)
    draw = row_weight = None
    if ranking is None and k < n_valid:
        # not expected (every row was: the ratio moved since, as where another thread counted a
        # step between the two): rank after all
        valid = target_masks(targets, V, ignore_index)[0] if strategy.per_sequence else None
        ranking = selection.rank_rows(diff, valid, config, seq)
        if ranking.keep_ranks is not None:  # sequence_aware's size: a second read, on this path alone
            n_sel = selection.count_selected(config, k, N, [int(r) for r in ranking.keep_ranks.tolist()])
    dense = need_rows and dense_rows(logits, N, n_sel)
    if dense and not probe:
        need_rows = False  # the gradient runs over every row; the noise probe reads the rows
    if ranking is None:
        sel_key, threshold, rows = selection.every_valid_row(diff, n_valid, need_rows)
    elif strategy.weighted and 0 < k < n_valid:
        # the rows, their Horvitz-Thompson factors, the key the loss kernel reads and the figures,
        # in one launch after the random order's sort
        norm = _horvitz_thompson_norm(targets, n_valid, V, spec)
        draw = selection.importance_draw(
            ranking, diff, n_valid, k, config.importance_floor, gen, uniform=scoring.random, norm=norm
        )
        rows, threshold, sel_key, row_weight = draw.rows, 1, draw.key, draw.row_weight
    else:
        sel_key, threshold, rows = selection.selection_as_key(ranking, n_valid, k, n_sel, config, gen)
        if need_rows and rows is None:
            rows = selection.choose_rows(ranking, n_valid, k, n_sel, config, gen)
    loss, row_scale = kernels.selected_loss(
        stats,
        targets,
        V,
        sel_key,
        threshold,
        n_sel,
        n_valid,
        spec.reduction,
        float(spec.label_smoothing),
        spec.weight,
        row_weight,
    )
    noise = None
    if auto:
        state = scheduler.auto_state(key, cands)
        state.add_tokens(n_valid)
        state.add_call(dev, N if loss_rows is None else loss_rows)
        # the estimate needs every row at one shared scale: the plain mean or sum, no class weights
        if probe and n_sel == n_valid >= 2 and spec.weight is None and spec.reduction != "none":
            noise = NoiseProbe(difficulty.gradnorm_sq(stats, V, float(spec.label_smoothing)), scheduler, key, cands)

    values = {
        "step": step + 1,  # the optimizer step this loss belongs to, counting from 1
        "token_ratio": n_sel / n_valid if n_valid else 0.0,
        "tokens_selected": n_sel,
        "tokens_total": n_valid,
        "selection": config.selection,
        "scoring": config.scoring,
    }
    if sums is not None:
        values.update(figures.averages(sums, n_valid))
    else:
        # read when metrics() asks, once the kernels of this stream have written them
        values["_sums"] = HostRead(partial.reshape(-1), now=False)
    if draw is not None:
        values["_draw"] = HostRead(draw.figures, now=False)
    if auto:
        values.update(figures.auto_figures(scheduler.auto_state(key, cands), ratio))
    # top-k (and every strategy at k = 0 or k >= n valid) selects the first k rows of the
    # difficulty order: the dense gradient schedules its rows by it (zero rows first)
    order = ranking.order if ranking is not None and sel_key is ranking.rank else None
    return GatedForward(loss, values, BackwardPlan(stats.lse, row_scale, rows, order, noise, dense))


def _head_rows(config: GateConfig, ratio: float, n_rows: int, seq: int | tuple[Tensor, int] | None) -> int:
    """The rows a head gradient counted on the device runs over (``_at_ratio``'s capacity) at the
    curriculum's or auto's ``ratio``: keep_count(bound, n_rows), bound the largest ratio the call
    can select at (min(1, r (1 + s)) under the dynamic threshold, else r), plus sequence_aware's
    ``min_tokens_per_sequence`` rows a sequence (of ``n_rows`` rows split by ``seq``), at most
    ``n_rows``."""
    bound = ratio
    if config.auto_candidates is None and config.dynamic_threshold:
        bound = kernels.spec.dynamic_ratio_bound(ratio, float(config.threshold_sensitivity))
    rows = tokens_to_keep(bound, n_rows)
    if config.selection == "sequence_aware":  # the kept rows past the top K
        rows = min(n_rows, rows + _kept_rows(config, n_rows, seq))
    return rows


def _kept_rows(config: GateConfig, n_rows: int, seq: int | tuple[Tensor, int] | None) -> int:
    """sequence_aware's rows kept whatever the ratio: ``min_tokens_per_sequence`` a sequence."""
    return min(n_rows, selection.sequences(seq, n_rows) * config.min_tokens_per_sequence)


def _spread(
    config: GateConfig, scheduler: Scheduler, key: str, n_rows: int, seq: int | tuple[Tensor, int] | None = None
) -> float:
    """``device_k_pays``' ``spread``: the rows a head gradient counted on the device runs over
    (``_head_rows``) over those it selects where every target is valid, keep_count(r, n_rows) at
    the ratio before the dynamic threshold moves it (sequence_aware: at least its kept rows)."""
    r = scheduler.known_ratio(config, key)
    selected = tokens_to_keep(r, n_rows)
    if config.selection == "sequence_aware":
        selected = max(selected, _kept_rows(config, n_rows, seq))
    return _head_rows(config, r, n_rows, seq) / max(1, selected)


def at_ratio(config: GateConfig, strategy: selection.Selection, auto: bool, every_row: bool) -> bool:
    """Whether a call selects by importance, top-k, sequence_aware or stratified (up to
    ``spec.MAX_STRATA`` buckets) below every row at a ratio the host knows before the scoring pass
    (a fixed ratio or its curriculum, or the fraction that ``'auto'``'s timed choice runs this
    step) or computes on the device from it (the dynamic threshold: ``kernels.dynamic_ratio``), so
    that n and k can be counted on the device (``_at_ratio``) and the call reads nothing on the
    host. (An auto step that measures the noise keeps every row: ``every_row``.)"""
    selects_at_k = (
        strategy.weighted
        or config.selection in ("topk", "sequence_aware")
        or (config.selection == "stratified" and config.num_strata <= kernels.spec.MAX_STRATA)
    )
    return selects_at_k and not every_row


def _at_ratio(
    logits: Tensor,
    targets: Tensor,
    config: GateConfig,
    scheduler: Scheduler,
    key: str,
    spec: LossSpec,
    param_ids: frozenset[int],
    need_rows: bool,
    seq: int | tuple[Tensor, int] | None = None,
    loss_rows: int | None = None,
) -> GatedForward:
    """``gated_forward`` for importance, top-k, sequence_aware or stratified at a ratio the host knows
    or the dynamic threshold moves on the device (``at_ratio``): nothing is read on the host, so the kernels (``_at_ratio_kernels``) are a fixed sequence of launches,
    replayed as one CUDA graph where ``config.cuda_graphs`` allows (``capture.replayed``).

    n comes from the scoring pass's partial sums, k = keep_count(ratio, n), both on the device; the
    dynamic threshold's ratio too (``kernels.dynamic_ratio``, from the batch's confidence and the
    gate's running average on the device, ``Scheduler.confidence_on``), and K below is then
    keep_count(min(1, r (1 + s)), N), for the largest ratio it can give.
    Importance lists its draw in K = keep_count(ratio, N) slots (an upper bound of k the host
    knows; the rows past the k drawn carry no weight) and the loss takes the mean's n from the
    draw; top-k's loss kernel selects the rows of rank below k (the 'sum' factor n / k there too)
    and a head gradient runs over the difficulty order's first K rows, those past k scaled by 0.
    Stratified computes its buckets' quotas on the device (``kernels.strata_at_ratio``) and puts
    its drawn rows first in a permutation of the rows that then stands in for top-k's order.
    sequence_aware hands the loss kernel the rows every sequence keeps (``selection.sequence_keep``)
    to select besides rank < k, and the kernel writes the union's size; a head gradient runs over
    K + sequences x min_tokens_per_sequence rows of an order with the kept rows first.
    The figures (n, k, the averages) stay on the device until ``metrics()`` asks. The partial
    sums' copy to the host is the target check's too: a bad target raises here where that copy is
    already done (on a CPU, always), else at a later call (``PendingTargetCheck``); this call's
    loss then counts its row as ignored, as the scoring pass reads it."""
    V = logits.shape[-1]
    N = targets.numel()
    dev = logits.device
    scoring = SCORINGS[config.scoring]
    weighted = selection.SELECTIONS[config.selection].weighted
    stratified = config.selection == "stratified"
    # the curriculum's ratio or auto's fraction for this step, known before any work; the dynamic
    # threshold moves the curriculum's on the device, at most to ``bound``
    cands = config.auto_candidates
    ratio = scheduler.known_ratio(config, key)
    dynamic = cands is None and config.dynamic_threshold
    sensitivity = float(config.threshold_sensitivity)
    average = scheduler.confidence_on(key, dev) if dynamic else None
    capacity = _head_rows(config, ratio, N, seq)
    per_sequence = config.selection == "sequence_aware"
    dense = need_rows and dense_rows(logits, N, capacity)
    step, call = scheduler.step_count, scheduler.calls_in_step
    # the call's random numbers come from a generator seeded by (seed, step, call); drawn inside the
    # graph, so that a replay draws them with no launch of its own
    seed = call_seed(config.seed, step, call) if scoring.random or weighted or stratified else None

    def eager() -> dict[str, Tensor]:
        return {"targets": targets}

    def fill(into: dict[str, Tensor] | None) -> dict[str, Tensor]:
        # a graph's inputs: the logits by their address (the logits themselves are never kept) and a
        # copy of the targets
        if into is None:
            into = {"address": torch.empty(1, dtype=torch.int64, device=dev), "targets": torch.empty_like(flat_t)}
        into["address"].fill_(logits.data_ptr())
        into["targets"].copy_(flat_t)
        return into

    def compute(inputs: dict[str, Tensor], gen: torch.Generator | None) -> dict[str, Tensor]:
        # the logits' dtype, shape and strides are the key's: a graph's replays read theirs at
        # ``address``. The draws in the order the kernels take them: random scoring's noise, then
        # importance's u and keys, or stratified's keys
        noise = difficulty.noise_for(config.scoring, N, dev, gen)
        keys_u = selection.random_keys(N, dev, gen) if weighted else None
        strata_keys = selection.stratified_keys(N, dev, gen) if stratified else None
        return _at_ratio_kernels(
            logits,
            inputs["targets"],
            config,
            spec,
            ratio,
            capacity,
            weighted,
            need_rows and not dense,
            noise,
            keys_u,
            inputs.get("address"),
            strata_keys,
            seq,
            average,
            sensitivity,
        )

    # a curriculum's warm-up gives every step its own ratio, hence its own graph: graphs from its end on
    # (auto's fractions are fixed)
    if (
        config.cuda_graphs
        and (cands is not None or scheduler.step_count >= config.warmup_steps)
        and capture.capturable(logits)
        and kernels.backend_for(logits) == "triton"
        and not kernels.reads_by_descriptor(logits)
        and (seed is None or capture.GRAPH_SAFE_RNG)
        and not isinstance(seq, tuple)  # (per-row sequence ids: a call's own tensor)
    ):
        flat_t = targets.reshape(-1)
        graph_key = (
            "at_ratio",
            tuple(logits.shape),
            logits.stride(),
            logits.dtype,
            logits.device,
            logits.data_ptr() % 16 == 0,  # what Triton specialises its loads on
            tuple(targets.shape),
            targets.dtype,
            capture.tensor_key(spec.weight),
            spec.ignore_index,
            spec.reduction,
            float(spec.label_smoothing),
            config.scoring,
            config.selection,
            config.importance_floor,
            config.num_strata,
            (config.min_tokens_per_sequence, seq) if per_sequence else None,
            ratio,
            # the running confidence the graph reads and updates, by its address
            (sensitivity, capture.tensor_key(average)) if dynamic else None,
            need_rows and not dense,
        )
        # the loss apart from the rest: a loop that keeps every step's loss keeps nothing else
        out = capture.replayed(graph_key, dev, eager, fill, compute, alone=("loss",), seed=seed)
    else:
        out = compute(eager(), None if seed is None else capture.seeded(dev, seed))

    sums_read = HostRead(out["partial"].reshape(-1))
    if sums_read.done():  # on a CPU always: checked at once
        n_valid, n_bad = _valid_and_bad(sums_read.values(), _N_SUMS)
        ValidShare.record(key, n_valid, N)
        _raise_if_bad(n_bad, V, spec.ignore_index)
    else:
        PendingTargetCheck.add(sums_read, V, spec.ignore_index, _N_SUMS, share=(key, N))
    # (its ratio: ``ratio``, or the one the dynamic threshold computed on the device from it)
    _, step, call = scheduler.begin_call(config, key, math.nan, param_ids)
    values: dict = {
        "step": step + 1,
        "selection": config.selection,
        "scoring": config.scoring,
        "_sums": sums_read,  # (the copy the target check reads too)
    }
    if cands is not None:
        # the step's valid tokens reach the auto state once the sums' copy is in
        state = scheduler.auto_state(key, cands)
        state.add_tokens(_ValidCount(sums_read))
        state.add_call(dev, N if loss_rows is None else loss_rows)
        values.update(figures.auto_figures(state, ratio))
    if weighted:
        values["_draw"] = HostRead(out["figures"], now=False)  # n and k too: no tokens_total until read
        plan = BackwardPlan(out["lse"], out["row_scale"], out.get("rows"), None, None, dense)
    else:
        # k = keep_count(_keep_ratio, n), n from _sums: read when asked
        values["_keep_ratio"] = HostRead(out["ratio"], now=False) if dynamic else ratio
        if per_sequence:  # the selection's size, which the kernel counted
            values["_selected"] = HostRead(out["selected"], now=False)
        order = out["order"]
        rows = None if dense or not need_rows else order[:capacity]
        plan = BackwardPlan(out["lse"], out["row_scale"], rows, order, None, dense)
    return GatedForward(out["loss"], values, plan)


def _at_ratio_kernels(
    logits: Tensor,
    targets: Tensor,
    config: GateConfig,
    spec: LossSpec,
    ratio: float,
    capacity: int,
    weighted: bool,
    list_rows: bool,
    noise: Tensor | None,
    keys_u: tuple[Tensor, Tensor] | None,
    address: Tensor | None = None,
    strata_keys: Tensor | None = None,
    seq: int | tuple[Tensor, int] | None = None,
    average: Tensor | None = None,
    sensitivity: float = 0.0,
) -> dict[str, Tensor]:
    """``_at_ratio``'s work on the device, no host read: the scoring pass, the difficulty and the
    partial sums, the difficulty order, then importance's draw, top-k's rank (with sequence_aware's
    kept rows, the selection's size in ``selected``) or stratified's
    permutation with its drawn rows first (standing in for top-k's order and rank), and the loss.
    ``noise``, ``keys_u`` and ``strata_keys``: the call's random numbers (random scoring's, the
    importance draw's, stratified's);
    ``address``: where the scoring pass reads the logits (a graph's input; None: ``logits``' own
    address); ``seq``: the rows' sequences (sequence_aware); ``average``: the gate's running
    confidence (``Scheduler.confidence_on``) where the dynamic threshold moves ``ratio`` (by
    ``sensitivity``): the ratio is then computed from the partial sums on the device
    (``kernels.dynamic_ratio``, returned as ``ratio``) and the selection takes it from there. Returns the loss, lse and row scale
    (the backward's), the partial sums, and importance's figures (and its rows where
    ``list_rows``) or top-k's difficulty order (stratified's permutation; sequence_aware's with its
    kept rows first where ``list_rows``)."""
    V = logits.shape[-1]
    ls = float(spec.label_smoothing)
    scoring = SCORINGS[config.scoring]
    stats = kernels.row_stats(
        logits, targets, spec.ignore_index, spec.weight, ls > 0, scoring.needs_p2sum, address=address
    )
    diff, partial = difficulty.score_rows(stats, targets, V, spec.ignore_index, config.scoring, None, ls, noise)
    out = {"lse": stats.lse, "partial": partial}
    r: float | Tensor = ratio
    if average is not None:
        r = out["ratio"] = kernels.dynamic_ratio(partial, ratio, sensitivity, average)
    order, rank = kernels.difficulty_rank(diff)
    if weighted:
        norm = _horvitz_thompson_norm(targets, None, V, spec)
        d = selection.importance_draw_at_ratio(
            selection.Ranking(order, rank),
            diff,
            partial,
            r,
            capacity,
            config.importance_floor,
            cast(tuple, keys_u),
            uniform=scoring.random,
            norm=norm,
        )
        loss, row_scale = kernels.selected_loss(
            stats,
            targets,
            V,
            d.key,
            1,
            capacity,
            capacity,
            spec.reduction,
            ls,
            spec.weight,
            d.row_weight,
            d.figures[_N_VALID : _N_VALID + 1],
        )
        out["figures"] = d.figures
        if list_rows:
            out["rows"] = d.rows
    else:
        if config.selection == "stratified":
            # the drawn rows first: the loss and the head gradient then take them as top-k's
            strata = kernels.strata_at_ratio(partial, r, config.num_strata)
            order, rank = selection.stratified_at_ratio(
                selection.Ranking(order, rank), strata, cast(Tensor, strata_keys), config.num_strata
            )
        keep = selected = None
        if config.selection == "sequence_aware":
            valid = target_masks(targets, V, spec.ignore_index)[0]
            keep = selection.sequence_keep(order, valid, config.min_tokens_per_sequence, seq)
            selected = out["selected"] = torch.empty(1, dtype=torch.int64, device=targets.device)
            if list_rows:
                # the kept rows first, then the rest by rank: the first K + (kept rows) of this order
                # hold the union of the top k and the kept rows
                order = torch.sort(rank + targets.numel() * (~keep).long()).indices
        loss, row_scale = kernels.selected_loss(
            stats,
            targets,
            V,
            rank,
            0,
            0,
            0,
            spec.reduction,
            ls,
            spec.weight,
            counts=partial,
            ratio=r,
            keep=keep,
            selected=selected,
        )
        out["order"] = order
    out["loss"], out["row_scale"] = loss, row_scale
    return out


class _ValidCount:
    """The valid targets of a call that read nothing, from its partial sums' copy
    (``auto.PendingCount``)."""

    def __init__(self, sums: HostRead) -> None:
        self._sums = sums

    def done(self) -> bool:
        return self._sums.done()

    def count(self) -> int:
        return _valid_and_bad(self._sums.values(), _N_SUMS)[0]


_N_VALID = kernels.spec.DRAW_FIGURES.index("n_valid")
_N_SUMS = len(kernels.spec.SUM_FIELDS)  # values a row of the scoring pass's partial sums


class ValidShare:
    """The share of valid targets among the rows of each gate's last call whose counts reached
    the host, by gate key. A head gradient at a ratio counted on the device multiplies
    keep_count(ratio, N) rows, N / n times the k selected where n of the N rows are valid: where
    most targets are ignored (prompts masked in fine-tuning), that costs more than the one host
    read it saves, and the call takes the read path instead (``device_k_pays``). Both paths give
    the same loss; only the work differs."""

    _shares: ClassVar[dict[str, float]] = {}

    @classmethod
    def record(cls, key: str, n_valid: int, n_rows: int) -> None:
        if n_rows > 0:
            cls._shares[key] = n_valid / n_rows

    @classmethod
    def get(cls, key: str) -> float | None:
        return cls._shares.get(key)

    @classmethod
    def clear(cls) -> None:
        cls._shares.clear()


# a head gradient counted on the device runs over at most this many times the selected rows
# (in expectation, from the last known share of valid targets) before the read path is taken
DEVICE_K_MAX_ROWS_FACTOR = 2.0


def device_k_pays(key: str, need_rows: bool, spread: float = 1.0) -> bool:
    """Whether a call at a ratio the host knows counts n and k on the device: always without a
    head gradient (the loss alone does no more work), else while the gate's last known share of
    valid targets keeps the head gradient's rows within ``DEVICE_K_MAX_ROWS_FACTOR`` of k
    (unknown: yes). ``spread``: the rows' ratio over the one the call selects at in expectation
    (the dynamic threshold sizes the rows for min(1, r (1 + s)), its ratio moves about r)."""
    if not need_rows:
        return True
    share = ValidShare.get(key)
    return share is None or share * DEVICE_K_MAX_ROWS_FACTOR >= spread


class PendingTargetCheck:
    """The target checks of calls that read nothing on the host (``_at_ratio``): each holds its call's valid and bad target counts (the scoring pass's
    partial sums), copied to the host behind the kernels, and raises the ValueError of a
    bad target at the first later gated call that finds the copy done (or at ``poll(wait=True)``:
    ``disable()``, ``metrics()``). A call never waits for one."""

    _pending: ClassVar[list[tuple[HostRead, int, int, int, tuple[str, int] | None]]] = []
    # gated calls and a metrics() reader in another thread may poll at once
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def clear(cls) -> None:
        with cls._lock:
            cls._pending.clear()

    @classmethod
    def add(
        cls, counts: HostRead, vocab: int, ignore_index: int, width: int = 2, share: tuple[str, int] | None = None
    ) -> None:
        """``counts``: the partial counts' copy, ``width`` values a row (``_valid_and_bad``);
        ``share``: (gate key, rows of the call) whose ``ValidShare`` the counts update once read."""
        with cls._lock:
            cls._pending.append((counts, vocab, ignore_index, width, share))

    @classmethod
    def poll(cls, wait: bool = False) -> None:
        """Check every pending call whose counts have arrived (every one with ``wait``), oldest
        first; the first bad one raises, and the checks after it stay pending for the next poll."""
        while True:
            with cls._lock:
                if not cls._pending or not (wait or cls._pending[0][0].done()):
                    return
                counts, vocab, ignore_index, width, share = cls._pending.pop(0)
            n_valid, n_bad = _valid_and_bad(counts.values(), width)  # outside the lock: with ``wait`` it may wait
            if share is not None:
                ValidShare.record(share[0], n_valid, share[1])
            if n_bad:
                raise ValueError(
                    f"cggr_hook: an earlier gated call's target had {n_bad} value(s) outside [0, {vocab}) that are not "
                    f"ignore_index={ignore_index} (that call counted them as ignored); targets must be class indices "
                    f"below the vocabulary size {vocab} or ignore_index"
                )
