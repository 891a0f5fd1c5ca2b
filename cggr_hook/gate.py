"""Gates: per-model state, the registry, and the cross-entropy handler that decides what is gated.

A call of ``F.cross_entropy`` is gated only when all of these hold; otherwise it is the original
function's call, untouched:

- some gate is enabled, this thread is not inside ``paused()``, and grad mode is on;
- its input traces back (``head.trace``) to a tapped training-mode forward of a gated model's LM
  head that no earlier cross entropy has consumed, through exact (widening) casts only;
- its targets are class indices (probability targets keep the plain loss, with a warning).
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import auto as auto_mod
from . import head as head_mod
from . import hf_loss
from . import patch
from . import trl_fused
from .config import GateConfig, make_config
from .loss import GatedCrossEntropy, GatedHeadCrossEntropy, LossSpec, Request, auto_figures, resolve_metrics
from .schedule import Scheduler, optimizer_holds

scheduler = Scheduler()

_lock = threading.RLock()
_gates: "weakref.WeakKeyDictionary[nn.Module, Gate]" = weakref.WeakKeyDictionary()
_local = threading.local()  # .paused: bool, .in_handler: bool
_warned: set[str] = set()

# optimizer steps after which a gate that has not yet been part of a counted step warns (the watchdog)
WATCHDOG_STEPS = 3


@dataclass(eq=False)
class _Figures:
    """One gated call's metrics, as ``metrics()`` hands them out."""

    generation: int  # the scheduler's generation then: figures from before a reset are stale
    root: "weakref.ref[nn.Module]"  # the model whose loss it was
    values: dict
    order: int = 0  # when it was recorded: metrics() without a model gives the latest model's


# each model's last gated call's figures; disable() drops them, a reset of the scheduler makes them
# stale, a collected model takes its own along
_figures: "weakref.WeakKeyDictionary[nn.Module, _Figures]" = weakref.WeakKeyDictionary()
_recorded = itertools.count()


def _paused() -> bool:
    return getattr(_local, "paused", False)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


class _InertHook:
    """What a gate's hook becomes in a pickled or deep-copied model: nothing. The copy is not gated
    (a gate belongs to the model it was enabled on), and its outputs are the model's own."""

    def __call__(self, *args: Any) -> None:
        return None


