"""Difficulty: each token's score from its logits row, in fp32, larger = harder.

One pass of the row kernels gives lse, entropy, the top-1/top-2 probabilities and the target's NLL
(``kernels.row_stats``); the scoring mode (``kernels.spec.SCORINGS``, formulas in
``kernels.reference.DIFFICULTY``) combines them:

- ``entropy``  H = -sum_v p_v log p_v
- ``margin``   1 - (p_top1 - p_top2)
- ``loss``     NLL of the target
- ``combined`` H / ln V + margin + NLL / ln V   (each term in [0, 1] for a confident model)
- ``gradnorm`` ||softmax(z) - y~||_2, y~ the (smoothed) target: the norm of the token's gradient on
  its logits, so s_i ||h_i|| is the norm of its gradient on the head weight (one more running sum,
  of p^2, in the scoring pass)
- ``random``   uniform noise in [0, 1): the control arm

Tokens whose target is ignored get -inf, so no selection can take them before a valid token; a NaN
difficulty (NaN logits) becomes +inf, so such a token is taken first and its NaN reaches the loss
exactly as it would without gating.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels import RowStats, reference, spec


def noise_for(scoring: str, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor | None:
    """The uniform draws of ``random`` scoring (fp32 (n,); None for every other mode)."""
    if not spec.scoring(scoring).random:
        return None
    return torch.rand(n, generator=generator, device=device, dtype=torch.float32)


def difficulty(
    stats: RowStats,
    scoring: str,
    vocab: int,
    valid: Tensor,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """fp32 (N,) difficulty of every row; -inf where ``valid`` is False (the definition above)."""
    noise = noise_for(scoring, valid.numel(), valid.device, generator)
    return reference.difficulty(stats, scoring, vocab, valid, noise, label_smoothing)


def score_rows(
    stats: RowStats,
    targets: Tensor,
    vocab: int,
    ignore_index: int,
    scoring: str,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The difficulty of every row (valid = target in [0, V) and not ``ignore_index``) and the
    float64 (P, 5) partial sums the host reads: valid rows, bad targets, and over valid rows the
    top-1 probability, entropy and difficulty (``kernels.spec.SUM_FIELDS``). On CUDA one kernel
    launch does both. ``noise``: random scoring's draws, where the caller drew them (else drawn
    here from ``generator``)."""
    if noise is None:
        noise = noise_for(scoring, targets.numel(), stats.lse.device, generator)
    return kernels.row_difficulty(stats, targets, vocab, ignore_index, scoring, noise, label_smoothing)


def gradnorm_sq(stats: RowStats, vocab: int, label_smoothing: float = 0.0) -> Tensor:
    """fp32 (N,) |softmax(x) - y~|^2 of every row from its statistics (``p2sum`` needed): the
    squared ``gradnorm`` score."""
    return reference.gradnorm_sq(stats, vocab, label_smoothing)
