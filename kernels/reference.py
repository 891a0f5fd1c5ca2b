"""PyTorch reference of the row kernels: the semantics every backend must match, and the test oracle.

Logits come as a 3-D view ``(B, T, V)`` with any strides (see ``kernels.as_rows``); row ``r`` is
``logits[r // T, r % T]``. All arithmetic is fp32 whatever the logits' dtype. Rows are processed in
chunks so the fp32 temporaries stay small.
"""

from __future__ import annotations

import math
import threading
from typing import cast

import torch
from torch import Tensor

from . import spec
from .spec import SUM_FIELDS, RowStats, check_reduction, check_row_scale, flat_upstream, target_masks

__all__ = [
    "RowStats",
    "SUM_FIELDS",
    "DIFFICULTY",
    "safe_targets",
    "row_stats",
    "inv_log_vocab",
    "gradnorm_constants",
    "gradnorm_sq",
    "difficulty",
    "row_difficulty",
    "target_counts",
    "difficulty_rank",
    "ascending_order",
    "selected_rows",
    "selected_loss",
    "ce_grad_rows",
    "ce_grad_dense_",
    "importance_scores",
    "importance_shares",
    "water_level",
    "uncapped_probabilities",
    "inclusion_probabilities",
    "systematic_hits",
    "importance_draw",
]

