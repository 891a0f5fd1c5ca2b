"""CUDA-graph replay of a call's kernels, where which kernels run does not depend on what they find.

Importance and top-k at a fixed ratio read nothing on the host between their launches
(``pipeline._at_ratio``): the scoring pass, the difficulty, its order, the draw and the loss are a
fixed sequence of launches for given shapes and options. Their Python and launch cost is most of a
gated call's host time (``kernels/NOTES.md``, "Host time of a call"); replaying them as one CUDA
graph costs one launch.

``replayed(key, device, eager, fill, compute)`` runs ``compute(eager())`` the first
``CAPTURE_AFTER`` times it sees ``key`` (the first compiles Triton's kernels), then captures it
once and from there on replays it:

- ``key`` names everything the launches depend on that is not an input: shapes, strides, dtypes,
  alignments, options, and the address of anything read in place (class weights).
- ``eager()`` returns the call's inputs (a dict of tensors) as they are; ``fill(None)`` returns
  new buffers holding them and ``fill(bufs)`` writes them into ``bufs``: the graph's inputs. The
  logits, too large to copy, are an input by their address (``kernels.row_stats``' ``address``);
  random numbers are drawn from the call's generator in the same order, so a replay draws what the
  eager call draws.
- ``compute`` returns a dict of tensors. In the graph they are copied into one buffer, which each
  replay copies once: the results a caller keeps (a forward whose backward comes after the next
  forward) are its own, never overwritten by the next replay. The results named in ``alone`` get
  a copy of their own instead (a loss a training loop may keep for its whole run must not hold
  the call's other results alive).

Only ``MAX_GRAPHS`` keys are kept (least recently used first out). ``clear()`` drops them (a gate's
``disable()``). Nothing is captured while the stream is already capturing (a caller's own graph).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# eager runs of a key before it is captured: the first compiles and warms the kernels, the second
# shows the key repeats (a key seen once, as where every call's logits sit elsewhere, costs no capture)
CAPTURE_AFTER = 2
MAX_GRAPHS = 8  # graphs kept; each holds its intermediates (O(rows) floats) in its own memory pool
_ALIGN = 16  # bytes: every result starts at an offset any dtype can be viewed at


@dataclass
class _Entry:
    seen: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)
    flat: Tensor | None = None  # uint8: every result, at ``layout``'s offsets, in the graph's pool
    layout: list[tuple[str, int, int, torch.dtype, torch.Size]] = field(default_factory=list)
    failed: bool = False  # capture raised: this key runs eagerly


_lock = threading.Lock()
_entries: OrderedDict[tuple, _Entry] = OrderedDict()
_streams: dict[int, torch.cuda.Stream] = {}


def tensor_key(t: Tensor | None) -> tuple | None:
    """What a captured launch depends on in ``t``: where it is and how it is laid out."""
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def capturable(t: Tensor) -> bool:
    """Whether work on ``t``'s device can be captured now: a CUDA tensor, its stream not already
    capturing (a caller's graph)."""
    return t.is_cuda and not torch.cuda.is_current_stream_capturing()


def clear() -> None:
    """Drop every graph and count (their memory pools go with them)."""
    with _lock:
        _entries.clear()


def count() -> int:
    """Graphs captured and kept."""
    with _lock:
        return sum(1 for e in _entries.values() if e.graph is not None)


def replayed(
    key: tuple,
    device: torch.device,
    eager: Callable[[], dict[str, Tensor]],
    fill: Callable[[dict[str, Tensor] | None], dict[str, Tensor]],
    compute: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    alone: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """``compute(eager())``, or its graph replayed on ``fill``'s inputs (the module's docstring)."""
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            entry = _entries[key] = _Entry()
            while len(_entries) > MAX_GRAPHS:
                _entries.popitem(last=False)
        else:
            _entries.move_to_end(key)
        entry.seen += 1
        graph = entry.graph
        capture = graph is None and not entry.failed and entry.seen > CAPTURE_AFTER
    if graph is not None:
        fill(entry.inputs)
        graph.replay()
        return _unpack(entry, alone)
    if not capture:
        return compute(eager())
    return _capture(entry, device, fill, compute)


def _capture(
    entry: _Entry,
    device: torch.device,
    fill: Callable[[dict[str, Tensor] | None], dict[str, Tensor]],
    compute: Callable[[dict[str, Tensor]], dict[str, Tensor]],
) -> dict[str, Tensor]:
    inputs = fill(None)  # this call's inputs, in the buffers the graph will read
    # this call's results, computed as the graph will (its kernels compiled and warm outside the
    # capture)
    result = compute(inputs)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(stream)
    try:
        with torch.cuda.stream(side), torch.no_grad():
            # thread-local: work other threads queue meanwhile is not part of the capture
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                flat, layout = _pack(compute(inputs), device)
            finally:
                graph.capture_end()
    except Exception:
        # what cannot be captured runs as it did, eagerly: this key from now on
        entry.failed = True
        stream.wait_stream(side)
        return result
    stream.wait_stream(side)
    with _lock:
        entry.graph, entry.inputs, entry.flat, entry.layout = graph, inputs, flat, layout
    return result


def _pack(out: dict[str, Tensor], device: torch.device) -> tuple[Tensor, list]:
    """Copy every result into one uint8 buffer (in the capture, so the graph writes it)."""
    layout = []
    offset = 0
    for name, t in out.items():
        nbytes = t.numel() * t.element_size()
        layout.append((name, offset, nbytes, t.dtype, t.shape))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    flat = torch.empty(max(offset, 1), dtype=torch.uint8, device=device)
    for (_, start, nbytes, dtype, shape), t in zip(layout, out.values(), strict=True):
        _view(flat, start, nbytes, dtype, shape).copy_(t)
    return flat, layout


def _view(flat: Tensor, start: int, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    return flat[start : start + nbytes].view(dtype).view(shape)


def _unpack(entry: _Entry, alone: tuple[str, ...] = ()) -> dict[str, Any]:
    # one copy of every result: the caller's own, whatever later replays write; those in ``alone``
    # copied on their own, so that keeping them keeps nothing else
    src = entry.flat
    assert src is not None
    flat = src.clone()
    return {
        name: _view(src, start, n, dtype, shape).clone() if name in alone else _view(flat, start, n, dtype, shape)
        for name, start, n, dtype, shape in entry.layout
    }


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    stream = _streams.get(idx)
    if stream is None:
        stream = _streams[idx] = torch.cuda.Stream(device=idx)
    return stream
