"""CUDA-graph replay of a call's kernels, where which kernels run does not depend on what they find.

Importance, top-k, sequence_aware and stratified at a fixed ratio read nothing on the host between their launches
(``pipeline._at_ratio``): the scoring pass, the difficulty, its order, the draw and the loss are a
fixed sequence of launches for given shapes and options. Their Python and launch cost is most of a
gated call's host time (``kernels/NOTES.md``, "Host time of a call"); replaying them as one CUDA
graph costs one launch.

``replayed(key, device, eager, fill, compute, seed=seed)`` runs ``compute(eager(), generator)``
the first ``CAPTURE_AFTER`` times it sees ``key`` (the first compiles Triton's kernels), then
captures it once and from there on replays it:

- ``key`` names everything the launches depend on that is not an input: shapes, strides, dtypes,
  alignments, options, and the address of anything read in place (class weights).
- ``eager()`` returns the call's inputs (a dict of tensors) as they are; ``fill(None)`` returns
  new buffers holding them and ``fill(bufs)`` writes them into ``bufs``: the graph's inputs. The
  logits, too large to copy, are an input by their address (``kernels.row_stats``' ``address``).
- ``seed`` (None: the call draws nothing): ``compute`` draws its random numbers from the generator
  it is given, a new one seeded with ``seed`` on an eager call. A graph draws inside the replay
  from a generator of its own, registered with it (``CUDAGraph.register_generator_state``) and
  seeded with the call's ``seed`` before each replay: the replay's draws start where a new
  generator's do, as the eager call's, at the cost of no launch from Python. Where torch cannot
  register a generator with a graph (``GRAPH_SAFE_RNG``), a caller that draws runs eagerly.
- ``compute`` returns a dict of tensors. In the graph they are copied into one buffer, which each
  replay copies once: the results a caller keeps (a forward whose backward comes after the next
  forward) are its own, never overwritten by the next replay. The results named in ``alone`` get
  a copy of their own instead (a loss a training loop may keep for its whole run must not hold
  the call's other results alive).

Only ``MAX_GRAPHS`` graphs are kept (least recently used first out; a key evicted counts again
from zero), and the counts of ``MAX_KEYS`` keys not captured yet; a key whose capture raised runs
eagerly from then on, as does every new key after ``MAX_CAPTURES`` captures.
``clear()`` drops them all (``cggr_hook.disable()`` with no gate left). One call at a time
replays a graph; a call on another stream than the last first waits for the last one's results,
and a graph dropped after a replay on another stream than its home one waits for that replay on
the host (``_retire``). Nothing is captured or replayed while the stream is already capturing (a caller's own graph) or
in inference mode.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

# eager runs of a key before it is captured: the first compiles and warms the kernels, the second
# shows the key repeats (a key seen once, as where every call's logits sit elsewhere, costs no capture)
CAPTURE_AFTER = 2
MAX_GRAPHS = 8  # graphs kept; each holds its intermediates (O(rows) floats) in its own memory pool
MAX_KEYS = 64  # keys counted before their capture, and keys whose capture failed, each
# captures between two clear()s: past them new keys run eagerly (more keys in turn than MAX_GRAPHS
# would otherwise capture again and again, each capture costing two calls' work)
MAX_CAPTURES = 64
_ALIGN = 16  # bytes: every result starts at an offset any dtype can be viewed at
# whether a graph can draw from a generator of its own (registered with it; torch's graph-safe RNG)
GRAPH_SAFE_RNG = hasattr(torch.cuda.CUDAGraph, "register_generator_state")


@dataclass
class _Entry:
    """A captured graph, its inputs and its results' buffer."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]
    flat: Tensor  # uint8: every result, at ``layout``'s offsets, in the graph's pool
    layout: list[tuple[str, int, int, torch.dtype, torch.Size]]
    # one call at a time writes the inputs, replays and copies the results (threads); a call on
    # another stream first waits for the last one's copy (``done``, recorded after it)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: torch.cuda.Event | None = None
    stream: torch.cuda.Stream | None = None
    home: torch.cuda.Stream | None = None  # the stream the inputs were allocated on
    generator: torch.Generator | None = None  # the graph's draws' own, seeded before each replay

    def ordered(self) -> None:
        """Before a call writes the inputs: where the last call ran on another stream, wait for its
        results' copy there."""
        if self.flat.is_cuda:
            stream = torch.cuda.current_stream(self.flat.device)
            if self.stream is not None and self.stream != stream and self.done is not None:
                stream.wait_event(self.done)

    def finished(self) -> None:
        """After a call's copy of the results: mark it on the call's stream. On a stream other
        than the one the buffers were allocated on, the allocator is told they are in use there,
        so that dropping the graph (``clear()``, eviction) cannot hand them out while that
        stream's replay is still queued."""
        if self.flat.is_cuda:
            self.stream = torch.cuda.current_stream(self.flat.device)
            if self.home is None:
                self.home = self.stream
            elif self.stream != self.home:
                for t in (self.flat, *self.inputs.values()):
                    t.record_stream(self.stream)
            if self.done is None:
                self.done = torch.cuda.Event()
            self.done.record(self.stream)


_lock = threading.Lock()
_graphs: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
_seen: OrderedDict[tuple, int] = OrderedDict()  # calls of each key not captured yet
_failed: OrderedDict[tuple, None] = OrderedDict()  # keys whose capture raised: eager from then on
_capturing: set[tuple] = set()  # keys a thread is capturing now
_captures = 0  # since the last clear()
_generation = 0  # clear()s so far: a capture that began before one keeps nothing
# one capture at a time: they share each device's side stream, and a capture on a stream another
# thread's capture is using would spoil both
_capture_lock = threading.Lock()
_streams: dict[int, torch.cuda.Stream] = {}


