"""Shared pieces of the tests: tiny models and an independently written gated reference loss."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class TinyLM(nn.Module):
    """nanoGPT-shaped: embedding, a nonlinearity, an ``lm_head``; forward returns (B, T, V) logits."""

    def __init__(self, vocab: int = 37, dim: int = 16, bias: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.emb(idx))))


def shifted_loss(model: nn.Module, idx: torch.Tensor, **kw) -> torch.Tensor:
    """The user-side shift: logits[:, :-1] against idx[:, 1:]."""
    logits = model(idx)
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1), **kw)


def reference_difficulty(
    logits: torch.Tensor, targets: torch.Tensor, scoring: str, ignore_index: int = -100
) -> torch.Tensor:
    """Difficulty of rows (N, V), float64, -inf where ignored: written from the definitions."""
    x = logits.detach().double()
    V = x.shape[-1]
    lp = torch.log_softmax(x, -1)
    p = lp.exp()
    ent = -(torch.where(p > 0, p * lp, torch.zeros_like(p))).sum(-1)
    top = torch.topk(p, min(2, V), -1).values
    p2 = top[:, 1] if V > 1 else torch.zeros_like(top[:, 0])
    margin = 1 - (top[:, 0] - p2)
    valid = targets != ignore_index
    nll = torch.where(valid, -lp.gather(1, targets.clamp(0, V - 1)[:, None])[:, 0], torch.zeros_like(ent))
    lnv = math.log(V) if V > 1 else 1.0
    d = {"entropy": ent, "margin": margin, "loss": nll, "combined": ent / lnv + margin + nll / lnv}[scoring]
    return torch.where(valid, d, torch.full_like(d, -math.inf))


def reference_topk_rows(
    logits: torch.Tensor, targets: torch.Tensor, ratio: float, scoring: str = "combined", ignore_index: int = -100
) -> torch.Tensor:
    """The k hardest valid rows, k = max(1, floor(ratio * n + 0.5)); ties by lower index."""
    d = reference_difficulty(logits, targets, scoring, ignore_index)
    n = int((targets != ignore_index).sum())
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    k = max(1, math.floor(ratio * n + 0.5))
    order = sorted(range(len(d)), key=lambda i: (-float(d[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def masked_reference_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    **kw,
) -> torch.Tensor:
    """The gated loss's definition, built from torch's own per-token cross entropy (autograd-able):
    mean over selected rows (weighted as torch weighs), sum times valid / selected, or per-row with
    zeros elsewhere."""
    per_row = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=ignore_index, **kw)
    mask = torch.zeros_like(per_row, dtype=torch.bool)
    mask[rows] = True
    if reduction == "none":
        return torch.where(mask, per_row, torch.zeros_like(per_row))
    total = torch.where(mask, per_row, torch.zeros_like(per_row)).sum()
    if reduction == "sum":
        n_valid = int((targets != ignore_index).sum())
        return total * (n_valid / len(rows)) if len(rows) else total * 0
    w = kw.get("weight")
    denom = w[targets[rows]].sum() if w is not None else torch.tensor(float(len(rows)))
    return total / denom


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def nan_empty():
    """torch.empty returns NaN-filled float tensors inside the block, so an unwritten output shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def make_logits(B, T, V, dtype, layout, scale=3.0, gen=None):
    """(B, T, V) random logits of ``dtype`` on DEVICE in the given layout (a view, not a copy)."""

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)

    if layout == "contiguous":
        x = rand(B, T, V)
    elif layout == "shifted":
        # the usual next-token view: logits[:, :-1] of a (B, T + 1, V) tensor
        x = rand(B, T + 1, V)[:, :-1]
    elif layout == "vocab_strided":
        # vocabulary is the slowest dimension: the stride of V is B * T, not 1
        x = rand(V, B, T).permute(1, 2, 0)
    else:
        raise AssertionError(layout)
    assert x.is_contiguous() == (layout == "contiguous") or V == 1
    return x


def count_target_counts(monkeypatch) -> list:
    """Count the launches of ``kernels.target_counts`` (the read path's separate count of the
    targets): the returned list gains an entry a call."""
    from cggr_hook import kernels

    real = kernels.target_counts
    counted: list = []
    monkeypatch.setattr(kernels, "target_counts", lambda *a: counted.append(1) or real(*a))
    return counted


def start_held_reader(monkeypatch, module, name: str, reader, hold_s: float = 20.0):
    """Run ``reader`` in a thread with ``module.name`` held at its entry until the returned
    ``release`` event is set (or ``hold_s`` passes): a window in which another call can run.
    Returns (thread, release) once the reader is inside the held function."""
    import threading

    real = getattr(module, name)
    entered, release = threading.Event(), threading.Event()

    def held(*a, **k):
        entered.set()
        release.wait(hold_s)
        return real(*a, **k)

    monkeypatch.setattr(module, name, held)
    thread = threading.Thread(target=reader)
    thread.start()
    assert entered.wait(5), f"{name} was not reached"
    monkeypatch.setattr(module, name, real)  # later callers run unheld
    return thread, release


def check_gated_gradients(
    make_model,
    forward,
    ids,
    ratio: float,
    vocab: int,
    head_route: str | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    **enable,
) -> dict:
    """Gate a fresh ``make_model()`` and compare its shifted loss and every trainable parameter's
    gradient with the same loss built by hand on a second ``make_model()`` (it must build the same
    model every time): at ``ratio`` 1.0 the plain
    cross entropy, below it the masked reference over the k hardest rows. ``forward(model, ids)``
    returns (B, T, V) logits. ``head_route``: 'head' (the selected-rows head backward) or 'logits'
    (the gradient through the logits), checked on the loss's graph. Returns the gated model's grads."""
    import cggr_hook

    model, ref = make_model(), make_model()
    # the original configuration (hard top-k), which the masked reference is written for
    enable = dict(
        dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False, min_tokens_ratio=ratio),
        **enable,
    )
    cggr_hook.enable(model, **enable)
    t = ids[:, 1:].reshape(-1)
    loss = F.cross_entropy(forward(model, ids)[:, :-1].reshape(-1, vocab), t)
    node = type(loss.grad_fn).__name__
    assert node.startswith("Gated"), f"not gated: {node}"
    if head_route is not None:
        assert node.startswith("GatedHead" if head_route == "head" else "GatedCrossEntropy"), node
    loss.backward()
    X = forward(ref, ids)[:, :-1].reshape(-1, vocab)
    if ratio == 1.0:
        expected = F.cross_entropy(X.float(), t)
    else:
        expected = masked_reference_loss(X, t, reference_topk_rows(X.detach(), t, ratio))
    expected.backward()
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=rtol, atol=atol)
    got = dict(model.named_parameters())
    grads = {}
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert got[name].grad is not None, name
            torch.testing.assert_close(got[name].grad, p.grad, rtol=rtol, atol=atol, msg=name)
            grads[name] = got[name].grad
    assert grads
    cggr_hook.disable(model)
    return grads
