"""Tracing a cross entropy's input back to a tapped LM head call (``head.HeadTap``).

When ``F.cross_entropy`` is called, ``trace`` walks the input's autograd graph back through
row-preserving shape and dtype operations (the fp32 upcast, the shift ``logits[:, :-1]``, reshapes,
transposes) to the tap's node, and replays those operations on a tensor of row indices: the result
maps every cross-entropy row to the head-output row it came from. Each operation it knows is a row
of ``OPS``, which gives both its shape rule (the shape it was applied to, from the shape it made)
and its row replay. Anything else on the way (a scale, a soft-cap, a gather) means the input is not
the head's logits, and the loss stays the plain one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .head import HeadCall, HeadTap

# how many graph nodes may stand between the head's output and the loss input
MAX_TRACE_DEPTH = 24

Shape = tuple[int, ...]


@dataclass
class Trace:
    call: HeadCall
    # (N_ce,) int64: the head-output row of every cross-entropy row, in the loss's order; None once
    # the call is consumed, or where the loss rows are the head rows in order (``identity``)
    rows: Tensor | None
    exact: bool  # every dtype change on the way is exact (an upcast), so head rows hold the same values
    identity: bool = False  # loss row i is head row i for every row: no row map is built


def _signed(v: int) -> int:
    # saved int64 arguments come back as unsigned 64-bit numbers
    return v - (1 << 64) if v >= (1 << 63) else v


# --------------------------------------------------------------------------------------------------
# one handler per operation: its shape rule and its row replay
# --------------------------------------------------------------------------------------------------
# A row replay takes R, the row-index tensor shaped as the operation's input with the vocabulary dim
# (at vdim) of size 1, and returns it shaped as the operation's output, with the vocabulary dim's new
# place; or None where the operation does not keep whole rows of the vocabulary.
Replay = Callable[[Any, Tensor, int, int, Shape, Shape], tuple[Tensor, int] | None]


@dataclass(frozen=True)
class Op:
    """An autograd operation that may stand between the head's logits and the loss input."""

    input_shape: Callable[[Any, Shape], Shape]  # (node, output shape) -> the shape it was applied to
    replay: Replay  # (node, R, vdim, V, input shape, output shape) -> (R, vdim) or None
    any_inputs: bool = False  # its node may list more than one next function
    cast: bool = False  # a dtype change (exact only when it widens)
    keeps_order: bool = False  # with the vocabulary dim last, rows keep their row-major order


def _same_shape(node: Any, out: Shape) -> Shape:
    return out


def _saved_sizes(node: Any, out: Shape) -> Shape:
    return tuple(node._saved_self_sym_sizes)