class _GateHook:
    """A hook a gate registers on the model or its head (the head's forward hook, the model's
    forward pre-hook and, for TRL, its forward hook). It lives in the module's hook tables, which
    ``pickle``, ``torch.save`` and ``copy.deepcopy`` of the model take along: there it turns into
    an ``_InertHook``, since the gate behind it (the registry, the patch) is not the model's to
    save."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class Gate:
    """The handle ``enable`` returns: one model's gate. ``remove()`` disables it."""

    def __init__(self, model: nn.Module, root: nn.Module, head: nn.Module, config: GateConfig) -> None:
        self._model = weakref.ref(model)
        self._root = weakref.ref(root)
        self.head = head  # held weakly (the property below): the head may be the model itself
        # where the head sits in the model: a wrapper that replaces it later (PEFT's
        # get_peft_model with the head in modules_to_save, or LoRA on the head) is found there
        self.head_path = head_mod.module_path(root, head) or ""
        self.config = config
        # names the gate's running confidence average in the scheduler: stable across re-enabling
        # and across processes, so gated() blocks and resumed runs keep the same average
        d_in, d_out = head_mod.head_features(head)
        self.key = f"{type(root).__name__}:{d_in}x{d_out}"
        self._param_ids = frozenset(id(p) for p in root.parameters())
        # sharded parameters (FSDP2 / DTensor) are gathered by their wrapper's own autograd hooks:
        # the gradient then takes the ordinary path through the logits and the head. Heads whose
        # output is not known to be the plain affine map take that path call by call (HeadCall.narrow).
        self.through_logits = _is_sharded(root, head)
        # what the watchdog reads: head forwards, tapped (training, grad) forwards, gated losses
        self._head_calls = self._taps = self._gated = self._gated_since_step = 0
        self._steps_unproven = 0
        self._proven = False  # a counted optimizer step followed a gated loss of this model
        # opaque to torch.compile: a compiled model breaks its graph at the head's hook, so the tap
        # is a real autograd node at run time rather than traced away. Prepended, so that no other
        # hook on the head changes the output before the tap sees it. The hooks are _GateHooks, which
        # a pickled or deep-copied model carries as inert stand-ins.
        self._head_hook = _GateHook(torch.compiler.disable(self._on_head_forward))
        self._handle = head.register_forward_hook(self._head_hook, prepend=True)
        # on the model: follows a head replaced after enable, and turns TRL's fused LM head off
        self._root_handle = root.register_forward_pre_hook(_GateHook(torch.compiler.disable(self._on_root_forward)),
                                                           with_kwargs=True)
        self._fused_handle = None  # the forward hook that rebuilds TRL's fused output (made on first use)
        self._trl_checks = [trl_fused.UNIFORM_CHECKS]  # backward passes that check TRL's loss weighs tokens equally
        self._undo_loss = hf_loss.install(root, torch.compiler.disable(self._would_gate))
        self.enabled = True
        # a model dropped without disable() takes its gate with it, and the last one the patch and
        # the optimizer hook (sweeps and notebooks re-create models all the time); nothing here
        # holds the model itself strongly, so it can be collected
        self._finalizer = weakref.finalize(root, _on_model_collected, self)
        self._finalizer.atexit = False

    @property
    def head(self) -> nn.Module | None:
        """The gated head (None once it is garbage-collected). Held weakly: the registry's entry
        for a model must not keep the model alive, and the head can be the model itself."""
        return self._head()

    @head.setter
    def head(self, module: nn.Module) -> None:
        self._head = weakref.ref(module)

    # the forward hook on the LM head
    def _on_head_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        # module is not self.head in a shallow copy of the head, which shares its hook table (deep
        # copies and pickles carry an _InertHook instead): a copy is not gated by a gate it was not
        # enabled on
        if module is not self.head:
            return None
        self._head_calls += 1
        if not (self.enabled and module.training and torch.is_grad_enabled() and not _paused()):
            return None
        if not isinstance(output, Tensor) or not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return None
        self._taps += 1
        called = head_mod.called_module(module)
        # the narrow backward only where output == F.linear(hidden, weight, bias) is known; a global
        # forward hook runs before ours and may have changed the output
        narrow = (not self.through_logits and head_mod.not_plain_reason(called) is None
                  and not torch.nn.modules.module._global_forward_hooks)
        call = head_mod.HeadCall(gate=self, head=called, hidden=args[0], output=output, narrow=narrow,
                                 weight=called.weight if narrow else None, bias=called.bias if narrow else None)
        return head_mod.tap_output(call)

    # the forward pre-hook on the model
    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        # a deep copy of the model carries this hook along: it acts on the model it was put on only
        if not (self.enabled and module is self._root() and module.training and torch.is_grad_enabled()
                and not _paused()):
            return None
        self._follow_head(module)
        if kwargs.get("fused_lm_head") is True:
            return self._unfuse(module, args, kwargs)
        return None

    def _follow_head(self, root: nn.Module) -> None:
        """Move the head's hook to the module now at the head's place, when a wrapper replaced
        the head after enable (``get_peft_model`` with ``modules_to_save=["lm_head"]``, or LoRA
        on the head): the module the loss reads is the one gated."""
        try:
            slot = root.get_submodule(self.head_path) if self.head_path else root
        except AttributeError:
            slot = None
        if slot is self.head:
            return
        if slot is None or head_mod.base_linear(slot) is None:
            _warn_once(f"moved:{id(self)}", (
                f"cggr_hook: the LM head of {type(root).__name__} at {self.head_path!r} was replaced after enable by "
                f"{type(slot).__name__}, which is not a head cggr_hook can gate: the loss is the plain one. "
                "Call cggr_hook.disable(model), then cggr_hook.enable(model, head=...) on the model as it is now"))
            return
        with _lock:
            self._handle.remove()
            self.head = slot
            self._handle = slot.register_forward_hook(self._head_hook, prepend=True)
            self.through_logits = _is_sharded(root, slot)

    def _unfuse(self, root: nn.Module, args: tuple, kwargs: dict) -> Any:
        """TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``) computes
        log-probabilities from the head's weight without calling the head or ``F.cross_entropy``:
        while this gate is active, the forward runs unfused, without labels, and ``_on_root_output``
        builds TRL's output from the gated loss of the head's logits."""
        if not trl_fused.available():
            _warn_once("trl", "cggr_hook: a fused_lm_head=True forward without trl's FusedCausalLMOutput: not gated")
            return None
        labels, shift = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift is None:
            return None
        if self._fused_handle is None:
            self._fused_handle = root.register_forward_hook(_GateHook(torch.compiler.disable(self._on_root_output)),
                                                            with_kwargs=True)
        kwargs = dict(kwargs)
        stash = tuple(kwargs.pop(k, None) for k in ("labels", "shift_labels", "num_items_in_batch"))
        kwargs["fused_lm_head"] = False
        _local.unfused = (kwargs, stash)
        return args, kwargs

    def _on_root_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending = getattr(_local, "unfused", None)
        if pending is None or pending[0] is not kwargs:
            return None
        _local.unfused = None
        return trl_fused.fused_output(output, *pending[1], sum_loss=self._sum_loss, checks_left=self._trl_checks)

    def _sum_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, bool]:
        """``F.cross_entropy(x, y, reduction='sum')`` (x (N, V) logits, y (N,)) and whether it was
        gated; a loss this gate cannot gate is the plain one, with the handler's warnings."""
        before = self._gated
        loss = torch.nn.functional.cross_entropy(x, y, reduction="sum")
        return loss, self._gated > before

    # the optimizer steps, through the scheduler's step hook
    def _refresh_params(self) -> bool:
        """Take the model's parameters again (those made after enable: LoRA's, when
        ``get_peft_model`` wrapped the model after enable); returns whether they changed."""
        root = self._root()
        if root is None:
            return False
        ids = frozenset(id(p) for p in root.parameters())
        changed = ids != self._param_ids
        self._param_ids = ids
        return changed

    def _watch(self, optimizer: torch.optim.Optimizer, counted: bool) -> None:
        """The watchdog: warn once if WATCHDOG_STEPS optimizer steps pass before any counted step
        follows a gated loss of this model, naming what was seen and the fix."""
        if self._proven or not self.enabled:
            return
        if counted and self._gated_since_step and optimizer_holds(optimizer, self._param_ids):
            self._proven = True
            return
        if _paused():
            return
        if not self._gated_since_step and not optimizer_holds(optimizer, self._param_ids):
            return  # another model's optimizer (a critic, a discriminator) with no gated loss waiting
        self._steps_unproven += 1
        if self._steps_unproven >= WATCHDOG_STEPS:
            self._proven = True  # once
            _warn_once(f"watchdog:{id(self)}", self._diagnosis())

    def _diagnosis(self) -> str:
        root = self._root()
        name = type(root).__name__ if root is not None else "the model"
        head = f"{self.head_path or '(the model itself)'} ({type(self.head).__name__})"
        n = self._steps_unproven
        if self._gated:
            what = (f"{self._gated} gated loss(es) were computed, but no optimizer that stepped holds a parameter "
                    f"of {name}: cggr_hook.enable was given a module the optimizer does not see (a copy, or the model "
                    "before a wrapper replaced its parameters), so the curriculum never advances. Fix: call "
                    "cggr_hook.enable on the model whose parameters the optimizer updates")
        elif self._taps:
            what = (f"its LM head {head} ran in training forwards, yet no loss was computed with "
                    "torch.nn.functional.cross_entropy on its logits: a custom or fused loss (a fused linear cross "
                    "entropy kernel, a loss written by hand) or a loss on changed logits (a soft-cap, a scale) takes "
                    "the plain path. Fix: compute the loss with F.cross_entropy or nn.CrossEntropyLoss on the head's "
                    "logits, or use cggr_hook.CGGRLoss on them")
        elif self._head_calls:
            what = (f"its LM head {head} ran only in eval mode or without grad. cggr_hook gates training-mode "
                    "forwards with grad enabled: call model.train() before training")
        else:
            what = (f"its LM head {head} was never called: a fused loss path computes the logits from the head's "
                    "weight without calling the module, the head was replaced after enable by something that is "
                    "not a head, or it is not the module that produces the logits. Fix: call cggr_hook.enable on "
                    "the model as it is trained (after wrapping it), pass head= the module whose output is the "
                    "logits, or compute the loss with cggr_hook.CGGRLoss")
        return (f"cggr_hook: {n} optimizer steps with a gate enabled on {name} and none followed a gated loss: {what}. "
                "Until then every loss is the plain one (this warning is given once)")

    def _record_metrics(self, values: dict) -> None:
        """A gated call's figures, from the loss (``Request.on_metrics``)."""
        root = self._root()
        if root is None:
            return
        with _lock:
            _figures[root] = _Figures(scheduler.generation, self._root, dict(values), next(_recorded))

    def _runs_plain(self) -> bool:
        """Whether ``min_tokens_ratio='auto'`` runs the current step as the plain loss."""
        return (self.config.min_tokens_ratio == "auto"
                and scheduler.auto_state(self.key).candidate() == auto_mod.PLAIN)

    def _would_gate(self, logits: Tensor) -> bool:
        """Whether a cross entropy on these logits would be gated now (Hugging Face loss fast path)."""
        node = getattr(logits, "grad_fn", None)
        return (self.enabled and torch.is_grad_enabled() and not _paused() and logits.device.type != "meta"
                and _gates.get(self._root()) is self and isinstance(node, head_mod.HeadTap._backward_cls)
                and not node.call.consumed and node.call.gate is self and not self._runs_plain())

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    def remove(self) -> None:
        """Disable this gate (``cggr_hook.disable(model)``)."""
        root = self._root()
        if root is not None:
            disable(root)
        else:
            self._detach()

    def _detach(self) -> None:
        self.enabled = False
        self._finalizer.detach()
        self._handle.remove()
        self._root_handle.remove()
        if self._fused_handle is not None:
            self._fused_handle.remove()
            self._fused_handle = None
        root = self._root()
        if root is not None:
            # copies of the head (or the model) made inside the model after enable carry the hooks
            # along, as the hook itself (a shallow copy) or as its inert stand-in (a deep copy: PEFT's
            # modules_to_save): take them off too, so nothing of the gate is left
            for m in root.modules():
                _remove_hooks(m, lambda fn: fn is self._head_hook or isinstance(fn, _InertHook))
        if self._undo_loss is not None:
            self._undo_loss()
            self._undo_loss = None

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "removed"
        if self.head is None:
            return f"Gate(collected, {state}, {self.config})"
        d_in, d_out = head_mod.head_features(self.head)
        return f"Gate({type(self.head).__name__}({d_in} -> {d_out}), {state}, {self.config})"


