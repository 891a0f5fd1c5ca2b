"""Launch shapes shared by the Triton row kernels: a row (or a chunk of it) read in blocks."""

from __future__ import annotations

import triton

MIN_BLOCK_V = 16


def block_v(V: int, max_block: int) -> int:
    """The block of a row read per loop iteration: V rounded up to a power of two, within
    [MIN_BLOCK_V, max_block]."""
    return max(MIN_BLOCK_V, min(triton.next_power_of_2(max(V, 1)), max_block))


def num_warps(block: int, max_warps: int) -> int:
    """Warps of one program: at least 4 elements a thread, at most ``max_warps``."""
    return max(1, min(max_warps, block // 128))
