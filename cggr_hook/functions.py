"""The autograd Functions of the gated loss: the forward hands them its result
(``pipeline.gated_forward``), and their backward replays the gradient from its ``BackwardPlan``.

The gradient is exactly the gradient of the gated loss: unselected rows get exact zeros.

- ``GatedCrossEntropy``: input logits -> loss, dense gradient on the logits (``CGGRLoss``, and heads
  whose gradient goes through the logits);
- ``GatedHeadCrossEntropy``: (hidden, W, b) of a tapped LM head -> loss; its backward multiplies
  the K selected rows only: dW = G^T h_S (V x K by K x D), dh_S = G W (K x V by V x D).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from . import auto as auto_mod
from . import kernels
from .pipeline import BackwardPlan, GatedForward, LossSpec, NoiseProbe


def _row_scale(plan: BackwardPlan, grad_output: Tensor, reduction: str) -> Tensor:
    """d total / d ce_r for the selected rows ``plan.rows``, fp32 (K,)."""
    if reduction == "none":
        return grad_output.reshape(-1).float()[plan.rows] * plan.row_scale[plan.rows]
    return plan.row_scale[plan.rows] * grad_output.float()


class GatedCrossEntropy(torch.autograd.Function):
    """logits (..., V) -> gated loss; dense gradient on the logits (in place if asked)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, fwd: GatedForward, spec: LossSpec, inplace: bool) -> Tensor:
        ctx.plan, ctx.spec = fwd.plan, spec
        if inplace:
            # a detached alias: returned as the gradient with no other reference, so autograd
            # takes it as is instead of copying it (the gradient lives in the logits' buffer)
            ctx.alias = logits.detach()
            ctx.save_for_backward(targets)
        else:
            ctx.alias = None
            ctx.save_for_backward(targets, logits)
        # detached: a view returned from a Function could not be modified in place (`loss *= mask`),
        # which the plain loss allows
        return (fwd.loss if spec.reduction != "none" else fwd.loss.view(targets.shape)).detach()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        targets, *saved = ctx.saved_tensors
        logits, ctx.alias = (ctx.alias if ctx.alias is not None else saved[0]), None
        plan: BackwardPlan = ctx.plan
        spec: LossSpec = ctx.spec
        out = logits if not saved else torch.empty_like(logits)
        # one launch: every row is written, selected rows scaled by row_scale * grad_output
        kernels.ce_grad_dense_(
            kernels.as_rows(logits),
            targets.reshape(-1),
            plan.lse,
            plan.row_scale,
            spec.weight,
            float(spec.label_smoothing),
            kernels.as_rows(out),
            grad_output,
            plan.order,
        )
        return out, None, None, None, None


def _measure_head_noise(noise: NoiseProbe, rows: Tensor, grad_w: Tensor, scale: Tensor, hidden: Tensor) -> None:
    """An auto gate's noise-measuring step (every valid row, one shared scale c): token i's gradient
    on the head weight is g_i = (p_i - y_i) h_i^T, so |g_i|^2 = |p_i - y_i|^2 |h_i|^2, and the
    mean gradient is grad_w / (c n). Their figures go to the gate's auto state, on the device."""
    n = rows.numel()
    h = hidden[rows].float()
    per_token = (noise.sq[rows] * h.pow(2).sum(-1)).mean()
    mean_grad = grad_w.float() / (scale[0] * n)
    noise.scheduler.auto_state(noise.key, noise.candidates).add_noise(
        auto_mod.noise_parts(per_token, mean_grad.pow(2).sum(), n)
    )


