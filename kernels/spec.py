"""What every backend computes, by name: the tables and rules the reference (``reference.py``), the
Triton launchers (``scoring.py``, ``gated_ce.py``) and the gate's options (``cggr_hook.config``) read.

- ``RowStats``: the per-row statistics of one pass over the logits;
- ``SCORINGS``: the scoring modes (a new mode is a row here, its formula in ``reference.DIFFICULTY``
  and its branch in the Triton difficulty kernel);
- ``REDUCTIONS``: the loss reductions;
- ``SUM_FIELDS``: the per-row sums that travel to the host;
- ``target_masks``: which targets are valid (in [0, V) and not ``ignore_index``) and which are bad;
- ``ImportanceDraw`` and ``DRAW_FIGURES``: what an importance draw returns;
- ``strata_sizes`` and ``strata_quotas``: ``stratified`` selection's buckets and what each gives;
- ``dynamic_ratio``, ``running_confidence`` and ``sum_in_order``: the dynamic threshold's ratio and
  running average, as the host and the ``dynamic`` kernel compute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


class RowStats(NamedTuple):
    """Per-row statistics of one pass over the logits, each an fp32 (N,) tensor."""

    lse: Tensor  # log-sum-exp of the row
    entropy: Tensor  # H = -sum p log p
    p_top1: Tensor  # largest probability
    p_top2: Tensor  # second largest probability (0 when V = 1)
    nll: Tensor  # lse - x_target, 0 where the target is ignored
    wsum: Tensor | None = None  # sum_v w_v x_v, only when label smoothing asks for it
    p2sum: Tensor | None = None  # sum_v p_v^2, only when gradnorm scoring asks for it


@dataclass(frozen=True)
class Scoring:
    """A scoring mode: how a row's difficulty is read off its statistics (``reference.DIFFICULTY``)."""

    name: str
    code: int  # MODE of the Triton difficulty kernel
    # when a score of 0 means a zero gradient, so that importance sampling may give such rows no
    # floor (``importance_floor=0``): "always", "unsmoothed" (without label smoothing) or "never"
    zero_is_no_gradient: str
    needs_p2sum: bool = False  # the scoring pass also sums p^2 (``row_stats(with_p2=True)``)
    random: bool = False  # uniform draws stand in for the score (a control arm)


# in the order the options list them
SCORINGS: dict[str, Scoring] = {
    s.name: s
    for s in (
        Scoring("combined", 3, "unsmoothed"),
        Scoring("entropy", 0, "never"),  # a confidently wrong token scores 0
        Scoring("margin", 1, "never"),
        Scoring("loss", 2, "unsmoothed"),  # 0 only for a one-hot prediction of the target
        Scoring("gradnorm", 5, "always", needs_p2sum=True),
        Scoring("random", 4, "always", random=True),  # draws uniformly: no row goes undrawn
    )
}

# what keep_count adds to ratio * n before the floor: a half, and a little more, so that a product
# that is a half-integer up to float noise (0.45 arrives as 0.44999999999999996) rounds up; one
# float64 constant, so that the host and a kernel (without FMA contraction) round the same way
KEEP_HALF = 0.5 + 5e-10


def keep_count(ratio: float, n_valid: int) -> int:
    """k = max(1, floor(ratio * n + 1/2)) of n > 0 valid rows, never more than n; 0 for n = 0.

    Computed as floor(fl(ratio * n) + ``KEEP_HALF``) in float64, as the importance kernel computes
    it on the device from a count it never sends to the host (``importance_draw_at_ratio``)."""
    if n_valid <= 0:
        return 0
    return min(n_valid, max(1, int(math.floor(float(ratio) * float(n_valid) + KEEP_HALF))))


# the dynamic threshold's running confidence: an exponential average with this momentum
EMA_MOMENTUM = 0.9


def sum_in_order(values) -> float:
    """The float64 sum of ``values`` added one by one from the first (the order the ``dynamic``
    kernel adds the partial sums in; Python's ``sum`` of floats compensates from 3.12 on)."""
    total = 0.0
    for v in values:
        total += v
    return total


def dynamic_ratio(r: float, confidence: float, average: float | None, sensitivity: float) -> float:
    """r adjusted by how the batch's confidence c compares with the running average a:

        r' = r (1 + s clamp((a - c) / a, -1, 1)),  clamped to [r (1 - s), min(1, r (1 + s))]

    r where there is no average yet (None, or not above 0) or c is not finite (no valid target).
    Float64, in this order, without FMA contraction on the device."""
    if average is None or not math.isfinite(confidence) or average <= 0.0:
        return r
    deviation = max(-1.0, min(1.0, (average - confidence) / average))
    adjusted = r * (1.0 + sensitivity * deviation)
    return max(r * (1.0 - sensitivity), min(adjusted, dynamic_ratio_bound(r, sensitivity)))


def dynamic_ratio_bound(r: float, sensitivity: float) -> float:
    """The largest ratio ``dynamic_ratio`` gives from ``r``: min(1, r (1 + s))."""
    return min(1.0, r * (1.0 + sensitivity))


def running_confidence(average: float | None, confidence: float) -> float | None:
    """The running average after a batch of confidence c: c for the first, else 0.9 a + (1 - 0.9) c
    (each product rounded, then the sum); unchanged where c is not finite."""
    if not math.isfinite(confidence):
        return average
    if average is None:
        return confidence
    return EMA_MOMENTUM * average + (1 - EMA_MOMENTUM) * confidence


# buckets whose quotas a kernel computes on the device (``strata.strata_at_ratio``: one program, a
# round a bucket at most and the buckets compared pairwise); a larger num_strata has n read on the host
MAX_STRATA = 64


