"""The registry: every gate of the process and what they share, behind ``enable``, ``disable``,
``gated``, ``paused``, ``metrics`` and ``scalars``.

One ``Registry`` (``registry``) owns that state: the gates by model, each model's last gated call's
figures, this thread's pause flag, the warnings given once, the patch of ``F.cross_entropy``
(installed by the first ``enable``, removed with the last gate) with its handler (``route.py``), and
the global scheduler's optimizer-step hook. ``registry.reset()`` puts all of it back as after import.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import capture, patch
from . import figures as figures_mod
from . import head as head_mod
from . import trace as trace_mod
from .config import GateConfig, make_config
from .gate import Gate
from .pipeline import PendingTargetCheck, ValidShare
from .route import Route
from .schedule import Scheduler, optimizer_holds


@dataclass(eq=False)
class _Figures:
    """One gated call's figures, as ``metrics()`` hands them out."""

    generation: int  # the scheduler's generation then: figures from before a reset are stale
    root: weakref.ref[nn.Module]  # the model whose loss it was
    values: dict
    order: int = 0  # when it was recorded: metrics() without a model gives the latest model's


class Registry:
    """Every gate of the process and the state they share (the module docstring)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.lock = threading.RLock()
        self._gates: weakref.WeakKeyDictionary[nn.Module, Gate] = weakref.WeakKeyDictionary()
        self._ids = itertools.count(1)
        self._local = threading.local()  # .paused: this thread is inside paused()
        self._warned: set[str] = set()
        # each model's last gated call's figures; disable() drops them, a reset of the scheduler makes
        # them stale, a collected model takes its own along
        self._figures: weakref.WeakKeyDictionary[nn.Module, _Figures] = weakref.WeakKeyDictionary()
        self._recorded = itertools.count()
        self._handler: Any = None  # the route, opaque to torch.compile (made on first enable)

    # --- what the gates and the route read ----------------------------------------------------------
    def paused_here(self) -> bool:
        """Whether this thread is inside ``paused()``."""
        return getattr(self._local, "paused", False)

    def any_gate(self) -> bool:
        return bool(self._gates)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def gate_with_id(self, gate_id: int | None) -> Gate | None:
        """The registered gate ``Gate.id == gate_id`` (what a head's tap holds), or None."""
        with self.lock:
            return next((g for g in self._gates.values() if g.id == gate_id), None)

    def claim_plain(self, x: Tensor) -> Gate | None:
        """The gate whose plain step produced the logits behind the cross-entropy input ``x``
        (``trace.claim_plain``: once per forward), or None."""
        gate_id = trace_mod.claim_plain(x)
        return None if gate_id is None else self.gate_with_id(gate_id)

    def holds(self, gate: Gate) -> bool:
        """Whether ``gate`` is its model's registered gate."""
        return self._gates.get(gate.root()) is gate  # pyright: ignore[reportArgumentType]

    def record(self, gate: Gate, values: dict) -> None:
        """A gated call's figures (``figures.py``), as ``metrics()`` will give them."""
        root = gate.root()
        if root is None:
            return
        with self.lock:
            self._figures[root] = _Figures(self.scheduler.generation, gate.root, dict(values), next(self._recorded))

    # --- enable / disable ---------------------------------------------------------------------------
    def enable(
        self,
        model: nn.Module,
        config: GateConfig | None = None,
        *,
        head: nn.Module | str | None = None,
        preset: str | None = None,
        **options: Any,
    ) -> Gate:
        """Gate ``model``'s loss from now on; returns its ``Gate`` (``.remove()`` undoes it).

        Finds the LM head (``head=`` overrides), registers a forward hook on it, wraps
        ``torch.nn.functional.cross_entropy`` and starts counting optimizer steps. Calling it again on
        the same model updates the options and returns the same gate. Options are GateConfig's;
        ``preset`` names a configuration to start from instead of the defaults (``"seed"``: the
        original package's).
        """
        if not isinstance(model, nn.Module):
            raise ValueError(f"cggr_hook.enable: model must be a torch.nn.Module, got {type(model).__name__}")
        root = head_mod.unwrap(model)
        with self.lock:
            existing = self._gate_for(root)
            if preset is not None:
                cfg = make_config(config, options, preset)
            else:
                cfg = make_config(config if config is not None else (existing.config if existing else None), options)
            if existing is not None:
                existing_root = existing.root()
                if existing_root is not None:
                    existing.follow_head(existing_root)  # a wrapper may have replaced the head since
                if head is not None and head_mod.find_head(root, head) is not existing.head:
                    raise ValueError(
                        "cggr_hook.enable: this model is already gated on another head; "
                        "call cggr_hook.disable(model) first to change head="
                    )
                existing.config = cfg
                return existing
            lm_head = head_mod.find_head(root, head)  # raises before anything is installed
            gate = Gate(self, next(self._ids), model, root, lm_head, cfg)
            self._gates[root] = gate  # registered first: a collected model's clean-up then sees this gate
            try:
                patch.install(self._route())
                self.scheduler.step_observer = self.observe_step
                self.scheduler.attach()
            except BaseException:
                self._gates.pop(root, None)
                gate.detach()
                self._uninstall_if_unused()
                raise
            return gate

    def disable(self, model: nn.Module | None = None) -> None:
        """Remove ``model``'s gate (every gate when None), and its figures from ``metrics()``. With no
        gate left, ``torch.nn.functional.cross_entropy`` is the original object again. Then the
        target checks that gated calls left pending (``pipeline.PendingTargetCheck``) are done: a
        bad target of the last calls raises its ValueError here, the gates already removed."""
        self._disable(model, keep_figures=False)
        PendingTargetCheck.poll(wait=True)

    def remove(self, gate: Gate, check_targets: bool = True) -> None:
        """``gate.remove()``: disable its model (``check_targets=False``: without the pending
        target checks, for a ``with`` block that an exception is leaving: theirs must not replace it)."""
        root = gate.root()
        if root is not None:
            self._disable(root, keep_figures=False)
        else:
            gate.detach()
        if check_targets:
            PendingTargetCheck.poll(wait=True)

    def _disable(self, model: nn.Module | None, keep_figures: bool) -> None:
        with self.lock:
            if model is None:
                targets = list(self._gates.keys())
                if not keep_figures:
                    self._figures.clear()
            else:
                g = self._gate_for(head_mod.unwrap(model))
                targets = [r for r in [g.root() if g is not None else None] if r is not None]
                if not keep_figures:
                    for root in targets:
                        self._figures.pop(root, None)
            for root in targets:
                gate = self._gates.pop(root, None)
                if gate is not None:
                    gate.detach()
            self._uninstall_if_unused()

    def _uninstall_if_unused(self) -> None:
        """With no gate left: the original ``F.cross_entropy`` back, and the optimizer hook gone (after
        the step a pending gated loss waits for), and the captured CUDA graphs dropped."""
        if not list(self._gates.values()):  # a collected model's entry may linger until its callback ran
            patch.uninstall()
            self.scheduler.detach()
            capture.clear()

    def on_model_collected(self, gate: Gate) -> None:
        """A gated model was garbage-collected without ``disable``: what ``disable(model)`` would have
        done. Runs from the garbage collector, at any allocation, so it only takes the (reentrant)
        lock and undoes; ``enable`` registers a gate before it installs anything, so this never sees
        an empty registry while a gate is being added."""
        with self.lock:
            gate.detach()
            self._uninstall_if_unused()

    def _route(self) -> Any:
        """The patch's handler, opaque to torch.compile: where a compiled region calls cross entropy,
        the graph breaks and the handler runs eagerly on real tensors. Made on first enable, because
        ``torch.compiler.disable`` imports torch._dynamo (and triton), which importing cggr_hook must
        not."""
        if self._handler is None:
            self._handler = torch.compiler.disable(Route(self).__call__)
        return self._handler

    def observe_step(self, optimizer: torch.optim.Optimizer, pending: bool, counted: bool) -> bool:
        """Every optimizer step while a gate is enabled (the scheduler's step hook). Returns True to
        count a step the scheduler did not: a gated loss is pending and the optimizer holds parameters
        the gated model gained after enable (``get_peft_model`` wrapping the model afterwards). Then
        feeds each gate's watchdog."""
        with self.lock:
            gates = [g for g in self._gates.values() if g.enabled]
        extra = False
        if pending and not counted:
            for g in gates:
                if g.gated_since_step and g.refresh_params() and optimizer_holds(optimizer, g.param_ids):
                    extra = True
        for g in gates:
            g.watch(optimizer, counted or extra)
            g.after_step(optimizer)
        if counted or extra:
            for g in gates:
                g.step_counted()
        return extra

    # --- looking gates up ---------------------------------------------------------------------------
    def gate_of(self, model: nn.Module) -> Gate | None:
        """The gate of ``model`` (wrapped or not), or None."""
        with self.lock:
            return self._gate_for(head_mod.unwrap(model))

    def _gate_for(self, root: nn.Module) -> Gate | None:
        """The gate of ``root``: its own, or that of the same model wrapped or unwrapped (a gate enabled
        on the base model before ``get_peft_model`` wrapped it is the PeftModel's gate too): a gate
        whose root contains ``root`` or is contained in it, and whose head is inside ``root``."""
        own = self._gates.get(root)
        if own is not None:
            return own
        for other, g in list(self._gates.items()):
            if _contains(root, g.head) and (_contains(root, other) or _contains(other, root)):
                return g
        return None

    # --- the context managers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Plain loss inside the block (this thread), whatever is enabled."""
        prev = self.paused_here()
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = prev

    @contextlib.contextmanager
    def gated(self, model: nn.Module | None = None, **options: Any) -> Iterator[Gate | None]:
        """Gating inside the block.

        With a model: enabled (with ``options``) inside, and its previous state (disabled, or enabled
        with its previous options) restored on exit, exceptions included; the block's figures stay in
        ``metrics()`` after it, since its loss's backward and optimizer step usually come after the
        block. Without: every enabled gate is active inside the block, even within an outer ``paused()``.
        """
        prev_paused = self.paused_here()
        prev_config = None
        if model is not None:
            existing = self.gate_of(model)
            prev_config = existing.config if existing is not None else None
            gate = self.enable(model, **options)
        else:
            if options:
                raise ValueError("cggr_hook.gated: options need a model: gated(model, **options)")
            gate = None
        self._local.paused = False
        try:
            yield gate
        finally:
            self._local.paused = prev_paused
            if model is not None:
                if prev_config is None:
                    self._disable(model, keep_figures=True)
                else:
                    self.enable(model, config=prev_config)

    # --- the figures --------------------------------------------------------------------------------
    def metrics(self, model: nn.Module | None = None) -> dict:
        """The figures of ``model``'s last gated call (of any gated model's when None); empty before the
        first, after ``disable()`` and after ``scheduler.reset()`` or ``load_state_dict()``.

        Keys: ``step`` (the optimizer step the loss belongs to, counting from 1: ``scheduler.step_count``
        once that step is taken, and the Hugging Face Trainer's ``global_step`` when it logs),
        ``token_ratio``, ``tokens_selected``, ``tokens_total``, ``avg_confidence``, ``avg_entropy``,
        ``avg_difficulty``, ``selection``, ``scoring``.
        """
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(
                f"cggr_hook.metrics: model must be the torch.nn.Module given to enable(), got "
                f"{type(model).__name__}; or call metrics() for the last gated call of any model"
            )
        with self.lock:
            if model is None:
                record = max(self._figures.values(), key=lambda r: r.order, default=None)
            else:
                record = self._figures.get(head_mod.unwrap(model))
            if record is None or record.generation != self.scheduler.generation or record.root() is None:
                return {}
            values = record.values
        # figures left on their way from the device are waited for outside the lock, so a reader
        # never holds up a gated call that wants to record its own figures
        resolved = figures_mod.resolve(values)
        PendingTargetCheck.poll(wait=True)  # the counts are in by now: a bad target raises here
        if resolved is not values:
            with self.lock:
                if record.values is values:  # keep them read; a newer call has a record of its own
                    record.values = resolved
        return dict(resolved)

    def scalars(self, model: nn.Module | None = None, prefix: str = "cggr/") -> dict:
        """The numbers of ``metrics(model)`` under ``prefix``, for a logger (empty when there are none):

            for tag, value in cggr_hook.scalars(model).items(): writer.add_scalar(tag, value, step)
            wandb.log(cggr_hook.scalars(model), step=step)

        ``step`` is left out (the logger has its own), and so are ``selection`` and ``scoring``, which
        are options, not figures; every numeric figure is in, importance sampling's included.
        """
        if not isinstance(prefix, str):
            raise ValueError(f"cggr_hook.scalars: prefix={prefix!r} must be a str, e.g. 'cggr/' or ''")
        return figures_mod.as_scalars(self.metrics(model), prefix)

    # --- tests --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after import: every gate disabled (``F.cross_entropy`` the original
        object again), no figures, the scheduler at step 0, and every warning given once may be given
        again (a test's clean slate)."""
        PendingTargetCheck.clear()
        ValidShare.clear()
        self.disable()
        self.scheduler.reset()
        with self.lock:
            self._warned.clear()


def _contains(outer: nn.Module, inner: nn.Module | None) -> bool:
    return any(m is inner for m in outer.modules())


scheduler = Scheduler()
registry = Registry(scheduler)

enable = registry.enable
disable = registry.disable
gated = registry.gated
paused = registry.paused
metrics = registry.metrics
scalars = registry.scalars
gate_of = registry.gate_of