class GatedHeadCrossEntropy(torch.autograd.Function):
    """(hidden, W, b) of a tapped LM head -> gated loss; backward over the selected rows only.

    ``head_out`` (..., V) holds the head's logits (the tap's output); ``targets`` are in head-row
    order with unmapped rows ignored; ``ce_rows`` maps the loss's rows to head rows (for 'none'),
    None where they are the head rows in order.

    Where the selection leaves out at most one head row in ``pipeline.DENSE_ROWS`` (every valid
    row kept, a few ignored ones such as each sequence's last position) on Triton
    (``plan.dense``), the backward runs over every head row instead, the left-out rows' gradient
    rows exact zeros: one kernel and two matrix products, without gathering and scattering the
    selected rows.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        head_out: Tensor,
        targets: Tensor,
        ce_rows: Tensor,
        ce_shape: torch.Size,
        fwd: GatedForward,
        spec: LossSpec,
        fsdp_owner: Any = None,
        tapped: Tensor | None = None,
        call: Any = None,
    ) -> Tensor:
        ctx.plan, ctx.spec, ctx.has_bias = fwd.plan, spec, bias is not None
        # under FSDP2 the tapped logits are an input only so that a gradient reaches them: the hooks
        # FSDP2 puts on module outputs (its pre-backward: gather again, queue the final reduce-scatter)
        # run on it; the tap passes that zero marker on to nothing (HeadTap.backward)
        ctx.fsdp_owner, ctx.call = fsdp_owner, call
        ctx.tapped_meta = None if tapped is None else (tapped.shape, tapped.dtype, tapped.device)
        ctx.save_for_backward(hidden, weight, bias, head_out, targets, ce_rows)
        if spec.reduction == "none":  # detached: see GatedCrossEntropy.forward
            return (fwd.loss if ce_rows is None else fwd.loss[ce_rows]).view(ce_shape).detach()
        return fwd.loss.detach()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.fsdp_owner is not None:
            # FSDP2 may have freed the gathered weight after the forward, and its own pre-backward
            # hook, on the logits, never runs here (no gradient goes through them): gather it again
            # (a no-op where it is still gathered). FSDP2's post-backward then reduce-scatters the
            # weight's gradient and frees it, as after the head's own backward.
            ctx.fsdp_owner.unshard()
        hidden, weight, bias, head_out, targets, ce_rows = ctx.saved_tensors
        plan: BackwardPlan = ctx.plan
        spec: LossSpec = ctx.spec
        go = grad_output
        if spec.reduction == "none":
            # the loss's rows back to head rows
            if ce_rows is None:
                go = grad_output.reshape(-1).float()
            else:
                go = torch.zeros(targets.numel(), dtype=torch.float32, device=grad_output.device)
                go[ce_rows] = grad_output.reshape(-1).float()
        compute_dtype = head_out.dtype  # the dtype the head's matmul ran in (autocast included)
        D = hidden.shape[-1]
        h2 = hidden.reshape(-1, D)
        rows_in = kernels.as_rows(head_out)
        ls = float(spec.label_smoothing)
        sel = None if plan.dense else cast(Tensor, plan.rows)  # the head route lists them (need_rows)
        if sel is None:
            # every head row: (N, V), rows off the selection exact zeros (their row_scale is 0)
            G3 = torch.empty(rows_in.shape, dtype=compute_dtype, device=rows_in.device)
            kernels.ce_grad_dense_(rows_in, targets, plan.lse, plan.row_scale, spec.weight, ls, G3, go)
            G, h_rows = G3.view(-1, rows_in.shape[-1]), h2
        else:
            # (K, V): row k scaled by row_scale[sel[k]] * the upstream gradient, gathered in the kernel
            G = kernels.ce_grad_rows(
                rows_in, targets, plan.lse, sel, plan.row_scale, spec.weight, ls, compute_dtype, go
            )
            h_rows = h2[sel]
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if sel is None:
                grad_h = (G @ weight.to(compute_dtype)).to(h2.dtype)
            else:
                grad_h = torch.zeros_like(h2)
                if sel.numel():
                    grad_h[sel] = (G @ weight.to(compute_dtype)).to(h2.dtype)
            grad_h = grad_h.view(hidden.shape)
        if ctx.needs_input_grad[1] or plan.noise is not None:
            gw = G.t() @ h_rows.to(compute_dtype)  # (V, D): the head weight's gradient
            if plan.noise is not None:  # the forward lists the rows for a noise-measuring step
                _measure_head_noise(plan.noise, cast(Tensor, plan.rows), gw, _row_scale(plan, go, spec.reduction), h2)
            if ctx.needs_input_grad[1]:
                grad_w = gw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = G.float().sum(0).to(bias.dtype)
        grad_tapped = None
        if ctx.tapped_meta is not None:
            shape, dtype, device = ctx.tapped_meta
            grad_tapped = torch.zeros((), dtype=dtype, device=device).expand(shape)  # no memory of its own
            ctx.call.sentinel = grad_tapped
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, grad_tapped, None
