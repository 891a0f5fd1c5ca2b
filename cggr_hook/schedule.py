"""The scheduler: which fraction of tokens a gated call keeps.

Curriculum over optimizer steps (``step`` counted by the scheduler itself):

    r(step) = 1 - min(1, step / warmup_steps) * (1 - min_tokens_ratio)      (warmup_steps = 0: r = min_tokens_ratio)

Dynamic ratio (``dynamic_threshold``): with c the batch's mean top-1 probability over valid tokens
and c_avg the running average of earlier batches (exponential, momentum 0.9),

    r' = r * (1 + s * clamp((c_avg - c) / c_avg, -1, 1)),   clamped to [r * (1 - s), min(1, r * (1 + s))]

so a batch less confident than usual keeps more tokens. The number of tokens kept out of n valid ones
is k = max(1, floor(r' * n + 0.5)) (k = 0 when n = 0), computed in float64 so noise in r never moves k.
A call that reads nothing on the host computes r' and the running average on the device
(``kernels.dynamic_ratio``, the same float64 operations); the average then lives there
(``Scheduler.confidence_on``) until a call reads it back or a checkpoint asks for it.

The global scheduler counts steps through PyTorch's global optimizer post-step hook: a step of any
optimizer that holds the parameters of a model whose loss was gated since the last counted step
counts once. So gradient accumulation counts optimizer steps, not micro-batches; a second optimizer
stepping in the same iteration does not count twice; a step that GradScaler skips never calls the
hook and is not counted. The hook is registered by the first ``enable`` and removed by the last
``disable``, or, when a gated loss is still waiting for its optimizer step (``with gated(model):``
around the forward only), right after that step is counted.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .auto import CANDIDATES, PLAIN, AutoState, candidate_key
from .config import GateConfig
from .kernels.spec import EMA_MOMENTUM, dynamic_ratio, keep_count, running_confidence

__all__ = [
    "EMA_MOMENTUM",
    "Scheduler",
    "auto_key",
    "curriculum_ratio",
    "dynamic_ratio",
    "optimizer_holds",
    "tokens_to_keep",
]


def curriculum_ratio(step: int, config: GateConfig) -> float:
    """r(step) of the curriculum, before any dynamic adjustment."""
    if config.warmup_steps == 0:
        progress = 1.0
    else:
        progress = min(1.0, step / config.warmup_steps)
    return 1.0 - progress * (1.0 - cast(float, config.min_tokens_ratio))


def tokens_to_keep(ratio: float, n_valid: int) -> int:
    """k = max(1, floor(ratio * n + 0.5)) for n > 0, else 0; never more than n.

    A product that is a half-integer up to float noise rounds up (r arrives through float
    arithmetic: 0.45 may be 0.44999999999999996): ``kernels.spec.keep_count``, the rule the
    importance kernel also follows where it counts n on the device."""
    return keep_count(ratio, n_valid)


class Scheduler:
    """Step count, running confidence averages and the per-call draw counter of one gate family.

    ``cggr_hook.scheduler`` is the global one (shared by every gated model); each ``CGGRLoss`` owns a
    private one advanced by its ``.step()``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.step_count = 0
        self.calls_in_step = 0  # gated calls since the last counted step: seeds random draws
        # the dynamic threshold's running confidence by gate key (``confidence_avg``): a float here, or, once a call
        # computed its ratio on the device (``confidence_on``), a float64 (2,) tensor there
        # ([average, 1 where there is one]) that the calls update in place; a key is in one of the two
        self._confidence_host: dict[str, float] = {}
        self._confidence_dev: dict[str, torch.Tensor] = {}
        # the CUDA stream of each key's last update on the device: a call on another stream first
        # waits for it, so that no update is lost between two streams
        self._confidence_stream: dict[str, Any] = {}
        self._pending = False  # a gated call happened since the last counted step
        self._pending_ids: frozenset[int] = frozenset()  # ids of the parameters behind those calls
        self._hook_handle = None
        self._release_after_step = False
        # called on every optimizer step the hook sees, as observer(optimizer, pending, counted);
        # returning True counts a step the rule above did not (gate.py: parameters a model gained
        # after enable, and the watchdog)
        self.step_observer: Callable[[torch.optim.Optimizer, bool, bool], bool] | None = None
        # counts resets and loaded states: figures recorded before one are of another run
        self.generation = 0
        # the timed choices ('auto', plain_when_faster): each gate's state, by auto_key
        self.auto: dict[str, AutoState] = {}
        self._auto_in_step: set[str] = set()  # the states with a call since the last counted step

    # --- the ratio ---------------------------------------------------------------------------------
    def ratio(self, config: GateConfig | None = None, key: str | None = None) -> float:
        """The curriculum ratio at the current step for ``config`` (default options when None); for
        ``min_tokens_ratio='auto'`` the fraction the gate ``key`` runs now (1.0 for the plain loss,
        1.0 before its first call)."""
        config = config or GateConfig()
        cands = config.auto_candidates
        if cands is not None:
            state = self.auto.get(auto_key(key or "", cands))
            c = state.candidate() if state is not None else cands[0]
            return 1.0 if c == PLAIN else float(c)
        return curriculum_ratio(self.step_count, config)

    def auto_state(self, key: str, candidates: tuple = CANDIDATES) -> AutoState:
        """The timed-choice state of the gate ``key`` choosing among ``candidates`` (its
        ``config.auto_candidates``), made on first use. Kept under ``auto_key(key, candidates)``:
        a gate's default choice and an ``'auto'`` run of a model of the same kind keep apart."""
        with self._lock:
            k = auto_key(key, candidates)
            state = self.auto.get(k)
            if state is None or state.candidates != candidates:
                state = self.auto[k] = AutoState(candidates=candidates)
            return state

    def plain_call(
        self,
        key: str,
        candidates: tuple,
        device: torch.device,
        param_ids: frozenset[int] = frozenset(),
        rows: int = 0,
    ) -> AutoState:
        """A call on ``device`` over ``rows`` rows of logits that the timed choice (``candidates``)
        runs as the plain loss: the optimizer step after it still counts (and times the plain
        candidate there). Returns the choice's state."""
        with self._lock:
            self._pending = True
            self._auto_in_step.add(auto_key(key, candidates))
            if param_ids is not self._pending_ids:
                self._pending_ids = self._pending_ids | param_ids
            state = self.auto_state(key, candidates)
            state.add_call(device, rows)
            return state

    def keeps_every_row(self, config: GateConfig, key: str) -> bool:
        """Whether ``begin_call`` will return a ratio of 1.0 for this gate's next call whatever its
        batch: a fixed ratio of 1.0 (its curriculum stays at 1.0; the dynamic threshold could move
        it), or a step that the timed choice (``config.auto_candidates``) runs at 1.0 or plain."""
        cands = config.auto_candidates
        if cands is not None:
            return self.auto_state(key, cands).candidate() in (1.0, PLAIN)
        return cast(float, config.min_tokens_ratio) >= 1.0 and not config.dynamic_threshold

    def known_ratio(self, config: GateConfig, key: str) -> float:
        """The ratio ``begin_call`` will return for the gate's next call where that does not depend
        on the batch (no dynamic threshold, or ``'auto'``): the timed choice's candidate, else the
        curriculum's."""
        with self._lock:
            cands = config.auto_candidates
            if cands is not None:
                c = self.auto_state(key, cands).candidate()
                return 1.0 if c == PLAIN else float(c)
            return curriculum_ratio(self.step_count, config)

    def begin_call(
        self, config: GateConfig, key: str, confidence: float, param_ids: frozenset[int] = frozenset()
    ) -> tuple[float, int, int]:
        """Ratio for one gated call (curriculum, then dynamic), updating the running confidence;
        ``param_ids``: the gated model's parameters, whose optimizer's next step counts.

        Returns (ratio, step, call index within the step); the last two seed the call's draws.
        """
        with self._lock:
            cands = config.auto_candidates
            r = self.known_ratio(config, key)
            if cands is not None:
                self._auto_in_step.add(auto_key(key, cands))
            if config.dynamic_threshold and cands is None and not math.isnan(confidence):
                average = self._host_confidence(key)
                r = dynamic_ratio(r, confidence, average, config.threshold_sensitivity)
                new = running_confidence(average, confidence)
                if new is not None:
                    self._confidence_host[key] = new
            step, call = self.step_count, self.calls_in_step
            self.calls_in_step += 1
            self._pending = True
            if param_ids is not self._pending_ids:
                self._pending_ids = self._pending_ids | param_ids
            return r, step, call

    def confidence_on(self, key: str, device: torch.device) -> torch.Tensor:
        """The running confidence of gate ``key`` as a float64 (2,) tensor on ``device`` ([average,
        1 where there is one, else 0]), for a call that computes its dynamic ratio there
        (``kernels.dynamic_ratio`` updates it in place). The same tensor call after call, the
        key's one record from then on; made from the host's figure (no read, two fills). On CUDA,
        a call on another stream than the last update's first waits for that stream."""
        with self._lock:
            t = self._confidence_dev.get(key)
            if t is not None and t.device == device:
                if t.is_cuda and not torch.cuda.is_current_stream_capturing():
                    stream = torch.cuda.current_stream(device)
                    last = self._confidence_stream.get(key)
                    if last is not None and last != stream:
                        stream.wait_stream(last)
                        t.record_stream(stream)  # (its memory stays until this stream's update is done)
                    self._confidence_stream[key] = stream
                return t
            average = self._host_confidence(key)  # (a tensor on another device: read back)
            t = torch.zeros(2, dtype=torch.float64, device=device)
            if average is not None:
                t[0].fill_(average)
                t[1].fill_(1.0)
            self._confidence_host.pop(key, None)
            self._confidence_dev[key] = t
            if t.is_cuda:
                self._confidence_stream[key] = torch.cuda.current_stream(device)
            return t

    def _host_confidence(self, key: str) -> float | None:
        """The running confidence of ``key`` as a float, kept on the host from now on: a tensor on
        a device is read back (a call that reads its sums on the host after calls that did not)."""
        if key in self._confidence_dev:
            value = self._read_device_confidence(key)
            del self._confidence_dev[key]
            self._confidence_stream.pop(key, None)
            if value is not None:
                self._confidence_host[key] = value
        return self._confidence_host.get(key)

    def _read_device_confidence(self, key: str) -> float | None:
        """The running confidence of ``key`` kept on a device, read once its last update, on
        whichever stream, is done (None: no average yet)."""
        stream = self._confidence_stream.get(key)
        if stream is not None:
            stream.synchronize()
        value, present = self._confidence_dev[key].tolist()
        return value if present else None

    @property
    def confidence_avg(self) -> dict[str, float]:
        """The dynamic threshold's running confidence of each gate key, as floats (a copy; those
        kept on a device are read)."""
        with self._lock:
            return self._confidence_figures()

    def _confidence_figures(self) -> dict[str, float]:
        """Every key's running confidence as a float (those on a device read, and left there)."""
        out = dict(self._confidence_host)
        for key in self._confidence_dev:
            value = self._read_device_confidence(key)
            if value is not None:
                out[key] = value
        return out

    # --- stepping ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Count one optimizer step (the global scheduler does this by itself)."""
        with self._lock:
            self.step_count += 1
            self.calls_in_step = 0
            self._pending = False
            self._pending_ids = frozenset()
            for key in self._auto_in_step:
                self.auto[key].on_step()
            self._auto_in_step = set()

    def attach(self) -> None:
        """Count steps from PyTorch's global optimizer post-step hook (idempotent)."""
        self._release_after_step = False
        if self._hook_handle is None:
            self._hook_handle = register_optimizer_step_post_hook(self._on_optimizer_step)

    def detach(self) -> None:
        """Stop counting: now, or after the step a pending gated loss is waiting for."""
        if self._pending:
            self._release_after_step = True
        else:
            self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._release_after_step = False

    @property
    def attached(self) -> bool:
        return self._hook_handle is not None

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        counted = self._pending and optimizer_holds(optimizer, self._pending_ids)
        observer = self.step_observer
        if observer is not None and observer(optimizer, self._pending, counted):
            counted = True
        if counted:
            self.step()
            if self._release_after_step:
                self._remove_hook()

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        with self._lock:
            return {
                "step_count": self.step_count,
                "calls_in_step": self.calls_in_step,
                "confidence_avg": self._confidence_figures(),
                "pending": self._pending,
                "auto": {key: state.state_dict() for key, state in self.auto.items()},
            }

    def load_state_dict(self, state: dict) -> None:
        missing = {"step_count", "calls_in_step", "confidence_avg"} - set(state)
        if missing:
            raise ValueError(
                f"cggr_hook: scheduler state lacks {sorted(missing)}; pass a dict from scheduler.state_dict()"
            )
        averages = {str(k): float(v) for k, v in state["confidence_avg"].items()}
        bad = sorted(k for k, v in averages.items() if not math.isfinite(v))
        if bad:  # (checked before anything is loaded: a refused state changes nothing)
            raise ValueError(
                f"cggr_hook: scheduler state's confidence_avg of {bad} is not a finite number; pass a dict from "
                "scheduler.state_dict() (a running average of confidences is a probability)"
            )
        with self._lock:
            self.step_count = int(state["step_count"])
            self.calls_in_step = int(state["calls_in_step"])
            self._confidence_host = averages
            self._confidence_dev = {}
            self._confidence_stream = {}
            self._pending = bool(state.get("pending", False))
            self.auto = {str(k): AutoState.from_state(v) for k, v in state.get("auto", {}).items()}
            self._auto_in_step = set()
            self.generation += 1

    def reset(self) -> None:
        """Back to step 0 with no history (a fresh run)."""
        with self._lock:
            self.step_count = 0
            self.calls_in_step = 0
            self._confidence_host = {}
            self._confidence_dev = {}
            self._confidence_stream = {}
            self._pending = False
            self._pending_ids = frozenset()
            self.auto = {}
            self._auto_in_step = set()
            self.generation += 1
        if self._release_after_step:
            self._remove_hook()

    # a Scheduler inside a saved model (a CGGRLoss submodule) pickles and deep-copies as its
    # counts; the lock and any optimizer hook belong to the running process, not to the copy
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        with self._lock:  # the running confidences on a device travel as floats
            state["_confidence_host"] = self._confidence_figures()
        state["_confidence_dev"] = {}
        state["_confidence_stream"] = {}
        state["_hook_handle"] = None
        state["_release_after_step"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if "confidence_avg" in state:  # (a copy saved when the floats were the only record)
            state["_confidence_host"] = state.pop("confidence_avg")
        state.setdefault("_confidence_dev", {})
        state.setdefault("_confidence_stream", {})
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Scheduler(step_count={self.step_count}, attached={self.attached})"


def auto_key(key: str, candidates: tuple) -> str:
    """Where ``Scheduler.auto`` keeps gate ``key``'s state for ``candidates``: the key itself for
    every candidate of ``'auto'`` (as 0.1.0 saved it), else the key and the candidates."""
    if candidates == CANDIDATES:
        return key
    return key + "/" + ",".join(candidate_key(c) for c in candidates)


def optimizer_holds(optimizer: torch.optim.Optimizer, param_ids: Iterable[int]) -> bool:
    ids = param_ids if isinstance(param_ids, (set, frozenset)) else set(param_ids)
    return any(id(p) in ids for group in optimizer.param_groups for p in group["params"])
