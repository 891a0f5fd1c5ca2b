"""The cross-entropy route: which ``F.cross_entropy`` calls are gated, and through which Function.

The patch (``patch.py``) hands every call to ``Route``. A call is gated only when all of these
hold; otherwise it is the original function's call, untouched:

- some gate is enabled, this thread is not inside ``paused()``, and grad mode is on;
- its input traces back (``trace.trace``) to a tapped training-mode forward of a gated model's LM
  head that no earlier cross entropy has consumed, through exact (widening) casts only;
- its targets are class indices (probability targets keep the plain loss, with a warning).

A gated call runs the gated forward (``pipeline.gated_forward``) and hands the result to
``functions.GatedHeadCrossEntropy`` (the selected-rows head backward) or, where the head's output is
not known to be the plain affine map or its parameters are sharded, to
``functions.GatedCrossEntropy`` on the loss input itself (the gradient through the logits).
"""

from __future__ import annotations

import numbers
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import kernels, patch
from . import trace as trace_mod
from .functions import GatedCrossEntropy, GatedHeadCrossEntropy
from .head import HeadCall
from .pipeline import HostRead, LossSpec, gated_forward

if TYPE_CHECKING:
    from .gate import Gate
    from .registry import Registry

# autograd nodes of a matrix product: a loss input behind one of them is another layer's output
_MATMULS = ("MmBackward", "AddmmBackward", "BmmBackward", "BaddbmmBackward", "MvBackward", "LinearBackward")


