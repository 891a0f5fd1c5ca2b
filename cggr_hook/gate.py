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
import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import head as head_mod
from . import hf_loss
from . import patch
from .config import GateConfig, make_config
from .loss import GatedCrossEntropy, GatedHeadCrossEntropy, LossSpec, Request, resolve_metrics
from .schedule import Scheduler

scheduler = Scheduler()

_lock = threading.RLock()
_gates: "weakref.WeakKeyDictionary[nn.Module, Gate]" = weakref.WeakKeyDictionary()
_local = threading.local()  # .paused: bool, .in_handler: bool
_warned: set[str] = set()


@dataclass(eq=False)
class _Figures:
    """One gated call's metrics, as ``metrics()`` hands them out."""

    generation: int  # the scheduler's generation then: figures from before a reset are stale
    root: "weakref.ref[nn.Module]"  # the model whose loss it was
    values: dict


# the last gated call's figures, per model and of any model; disable() drops them, a reset of the
# scheduler makes them stale, a collected model takes its own along
_figures: "weakref.WeakKeyDictionary[nn.Module, _Figures]" = weakref.WeakKeyDictionary()
_last_figures: _Figures | None = None


def _paused() -> bool:
    return getattr(_local, "paused", False)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


class _InertHook:
    """What a gated head's forward hook becomes in a pickled or deep-copied model: nothing. The
    copy is not gated (a gate belongs to the model it was enabled on), and its outputs are the
    model's own."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        return None


class _HeadHook:
    """The forward hook a gate registers on its head. It lives in the head's ``_forward_hooks``,
    which ``pickle``, ``torch.save`` and ``copy.deepcopy`` of the model take along: there it turns
    into an ``_InertHook``, since the gate behind it (the registry, the patch) is not the model's
    to save."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self._fn(module, args, output)

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class Gate:
    """The handle ``enable`` returns: one model's gate. ``remove()`` disables it."""

    def __init__(self, model: nn.Module, root: nn.Module, head: nn.Linear, config: GateConfig) -> None:
        self._model = weakref.ref(model)
        self._root = weakref.ref(root)
        self.head = head
        self.config = config
        # names the gate's running confidence average in the scheduler: stable across re-enabling
        # and across processes, so gated() blocks and resumed runs keep the same average
        self.key = f"{type(root).__name__}:{head.in_features}x{head.out_features}"
        self._param_ids = frozenset(id(p) for p in root.parameters())
        # sharded parameters (FSDP2 / DTensor) are gathered by their wrapper's own autograd hooks:
        # the gradient then takes the ordinary path through the logits and the head
        self.through_logits = _is_sharded(root, head)
        # opaque to torch.compile: a compiled model breaks its graph at the head's hook, so the tap
        # is a real autograd node at run time rather than traced away
        self._handle = head.register_forward_hook(_HeadHook(torch.compiler.disable(self._on_head_forward)))
        self._undo_loss = hf_loss.install(root, torch.compiler.disable(self._would_gate))
        self.enabled = True
        # a model dropped without disable() takes its gate with it, and the last one the patch and
        # the optimizer hook (sweeps and notebooks re-create models all the time); nothing here
        # holds the model itself strongly, so it can be collected
        self._finalizer = weakref.finalize(root, _on_model_collected, self)
        self._finalizer.atexit = False

    # the forward hook on the LM head
    def _on_head_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        # module is not self.head in a shallow copy of the head, which shares its hook table (deep
        # copies and pickles carry an _InertHook instead): a copy is not gated by a gate it was not
        # enabled on
        if not (self.enabled and module is self.head and module.training and torch.is_grad_enabled()
                and not _paused()):
            return None
        if not isinstance(output, Tensor) or not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return None
        call = head_mod.HeadCall(gate=self, head=module, hidden=args[0], output=output)
        return head_mod.tap_output(call)

    def _record_metrics(self, values: dict) -> None:
        """A gated call's figures, from the loss (``Request.on_metrics``)."""
        global _last_figures
        root = self._root()
        if root is None:
            return
        record = _Figures(scheduler.generation, self._root, dict(values))
        with _lock:
            _figures[root] = record
            _last_figures = record

    def _would_gate(self, logits: Tensor) -> bool:
        """Whether a cross entropy on these logits would be gated now (Hugging Face loss fast path)."""
        node = getattr(logits, "grad_fn", None)
        return (self.enabled and torch.is_grad_enabled() and not _paused() and logits.device.type != "meta"
                and _gates.get(self._root()) is self and isinstance(node, head_mod.HeadTap._backward_cls)
                and not node.call.consumed and node.call.gate is self)

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
        if self._undo_loss is not None:
            self._undo_loss()
            self._undo_loss = None

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "removed"
        return f"Gate({type(self.head).__name__}({self.head.in_features} -> {self.head.out_features}), {state}, {self.config})"


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


