"""TRL's fused LM head, gated: the output ``model(..., labels=..., fused_lm_head=True)`` returns,
built from the gated loss of the head's logits.

TRL's trainers patch the model's forward (``trl.trainer.utils.add_fused_lm_head``): with
``fused_lm_head=True`` it runs the backbone and computes per-token log-probabilities from the head's
weight in its own autograd function, never calling the head module or ``F.cross_entropy``, so
nothing could be gated. While a gate is enabled, its forward pre-hook on the model runs that call
unfused and without labels (the head is called, its logits are tapped), and ``fused_output``
turns the result into the ``FusedCausalLMOutput`` the trainer reads:

- ``log_probs``: each valid token's equal share of minus the gated loss with ``reduction='sum'``
  (Hugging Face's semantics: the sum over the selected tokens, weighed so that dividing by the
  number of tokens gives the gated mean). ``SFTTrainer``'s loss, ``-log_probs.sum() / num_tokens``,
  is then the gated loss, and its gradient exactly the gated loss's gradient.
- ``entropy``, ``is_top1``, ``label_mask``: computed from the logits without grad, as TRL defines
  them, so the trainer's logged entropy and token accuracy are unchanged.

Only a loss that sums ``log_probs`` with equal weights can be gated this way (SFT's default
``loss_type='nll'``). The first backward passes check that every token received the same gradient;
a loss that weighs tokens by their log-probability (SFT's ``loss_type='dft'``, DPO, KTO, GRPO,
RLOO) raises there, before any optimizer step, with the fix. Logits the gate cannot trace back to
the head (a soft-cap) give TRL's own plain values, with the gate's warning.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# backward passes (per gate) that check the gradient TRL's loss sends to log_probs is the same for
# every token
UNIFORM_CHECKS = 3
# rows of the logits per chunk when computing the metrics fields (bounds the temporaries)
_CHUNK_ROWS = 4096


def available() -> bool:
    return _output_class() is not None


def _output_class() -> Any:
    if "trl" not in sys.modules:
        return None
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return None
    return FusedCausalLMOutput


class _EqualShares(torch.autograd.Function):
    """Identity on ``log_probs``; its backward checks, for the first few calls, that the loss
    reading them weighs every token equally (the only loss the equal shares are right for)."""

    @staticmethod
    def forward(ctx, shares: Tensor, checks_left: list) -> Tensor:
        ctx.checks_left = checks_left
        return shares.view_as(shares)

    @staticmethod
    def backward(ctx, grad: Tensor):
        left = ctx.checks_left
        if left[0] > 0:
            left[0] -= 1
            flat = grad.reshape(-1)
            if flat.numel() and not bool((flat == flat[0]).all()):
                left[0] = UNIFORM_CHECKS
                raise RuntimeError(
                    "cggr_hook: TRL's loss weighs the fused head's log_probs token by token (SFTTrainer with "
                    "loss_type='dft', or a DPO, KTO, GRPO or RLOO trainer), which a gated loss cannot serve: gating "
                    "covers SFTTrainer's default loss_type='nll'. Call cggr_hook.disable(model) for this trainer, or "
                    "train with loss_type='nll'"
                )
        return grad, None


@torch.no_grad()
def _metric_fields(x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy of each row's softmax and whether the label is its top-1, zero where masked."""
    xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    entropy = torch.empty(ys.shape, dtype=torch.float32, device=x.device)
    top1 = torch.empty(ys.shape, dtype=torch.bool, device=x.device)
    for a in range(0, xs.shape[0], _CHUNK_ROWS):
        rows = xs[a : a + _CHUNK_ROWS].float()
        logp = torch.log_softmax(rows, -1)
        entropy[a : a + _CHUNK_ROWS] = -(logp.exp() * logp).nan_to_num().sum(-1)
        top1[a : a + _CHUNK_ROWS] = rows.argmax(-1) == ys[a : a + _CHUNK_ROWS]
    m = mask.reshape(-1)
    return (entropy * m).view(mask.shape), (top1 & m).view(mask.shape)


def fused_output(
    output: Any,
    labels: Tensor | None,
    shift_labels: Tensor | None,
    num_items_in_batch: Any,
    sum_loss: Callable[[Tensor, Tensor], tuple[Tensor, bool]],
    checks_left: list,
) -> Any:
    """TRL's ``FusedCausalLMOutput`` for an unfused forward's ``output`` (with ``.logits``).

    ``sum_loss(x, y)``: ``F.cross_entropy(x, y, reduction='sum')`` through the gate, and whether it
    was gated. Labels are shifted as TRL shifts them (``shift_labels`` are taken as they are).
    ``checks_left``: [backward passes still to check], the gate's own count.
    """
    cls = _output_class()
    logits = output.logits
    if shift_labels is None:
        x, y = logits[:, :-1], labels[:, 1:]  # pyright: ignore[reportOptionalSubscript]
    else:
        x, y = logits, shift_labels
    y = y.to(x.device)
    V = x.shape[-1]
    mask = y != -100
    flat_x, flat_y = x.reshape(-1, V), y.reshape(-1)
    total, gated = sum_loss(flat_x, flat_y)
    if gated:
        n = mask.sum()
        share = mask.to(torch.float32) / n.clamp(min=1)
        log_probs = _EqualShares.apply(-total * share, checks_left)
    else:
        # the plain values TRL's fused head would give: the log-probability of every label
        from .patch import original_cross_entropy

        log_probs = -original_cross_entropy()(flat_x.float(), flat_y, reduction="none").view(mask.shape)
    entropy, is_top1 = _metric_fields(x, y, mask)
    num = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / num
    aux = getattr(output, "aux_loss", None)
    return cls(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask, aux_loss=aux)
