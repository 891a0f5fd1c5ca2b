"""Types shared by the kernel backends."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class RowStats(NamedTuple):
    """Per-row statistics of one pass over the logits, each an fp32 (N,) tensor."""

    lse: Tensor  # log-sum-exp of the row
    entropy: Tensor  # H = -sum p log p
    p_top1: Tensor  # largest probability
    p_top2: Tensor  # second largest probability (0 when V = 1)
    nll: Tensor  # lse - x_target, 0 where the target is ignored
    wsum: Optional[Tensor] = None  # sum_v w_v x_v, only when label smoothing asks for it
    p2sum: Optional[Tensor] = None  # sum_v p_v^2, only when gradnorm scoring asks for it
