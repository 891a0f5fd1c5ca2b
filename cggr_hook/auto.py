"""``min_tokens_ratio='auto'``: the gate picks the kept fraction that promises the most progress per
second, from step times measured on the run and an estimate of the gradient noise.

**Model of progress** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"). With
the noise scale B = tr(Sigma) / |G|^2 (in tokens: Sigma the covariance of one token's gradient, G
the mean gradient) and n valid tokens a step, an unbiased estimate that keeps a fraction f of them
has gradient noise

    N(f) / |G|^2 = (1 / n) (B + (1 - f) / f (B + 1))

(the batch's own noise, plus what sampling adds, for uniform sampling: importance sampling adds
less, so the model is conservative for it). A step's expected loss decrease at its best learning
rate is proportional to 1 / (1 + N(f) / |G|^2); per second, to that over the measured step time t(f).

**Candidates**: the gated fractions ``FRACTIONS`` and ``PLAIN``, the plain loss with the gate out
of the way (the original ``F.cross_entropy``), which keeps every token like 1.0 and can be the
faster of the two where a call's fixed cost outweighs what the gate's kernels save. 1.0 is
preferred to the plain loss only where its steps are ``MARGIN`` faster, and a fraction below 1.0
is chosen only if it promises ``MARGIN`` more progress per second than the better of the two
full-token candidates; otherwise that one is. The default gate (a fixed ratio of 1.0 with
``plain_when_faster``) runs this policy over ``FULL_TOKENS`` alone: the same loss either way, so
the faster one, with no noise to measure.

**Schedule**: a probe window runs up to ``PROBE_STEPS`` optimizer steps at each candidate, in the
order of its candidates: for ``'auto'`` (``CANDIDATES``) 1.0 first (its steps measure the noise),
the plain loss, then the fractions from the largest; for the default (``FULL_TOKENS``) the plain
loss, then 1.0 (on a CUDA device only: elsewhere the gate's kernels are its PyTorch reference,
never the faster, and the default runs the plain loss with no probe of them). A candidate's step
time is the median time between optimizer steps of its run,
the first step of each run left out (it pays for compilation and the switch): on a CUDA device
the time between events recorded on the device's stream at each step (read once, at the
window's decision: the host can queue steps ahead of the device where nothing waits), elsewhere
the wall clock. A fraction whose first two timed steps are both no faster than the faster
full-token candidate is left after them: with a noisier gradient and no faster step it cannot
promise more progress per second, so where dropping tokens does not pay the window costs few
gated steps; likewise 1.0 after the plain loss, where its two timed steps are not ``MARGIN``
faster. Then the choice runs until the next window, ``INTERVAL`` steps after the last one began,
or sooner where the batch changes: once all but one of the last ``RECENT_STEPS`` steps ran at least
``RESHAPE`` times, or at most 1 / ``RESHAPE`` of, the rows a step of the last window (every row of
the gate's cross entropies, ignored ones included; the mean over the window's steps), or at once
where the batch changed that much during the window itself (its last three steps against its
first three), which then timed its candidates on two batches; at most one such window in
``BATCH_GAP`` steps, and none right after another.
The choice follows measured time: a repeated or resumed run can choose otherwise (a resumed run's
first step is not timed, so a probe can run a step longer there).

**Noise on the head**: token i's gradient on the head weight is g_i = (p_i - y_i) h_i^T, of norm
s_i ||h_i|| (s_i the gradnorm score). From one call's n tokens, S = mean_i |g_i|^2 estimates
tr(Sigma) + |G|^2 and Bn = |mean_i g_i|^2 estimates |G|^2 + tr(Sigma) / n, so

    tr(Sigma) ~ (S - Bn) n / (n - 1),    |G|^2 ~ Bn - tr(Sigma) / n,

(McCandlish et al., appendix A, with the per-token and the batch gradient as the two batch sizes),
averaged over the probe's calls; B is their ratio. The noise is that of the head alone: the body's
own gradient noise is not seen.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

PLAIN = "plain"
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
# the probe order: the full-token candidates first (1.0's steps measure the noise), so that a
# fraction's first timed step can be held against them
CANDIDATES: tuple[float | str, ...] = (1.0, PLAIN, 0.75, 0.5, 0.25)
# every token either way: the plain loss or the gate's kernels, whichever runs faster
# (``plain_when_faster`` at a fixed ratio of 1.0). Same loss, so no noise to measure; the plain
# loss first, so that the kernels' probe can be cut short where they are no faster
FULL_TOKENS: tuple[float | str, ...] = (PLAIN, 1.0)
PROBE_STEPS = 5  # a candidate's time: the median of its last four steps
LEAVE_AFTER = 2  # timed steps of a fraction (or of 1.0 after plain) before it may be left as not faster
INTERVAL = 500
# a new window as soon as all but one of the last RECENT_STEPS steps ran this many times, or this
# fraction of, the rows a step of the last window (their mean over the window): the choice depends
# on the batch (a small batch's fixed cost can make the plain loss the faster, a large one the
# gate's kernels). A sustained change shows after RECENT_STEPS - 1 steps; one outlying step (a
# short last batch) shows nothing; two sizes taken in turn or at random (length buckets) put the
# window's mean between them, so neither is twice or half of it. Sizes four times apart at random
# can, rarely, all but fill the last steps with one of them: a window more, no harm.
RESHAPE = 2.0
RECENT_STEPS = 9
# at least this many steps from the start of the last window to one that a batch change starts, and
# no window started by a batch change starts another at its end: batches that mix sizes in ways the
# check cannot tell from a change (a block pattern as long as a window, a rare large size) probe at
# most once in BATCH_GAP steps, not on and on
BATCH_GAP = 100
MARGIN = 0.03
# whether the default's window also times 1.0 off a CUDA device, where the gate's kernels are its
# PyTorch reference (``AutoState._skip_the_reference``): off, as shipped; the CPU tests of the
# probe's mechanics turn it on
PROBE_THE_REFERENCE = False
NOISE_MOMENTUM = 0.5  # weight of the earlier windows' noise figures in the running average

Candidate = float | str


def sampling_noise(f: float, noise_scale: float, n: float) -> float:
    """N(f) / |G|^2: the gradient noise of a step that keeps a fraction f of n tokens, relative to
    the squared mean gradient (``noise_scale`` B in tokens; inf: noise only)."""
    if math.isinf(noise_scale):
        return math.inf
    return (noise_scale + (1.0 - f) / f * (noise_scale + 1.0)) / max(n, 1.0)


def progress_rate(f: float, step_seconds: float, noise_scale: float, n: float) -> float:
    """Expected loss decrease per second, up to a constant: 1 / ((1 + N(f) / |G|^2) t(f))."""
    noise = sampling_noise(f, noise_scale, n)
    if math.isinf(noise):  # no signal at all: every candidate makes the same (no) progress per step
        return f / step_seconds
    return 1.0 / ((1.0 + noise) * step_seconds)


def choose(step_seconds: dict, noise_scale: float | None, n: float, margin: float = MARGIN) -> Candidate:
    """The candidate with the most expected progress per second. ``step_seconds``: candidate ->
    seconds per step (those measured). Without a noise estimate, or where no fraction below 1.0
    beats the faster full-token candidate by ``margin``, that full-token candidate."""
    full = [c for c in (1.0, PLAIN) if c in step_seconds]
    if not full:
        raise ValueError("cggr_hook: auto needs the step time of 1.0 or plain")
    # the plain loss is what the user runs without the gate: 1.0 replaces it only where its steps
    # are faster by the margin (step times measured over a few steps are noisy to a few %)
    if len(full) == 2 and step_seconds[1.0] >= step_seconds[PLAIN] * (1.0 - margin):
        full = [PLAIN]
    best_full = min(full, key=lambda c: step_seconds[c])
    if noise_scale is None:
        return best_full
    rate_full = progress_rate(1.0, step_seconds[best_full], noise_scale, n)
    best, best_rate = best_full, rate_full * (1.0 + margin)
    for c, t in step_seconds.items():
        if c in (1.0, PLAIN):
            continue
        rate = progress_rate(float(c), t, noise_scale, n)
        if rate > best_rate:
            best, best_rate = c, rate
    return best


def noise_parts(per_token_sq: Tensor, mean_grad_sq: Tensor, n: int) -> Tensor:
    """Device float64 (2,) (tr Sigma, |G|^2) from one call: ``per_token_sq`` S = mean_i |g_i|^2 and
    ``mean_grad_sq`` Bn = |mean_i g_i|^2 over its n tokens (n >= 2)."""
    trace = (per_token_sq.double() - mean_grad_sq.double()) * (n / (n - 1))
    return torch.stack([trace, mean_grad_sq.double() - trace / n])


class PendingCount(Protocol):
    """A count still on its way from the device: ``done()`` says whether ``count()`` would return
    without waiting."""

    def done(self) -> bool: ...

    def count(self) -> int: ...


@dataclass
class AutoState:
    """One gate's timed-choice state (``Scheduler.auto_state``): its candidates, the probe
    schedule, the measured step times and noise, the current choice. The step times and noise not
    yet read off the device (CUDA events, a device accumulator) are read into plain data for
    ``Scheduler.state_dict()`` and copies; the events themselves are not kept."""

    candidates: tuple = CANDIDATES  # what the probe windows run, in order (``GateConfig.auto_candidates``)
    steps: int = 0  # counted optimizer steps of this gate so far
    window_start: int = 0  # the step at which the current (or last) probe window began
    probe: int = 0  # the candidate being probed (index into candidates); len(candidates): none
    probe_steps: int = 0  # steps of that candidate so far in this window
    choice: Candidate = 1.0  # what runs outside the probe windows
    step_seconds: dict = field(default_factory=dict)  # candidate -> median seconds a step (last measured)
    noise: list | None = None  # running [tr Sigma, |G|^2]
    tokens: float = 0.0  # running valid tokens a step
    decided_rows: float = 0.0  # the mean rows of the last window's steps (0: not known)
    decisions: int = 0
    _times: dict = field(default_factory=dict)  # candidate -> step times of the current window
    _last: float | None = None  # wall clock at the last counted step
    device: torch.device | None = None  # where the gate's calls run (a CUDA device: steps timed there)
    _mark: Any = None  # CUDA: an event recorded at the last counted step of the window
    _marked: list = field(default_factory=list)  # CUDA: (candidate, start, end) events not yet read
    _acc: Tensor | None = None  # device [tr Sigma sum, |G|^2 sum, calls] of the current window's 1.0 steps
    _step_tokens: int = 0  # valid tokens of the gated calls of the current step
    _step_pending: list = field(default_factory=list)  # the current step's counts still on the device
    # steps whose valid tokens are not all read yet, in order: (known tokens, pending counts)
    _unfolded: list = field(default_factory=list)
    _step_rows: int = 0  # rows of the calls (gated or plain) of the current step
    _recent_rows: list = field(default_factory=list)  # rows of the last RECENT_STEPS steps
    _window_rows: list = field(default_factory=list)  # rows of the current window's steps
    batch_started: bool = False  # the current (or last) window was started by a change of batch
    _ungated: int = 0  # optimizer steps in a row whose gated candidate gated no loss

    # --- which candidate the current step runs --------------------------------------------------
    def in_window(self) -> bool:
        return self.probe < len(self.candidates)

    def candidate(self) -> Candidate:
        return self.candidates[self.probe] if self.in_window() else self.choice

    def measures_noise(self) -> bool:
        """Whether this step's calls measure the head's gradient noise: the 1.0 steps of a window,
        where a fraction below 1.0 is a candidate (only a fraction's choice needs the noise)."""
        return self.in_window() and self.candidates[self.probe] == 1.0 and self.has_fractions()

    def has_fractions(self) -> bool:
        """Whether a fraction below 1.0 is a candidate (else the choice is between the gate's
        kernels and the plain loss, the same loss, and the noise plays no part)."""
        return any(c != PLAIN and c < 1.0 for c in self.candidates)

    # --- what the calls of a step report -------------------------------------------------------------
    def add_tokens(self, n: int | PendingCount) -> None:
        """A gated call's valid tokens: a number, or a count still on its way from the device (a
        call that reads nothing on the host), folded into ``tokens`` once it has arrived, and at
        the latest when a decision or ``state_dict`` needs it."""
        if isinstance(n, int):
            self._step_tokens += n
        elif n.done():  # (calls with no step between them, an evaluation loop's, hold nothing)
            self._step_tokens += n.count()
        else:
            self._step_pending.append(n)

    def add_call(self, device: torch.device, rows: int = 0) -> None:
        """A call of the gate ran on ``device`` (gated or plain) over ``rows`` rows of logits:
        where its steps are timed, and how large they are."""
        self.device = device
        self._step_rows += rows

    def add_noise(self, parts: Tensor) -> None:
        """One call's (tr Sigma, |G|^2) (``noise_parts``), kept on the device until the decision."""
        row = torch.cat([parts, parts.new_ones(1)])
        self._acc = row if self._acc is None else self._acc.to(row.device) + row

    # --- an optimizer step was counted -----------------------------------------------------------------
    def on_step(self, now: float | None = None) -> None:
        """An optimizer step was counted. A step's time is the time between two counted steps: on
        a CUDA device the time between events recorded on its stream at each (the device's own
        timeline: the host may run steps ahead of the device where nothing waits, which its clock
        would count as fast), else the host's wall clock."""
        now = time.perf_counter() if now is None else now
        self._ungated = 0
        c = self.candidate()
        in_window = self.in_window()
        mark = None
        if in_window and self.device is not None and self.device.type == "cuda":
            mark = torch.cuda.Event(enable_timing=True)
            mark.record(torch.cuda.current_stream(self.device))
        timed = in_window and self.probe_steps  # not the first step of a run
        if timed and mark is not None:
            if self._mark is not None:
                self._marked.append((c, self._mark, mark))
        elif timed and self._last is not None:
            self._times.setdefault(c, []).append(now - self._last)
        self._mark = mark
        self._unfolded.append((self._step_tokens, self._step_pending))
        self._step_tokens, self._step_pending = 0, []
        self._fold_tokens(wait=False)
        if self._step_rows:
            r = self._step_rows
            self._recent_rows = (self._recent_rows + [r])[-RECENT_STEPS:]
            if in_window:
                self._window_rows.append(r)
        self._step_rows = 0
        self._last = now
        self.steps += 1
        if in_window:
            self.probe_steps += 1
            if self.probe_steps >= PROBE_STEPS or self._cannot_win(c):
                self.probe, self.probe_steps = self.probe + 1, 0
                self._skip_the_reference()
                if not self.in_window():
                    self._decide()
        elif self.steps - self.window_start >= INTERVAL:
            self._start_window(batch=False)
        elif self.steps - self.window_start >= BATCH_GAP and self._reshaped():
            self._start_window(batch=True)

    def _fold_tokens(self, wait: bool) -> None:
        """Fold the counted steps' valid tokens into the running ``tokens``, oldest first, as far as
        their counts have reached the host (all of them with ``wait``)."""
        while self._unfolded:
            known, pending = self._unfolded[0]
            if not wait and not all(p.done() for p in pending):
                return
            n = known + sum(p.count() for p in pending)
            if n:
                self.tokens = n if not self.tokens else 0.9 * self.tokens + 0.1 * n
            self._unfolded.pop(0)

    def _skip_the_reference(self) -> None:
        """The default's window leaves 1.0 out where its calls run off a CUDA device: there the
        gate's kernels are its PyTorch reference (``kernels.reference``), a score, a selection and
        a loss of several torch operators each, which cannot be faster than torch's own fused
        cross entropy over the same tokens, and a probe of it costs the run steps for nothing
        (three of 205 in the CPU main job's 30 s, 0.067 nats). ``'auto'`` still times its
        fractions there: dropping rows saves a share of the head's backward."""
        if PROBE_THE_REFERENCE or self.candidates != FULL_TOKENS or self.device is None or self.device.type == "cuda":
            return
        while self.in_window() and self.candidates[self.probe] == 1.0:
            self.probe += 1

    def _start_window(self, batch: bool) -> None:
        self.window_start, self.probe, self.probe_steps = self.steps, 0, 0
        self.batch_started = batch

    def _reshaped(self) -> bool:
        """Whether the batch changed since the last decision: all but one of the last
        ``RECENT_STEPS`` steps ran ``RESHAPE`` times, or 1 / ``RESHAPE`` of, the last window's rows."""
        d, recent = self.decided_rows, self._recent_rows
        if d <= 0:
            return False
        up = sum(r >= RESHAPE * d for r in recent)
        down = sum(r * RESHAPE <= d for r in recent)
        return max(up, down) >= RECENT_STEPS - 1

    def no_gated_loss(self) -> None:
        """An optimizer step ran a gated candidate, but no loss of it was gated (the gate left its
        cross entropy to the plain loss: a lossy cast, probability targets, a loss the gate cannot
        follow; such a step is not counted, so nothing else would move on). After ``LEAVE_AFTER``
        such steps in a row with no counted step between them, the candidate is left: the probe
        goes on to the next one (the window's measurements kept), and a choice outside the window
        falls back to the plain loss until the next window. One such step (an auxiliary loss now
        and then) changes nothing."""
        c = self.candidate()
        if c == PLAIN:
            return
        self._ungated += 1
        if self._ungated < LEAVE_AFTER:
            return
        self._ungated = 0
        if self.in_window():
            self.probe, self.probe_steps, self._mark = self.probe + 1, 0, None
            if not self.in_window():
                self._decide()
        elif PLAIN in self.candidates:
            self.choice = PLAIN

    def _cannot_win(self, c: Candidate) -> bool:
        """Whether candidate ``c``'s two timed steps so far already rule it out: a fraction's, both
        no faster than the faster full-token candidate's median in this window (then its noisier
        gradient cannot buy more progress per second); 1.0's, both short of the ``MARGIN`` it must
        beat the plain loss's median by. The faster of two, so that one slow step (an evaluation, a
        checkpoint between two optimizer steps) does not end a probe. The plain loss, what the
        user runs without the gate, always gets its whole probe."""
        if c == PLAIN:
            return False
        self._read_marks(wait=False)
        times = self._times.get(c)
        if not times or len(times) < LEAVE_AFTER:
            return False
        if c == 1.0:
            plain = self._times.get(PLAIN)
            return bool(plain) and min(times) >= statistics.median(plain) * (1.0 - MARGIN)
        full = [statistics.median(self._times[f]) for f in (1.0, PLAIN) if self._times.get(f)]
        return bool(full) and min(times) >= min(full)

    def _read_marks(self, wait: bool) -> None:
        """Step times from the CUDA events recorded so far, in order: those the device has passed
        (``wait``: all of them, waiting for the last; the window's decision does, once)."""
        if wait and self._marked:
            self._marked[-1][2].synchronize()  # the device has then passed every earlier mark too
        while self._marked:
            c, start, end = self._marked[0]
            if not wait and not end.query():
                return
            self._times.setdefault(c, []).append(start.elapsed_time(end) / 1e3)
            self._marked.pop(0)

    def _decide(self) -> None:
        self._read_marks(wait=True)
        self._fold_tokens(wait=True)
        self._mark = None
        for c, ts in self._times.items():
            self.step_seconds[c] = statistics.median(ts)
        self._times = {}
        if self._acc is not None:
            trace, g2, calls = self._acc.tolist()  # the one host read of a window
            self._acc = None
            if calls:
                new = [trace / calls, g2 / calls]
                self.noise = (
                    new
                    if self.noise is None
                    else [NOISE_MOMENTUM * a + (1 - NOISE_MOMENTUM) * b for a, b in zip(self.noise, new)]
                )
        if any(c in self.step_seconds for c in (1.0, PLAIN)):
            self.choice = choose(self.step_seconds, self.noise_scale(), self.tokens)
        else:  # every token was never timed (its steps gated no loss): nothing to hold a fraction against
            self.choice = PLAIN if PLAIN in self.candidates else 1.0
        w, self._window_rows = self._window_rows, []
        if w:
            self.decided_rows = float(sum(w)) / len(w)
        self.decisions += 1
        changed = len(w) >= 6 and (min(w[-3:]) >= RESHAPE * max(w[:3]) or max(w[-3:]) * RESHAPE <= min(w[:3]))
        if changed and not self.batch_started:
            # the batch changed during the window: its candidates were timed on two batches
            self._start_window(batch=True)

    def noise_scale(self) -> float | None:
        """B = tr Sigma / |G|^2 in tokens (None before any estimate; inf where |G|^2 <= 0)."""
        if self.noise is None:
            return None
        trace, g2 = self.noise
        if g2 <= 0:
            return math.inf
        return max(trace, 0.0) / g2

    # --- checkpoints --------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """A copy or pickle (``CGGRLoss`` in ``torch.save(model)``, a deep copy of a model) takes the
        step times read so far, and the valid tokens counted so far, read now; the CUDA events of
        the window and of the counts belong to this process (the next step of the copy is not
        timed, as after a resume)."""
        self._read_marks(wait=True)
        self._fold_tokens(wait=True)
        state = dict(self.__dict__)
        state["_mark"], state["_marked"] = None, []
        state["_step_tokens"] = self._step_tokens + sum(p.count() for p in self._step_pending)
        state["_step_pending"], state["_unfolded"] = [], []
        return state

    def state_dict(self) -> dict:
        self._read_marks(wait=True)
        self._fold_tokens(wait=True)
        acc = None if self._acc is None else self._acc.tolist()
        return dict(
            candidates=[candidate_key(c) for c in self.candidates],
            steps=self.steps,
            window_start=self.window_start,
            probe=self.probe,
            probe_steps=self.probe_steps,
            choice=self.choice,
            step_seconds={candidate_key(c): t for c, t in self.step_seconds.items()},
            noise=self.noise,
            tokens=self.tokens,
            decided_rows=self.decided_rows,
            recent_rows=list(self._recent_rows),
            window_rows=list(self._window_rows),
            batch_started=self.batch_started,
            decisions=self.decisions,
            times={candidate_key(c): list(ts) for c, ts in self._times.items()},
            acc=acc,
        )

    @classmethod
    def from_state(cls, state: dict) -> AutoState:
        if "probe" in state:
            probe, probe_steps = int(state["probe"]), int(state["probe_steps"])
        else:
            probe, probe_steps = _probe_of_0_1_0(int(state["steps"]) - int(state["window_start"]))
        s = cls(
            # a state without its candidates is 0.1.0's, whose auto probed them all
            candidates=tuple(_candidate(c) for c in state.get("candidates", CANDIDATES)),
            steps=int(state["steps"]),
            window_start=int(state["window_start"]),
            probe=probe,
            probe_steps=probe_steps,
            choice=_candidate(state["choice"]),
            step_seconds={_candidate(c): float(t) for c, t in state["step_seconds"].items()},
            noise=None if state["noise"] is None else [float(v) for v in state["noise"]],
            tokens=float(state["tokens"]),
            decided_rows=float(state.get("decided_rows", 0.0)),
            decisions=int(state["decisions"]),
        )
        s._times = {_candidate(c): [float(t) for t in ts] for c, ts in state.get("times", {}).items()}
        s._recent_rows = [int(r) for r in state.get("recent_rows", [])]
        s._window_rows = [int(r) for r in state.get("window_rows", [])]
        s.batch_started = bool(state.get("batch_started", False))
        if state.get("acc") is not None:
            s._acc = torch.tensor(state["acc"], dtype=torch.float64)
        return s


def _probe_of_0_1_0(k: int) -> tuple[int, int]:
    """(probe, probe_steps) of a 0.1.0 state ``k`` steps into its window: that version ran three
    steps of each of 1.0, 0.75, 0.5, 0.25 and plain, in that order."""
    old_order, old_steps = (1.0, 0.75, 0.5, 0.25, PLAIN), 3
    if 0 <= k < old_steps * len(old_order):
        return CANDIDATES.index(old_order[k // old_steps]), k % old_steps
    return len(CANDIDATES), 0


def candidate_key(c: Candidate) -> str:
    """A candidate as a string: 'plain', or the fraction's repr (state dicts, ``schedule.auto_key``)."""
    return PLAIN if c == PLAIN else repr(float(c))


def _candidate(c) -> Candidate:
    return PLAIN if c == PLAIN else float(c)