def _live_gates() -> list[Gate]:
    """The gates of models still alive (a collected model's entry may linger until its weak
    reference's callback has run)."""
    return list(_gates.values())


def _uninstall_if_unused() -> None:
    """With no gate left: the original ``F.cross_entropy`` back, and the optimizer hook gone (after
    the step a pending gated loss waits for)."""
    if not _live_gates():
        patch.uninstall()
        scheduler.detach()


def _remove_hooks(module: nn.Module, match: Any) -> None:
    """Remove the forward hooks and forward pre-hooks of ``module`` for which ``match(fn)`` holds,
    with their entries in the tables that record how each hook is called."""
    for table, extras in ((module._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
                          (module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",))):
        for key in [k for k, fn in table.items() if match(fn)]:
            del table[key]
            for name in extras:
                getattr(module, name, {}).pop(key, None)


def _on_model_collected(gate: Gate) -> None:
    """A gated model was garbage-collected without ``disable``: what ``disable(model)`` would have
    done. Runs from the garbage collector, at any allocation, so it only takes the (reentrant)
    lock and undoes; ``enable`` registers a gate before it installs anything, so this never sees
    an empty registry while a gate is being added."""
    with _lock:
        gate._detach()
        _uninstall_if_unused()


def _is_sharded(root: nn.Module, head: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    if isinstance(getattr(head_mod.base_linear(head), "weight", None), DTensor):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in root.modules())


# --------------------------------------------------------------------------------------------------
# enable / disable
# --------------------------------------------------------------------------------------------------
def enable(model: nn.Module, config: GateConfig | None = None, *, head: nn.Module | str | None = None,
           preset: str | None = None, **options: Any) -> Gate:
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
    with _lock:
        existing = _gate_for(root)
        if preset is not None:
            cfg = make_config(config, options, preset)
        else:
            cfg = make_config(config if config is not None else (existing.config if existing else None), options)
        if existing is not None:
            if existing._root() is not None:
                existing._follow_head(existing._root())  # a wrapper may have replaced the head since
            if head is not None and head_mod.find_head(root, head) is not existing.head:
                raise ValueError(
                    "cggr_hook.enable: this model is already gated on another head; "
                    "call cggr_hook.disable(model) first to change head="
                )
            existing.config = cfg
            return existing
        lm_head = head_mod.find_head(root, head)  # raises before anything is installed
        gate = Gate(model, root, lm_head, cfg)
        _gates[root] = gate  # registered first: a collected model's clean-up then sees this gate
        try:
            patch.install(_handler_for_patch())
            scheduler.step_observer = _observe_step
            scheduler.attach()
        except BaseException:
            _gates.pop(root, None)
            gate._detach()
            _uninstall_if_unused()
            raise
        return gate


def disable(model: nn.Module | None = None) -> None:
    """Remove ``model``'s gate (every gate when None), and its figures from ``metrics()``. With no
    gate left, ``torch.nn.functional.cross_entropy`` is the original object again."""
    _disable(model, keep_figures=False)


def _disable(model: nn.Module | None, keep_figures: bool) -> None:
    with _lock:
        if model is None:
            targets = list(_gates.keys())
            if not keep_figures:
                _figures.clear()
        else:
            g = _gate_for(head_mod.unwrap(model))
            targets = [r for r in [g._root() if g is not None else None] if r is not None]
            if not keep_figures:
                for root in targets:
                    _figures.pop(root, None)
        for root in targets:
            gate = _gates.pop(root, None)
            if gate is not None:
                gate._detach()
        _uninstall_if_unused()


def _observe_step(optimizer: torch.optim.Optimizer, pending: bool, counted: bool) -> bool:
    """Every optimizer step while a gate is enabled (the scheduler's step hook). Returns True to
    count a step the scheduler did not: a gated loss is pending and the optimizer holds parameters
    the gated model gained after enable (``get_peft_model`` wrapping the model afterwards). Then
    feeds each gate's watchdog."""
    with _lock:
        gates = [g for g in _gates.values() if g.enabled]
    extra = False
    if pending and not counted:
        for g in gates:
            if g._gated_since_step and g._refresh_params() and optimizer_holds(optimizer, g._param_ids):
                extra = True
    for g in gates:
        g._watch(optimizer, counted or extra)
    if counted or extra:
        for g in gates:
            g._gated_since_step = 0
    return extra


def gate_of(model: nn.Module) -> Gate | None:
    with _lock:
        return _gate_for(head_mod.unwrap(model))


def _gate_for(root: nn.Module) -> Gate | None:
    """The gate of ``root``: its own, or that of the same model wrapped or unwrapped (a gate enabled
    on the base model before ``get_peft_model`` wrapped it is the PeftModel's gate too): a gate
    whose root contains ``root`` or is contained in it, and whose head is inside ``root``."""
    own = _gates.get(root)
    if own is not None:
        return own
    for other, g in list(_gates.items()):
        if _contains(root, g.head) and (_contains(root, other) or _contains(other, root)):
            return g
    return None


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Plain loss inside the block (this thread), whatever is enabled."""
    prev = _paused()
    _local.paused = True
    try:
        yield
    finally:
        _local.paused = prev


@contextlib.contextmanager
def gated(model: nn.Module | None = None, **options: Any) -> Iterator[Gate | None]:
    """Gating inside the block.

    With a model: enabled (with ``options``) inside, and its previous state (disabled, or enabled
    with its previous options) restored on exit, exceptions included; the block's figures stay in
    ``metrics()`` after it, since its loss's backward and optimizer step usually come after the
    block. Without: every enabled gate is active inside the block, even within an outer ``paused()``.
    """
    prev_paused = _paused()
    prev_config = None
    if model is not None:
        existing = gate_of(model)
        prev_config = existing.config if existing is not None else None
        gate = enable(model, **options)
    else:
        if options:
            raise ValueError("cggr_hook.gated: options need a model: gated(model, **options)")
        gate = None
    _local.paused = False
    try:
        yield gate
    finally:
        _local.paused = prev_paused
        if model is not None:
            if prev_config is None:
                _disable(model, keep_figures=True)
            else:
                enable(model, config=prev_config)


def metrics(model: nn.Module | None = None) -> dict:
    """The figures of ``model``'s last gated call (of any gated model's when None); empty before the
    first, after ``disable()`` and after ``scheduler.reset()`` or ``load_state_dict()``.

    Keys: ``step`` (the optimizer step the loss belongs to, counting from 1: ``scheduler.step_count``
    once that step is taken, and the Hugging Face Trainer's ``global_step`` when it logs),
    ``token_ratio``, ``tokens_selected``, ``tokens_total``, ``avg_confidence``, ``avg_entropy``,
    ``avg_difficulty``, ``selection``, ``scoring``.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"cggr_hook.metrics: model must be the torch.nn.Module given to enable(), got "
                         f"{type(model).__name__}; or call metrics() for the last gated call of any model")
    with _lock:
        if model is None:
            record = max(_figures.values(), key=lambda r: r.order, default=None)
        else:
            record = _figures.get(head_mod.unwrap(model))
        if record is None or record.generation != scheduler.generation or record.root() is None:
            return {}
        values = record.values
    # averages left on their way from the device are waited for outside the lock, so a reader
    # never holds up a gated call that wants to record its own figures
    resolved = resolve_metrics(values)
    if resolved is not values:
        with _lock:
            if record.values is values:  # keep them read; a newer call has a record of its own
                record.values = resolved
    return dict(resolved)


def scalars(model: nn.Module | None = None, prefix: str = "cggr/") -> dict:
    """The numbers of ``metrics(model)`` under ``prefix``, for a logger (empty when there are none):

        for tag, value in cggr_hook.scalars(model).items(): writer.add_scalar(tag, value, step)
        wandb.log(cggr_hook.scalars(model), step=step)

    ``step`` is left out (the logger has its own), and so are ``selection`` and ``scoring``, which
    are options, not figures; every numeric figure is in, importance sampling's included.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"cggr_hook.scalars: prefix={prefix!r} must be a str, e.g. 'cggr/' or ''")
    return as_scalars(metrics(model), prefix)


def as_scalars(figures: dict, prefix: str = "cggr/") -> dict:
    """The numeric figures of a ``metrics()`` dict but its ``step``, keys under ``prefix``."""
    return {prefix + k: v for k, v in figures.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------------
# the cross-entropy handler
# --------------------------------------------------------------------------------------------------
def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and is_fake(t)


def _bind(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: Any = None,
          ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
          label_smoothing: float = 0.0) -> tuple:
    return input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing


def _handle_cross_entropy(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if (getattr(_local, "in_handler", False) or not _gates or _paused() or not torch.is_grad_enabled()):
        return wrapped(*args, **kwargs)
    if args and _is_fake(args[0]):
        # torch.compile is tracing with fake tensors: no autograd graph to trace back to the head.
        # Breaking the graph here makes the call run eagerly, where it can be gated.
        raise torch._dynamo.exc.Unsupported("cggr_hook: a cross entropy runs eagerly while a gate is enabled")
    _local.in_handler = True
    try:
        gated_loss = _gated_call(args, kwargs)
        return gated_loss if gated_loss is not None else wrapped(*args, **kwargs)
    finally:
        _local.in_handler = False


def _gated_call(args: tuple, kwargs: dict) -> Tensor | None:
    """The gated loss of this cross-entropy call, or None for the plain one."""
    try:
        x, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing = _bind(*args, **kwargs)
    except TypeError:
        return None  # let the original report the bad call
    if not isinstance(x, Tensor) or not isinstance(target, Tensor) or x.grad_fn is None or x.dim() < 1:
        return None
    if x.device.type == "meta":
        return None  # no values to score: the original gives the meta result it gives ungated
    class_dim = 0 if x.dim() == 1 else 1
    tr = head_mod.trace(x, class_dim)
    if tr is None:
        _warn_not_traced(x)
        return None
    call = tr.call
    gate: Gate = call.gate
    if call.consumed or not gate.enabled or x.device != call.output.device:
        return None
    if target.is_floating_point() and tuple(target.shape) == tuple(x.shape):
        _warn_once("soft", "cggr_hook: cross_entropy with probability targets is not gated; the plain loss is used")
        return None
    if not tr.exact:
        _warn_once("cast", "cggr_hook: the loss input is a lossy cast of the LM head's logits; the plain loss is used")
        return None
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)

    # validate before any work
    V = x.shape[class_dim]
    expected = tuple(x.shape[:class_dim]) + tuple(x.shape[class_dim + 1:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"cggr_hook: target of shape {tuple(target.shape)} does not match input of shape {tuple(x.shape)}; "
            f"cross_entropy needs target of shape {expected} (one class index per row of logits)"
        )
    if (target.dtype != torch.long or target.device != x.device) and not _original_accepts_target(x, target):
        return None  # the original raises its own error, as it does without the gate
    spec = LossSpec(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, weight=weight)
    spec.check(V)
    if gate._runs_plain():
        # min_tokens_ratio='auto' runs this step as the plain loss: the original function, whose
        # optimizer step still counts (and times the plain candidate)
        scheduler.plain_call(gate.key, gate._param_ids)
        gate._record_metrics(dict(step=scheduler.step_count + 1, token_ratio=1.0, selection="plain",
                                  scoring=gate.config.scoring,
                                  **auto_figures(scheduler.auto_state(gate.key), auto_mod.PLAIN)))
        call.gate._gated_since_step += 1  # the watchdog: this loss is the gate's own choice
        return None

    out = call.output
    if gate.through_logits or not call.narrow:
        # gated loss on the loss input itself; its gradient flows back through the logits' graph
        xr = x.movedim(class_dim, -1) if class_dim != x.dim() - 1 else x
        seq = (tr.rows // out.shape[-2], out.numel() // (out.shape[-2] * V)) if out.dim() >= 3 else None
        req = Request(gate.config, scheduler, gate.key, spec, seq=seq, on_metrics=gate._record_metrics,
                      param_ids=gate._param_ids)
        loss = GatedCrossEntropy.apply(xr, target.to(device=x.device, dtype=torch.long), req, False)
        _consume(call)
        return loss
    n_head_rows = out.numel() // max(V, 1)
    t_head = torch.full((n_head_rows,), ignore_index, dtype=torch.long, device=out.device)
    t_head[tr.rows] = target.reshape(-1).to(device=out.device, dtype=torch.long)
    seq = out.shape[-2] if out.dim() >= 3 else None
    req = Request(gate.config, scheduler, gate.key, spec, seq=seq, on_metrics=gate._record_metrics,
                  param_ids=gate._param_ids)
    loss = GatedHeadCrossEntropy.apply(call.hidden, call.weight, call.bias, out.detach(), t_head, tr.rows,
                                       target.shape, req)
    _consume(call)
    return loss


_accepted_targets: dict = {}


def _original_accepts_target(x: Tensor, target: Tensor) -> bool:
    """Whether ``F.cross_entropy`` itself takes class-index targets of ``target``'s dtype and device
    for input like ``x``: a gated loss must accept and reject what the plain one does (int32 targets
    that trained under the gate would otherwise fail in the evaluation loop). Which dtypes torch
    takes depends on the device and on the input's rank (uint8 for (N, V) input on the CPU, not
    for (B, V, T)), so the original is asked once per kind of call, on a one-row input of two
    classes, and the answer kept."""
    key = (target.dtype, str(target.device), x.dtype, str(x.device), x.dim())
    accepted = _accepted_targets.get(key)
    if accepted is None:
        shape = (1, 2) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (2,)
        t_shape = (1,) + shape[2:] if x.dim() >= 2 else ()
        try:
            with torch.no_grad():
                patch.original_cross_entropy()(x.new_zeros(shape), target.new_zeros(t_shape))
            accepted = True
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            accepted = False
        _accepted_targets[key] = accepted
    return accepted


def _consume(call: head_mod.HeadCall) -> None:
    """Later cross entropies on this head call get the plain loss; drop what the tap held."""
    call.consumed = True
    call.hidden = call.output = call.weight = call.bias = None
    call.gate._gated += 1
    call.gate._gated_since_step += 1


_MATMULS = ("MmBackward", "AddmmBackward", "BmmBackward", "BaddbmmBackward", "MvBackward", "LinearBackward")


def _warn_not_traced(x: Tensor) -> None:
    """A loss input that does not trace back to a head's logits: warn when a tap lies behind it
    through other operations (the loss is plain)."""
    ops = head_mod.tap_behind(x)
    if ops is None:
        return
    if any(m in ops for m in _MATMULS):
        _warn_once("ops:" + ops, (
            f"cggr_hook: this cross_entropy input is computed from the gated module's output through further layers "
            f"({ops}): the module gated as the LM head is not the one that produces the logits, and the loss is the "
            "plain one. Pass head= the module whose output is the logits; if the logits come from a weight without "
            "a head module (h @ wte.weight.T), add an nn.Linear head that shares the weight or use cggr_hook.CGGRLoss"))
        return
    _warn_once("ops:" + ops, (
        f"cggr_hook: this cross_entropy input is computed from the LM head's logits through {ops}, "
        "which is not a reshape, slice or widening cast; it gets the plain loss. Gating covers the "
        "head's own logits (a soft-capped or rescaled loss input is not gated); if the gated module is not "
        "the one that produces the logits, pass head= the one that does"))


_eager_handler: Any = None


def _handler_for_patch() -> Any:
    """The handler, opaque to torch.compile: where a compiled region calls cross entropy, the graph
    breaks and the handler runs eagerly on real tensors. Made on first enable, because
    ``torch.compiler.disable`` imports torch._dynamo (and triton), which importing cggr_hook must not."""
    global _eager_handler
    if _eager_handler is None:
        _eager_handler = torch.compiler.disable(_handle_cross_entropy)
    return _eager_handler
