"""The patch: ``torch.nn.functional.cross_entropy`` wrapped with wrapt while any gate is enabled.

Installed by the first ``enable`` and removed by the last ``disable``, which puts the original
function object back. The wrapper hands every call to a handler; the handler returns the plain
result by calling the original whenever the call is not a gated one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
import wrapt

_installed: wrapt.FunctionWrapper | None = None


def original_cross_entropy() -> Callable[..., Any]:
    """The unwrapped ``F.cross_entropy`` (whether or not the patch is installed)."""
    return _installed.__wrapped__ if _installed is not None else F.cross_entropy


def installed() -> bool:
    return _installed is not None


def install(handler: Callable[[Callable, Any, tuple, dict], Any]) -> None:
    """Wrap ``F.cross_entropy`` with ``handler(wrapped, instance, args, kwargs)`` (idempotent)."""
    global _installed
    if _installed is None:
        _installed = wrapt.wrap_function_wrapper(F, "cross_entropy", handler)


def uninstall() -> None:
    """Put the original ``F.cross_entropy`` back, unless someone wrapped it after us."""
    global _installed
    if _installed is None:
        return
    if F.cross_entropy is _installed:
        F.cross_entropy = _installed.__wrapped__
    else:
        # another library patched on top of ours: removing ours would drop theirs; ours is a
        # pass-through once no gate is enabled, so it stays inside theirs
        warnings.warn(
            "cggr_hook.disable: torch.nn.functional.cross_entropy was re-wrapped after cggr_hook.enable; "
            "leaving the (now pass-through) cggr_hook wrapper inside it",
            RuntimeWarning,
            stacklevel=3,
        )
    _installed = None