def _on_model_collected(gate: Gate) -> None:
    """A gated model was garbage-collected without ``disable``: what ``disable(model)`` would have
    done. Runs from the garbage collector, at any allocation, so it only takes the (reentrant)
    lock and undoes; ``enable`` registers a gate before it installs anything, so this never sees
    an empty registry while a gate is being added."""
    with _lock:
        gate._detach()
        _drop_figures(gate._root)
        _uninstall_if_unused()


def _is_sharded(root: nn.Module, head: nn.Linear) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    if isinstance(head.weight, DTensor):
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
           **options: Any) -> Gate:
    """Gate ``model``'s loss from now on; returns its ``Gate`` (``.remove()`` undoes it).

    Finds the LM head (``head=`` overrides), registers a forward hook on it, wraps
    ``torch.nn.functional.cross_entropy`` and starts counting optimizer steps. Calling it again on
    the same model updates the options and returns the same gate. Options are GateConfig's.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"cggr_hook.enable: model must be a torch.nn.Module, got {type(model).__name__}")
    root = head_mod.unwrap(model)
    with _lock:
        existing = _gates.get(root)
        cfg = make_config(config if config is not None else (existing.config if existing else None), options)
        if existing is not None:
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
    global _last_figures
    with _lock:
        if model is None:
            targets = list(_gates.keys())
            if not keep_figures:
                _figures.clear()
                _last_figures = None
        else:
            root = head_mod.unwrap(model)
            targets = [root] if root in _gates else []
            if not keep_figures:
                _figures.pop(root, None)
                if _last_figures is not None and _last_figures.root() is root:
                    _last_figures = None
        for root in targets:
            gate = _gates.pop(root, None)
            if gate is not None:
                gate._detach()
        _uninstall_if_unused()


def _drop_figures(root_ref: "weakref.ref[nn.Module]") -> None:
    global _last_figures
    if _last_figures is not None and _last_figures.root is root_ref:
        _last_figures = None


def gate_of(model: nn.Module) -> Gate | None:
    with _lock:
        return _gates.get(head_mod.unwrap(model))


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
        record = _last_figures if model is None else _figures.get(head_mod.unwrap(model))
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
        ops = head_mod.tap_behind(x)
        if ops is not None:
            _warn_once("ops:" + ops, (
                f"cggr_hook: this cross_entropy input is computed from the LM head's logits through {ops}, "
                "which is not a reshape, slice or widening cast; it gets the plain loss. Gating covers the "
                "head's own logits (a soft-capped or rescaled loss input is not gated)"))
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

    out = call.output
    if gate.through_logits:
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
    lin = call.head
    loss = GatedHeadCrossEntropy.apply(call.hidden, lin.weight, lin.bias, out.detach(), t_head, tr.rows,
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
    call.hidden = call.output = None


_eager_handler: Any = None


def _handler_for_patch() -> Any:
    """The handler, opaque to torch.compile: where a compiled region calls cross entropy, the graph
    breaks and the handler runs eagerly on real tensors. Made on first enable, because
    ``torch.compiler.disable`` imports torch._dynamo (and triton), which importing cggr_hook must not."""
    global _eager_handler
    if _eager_handler is None:
        _eager_handler = torch.compiler.disable(_handle_cross_entropy)
    return _eager_handler