def tensor_key(t: Tensor | None) -> tuple | None:
    """What a captured launch depends on in ``t``: where it is and how it is laid out."""
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def seeded(device: torch.device, seed: int) -> torch.Generator:
    """A new generator on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def capturable(t: Tensor) -> bool:
    """Whether work on ``t``'s device can be captured and replayed now: a CUDA tensor, its stream
    not already capturing (a caller's graph), not in inference mode (whose tensors a later call
    outside it could not write)."""
    return t.is_cuda and not torch.is_inference_mode_enabled() and not torch.cuda.is_current_stream_capturing()


def clear() -> None:
    """Drop every graph and count (their memory pools go with them)."""
    global _captures, _generation
    with _lock:
        dropped = list(_graphs.values())
        _graphs.clear()
        _seen.clear()
        _failed.clear()
        _captures = 0
        _generation += 1
    _retire(dropped)


def _retire(dropped: list[_Entry]) -> None:
    """Before the memory of dropped graphs can be handed out again: where a graph's last replay
    ran on another stream than its home one, wait on the host for that replay. On the home stream
    the allocator orders a reuse after it by itself; the graph's own pool and its generator's seed
    and offset know nothing of another stream (its inputs and results are marked there too:
    ``_Entry.finished``). Only a program that replays on several streams ever waits here."""
    for entry in dropped:
        with entry.lock:  # after a replay under way in another thread
            if entry.done is not None and entry.stream is not None and entry.stream != entry.home:
                entry.done.synchronize()


def count() -> int:
    """Graphs captured and kept."""
    with _lock:
        return len(_graphs)


def _bounded_put(table: OrderedDict, key: tuple, value, limit: int) -> list:
    """Put, evicting the least recently used past ``limit``; returns the evicted values."""
    table[key] = value
    table.move_to_end(key)
    evicted = []
    while len(table) > limit:
        evicted.append(table.popitem(last=False)[1])
    return evicted


def replayed(
    key: tuple,
    device: torch.device,
    eager: Callable[[], dict[str, Tensor]],
    fill: Callable[[dict[str, Tensor] | None], dict[str, Tensor]],
    compute: Callable[[dict[str, Tensor], torch.Generator | None], dict[str, Tensor]],
    alone: tuple[str, ...] = (),
    seed: int | None = None,
) -> dict[str, Tensor]:
    """``compute(eager(), generator)``, or its graph replayed on ``fill``'s inputs (the module's
    docstring)."""
    with _lock:
        entry = _graphs.get(key)
        capture = False
        if entry is not None:
            _graphs.move_to_end(key)
        elif key not in _failed and key not in _capturing and _captures < MAX_CAPTURES:
            seen = _seen.get(key, 0) + 1
            capture = seen > CAPTURE_AFTER
            if capture:
                _seen.pop(key, None)
                _capturing.add(key)
            else:
                _bounded_put(_seen, key, seen, MAX_KEYS)
        generation = _generation
    if entry is not None:
        return _replay(entry, fill, alone, seed)
    if not capture:
        return compute(eager(), None if seed is None else seeded(device, seed))
    try:
        return _capture(key, device, fill, compute, generation, seed)
    finally:
        with _lock:
            _capturing.discard(key)


def _replay(
    entry: _Entry,
    fill: Callable[[dict[str, Tensor] | None], dict[str, Tensor]],
    alone: tuple[str, ...],
    seed: int | None,
) -> dict[str, Tensor]:
    with entry.lock:
        entry.ordered()
        fill(entry.inputs)
        if entry.generator is not None:
            # the replay's draws from offset 0 of this seed (its prologue reads the two on the host)
            entry.generator.manual_seed(cast(int, seed))
        entry.graph.replay()
        out = _unpack(entry, alone)
        entry.finished()
        return out


def _capture(
    key: tuple,
    device: torch.device,
    fill: Callable[[dict[str, Tensor] | None], dict[str, Tensor]],
    compute: Callable[[dict[str, Tensor], torch.Generator | None], dict[str, Tensor]],
    generation: int,
    seed: int | None,
) -> dict[str, Tensor]:
    inputs = fill(None)  # this call's inputs, in the buffers the graph will read
    # this call's results, computed as the graph will (its kernels compiled and warm outside the
    # capture), its draws from the generator the graph will draw from
    generator = None if seed is None else seeded(device, seed)
    result = compute(inputs, generator)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    side = _side_stream(device)
    try:
        if generator is not None:
            graph.register_generator_state(generator)
        with _capture_lock, torch.cuda.stream(side), torch.no_grad():
            side.wait_stream(stream)
            # thread-local: work other threads queue meanwhile is not part of the capture
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                flat, layout = _pack(compute(inputs, generator), device)
            finally:
                graph.capture_end()
    except Exception:
        # what cannot be captured runs as it did, eagerly: this key from now on
        stream.wait_stream(side)
        with _lock:
            _bounded_put(_failed, key, None, MAX_KEYS)
        return result
    stream.wait_stream(side)
    entry = _Entry(graph, inputs, flat, layout, generator=generator)
    entry.finished()  # after this call's own work on the graph's inputs
    _keep(key, entry, generation)
    return result


def _keep(key: tuple, entry: _Entry, generation: int) -> None:
    """Keep a captured graph, unless ``clear()`` ran since its call began (``generation``)."""
    global _captures
    evicted = []
    with _lock:
        if generation == _generation:
            evicted = _bounded_put(_graphs, key, entry, MAX_GRAPHS)
            _captures += 1
    _retire(evicted)


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
