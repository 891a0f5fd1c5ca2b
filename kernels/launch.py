"""Launch shapes shared by the Triton row kernels, and the lean launch path they all go through."""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

MIN_BLOCK_V = 16


def block_v(V: int, max_block: int) -> int:
    """The block of a row read per loop iteration: V rounded up to a power of two, within
    [MIN_BLOCK_V, max_block]."""
    return max(MIN_BLOCK_V, min(triton.next_power_of_2(max(V, 1)), max_block))


def num_warps(block: int, max_warps: int) -> int:
    """Warps of one program: at least 4 elements a thread, at most ``max_warps``."""
    return max(1, min(max_warps, block // 128))


# ---------------------------------------------------------------------------------------------
# Lean launches
#
# ``kernel[grid](*args, **kw)`` on a ``triton.jit`` function redoes Triton's whole dispatch every
# call: binding the arguments, specialising each one, building the cache key's string, checking
# the globals, looking up the device and stream, reading the knobs. At V = 32000 a gated call is
# host-bound and that dispatch is a large part of its host time (kernels/NOTES.md). ``lean`` wraps
# a kernel so that a call computes a key of its own from what Triton specialises on, and after the
# first call with that key launches the compiled kernel Triton returned directly.
#
# The key is never coarser than Triton's: for a tensor its dtype and whether its address is a
# multiple of 16; for an int whether it is 1, whether it is a multiple of 16 and its integer type;
# a bool's and every keyword's value (constexprs and options); the current device. Two calls with
# one key therefore get the same compiled kernel from Triton as well. Anything else (a tensor
# descriptor, a launch hook set for a profiler, Triton's interpreter) takes Triton's own path.
# ``CGGR_HOOK_LEAN_LAUNCH=0`` turns the lean path off; ``CGGR_HOOK_LEAN_LAUNCH=check`` keeps it on
# and asks Triton, at every launch, which kernel it would have run, raising where it differs.
# ---------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """An argument the lean key does not describe: Triton's own path launches the call."""


_I32 = 2**31
_I64 = 2**63


def _arg_key(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    t = type(a)
    if t is int:
        return (a == 1, a % 16 == 0, -_I32 <= a < _I32, -_I64 <= a < _I64)
    if t is bool or a is None:
        return a
    if t is float:
        return 0.0
    raise _Unsupported


class _Mode:
    """How launches go, read from the environment at the first launch."""

    read = False
    lean = True
    check = False
    runtime: Any = None  # Triton's knobs.runtime (launch hooks), None when lean is off
    why_off = ""  # why the lean path is off, where it is
    device: Any = None
    stream: Any = None


def _read_mode() -> None:
    value = os.environ.get("CGGR_HOOK_LEAN_LAUNCH", "1").strip().lower()
    if value not in ("0", "1", "check"):
        raise ValueError(
            f"cggr_hook: CGGR_HOOK_LEAN_LAUNCH={value!r} is not a setting; use 1 (default), 0 (Triton's own "
            "launch path) or check (lean, checked against Triton at every launch)"
        )
    lean = value != "0"
    why_off = "" if lean else "CGGR_HOOK_LEAN_LAUNCH=0"
    try:
        from triton import knobs
        from triton.runtime.driver import driver

        runtime = knobs.runtime
        device = driver.active.get_current_device  # pyright: ignore[reportAttributeAccessIssue]
        stream = driver.active.get_current_stream  # pyright: ignore[reportAttributeAccessIssue]
    except (ImportError, AttributeError, RuntimeError) as e:  # no knobs, or no GPU driver: its own path only
        lean = False
        why_off = f"{type(e).__name__}: {e}"
        runtime = device = stream = None
    _Mode.lean, _Mode.check = lean, value == "check" and lean
    _Mode.runtime, _Mode.device, _Mode.stream = runtime, device, stream
    _Mode.why_off = why_off
    _Mode.read = True


def status() -> str:
    """'lean', 'lean, checked' or 'off (why)': how Triton kernels are launched now."""
    if not _Mode.read:
        _read_mode()
    if _Mode.lean:
        return "lean, checked" if _Mode.check else "lean"
    return f"off ({_Mode.why_off})"


def set_lean(mode: str | None) -> None:
    """Re-read ``CGGR_HOOK_LEAN_LAUNCH`` at the next launch (None), or force ``mode`` ('0', '1' or
    'check') until the next call. Kernels already dispatched stay cached either way."""
    if mode is None:
        _Mode.read = False
        return
    previous = os.environ.get("CGGR_HOOK_LEAN_LAUNCH")
    os.environ["CGGR_HOOK_LEAN_LAUNCH"] = mode
    try:
        _read_mode()
    finally:
        if previous is None:
            os.environ.pop("CGGR_HOOK_LEAN_LAUNCH", None)
        else:
            os.environ["CGGR_HOOK_LEAN_LAUNCH"] = previous


def _hook_set(hook: Any) -> bool:
    """Whether a launch hook of Triton's knobs would run: Triton keeps a chain of hooks there
    (never None, empty unless a profiler added one); older versions keep a callable or None."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


class _Compiled:
    """What one launch of a compiled kernel needs besides the grid, the stream and the arguments."""

    __slots__ = ("kernel", "run", "function", "metadata", "names")

    def __init__(self, kernel: Any, names: tuple[str, ...]):
        self.kernel = kernel
        self.run = kernel.run  # loads the module the first time (Triton's launch did already)
        self.function = kernel.function
        self.metadata = kernel.packed_metadata
        self.names = names


class LeanKernel:
    """A ``triton.jit`` kernel launched as ``kernel[grid](*args, **kw)``, each specialisation
    dispatched by Triton once. The arguments must be passed as Triton's own launch takes them:
    every parameter, positionally in order or by name."""

    direct_launches = 0  # launches of every lean kernel that skipped Triton's dispatch (for tests)

    def __init__(self, fn: Any):
        self.fn = fn
        self.arg_names: tuple[str, ...] = tuple(fn.arg_names)
        self._cache: dict[Any, _Compiled] = {}

    def __getitem__(self, grid: tuple):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _key(self, device: int, args: tuple, kwargs: dict) -> tuple:
        return (
            device,
            tuple(_arg_key(a) for a in args),
            tuple((k, v if type(v) is not torch.Tensor else _arg_key(v)) for k, v in kwargs.items()),
        )

    def _launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if not _Mode.read:
            _read_mode()
        runtime = _Mode.runtime
        if not _Mode.lean or _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook):
            self.fn[grid](*args, **kwargs)  # a profiler's hooks see every launch
            return
        device = _Mode.device()
        try:
            key = self._key(device, args, kwargs)
            hash(key)
        except (_Unsupported, TypeError):
            self.fn[grid](*args, **kwargs)
            return
        hit = self._cache.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **kwargs)  # Triton's own dispatch (and compile)
            if kernel is not None:
                self._cache[key] = _Compiled(kernel, self.arg_names[len(args) :])
            return
        if _Mode.check:
            expected = self.fn.warmup(*args, grid=grid, **kwargs)
            if expected is not hit.kernel:
                raise RuntimeError(
                    f"cggr_hook: the lean launch of {self.fn.__name__} chose another compiled kernel than Triton "
                    f"for key {key!r}; set CGGR_HOOK_LEAN_LAUNCH=0 and report this"
                )
        values = args + tuple(kwargs[name] for name in hit.names)  # the key holds the names: all there
        g0, g1, g2 = (*grid, 1, 1)[:3]
        LeanKernel.direct_launches += 1
        hit.run(g0, g1, g2, _Mode.stream(device), hit.function, hit.metadata, None, None, None, *values)


def lean(fn: Any) -> Any:
    """``fn`` (a ``triton.jit`` function) behind the lean launch path; under Triton's interpreter,
    which has no compiled kernels, ``fn`` itself."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(fn, "arg_names"):
        return fn
    return LeanKernel(fn)
