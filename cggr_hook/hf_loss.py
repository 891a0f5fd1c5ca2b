"""Hugging Face's causal-LM loss without its fp32 copy of the logits, while a model is gated.

Hugging Face's ``ForCausalLMLoss`` upcasts the whole (B, T, V) logits to fp32 before the cross
entropy: a copy of twice the logits' size, read and written once more every step. The gated
kernels read the logits in their own dtype and compute in fp32, and a widening cast is exact, so
for a gated call the copy changes no value: this stand-in does what ``ForCausalLMLoss`` does
(label shift with ``ignore_index`` padding, flatten, ``reduction='sum'`` and division by
``num_items_in_batch`` when given, else ``'mean'``) minus the upcast. Every call that would not be
gated (eval mode, no grad, ``paused()``) goes to the original function, untouched.

It is installed through ``PreTrainedModel.loss_function``'s own setter, only where the model's loss
is exactly ``transformers``' ``ForCausalLMLoss``, and removed by ``disable``.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GatedCausalLMLoss:
    """``ForCausalLMLoss`` without the fp32 copy for the calls ``would_gate`` accepts, the
    original for every other call.

    A gated model's ``_loss_function``: ``pickle``, ``torch.save`` and ``copy.deepcopy`` of the model
    take it along, and there it turns back into ``ForCausalLMLoss`` itself (by reference, through
    ``copy.copy``, which returns a function as it is), so a saved or copied model is not gated and
    loading it needs nothing from cggr_hook for its loss.
    """

    def __init__(self, original: Callable[..., Tensor], would_gate: Callable[[Tensor], bool]) -> None:
        self.original = original
        self.would_gate = would_gate

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int,
        num_items_in_batch: Any = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if not self.would_gate(logits):
            return self.original(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        flat = logits.view(-1, vocab_size)
        shift_labels = shift_labels.view(-1).to(flat.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = F.cross_entropy(flat, shift_labels, ignore_index=ignore_index, reduction=reduction)
        if reduction == "sum":
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch  # pyright: ignore[reportOperatorIssue]
        return loss

    def __reduce__(self) -> tuple:
        return (copy.copy, (self.original,))


def install(root: nn.Module, would_gate: Callable[[Tensor], bool]) -> Callable[[], None] | None:
    """Replace ``root.loss_function`` when it is ``ForCausalLMLoss``; returns the undo, or None."""
    if "transformers" not in sys.modules:
        return None
    prop = getattr(type(root), "loss_function", None)
    if not isinstance(prop, property) or prop.fset is None:
        return None
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        current = root.loss_function
    except (ImportError, AttributeError, KeyError):
        return None
    if current is not ForCausalLMLoss:
        return None
    had_own = "_loss_function" in root.__dict__
    previous = root.__dict__.get("_loss_function")
    # the undo is kept by the gate, which the registry keeps as long as the model lives: a strong
    # reference to the model here would keep every dropped gated model alive
    root_ref = weakref.ref(root)

    causal_lm_loss = GatedCausalLMLoss(ForCausalLMLoss, would_gate)
    root.loss_function = causal_lm_loss  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]

    def undo() -> None:
        root = root_ref()
        if root is None or root.__dict__.get("_loss_function") is not causal_lm_loss:
            return  # replaced since: leave the newer choice alone
        if had_own:
            root._loss_function = previous  # pyright: ignore[reportArgumentType]
        else:
            del root._loss_function

    return undo