def _cross_entropy_args(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> tuple:
    """A call's arguments bound as ``F.cross_entropy``'s signature binds them."""
    return input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and is_fake(t)


class Route:
    """The handler of the patched ``F.cross_entropy``: ``route(wrapped, instance, args, kwargs)``
    returns the gated loss, or the original function's result."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._local = threading.local()  # .in_handler: this thread is inside a call (no re-entry)
        self._accepted_targets: dict = {}

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        registry = self.registry
        if (
            getattr(self._local, "in_handler", False)
            or not registry.any_gate()
            or registry.paused_here()
            or not torch.is_grad_enabled()
        ):
            return wrapped(*args, **kwargs)
        if args and _is_fake(args[0]):
            # torch.compile is tracing with fake tensors: no autograd graph to trace back to the head.
            # Breaking the graph here makes the call run eagerly, where it can be gated.
            raise torch._dynamo.exc.Unsupported(  # pyright: ignore[reportAttributeAccessIssue]
                "cggr_hook: a cross entropy runs eagerly while a gate is enabled"
            )
        self._local.in_handler = True
        try:
            gated_loss = self._gated_loss(args, kwargs)
            return gated_loss if gated_loss is not None else wrapped(*args, **kwargs)
        finally:
            self._local.in_handler = False

    def _gated_loss(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The gated loss of this cross-entropy call, or None for the plain one."""
        registry = self.registry
        try:
            x, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing = _cross_entropy_args(
                *args, **kwargs
            )
        except TypeError:
            return None  # let the original report the bad call
        if not isinstance(x, Tensor) or not isinstance(target, Tensor) or x.grad_fn is None or x.dim() < 1:
            return None
        if x.device.type == "meta":
            return None  # no values to score: the original gives the meta result it gives ungated
        class_dim = 0 if x.dim() == 1 else 1
        tr = trace_mod.trace(x, class_dim)
        if tr is None:
            plain = registry.claim_plain(x)  # the head's logits on a step run as the plain loss
            if plain is not None:
                plain.run_plain(x.device, _valid_count(target, ignore_index), _rows(target))
            else:
                self._warn_not_traced(x)
            return None
        call = tr.call
        gate = registry.gate_with_id(call.gate_id)
        if call.consumed or gate is None or not gate.enabled or x.device != call.output.device:
            return None
        if target.is_floating_point() and tuple(target.shape) == tuple(x.shape):
            registry.warn_once(
                "soft", "cggr_hook: cross_entropy with probability targets is not gated; the plain loss is used"
            )
            return None
        if not tr.exact:
            registry.warn_once(
                "cast", "cggr_hook: the loss input is a lossy cast of the LM head's logits; the plain loss is used"
            )
            return None
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(  # pyright: ignore[reportAttributeAccessIssue]
                size_average, reduce, emit_warning=False
            )

        # validate before any work
        V = x.shape[class_dim]
        expected = tuple(x.shape[:class_dim]) + tuple(x.shape[class_dim + 1 :])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"cggr_hook: target of shape {tuple(target.shape)} does not match input of shape {tuple(x.shape)}; "
                f"cross_entropy needs target of shape {expected} (one class index per row of logits)"
            )
        if (target.dtype != torch.long or target.device != x.device) and not self._original_accepts_target(x, target):
            return None  # the original raises its own error, as it does without the gate
        spec = LossSpec(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, weight=weight)
        spec.check(V)
        scheduler = registry.scheduler
        if gate.runs_plain():
            # the timed choice (auto, plain_when_faster) runs this step as the plain loss (the head's forward hook
            # leaves such a step's logits untapped; these were tapped before the step's choice)
            gate.run_plain(x.device, _valid_count(target, ignore_index), _rows(target))
            return None

        out = call.output
        rows = tr.rows  # the head row of every loss row; None where they are the head rows in order
        if gate.through_logits or not call.narrow:
            # gated loss on the loss input itself; its gradient flows back through the logits' graph
            xr = x.movedim(class_dim, -1) if class_dim != x.dim() - 1 else x
            seq = None
            if out.dim() >= 3:
                T = out.shape[-2]
                seq = T if rows is None else (rows // T, out.numel() // (T * V))
            targets = target.to(device=x.device, dtype=torch.long)
            with torch.no_grad():
                fwd = gated_forward(
                    kernels.as_rows(xr.detach()),
                    targets.reshape(-1),
                    config=gate.config,
                    scheduler=scheduler,
                    key=gate.key,
                    spec=spec,
                    seq=seq,
                    param_ids=gate.param_ids,
                )
            loss = GatedCrossEntropy.apply(xr, targets, fwd, spec, False)
        else:
            # targets in head-row order, rows the loss does not read ignored
            t_head = target.reshape(-1).to(device=out.device, dtype=torch.long)
            if rows is not None:
                n_head_rows = out.numel() // max(V, 1)
                t_head = torch.full((n_head_rows,), ignore_index, dtype=torch.long, device=out.device).index_put_(
                    (rows,), t_head
                )
            seq = out.shape[-2] if out.dim() >= 3 else None
            head_out = out.detach()
            with torch.no_grad():
                fwd = gated_forward(
                    kernels.as_rows(head_out),
                    t_head,
                    config=gate.config,
                    scheduler=scheduler,
                    key=gate.key,
                    spec=spec,
                    seq=seq,
                    param_ids=gate.param_ids,
                    need_rows=True,
                    loss_rows=_rows(target),  # what a plain step books (_rows)
                )
            tapped = call.tapped() if call.fsdp_owner is not None and call.tapped is not None else None
            loss = GatedHeadCrossEntropy.apply(
                call.hidden,
                call.weight,
                call.bias,
                head_out,
                t_head,
                rows,
                target.shape,
                fwd,
                spec,
                call.fsdp_owner,
                tapped,
                call,
            )
        registry.record(gate, fwd.figures)
        _consume(call, gate)
        return loss

    def _original_accepts_target(self, x: Tensor, target: Tensor) -> bool:
        """Whether ``F.cross_entropy`` itself takes class-index targets of ``target``'s dtype and device
        for input like ``x``: a gated loss must accept and reject what the plain one does (int32 targets
        that trained under the gate would otherwise fail in the evaluation loop). Which dtypes torch
        takes depends on the device and on the input's rank (uint8 for (N, V) input on the CPU, not
        for (B, V, T)), so the original is asked once per kind of call, on a one-row input of two
        classes, and the answer kept."""
        key = (target.dtype, str(target.device), x.dtype, str(x.device), x.dim())
        accepted = self._accepted_targets.get(key)
        if accepted is None:
            shape = (1, 2) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (2,)
            t_shape = (1,) + shape[2:] if x.dim() >= 2 else ()
            try:
                with torch.no_grad():
                    patch.original_cross_entropy()(x.new_zeros(shape), target.new_zeros(t_shape))
                accepted = True
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                accepted = False
            self._accepted_targets[key] = accepted
        return accepted

    def _warn_not_traced(self, x: Tensor) -> None:
        """A loss input that does not trace back to a head's logits: warn when a tap lies behind it
        through other operations (the loss is plain)."""
        ops = trace_mod.tap_behind(x)
        if ops is None:
            return
        if any(m in ops for m in _MATMULS):
            self.registry.warn_once(
                "ops:" + ops,
                (
                    f"cggr_hook: this cross_entropy input is computed from the gated module's output through further "
                    f"layers ({ops}): the module gated as the LM head is not the one that produces the logits, and the "
                    "loss is the plain one. Pass head= the module whose output is the logits; if the logits come from a "
                    "weight without a head module (h @ wte.weight.T), add an nn.Linear head that shares the weight or "
                    "use cggr_hook.CGGRLoss"
                ),
            )
            return
        self.registry.warn_once(
            "ops:" + ops,
            (
                f"cggr_hook: this cross_entropy input is computed from the LM head's logits through {ops}, "
                "which is not a reshape, slice or widening cast; it gets the plain loss. Gating covers the "
                "head's own logits (a soft-capped or rescaled loss input is not gated); if the gated module is not "
                "the one that produces the logits, pass head= the one that does"
            ),
        )


def _valid_count(target: Any, ignore_index: Any) -> HostRead | None:
    """The count of a plain step's valid targets, left on the device until ``metrics()`` asks
    (None for probability targets or arguments the plain loss will reject)."""
    if not isinstance(target, Tensor) or target.is_floating_point() or not isinstance(ignore_index, numbers.Integral):
        return None
    return HostRead((target != int(ignore_index)).sum().reshape(1), now=False)


def _rows(target: Any) -> int:
    """The rows of a plain step's cross entropy (its targets' count, ignored ones included): how
    large the timed choice's steps are."""
    return target.numel() if isinstance(target, Tensor) else 0


def _consume(call: HeadCall, gate: Gate) -> None:
    """Later cross entropies on this head call get the plain loss; drop what the tap held."""
    call.consumed = True
    call.hidden = call.output = call.weight = call.bias = call.fsdp_owner = None  # pyright: ignore[reportAttributeAccessIssue]
    gate.on_gated_loss()