def _same_rows(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    return R, vdim


def _replay_reshape(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    if vdim != R.dim() - 1 or out[-1] != V:
        return None  # a reshape that mixes the vocabulary with other dims
    R = R.reshape(*out[:-1], 1)
    return R, R.dim() - 1


def _replay_slice(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    d = _signed(node._saved_dim) % R.dim()
    start, end, step = _signed(node._saved_start), _signed(node._saved_end), _signed(node._saved_step)
    if d == vdim:
        # the whole vocabulary, or part of it only
        return (R, vdim) if range(V)[start:end:step] == range(V) else None
    index = [slice(None)] * R.dim()
    index[d] = slice(start, end, step)
    return R[tuple(index)], vdim


def _replay_select(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    d = _signed(node._saved_dim) % R.dim()
    if d == vdim:
        return None
    return R.select(d, _signed(node._saved_index)), vdim - (1 if d < vdim else 0)


def _transposed_dims(node: Any) -> tuple[int, int]:
    if type(node).__name__ == "TBackward0":
        return 0, 1
    return _signed(node._saved_dim0), _signed(node._saved_dim1)


def _transposed_shape(node: Any, out: Shape) -> Shape:
    d0, d1 = _transposed_dims(node)
    inp = list(out)
    d0, d1 = d0 % len(out), d1 % len(out)
    inp[d0], inp[d1] = inp[d1], inp[d0]
    return tuple(inp)


def _replay_transpose(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    d0, d1 = _transposed_dims(node)
    if type(node).__name__ != "TBackward0":
        d0, d1 = d0 % R.dim(), d1 % R.dim()
    return R.transpose(d0, d1), (d1 if vdim == d0 else d0 if vdim == d1 else vdim)


def _permuted_shape(node: Any, out: Shape) -> Shape:
    dims = [_signed(d) % len(out) for d in node._saved_dims]
    inp = [0] * len(out)
    for i, d in enumerate(dims):
        inp[d] = out[i]
    return tuple(inp)


def _replay_permute(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    dims = [_signed(d) % R.dim() for d in node._saved_dims]
    return R.permute(dims), dims.index(vdim)


def _unsqueezed_shape(node: Any, out: Shape) -> Shape:
    d = _signed(node._saved_dim) % len(out)
    return out[:d] + out[d + 1 :]


def _replay_unsqueeze(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    d = _signed(node._saved_dim) % (R.dim() + 1)
    return R.unsqueeze(d), vdim + (1 if d <= vdim else 0)


def _replay_squeeze(node: Any, R: Tensor, vdim: int, V: int, inp: Shape, out: Shape) -> tuple[Tensor, int] | None:
    if type(node).__name__ == "SqueezeBackward0":
        asked = range(len(inp))
    else:
        saved = node._saved_dim
        asked = [_signed(d) % len(inp) for d in (saved if isinstance(saved, tuple) else (saved,))]
    removed = sorted(d for d in asked if inp[d] == 1)
    if vdim in removed:
        return None
    if removed:
        R = R.squeeze(tuple(removed))
    return R, vdim - sum(1 for d in removed if d < vdim)


_SAME = Op(_same_shape, _same_rows, keeps_order=True)
_RESHAPE = Op(_saved_sizes, _replay_reshape, keeps_order=True)
_TRANSPOSE = Op(_transposed_shape, _replay_transpose)
_SQUEEZE = Op(_saved_sizes, _replay_squeeze, keeps_order=True)

# the operations a loss input may be reached through from the head's logits, by autograd node name
OPS: dict[str, Op] = {
    "ToCopyBackward0": Op(_same_shape, _same_rows, cast=True, keeps_order=True),
    "CloneBackward0": _SAME,
    "AliasBackward0": _SAME,
    "ViewBackward0": _RESHAPE,
    "UnsafeViewBackward0": _RESHAPE,
    "ReshapeAliasBackward0": _RESHAPE,
    "_ReshapeAliasBackward0": _RESHAPE,
    "SliceBackward0": Op(_saved_sizes, _replay_slice, any_inputs=True),
    "SelectBackward0": Op(_saved_sizes, _replay_select),
    "TransposeBackward0": _TRANSPOSE,
    "TBackward0": _TRANSPOSE,
    "PermuteBackward0": Op(_permuted_shape, _replay_permute),
    "UnsqueezeBackward0": Op(_unsqueezed_shape, _replay_unsqueeze, keeps_order=True),
    "SqueezeBackward0": _SQUEEZE,
    "SqueezeBackward1": _SQUEEZE,
    "SqueezeBackward2": _SQUEEZE,
}


# a dtype change is exact when it widens: half/bfloat16 -> float32 -> float64
_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or _FLOAT_RANK.get(dst, 0) > _FLOAT_RANK.get(src, 9)


PLAIN_MARK = "cggr_hook.plain"  # node metadata key: a plain step's head output, by gate id


class _PlainMark:
    """What a plain step's head output carries in its autograd node's metadata: the gate's id and
    whether a cross entropy has booked that forward yet."""

    __slots__ = ("gate_id", "booked")

    def __init__(self, gate_id: int) -> None:
        self.gate_id, self.booked = gate_id, False


def mark_plain(node: Any, gate_id: int) -> None:
    """Mark the autograd node of a head output that a gate left untapped (a plain step)."""
    node.metadata[PLAIN_MARK] = _PlainMark(gate_id)


def claim_plain(x: Tensor) -> int | None:
    """The gate id of the plain step's head output that ``x`` is computed from through the
    operations of ``OPS`` (reshapes, slices, casts: what a loss does to the logits) or a
    torch.compile'd region that takes it in, the first time that output is claimed; else None."""
    cur = x.grad_fn
    for _ in range(MAX_TRACE_DEPTH):
        if cur is None:
            return None
        candidates = [cur]
        if type(cur).__name__ == "CompiledFunctionBackward":
            candidates += [n for n, _ in cur.next_functions if n is not None]
        for node in candidates:
            metadata = getattr(node, "metadata", None)
            mark = metadata.get(PLAIN_MARK) if isinstance(metadata, dict) else None
            if mark is not None:
                if mark.booked:
                    return None
                mark.booked = True
                return mark.gate_id
        op = OPS.get(type(cur).__name__)
        nxt = cur.next_functions
        if op is None or not nxt or (len(nxt) != 1 and not op.any_inputs):
            return None
        cur = nxt[0][0]
    return None


def trace(x: Tensor, class_dim: int) -> Trace | None:
    """Map the cross-entropy input ``x`` (class dim ``class_dim``) back to a tapped head call."""
    node = x.grad_fn
    if node is not None and type(node).__name__ == "CompiledFunctionBackward":
        return _trace_compiled(x, class_dim, node)
    ops: list[tuple[Any, Op]] = []  # from the loss input back to the tap
    for _ in range(MAX_TRACE_DEPTH):
        if node is None:
            return None
        if isinstance(node, HeadTap._backward_cls):
            break
        op = OPS.get(type(node).__name__)
        if op is None:
            return None
        nxt = node.next_functions
        if len(nxt) != 1 and not op.any_inputs:
            return None
        ops.append((node, op))
        node = nxt[0][0]
    else:
        return None
    call: HeadCall = node.call  # pyright: ignore[reportAttributeAccessIssue]
    if call.consumed:
        return Trace(call, None, False)
    head_out = call.output
    V = head_out.shape[-1]

    # shapes after each op, from the loss input backwards
    shapes: list[Shape] = [tuple(x.shape)]
    for node, op in ops:
        shapes.append(tuple(int(s) for s in op.input_shape(node, shapes[-1])))
    if shapes[-1] != tuple(head_out.shape):
        return None
    n_casts = sum(1 for _, op in ops if op.cast)
    exact = n_casts == 0 or (n_casts == 1 and _exact_cast(head_out.dtype, x.dtype))
    if class_dim == x.dim() - 1 and all(op.keeps_order for _, op in ops) and all(s and s[-1] == V for s in shapes):
        # casts, copies and reshapes that keep the vocabulary last (the usual `logits.float().view(-1,
        # V)`): the loss rows are the head rows in order, and no row map needs building
        return Trace(call, None, exact, identity=True)

    # replay on row indices, from the head forwards, keeping the vocabulary dim as a size-1 dim
    lead = head_out.shape[:-1]
    R = torch.arange(head_out.numel() // max(V, 1), device=head_out.device).view(*lead, 1)
    vdim = R.dim() - 1
    for i in range(len(ops) - 1, -1, -1):
        (node, op), out_shape = ops[i], shapes[i]
        replayed = op.replay(node, R, vdim, V, shapes[i + 1], out_shape)
        if replayed is None:
            return None
        R, vdim = replayed
        if tuple(s for j, s in enumerate(R.shape) if j != vdim) != tuple(
            s for j, s in enumerate(out_shape) if j != vdim
        ):
            return None
    if vdim != class_dim:
        return None
    rows = R.movedim(vdim, -1).reshape(-1)
    return Trace(call, rows, exact)


def _trace_compiled(x: Tensor, class_dim: int, node: Any) -> Trace | None:
    """The loss input is the output of a torch.compile'd region fed by a tap: the operations in
    between are compiled away, so the row map is inferred. Candidates are the ways a causal-LM
    loss takes the head's rows (all of them, or each sequence without its last / first position).
    Three vocabulary columns pick the candidate; it is taken only if it is the only one that fits
    there and the whole input then equals those head rows exactly (checked in chunks, so a
    compiled region that changes any logit keeps the plain loss). Two host reads, on this path
    only."""
    taps = [n for n, _ in node.next_functions if isinstance(n, HeadTap._backward_cls)]
    if len(taps) != 1 or taps[0].call.consumed:
        return None
    call: HeadCall = taps[0].call
    out = call.output
    V = out.shape[-1]
    if x.dim() < 1 or x.shape[class_dim] != V or x.device != out.device or not _exact_cast(out.dtype, x.dtype):
        return None
    X = x.detach().movedim(class_dim, -1).reshape(-1, V)
    B, T = (out.shape[0], out.shape[1]) if out.dim() == 3 else (1, out.numel() // max(V, 1))
    grid = torch.arange(B * T, device=out.device).view(B, T)
    candidates = [grid.reshape(-1), grid[:, :-1].reshape(-1), grid[:, 1:].reshape(-1)]
    candidates = [c for c in candidates if c.numel() == X.shape[0]]
    if not candidates:
        return None
    H = out.detach().reshape(-1, V)
    cols = torch.tensor(sorted({0, V // 2, V - 1}), device=out.device)
    probe = X[:, cols]
    matches = torch.stack([(H[c][:, cols].to(X.dtype) == probe).all() for c in candidates]).tolist()
    if sum(matches) != 1:
        return None
    rows = candidates[matches.index(True)]
    step = max(1, (1 << 24) // max(V, 1))  # rows per chunk: at most 16M elements of temporaries
    same = torch.ones((), dtype=torch.bool, device=out.device)
    for a in range(0, rows.numel(), step):
        same &= (H[rows[a : a + step]].to(X.dtype) == X[a : a + step]).all()
    if not bool(same):
        return None
    return Trace(call, rows, True)


def tap_behind(x: Tensor, max_nodes: int = 64) -> str | None:
    """If an unconsumed tap lies a few graph nodes behind ``x`` through other operations (a
    soft-cap, a scale), the names of those operations; else None. Used to warn that such a loss
    is not gated."""
    start = x.grad_fn
    if start is None:
        return None
    seen = {id(start)}
    frontier: list[tuple[Any, tuple[str, ...]]] = [(start, ())]
    visited = 0
    while frontier and visited < max_nodes:
        node, path = frontier.pop(0)
        visited += 1
        if isinstance(node, HeadTap._backward_cls):
            return None if node.call.consumed else " <- ".join(path) or "(none)"  # pyright: ignore[reportAttributeAccessIssue]
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                frontier.append((nxt, path + (type(node).__name__,)))
    return None