# fp32 elements per chunk of temporaries (64 MiB)
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _rows(logits: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of a (B, T, V) view as an fp32 (stop - start, V) tensor."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V) if logits.is_contiguous() else None
    if flat is not None:
        return flat[start:stop].float()
    r = torch.arange(start, stop, device=logits.device)
    return logits[r // T, r % T].float()


def safe_targets(targets: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(valid mask, targets clamped into [0, V)) so an ignored or bad target is never an address."""
    valid, _ = target_masks(targets, vocab, ignore_index)
    return valid, torch.where(valid, targets, torch.zeros_like(targets))


def row_stats(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int,
    weight: Tensor | None = None,
    with_wsum: bool = False,
    with_p2: bool = False,
) -> RowStats:
    """One pass over each row.

    Returns fp32 (N,) vectors: ``lse`` = log sum_v exp x_v; ``entropy`` = sum_v p_v (lse - x_v);
    ``p_top1``, ``p_top2`` = the two largest probabilities (ties count twice, p_top2 = 0 when
    V = 1); ``nll`` = lse - x_t for a target in [0, V) that is not ``ignore_index``, else 0;
    with ``with_wsum`` ``wsum`` = sum_v w_v x_v (w = 1 without ``weight``), which label smoothing
    needs; with ``with_p2`` ``p2sum`` = sum_v p_v^2, which gradnorm scoring needs.
    """
    B, T, V = logits.shape
    N = B * T
    dev = logits.device
    out = [torch.empty(N, dtype=torch.float32, device=dev) for _ in range(5)]
    wsum = torch.empty(N, dtype=torch.float32, device=dev) if with_wsum else None
    p2sum = torch.empty(N, dtype=torch.float32, device=dev) if with_p2 else None
    valid, safe = safe_targets(targets, ignore_index, V)
    w = weight.float() if weight is not None else None
    for a, b in _row_chunks(N, V):
        x = _rows(logits, a, b)
        lse = torch.logsumexp(x, dim=-1)
        p = torch.exp(x - lse[:, None])
        # p * (lse - x) is 0 where p is exactly 0 (x = -inf), not nan; a NaN logit stays NaN
        ent = torch.where(p == 0, torch.zeros_like(p), p * (lse[:, None] - x)).sum(-1)
        top = torch.topk(x, min(2, V), dim=-1).values
        p1 = torch.exp(top[:, 0] - lse)
        p2 = torch.exp(top[:, 1] - lse) if V > 1 else torch.zeros_like(p1)
        xt = x.gather(1, safe[a:b, None])[:, 0]
        nll = torch.where(valid[a:b], lse - xt, torch.zeros_like(lse))
        for dst, src in zip(out, (lse, ent, p1, p2, nll)):
            dst[a:b] = src
        if wsum is not None:
            wsum[a:b] = (x * w).sum(-1) if w is not None else x.sum(-1)
        if p2sum is not None:
            p2sum[a:b] = (p * p).sum(-1)
    return RowStats(*out, wsum, p2sum)  # pyright: ignore[reportCallIssue]


def inv_log_vocab(vocab: int) -> float:
    """1 / ln V for ``combined`` scoring; 1 for V = 1 (where H and NLL are 0 too)."""
    return 1.0 / math.log(vocab) if vocab > 1 else 1.0


def gradnorm_constants(vocab: int, label_smoothing: float) -> tuple[float, float]:
    """(c_y, c_0) with ||p - y~||^2 = sum_v p_v^2 - c_y p_t + c_0 for the smoothed target
    y~ = (1 - eps) onehot_t + eps / V: c_y = 2 (1 - eps), c_0 = (1 - eps)^2 - eps^2 / V
    (eps = 0: 2 and 1)."""
    eps = float(label_smoothing)
    return 2.0 * (1.0 - eps), (1.0 - eps) ** 2 - eps * eps / max(vocab, 1)


def gradnorm_sq(stats: RowStats, vocab: int, label_smoothing: float = 0.0) -> Tensor:
    """fp32 (N,) ||softmax(x) - y~||^2 from ``p2sum`` and p_t = exp(-nll) (``gradnorm_constants``)."""
    if stats.p2sum is None:
        raise ValueError("cggr_hook: gradnorm scoring needs the statistics' p2sum (row_stats(with_p2=True))")
    c_y, c_0 = gradnorm_constants(vocab, label_smoothing)
    # the same operations in the same order as the Triton difficulty kernel; a square that rounds
    # below zero (a near one-hot row) is 0, and NaN stays NaN
    return torch.clamp(stats.p2sum - c_y * torch.exp(-stats.nll) + c_0, min=0.0)


def _gradnorm(stats: RowStats, vocab: int, noise: Tensor | None, label_smoothing: float) -> Tensor:
    # a row whose loss is infinite (its target's logit -inf) has a bounded gradient norm but must
    # reach the loss as it would without gating: it scores +inf, so it is always kept
    return torch.where(stats.nll == math.inf, math.inf, torch.sqrt(gradnorm_sq(stats, vocab, label_smoothing)))


def _random(stats: RowStats, vocab: int, noise: Tensor | None, label_smoothing: float) -> Tensor:
    if noise is None:
        raise ValueError("cggr_hook: random scoring needs its noise")
    return noise


# each scoring mode's difficulty (``spec.SCORINGS``), larger = harder:
# (stats, vocab, noise, label_smoothing) -> (N,)
DIFFICULTY = {
    "gradnorm": _gradnorm,
    "entropy": lambda stats, vocab, noise, eps: stats.entropy,
    "margin": lambda stats, vocab, noise, eps: 1.0 - (stats.p_top1 - stats.p_top2),
    "loss": lambda stats, vocab, noise, eps: stats.nll,
    "combined": lambda stats, vocab, noise, eps: (
        (stats.entropy + stats.nll) * inv_log_vocab(vocab) + (1.0 - (stats.p_top1 - stats.p_top2))
    ),
    "random": _random,
}


def difficulty(
    stats: RowStats, scoring: str, vocab: int, valid: Tensor, noise: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """fp32 (N,) difficulty of every row, larger = harder; -inf where ``valid`` is False, +inf
    where it is NaN. ``noise`` (fp32 (N,)) is the difficulty of ``random`` scoring.

    ``gradnorm``: s = ||softmax(x) - y~||_2, the norm of the row's cross-entropy gradient on its
    logits (y~ the smoothed target, ``gradnorm_constants``), from ``p2sum`` and p_t = exp(-nll);
    +inf where the row's loss is infinite."""
    d = DIFFICULTY[spec.scoring(scoring).name](stats, vocab, noise, label_smoothing)
    d = d.float().nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    # -0 -> +0: the two zeros compare equal but a radix sort orders them; equal values must tie
    d = torch.where(d == 0, torch.zeros_like(d), d)
    return d.masked_fill(~valid, -math.inf)


def row_difficulty(
    stats: RowStats,
    targets: Tensor,
    vocab: int,
    ignore_index: int,
    scoring: str,
    noise: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Difficulty of every row (``difficulty``) and the sums the host needs, in one place.

    Returns (fp32 (N,) difficulty, float64 (P, 5) partial sums): the columns are ``SUM_FIELDS``
    and the host adds the P rows (here P = 1). A valid row has a target in [0, V) that is not
    ``ignore_index``; a bad one has neither.
    """
    valid, bad = target_masks(targets, vocab, ignore_index)
    d = difficulty(stats, scoring, vocab, valid, noise, label_smoothing)
    counts = torch.stack([valid, bad]).sum(1, dtype=torch.float64)
    per_row = torch.where(valid, torch.stack([stats.p_top1, stats.entropy, d]), 0.0)
    return d, torch.cat([counts, per_row.sum(1, dtype=torch.float64)]).view(1, len(SUM_FIELDS))


def target_counts(targets: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """int64 (P, 2) partial counts of valid targets (in [0, V) and not ``ignore_index``) and of bad
    ones (neither); the host adds the P rows (here P = 1)."""
    return torch.stack(target_masks(targets, vocab, ignore_index)).sum(1).view(1, 2)


def difficulty_rank(diff: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank), int64 (N,): ``order`` lists the rows by descending difficulty, ties by lower
    row index first; ``rank[r]`` is row r's position in ``order``:

        rank[r] = #{j : d_j > d_r} + #{j < r : d_j = d_r}

    (The difficulty maps NaN to +inf and -0 to +0; a NaN given here ranks as +inf too.)"""
    N = diff.numel()
    order = torch.sort(
        diff.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf), descending=True, stable=True
    ).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=diff.device))
    return order, rank


def ascending_order(keys: Tensor) -> Tensor:
    """int64 (N,): the rows by ascending ``keys`` (fp32 (N,), no NaN), ties by lower row index (a
    stable sort): the random order of the importance draw, from uniform keys."""
    return torch.sort(keys, stable=True).indices


def selected_rows(sel_key: Tensor, sel_k: int, n_selected: int) -> Tensor:
    """The rows with ``sel_key < sel_k``, ascending, int64 of the known length ``n_selected``
    (a stable sort of a 0/1 key: no data-dependent size, so no host synchronisation)."""
    outside = (sel_key >= sel_k).to(torch.int8)
    return torch.sort(outside, stable=True).indices[:n_selected]


def selected_loss(
    stats: RowStats,
    targets: Tensor,
    vocab: int,
    sel_key: Tensor,
    sel_k: int,
    n_selected: int,
    n_valid: int,
    reduction: str,
    label_smoothing: float,
    weight: Tensor | None,
    row_weight: Tensor | None = None,
    count: Tensor | None = None,
    counts: Tensor | None = None,
    ratio: float | Tensor = 0.0,
    keep: Tensor | None = None,
    selected: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated loss over the selected rows (``sel_key < sel_k``, ``n_selected`` of them) and
    ``row_scale``, d loss / d ce_r of every row (0 off the selection). Selected rows have valid
    targets; ``stats.wsum`` is needed with label smoothing.

    ce_r = (1 - eps) w_t nll_r + (eps / V) (sum(w) lse_r - sum_v w_v x_rv), w = 1 without ``weight``:

    - mean: sum_S ce_r / sum_S w_t (0 / 0 = NaN when nothing is selected), row_scale 1 / sum_S w_t;
    - sum:  sum_S ce_r * n_valid / K, row_scale n_valid / K (0 when K = 0);
    - none: (N,) ce_r on S and exact 0 elsewhere, row_scale 1 on S.

    With ``row_weight`` (fp32 (N,), read on S only; importance sampling's Horvitz-Thompson factors
    with the reduction's normaliser folded in) every selected row carries its own factor rho_r:
    mean and sum give sum_S rho_r ce_r, none gives rho_r ce_r on S; row_scale is rho_r on S.
    ``count`` (a float64 device scalar, with ``row_weight``): the number of valid rows where the
    host does not know it; the mean is NaN where it is 0, as torch's mean over no target.

    ``counts`` (partial counts whose first column counts the valid targets: ``target_counts``' or
    ``row_difficulty``'s) with ``ratio``: a selection whose size the host does not know (top-k at
    a fixed ratio): n_valid = n of the counts, sel_k = n_selected = ``keep_count(ratio, n)``, in
    place of the arguments. This reference reads n on the host; the Triton kernel does not.

    ``keep`` (bool (N,), with ``counts``): rows selected besides those of ``sel_key < sel_k``
    (``sequence_aware``'s rows every sequence keeps, valid ones only); ``n_selected`` is then the
    size of the union, written into ``selected`` (int64 (1,)), and the sum's factor is n / it.
    """
    if keep is not None and (counts is None or selected is None or row_weight is not None):
        raise ValueError(
            "cggr_hook: selected_loss takes keep only with counts and a selected buffer, and without row_weight"
        )
    if counts is not None:
        n_valid = int(counts[:, 0].sum())
        sel_k = n_selected = spec.keep_count(float(ratio), n_valid)
    N = targets.numel()
    dev = stats.lse.device
    if keep is not None:
        mark = (sel_key < sel_k) | keep
        n_selected = int(mark.sum())
        cast(Tensor, selected).fill_(n_selected)
        rows = selected_rows((~mark).to(torch.int8), 1, n_selected)
    else:
        rows = selected_rows(sel_key, sel_k, n_selected)
    ls = float(label_smoothing)
    if weight is None:
        w_t = torch.ones(n_selected, dtype=torch.float32, device=dev)
        w_sum = float(vocab)
    else:
        wf = weight.float()
        w_t = wf[targets[rows].clamp(0, vocab - 1)]  # (a padded row past the selection may be ignored)
        w_sum = wf.sum()
    row_loss = (1.0 - ls) * w_t * stats.nll[rows]
    if ls:
        row_loss = row_loss + (ls / vocab) * (w_sum * stats.lse[rows] - stats.wsum[rows])  # pyright: ignore[reportOptionalSubscript]
    row_scale = torch.zeros(N, dtype=torch.float32, device=dev)
    check_reduction(reduction)
    if row_weight is not None:
        # (``n_selected`` may be an upper bound here, the host not knowing the draw's k: the rows
        # past the selection carry no weight and add exact zeros)
        rho = torch.where(sel_key[rows] < sel_k, row_weight.float()[rows], 0.0)
        weighted = torch.where(rho != 0, row_loss * rho, 0.0)
        row_scale[rows] = rho
        if reduction == "none":
            return torch.zeros(N, dtype=torch.float32, device=dev).index_put_((rows,), weighted), row_scale
        total = weighted.sum()
        if reduction == "mean" and count is not None:
            total = torch.where(count.reshape(()) == 0, math.nan, total)
        return total, row_scale
    if reduction == "mean":
        denom = w_t.sum()
        loss = row_loss.sum() / denom
        row_scale[rows] = 1.0 / denom
    elif reduction == "sum":
        factor = n_valid / n_selected if n_selected else 0.0
        loss = row_loss.sum() * factor
        row_scale[rows] = factor
    elif reduction == "none":
        loss = torch.zeros(N, dtype=torch.float32, device=dev).index_put_((rows,), row_loss)
        row_scale[rows] = 1.0
    return loss, row_scale


def _row_grad(
    x: Tensor, lse: Tensor, tgt: Tensor, scale: Tensor, weight: Tensor | None, label_smoothing: float
) -> Tensor:
    """scale * d loss / d x for rows x (K, V) fp32:
    (1 - eps) w_t (p - onehot_t) + (eps / V) (sum(w) p - w)."""
    V = x.shape[1]
    p = torch.exp(x - lse[:, None])
    onehot = torch.zeros_like(p).scatter_(1, tgt[:, None], 1.0)
    if weight is None:
        g = (1.0 - label_smoothing) * (p - onehot)
        if label_smoothing:
            g = g + label_smoothing * p - label_smoothing / V
    else:
        w = weight.float()
        g = (1.0 - label_smoothing) * w[tgt][:, None] * (p - onehot)
        if label_smoothing:
            g = g + (label_smoothing / V) * (w.sum() * p - w[None, :])
    return g * scale[:, None]


def ce_grad_rows(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    rows: Tensor,
    row_scale: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    out_dtype: torch.dtype,
    grad_output: Tensor | None = None,
) -> Tensor:
    """Compact gradient (K, V) in ``out_dtype``: row k is ``row_scale[rows[k]] * grad_output``
    times the gradient of row ``rows[k]``'s cross entropy (``row_scale`` fp32 (N,); ``grad_output``
    one element or one per row (N,), None = 1). A listed row whose target is not in [0, V) or whose
    ``row_scale`` is 0 (a row past an importance draw's k, listed to fill its slots) gets zeros."""
    B, T, V = logits.shape
    K = rows.numel()
    check_row_scale(row_scale, B * T)
    g_out = flat_upstream(grad_output, B * T)
    out = torch.empty(K, V, dtype=out_dtype, device=logits.device)
    for a, b in _row_chunks(K, V):
        r = rows[a:b]
        x = logits[r // T, r % T].float()
        scale = row_scale[r].float()
        if g_out is not None:
            scale = scale * (g_out if g_out.numel() == 1 else g_out[r]).float()
        t = targets[r]
        # a row whose target is ignored, or whose scale is 0 (off the selection: an importance
        # draw's slots past k), is exact zeros whatever the upstream gradient, as Triton writes
        ok = ((t >= 0) & (t < V) & (row_scale[r] != 0))[:, None]
        g = _row_grad(x, lse[r], torch.where(ok[:, 0], t, 0), scale, weight, label_smoothing)
        out[a:b] = torch.where(ok, g, 0.0).to(out_dtype)
    return out


def ce_grad_dense_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    row_scale: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    out: Tensor,
    grad_output: Tensor | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """Dense gradient written into ``out`` (B, T, V), which may be ``logits`` itself (in place):
    row r gets ``row_scale[r] * grad_output`` times its cross-entropy gradient where
    ``row_scale[r] != 0`` and exact zeros elsewhere; a row whose scale is 0 is never read.
    ``grad_output``: one element (a reduced loss's upstream gradient) or one per row (N,); None = 1.
    ``order``: the schedule of the Triton kernel's programs, which the reference has not."""
    B, T, V = logits.shape
    sel = torch.nonzero(row_scale != 0).flatten()
    g = ce_grad_rows(logits, targets, lse, sel, row_scale, weight, label_smoothing, out.dtype, grad_output)
    keep = torch.zeros(B * T, dtype=torch.bool, device=logits.device)
    keep[sel] = True
    # zero the unselected rows first, then place the gradient rows (in place is safe: g is a copy)
    drop = torch.nonzero(~keep).flatten()
    out[drop // T, drop % T] = 0
    out[sel // T, sel % T] = g
    return out


# --------------------------------------------------------------------------------------------------
# importance sampling
# --------------------------------------------------------------------------------------------------
# Running sums are sequential (torch's CPU cumsum), each block's carry entering with its first
# element: the order of additions the Triton kernel's block scans follow under the interpreter, so
# the two backends draw the same rows bit for bit on the CPU.
_FLT_MAX = 3.4028234663852886e38


def importance_scores(diff: Tensor, uniform: bool) -> Tensor:
    """float64 score of each row: its difficulty with +inf (NaN logits) and NaN as the largest
    float, a huge but still summable score, as the Triton kernel's min(d, FLT_MAX) gives; every
    score 1 with ``uniform``."""
    if uniform:
        return torch.ones_like(diff, dtype=torch.float64)
    return diff.double().nan_to_num(nan=_FLT_MAX).clamp(max=_FLT_MAX)


def importance_shares(s: Tensor, total: Tensor, n: int, floor: float) -> Tensor:
    """q = (1 - a) s / sum s + a / n (a = ``floor``; s / sum s is 1 / n when every score is 0)."""
    share = torch.where(total > 0, s / total, torch.full_like(s, 1.0 / n))
    return (1.0 - floor) * share + floor / n


def water_level(scores: Tensor, k: int, floor: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total, q, m, rest) of water-filling over ``scores`` (float64 (n,), descending): the sum of
    the scores, the shares q, the number m of certain rows (0-d int64) and rest = sum_{i >= m} q_i.

    m is the first j < k with (k - j) q_j <= tail_j = sum_{i >= j} q_i (that condition, once true,
    stays true, and at j = k - 1 always is: taken there whatever the rounding). 1 <= k < n."""
    n = scores.numel()
    total = scores.cumsum(0)[-1]
    q = importance_shares(scores, total, n, floor)
    tail = q.flip(0).cumsum(0).flip(0)
    j = torch.arange(k, device=scores.device)
    fits = ((k - j) * q[:k] <= tail[:k]) | (j == k - 1)
    m = fits.to(torch.int32).argmax()  # the first j that fits
    rest = tail.gather(0, m.view(1)).squeeze(0)  # (indexing with a device scalar would read it on the host)
    return total, q, m, rest


def uncapped_probabilities(q: Tensor, m: Tensor, rest: Tensor, n: int, k: int) -> Tensor:
    """pi = min(1, c q) with c = (k - m) / rest for the rows past the m certain ones; where rest is
    0 (a = 0 and fewer than k positive scores) they share the remaining k - m uniformly."""
    left = k - m.double()
    return torch.where(rest > 0, (left / rest * q).clamp(max=1.0), left / (n - m.double()))


def inclusion_probabilities(scores: Tensor, k: int, floor: float) -> tuple[Tensor, Tensor]:
    """Water-filling: pi_i = min(1, c q_i) with sum pi = k, for ``scores`` (n,) >= 0 sorted
    descending (any float dtype; +inf: a certain row). The first m rows (``water_level``) have
    pi = 1. Returns (pi float64 (n,), m 0-d int64); no host synchronisation. 1 <= k < n."""
    s = importance_scores(scores, False)
    n = s.numel()
    _, q, m, rest = water_level(s, k, floor)
    pi = uncapped_probabilities(q, m, rest, n, k)
    return torch.where(torch.arange(n, device=s.device) < m, torch.ones_like(q), pi), m


def systematic_hits(
    pi: Tensor, certain: Tensor, uncertain: Tensor, m: Tensor, k: int, walk: Tensor, u: Tensor
) -> Tensor:
    """bool (N,): the rows that systematic sampling draws, exactly k with probability exactly pi.

    The m ``certain`` rows (pi = 1) hold the points u, u + 1, ..., u + m - 1 (u in [0, 1), float64
    (1,)); the ``uncertain`` rows follow in the random order ``walk`` (int64 rows, each uncertain
    one once; the other rows there take no room), each spanning its pi on the line from m: cum_i = m + the pi of
    the uncertain rows up to i in that order, the last uncertain row's end set to k. A row holds
    the points in (cum_prev, cum], with F(c) = min(ceil(c - u), k) the points below c: it is drawn
    when F(cum) > F(cum_prev). A length pi <= 1 holds at most one point, with probability pi.
    """
    unc = uncertain[walk]
    x = torch.where(unc, pi[walk], 0.0)
    x[0] += m.double()
    cum = x.cumsum(0)
    cum = torch.where(unc.cumsum(0) == uncertain.sum(), float(k), cum)
    F = (cum - u).ceil().clamp(max=k).long()
    F_prev = torch.cat([m.view(1), F[:-1]])
    hit = torch.zeros_like(uncertain).scatter_(0, walk, unc & (F > F_prev))
    return certain | hit


def importance_draw(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    n_valid: int,
    k: int,
    floor: float,
    uniform: bool,
    norm: int | Tensor | None,
) -> spec.ImportanceDraw:
    """Draw k of the n = ``n_valid`` valid rows (the first n of ``order``, the difficulty order:
    ``rank[r] < n``) with inclusion probabilities pi by water-filling over their scores
    (``importance_scores`` of ``diff`` (N,) fp32; ``uniform``: every score 1) and the floor a:

        q_i = (1 - a) s_i / sum s + a / n,    pi_i = min(1, c q_i),    sum pi = k

    (``water_level``: the m hardest rows are certain, pi = 1), then systematic sampling
    (``systematic_hits``) over the valid rows in the random order ``perm`` (int64 (n,), a
    permutation of 0..n-1: the valid rows by their ordinals, the j-th valid row in row order being
    j) with the start u (float64 (1,), uniform in [0, 1)).

    Returns ``ImportanceDraw``: the rows ascending, 1 / pi of each, ``row_weight`` = (1 / pi_r) /
    ``norm`` on the drawn rows (an int, a float64 0-d device tensor, or None for n), the key (0 on
    the drawn rows, 1 elsewhere) and ``DRAW_FIGURES``. No host synchronisation; 1 <= k < n <= N.
    """
    n = n_valid
    norm = n if norm is None else norm
    s_sorted = importance_scores(diff[order[:n]], uniform)
    total, _, m, rest = water_level(s_sorted, k, floor)
    valid = rank < n
    certain = rank < m
    uncertain = valid & ~certain
    s = torch.where(valid, importance_scores(diff, uniform), 0.0)
    pi = uncapped_probabilities(importance_shares(s, total, n, floor), m, rest, n, k)
    pi = torch.where(certain, 1.0, torch.where(uncertain, pi, 0.0))
    valid_rows = torch.sort((~valid).to(torch.int8), stable=True).indices[:n]
    drawn = systematic_hits(pi, certain, uncertain, m, k, valid_rows[perm], u)
    w = 1.0 / torch.where(drawn, pi, 1.0)
    rows = torch.sort((~drawn).to(torch.int8), stable=True).indices[:k]
    inv_pi = w[rows]
    row_weight = torch.where(drawn, w / norm, 0.0).float()
    key = (~drawn).long()
    figures = torch.stack(
        [
            inv_pi.sum() ** 2 / (inv_pi * inv_pi).sum(),
            inv_pi.max(),
            m.double(),
            total / n,
            (s_sorted * s_sorted).sum() / n,
            torch.tensor(float(n), dtype=torch.float64, device=diff.device),
            torch.tensor(float(k), dtype=torch.float64, device=diff.device),
        ]
    )
    return spec.ImportanceDraw(rows, inv_pi, row_weight, key, figures)


def importance_draw_at_ratio(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    counts: Tensor,
    ratio: float | Tensor,
    capacity: int,
    floor: float,
    uniform: bool,
    norm: int | Tensor | None,
) -> spec.ImportanceDraw:
    """``importance_draw`` with n and k taken on the device, where the host never learns them:
    n = the sum of ``counts``' first column (``target_counts``' int64 (P, 2) or ``row_difficulty``'s
    float64 (P, 5) partials: the valid targets), k =
    ``spec.keep_count(ratio, n)``, and the rows listed in ``capacity`` slots (an upper bound of
    k the host knows: ``keep_count(ratio, N)``), the drawn rows ascending and then the first undrawn
    rows ascending, which carry no weight (their ``row_weight`` is 0, their ``inv_pi`` 1): a
    gradient over the listed rows gives those rows exact zeros.

    ``perm``: the random order of one key per row of the call (int64 (N,), a permutation of
    0..N-1); the valid rows take the ordinals below n and the order of those is the draw's
    (``importance_draw``'s ``perm``). Where k = n (a few valid rows, or none) every valid row is
    kept with pi = 1. ``norm`` None: n. This reference reads n on the host (the CPU's reads cost
    nothing); the Triton kernel does not."""
    n = int(counts[:, 0].sum())
    k = spec.keep_count(float(ratio), n)
    dev = diff.device
    if 0 < k < n:
        d = importance_draw(diff, order, rank, perm[perm < n], u, n, k, floor, uniform, norm)
        drawn = d.key == 0
        rows = torch.sort((~drawn).to(torch.int8), stable=True).indices[:capacity]
        inv_pi = torch.cat([d.inv_pi, torch.ones(capacity - k, dtype=torch.float64, device=dev)])
        return spec.ImportanceDraw(rows, inv_pi, d.row_weight, d.key, d.figures)
    # every valid row kept, each with pi = 1 (none where n = 0)
    valid = rank < n
    norm = max(n, 1) if norm is None else norm
    rows = torch.sort((~valid).to(torch.int8), stable=True).indices[:capacity]
    w = valid.double()
    row_weight = (w / norm).float()
    s = importance_scores(diff[order[:n]], uniform)
    total = s.cumsum(0)[-1] if n else torch.zeros((), dtype=torch.float64, device=dev)
    figures = torch.stack(
        [
            w.sum() ** 2 / w.sum(),
            w.max(),
            w.sum(),
            total / n if n else total * math.nan,
            (s * s).sum() / n if n else total * math.nan,
            torch.tensor(float(n), dtype=torch.float64, device=dev),
            torch.tensor(float(k), dtype=torch.float64, device=dev),
        ]
    )
    return spec.ImportanceDraw(
        rows, torch.ones(capacity, dtype=torch.float64, device=dev), row_weight, valid.logical_not().long(), figures
    )


def strata_at_ratio(counts: Tensor, ratio: float | Tensor, num_strata: int) -> Tensor:
    """``stratified`` selection's quotas where the host does not know n: int64 (num_strata + 1,),
    the quotas of the buckets (``spec.strata_quotas(n, keep_count(ratio, n), num_strata)``, hardest
    first, 0 past min(num_strata, n)) and then n, the sum of ``counts``' first column. This reference
    reads n on the host; the Triton kernel does not."""
    n = int(counts[:, 0].sum())
    quotas = spec.strata_quotas(n, spec.keep_count(float(ratio), n), num_strata) if n > 0 else []
    quotas = quotas + [0] * (num_strata - len(quotas))
    return torch.tensor(quotas + [n], dtype=torch.int64, device=counts.device)


def dynamic_ratio(sums: Tensor, ratio: float, sensitivity: float, average: Tensor) -> Tensor:
    """The dynamic threshold's ratio of a batch, float64 (1,): ``spec.dynamic_ratio`` of the
    curriculum's ``ratio`` and ``sensitivity`` at the batch's mean confidence (the partial sums'
    confidence over their count, each column added row after row: ``spec.sum_in_order``) and the
    running average held in ``average`` (float64 (2,): the average and whether there is one), which
    is then updated in place (``spec.running_confidence``), unless the sums count a bad target
    (the call raises). This reference reads the sums on the host; the Triton kernel does not."""
    rows = sums.tolist()
    n = spec.sum_in_order(row[0] for row in rows)
    n_bad = spec.sum_in_order(row[SUM_FIELDS.index("n_bad")] for row in rows)
    c_sum = spec.sum_in_order(row[SUM_FIELDS.index("p_top1")] for row in rows)
    confidence = c_sum / n if n else math.nan
    with _DYNAMIC_LOCK:  # one read and write of the average at a time (threads sharing a gate)
        value, present = average.tolist()
        avg = value if present else None
        out = spec.dynamic_ratio(float(ratio), confidence, avg, float(sensitivity))
        new = spec.running_confidence(avg, confidence)
        if new is not None and not n_bad:  # (a batch with a bad target raises: it moves nothing)
            average.copy_(torch.tensor([new, 1.0], dtype=torch.float64))
    return torch.tensor([out], dtype=torch.float64, device=sums.device)


_DYNAMIC_LOCK = threading.Lock()