def strata_sizes(n_valid: int, num_strata: int) -> list[int]:
    """Sizes of the equal-count buckets: n_valid // S or one more, the larger ones first."""
    S = max(1, min(num_strata, n_valid))
    return [n_valid // S + (1 if b < n_valid % S else 0) for b in range(S)]


def strata_quotas(n_valid: int, k: int, num_strata: int) -> list[int]:
    """How many rows each of ``num_strata`` equal-count difficulty buckets gives (hardest first):
    ``stratified`` selection's quotas (the Triton kernel ``strata.strata_at_ratio`` computes the
    same on the device, in the same float64 operations).

    Bucket b (0 = hardest) weighs (S - b) per row, so harder buckets give more: the shares are
    k * w_b n_b / sum(w n). A bucket whose share reaches its size gives all its rows and the rest is
    shared again among the others; then each bucket gives the floor of its share and the remaining
    rows go one each to the largest fractional parts (ties: the harder bucket). Sums to exactly k.
    """
    sizes = strata_sizes(n_valid, num_strata)
    S = len(sizes)
    quotas = [0] * S
    remaining = min(k, n_valid)
    open_b = [b for b in range(S) if sizes[b] > 0]
    while remaining > 0 and open_b:
        total = sum((S - b) * sizes[b] for b in open_b)
        shares = {b: remaining * (S - b) * sizes[b] / total for b in open_b}
        full = [b for b in open_b if shares[b] >= sizes[b]]
        if full:
            for b in full:
                quotas[b] = sizes[b]
                remaining -= sizes[b]
            open_b = [b for b in open_b if b not in full]
            continue
        for b in open_b:
            quotas[b] = int(shares[b])
        left = remaining - sum(quotas[b] for b in open_b)
        for b in sorted(open_b, key=lambda b: (-(shares[b] - int(shares[b])), b))[:left]:
            quotas[b] += 1
        break
    return quotas


# reduction -> REDUCTION of the Triton loss kernel
REDUCTIONS: dict[str, int] = {"mean": 0, "sum": 1, "none": 2}


class ImportanceDraw(NamedTuple):
    """k rows drawn with inclusion probabilities pi (``reference.importance_draw``)."""

    rows: Tensor  # (k,) int64, ascending
    inv_pi: Tensor  # (k,) float64, 1 / pi of each drawn row (the Horvitz-Thompson weight), rows' order
    row_weight: Tensor  # (N,) fp32, (1 / pi_r) / norm on drawn rows, 0 elsewhere
    key: Tensor  # (N,) int64, 0 on drawn rows and 1 elsewhere: the selection is ``key < 1``
    figures: Tensor  # float64 (7,): ``DRAW_FIGURES``


# what ``ImportanceDraw.figures`` holds: the effective sample size (sum w)^2 / sum w^2 and the
# largest weight w = 1 / pi over the drawn rows, how many rows were certain (pi = 1), and over the
# n valid rows the mean score and mean squared score (the variance gain the scores predict needs both),
# then n and k themselves (where they were counted on the device, the host learns them from here)
DRAW_FIGURES = ("ess", "max_weight", "n_certain", "score_mean", "score_sq_mean", "n_valid", "k")


# columns of the per-row sums that travel to the host: valid rows, bad targets (neither ignored nor
# in [0, V)), and over valid rows the top-1 probability, the entropy and the difficulty
SUM_FIELDS = ("n_valid", "n_bad", "p_top1", "entropy", "difficulty")


def scoring(name: str) -> Scoring:
    """The scoring mode ``name`` (a ValueError for an unknown one: GateConfig validates user input,
    this guards internal misuse)."""
    mode = SCORINGS.get(name)
    if mode is None:
        raise ValueError(f"cggr_hook: unknown scoring {name!r}")
    return mode


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        *first, last = (repr(r) for r in REDUCTIONS)
        raise ValueError(f"cggr_hook: reduction={reduction!r} is not valid; use {', '.join(first)} or {last}")


def check_weight(weight: Tensor, vocab: int) -> None:
    """One class weight per class (the Triton launchers' check; user input is checked with its shape
    and dtype before it gets here)."""
    if weight.numel() != vocab:
        raise ValueError(f"cggr_hook: weight has {weight.numel()} entries for {vocab} classes")


def check_row_scale(row_scale: Tensor, n_rows: int) -> None:
    """One gradient scale per row of the logits (the gradient kernels read it at row indices:
    another size would be read out of bounds)."""
    if row_scale.dim() != 1 or row_scale.numel() != n_rows:
        raise ValueError(
            f"cggr_hook: row_scale of shape {tuple(row_scale.shape)} must have one scale per row of the logits ({n_rows},)"
        )


def flat_upstream(grad_output: Tensor | None, n_rows: int) -> Tensor | None:
    """The gradient kernels' upstream gradient flattened: one element or one per row (else a
    ValueError); None stays None (a gradient of 1)."""
    if grad_output is None:
        return None
    g_out = grad_output.reshape(-1)
    if g_out.numel() not in (1, n_rows):
        raise ValueError(f"cggr_hook: grad_output has {g_out.numel()} elements for {n_rows} rows")
    return g_out


def target_masks(targets: Tensor, vocab: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(valid, bad) masks of the targets: valid = in [0, V) and not ``ignore_index``; bad = neither.
    (The Triton kernels apply the same rule, ``scoring._target_masks``.)"""
    not_ignored = targets != ignore_index
    in_range = (targets >= 0) & (targets < vocab)
    return not_ignored & in_range, not_ignored & ~in_range
