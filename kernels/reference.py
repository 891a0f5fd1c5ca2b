"""PyTorch reference of the row kernels: the semantics every backend must match, and the test oracle.

Logits come as a 3-D view ``(B, T, V)`` with any strides (see ``kernels.as_rows``); row ``r`` is
``logits[r // T, r % T]``. All arithmetic is fp32 whatever the logits' dtype. Rows are processed in
chunks so the fp32 temporaries stay small.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .types import RowStats

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


def _safe_targets(targets: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(valid mask, targets clamped into [0, V)) so an ignored or bad target is never an address."""
    valid = (targets != ignore_index) & (targets >= 0) & (targets < vocab)
    return valid, torch.where(valid, targets, torch.zeros_like(targets))


def row_stats(logits: Tensor, targets: Tensor, ignore_index: int, weight: Tensor | None = None,
              with_wsum: bool = False) -> RowStats:
    """One pass over each row.

    Returns fp32 (N,) vectors: ``lse`` = log sum_v exp x_v; ``entropy`` = sum_v p_v (lse - x_v);
    ``p_top1``, ``p_top2`` = the two largest probabilities (ties count twice, p_top2 = 0 when
    V = 1); ``nll`` = lse - x_t for a target in [0, V) that is not ``ignore_index``, else 0; and
    with ``with_wsum`` ``wsum`` = sum_v w_v x_v (w = 1 without ``weight``), which label smoothing needs.
    """
    B, T, V = logits.shape
    N = B * T
    dev = logits.device
    out = [torch.empty(N, dtype=torch.float32, device=dev) for _ in range(5)]
    wsum = torch.empty(N, dtype=torch.float32, device=dev) if with_wsum else None
    valid, safe = _safe_targets(targets, ignore_index, V)
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
    return RowStats(*out, wsum)


def _row_grad(x: Tensor, lse: Tensor, tgt: Tensor, scale: Tensor, weight: Tensor | None,
              label_smoothing: float) -> Tensor:
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


def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, rows: Tensor, scale: Tensor,
                 weight: Tensor | None, label_smoothing: float, out_dtype: torch.dtype) -> Tensor:
    """Compact gradient (K, V) in ``out_dtype``: row k is ``scale[k]`` times the gradient of
    row ``rows[k]``'s cross entropy. Selected rows have valid targets."""
    B, T, V = logits.shape
    K = rows.numel()
    out = torch.empty(K, V, dtype=out_dtype, device=logits.device)
    for a, b in _row_chunks(K, V):
        r = rows[a:b]
        x = logits[r // T, r % T].float()
        out[a:b] = _row_grad(x, lse[r], targets[r], scale[a:b].float(), weight, label_smoothing).to(out_dtype)
    return out


def ce_grad_dense_(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor,
                   weight: Tensor | None, label_smoothing: float, out: Tensor) -> Tensor:
    """Dense gradient written into ``out`` (B, T, V), which may be ``logits`` itself (in place):
    row r gets ``row_scale[r]`` times its cross-entropy gradient where ``row_scale[r] != 0``
    and exact zeros elsewhere; a row whose scale is 0 is never read."""
    B, T, V = logits.shape
    sel = torch.nonzero(row_scale != 0).flatten()
    g = ce_grad_rows(logits, targets, lse, sel, row_scale[sel], weight, label_smoothing, out.dtype)
    keep = torch.zeros(B * T, dtype=torch.bool, device=logits.device)
    keep[sel] = True
    # zero the unselected rows first, then place the gradient rows (in place is safe: g is a copy)
    drop = torch.nonzero(~keep).flatten()
    out[drop // T, drop % T] = 0
    out[sel // T, sel % T] = g
    return out
