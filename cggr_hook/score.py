"""Scoring: each token's difficulty from its logits row, in fp32.

One pass of the row kernels gives lse, entropy, the top-1/top-2 probabilities and the target's NLL
(``kernels.row_stats``); the scoring mode combines them into a difficulty, larger = harder:

- ``entropy``  H = -sum_v p_v log p_v
- ``margin``   1 - (p_top1 - p_top2)
- ``loss``     NLL of the target
- ``combined`` H / ln V + margin + NLL / ln V   (each term in [0, 1] for a confident model)
- ``random``   uniform noise in [0, 1): the control arm

Tokens whose target is ignored get -inf, so no selection can take them before a valid token; a NaN
difficulty (NaN logits) becomes +inf, so such a token is taken first and its NaN reaches the loss
exactly as it would without gating.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import RowStats


def difficulty(stats: RowStats, scoring: str, vocab: int, valid: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
    """fp32 (N,) difficulty of every row; -inf where ``valid`` is False."""
    if scoring == "entropy":
        d = stats.entropy
    elif scoring == "margin":
        d = 1.0 - (stats.p_top1 - stats.p_top2)
    elif scoring == "loss":
        d = stats.nll
    elif scoring == "combined":
        # ln V is 0 for V = 1, where H and NLL are 0 too: divide by 1 instead of 0
        inv_log_v = 1.0 / math.log(vocab) if vocab > 1 else 1.0
        d = (stats.entropy + stats.nll) * inv_log_v + (1.0 - (stats.p_top1 - stats.p_top2))
    elif scoring == "random":
        d = torch.rand(valid.shape, generator=generator, device=valid.device, dtype=torch.float32)
    else:  # GateConfig validates; this guards internal misuse
        raise ValueError(f"cggr_hook: unknown scoring {scoring!r}")
    d = d.float().nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return d.masked_fill(~valid, -math.inf)
