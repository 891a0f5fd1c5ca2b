"""cggr_hook: Confidence-Gated Gradient Routing for existing PyTorch training scripts.

    import cggr_hook
    cggr_hook.enable(model)            # training forwards now get the gated loss
    with cggr_hook.paused():           # or model.eval(): the plain loss
        ...
    cggr_hook.disable(model)           # hooks removed, F.cross_entropy restored

Importing the package changes nothing global: hooks and the patch exist only between ``enable``
and ``disable``.
"""

from .config import GateConfig
from .gate import Gate
from .loss import CGGRLoss
from .registry import disable, enable, gated, metrics, paused, scalars, scheduler
from .schedule import Scheduler

__all__ = [
    "CGGRLoss",
    "Gate",
    "GateConfig",
    "Scheduler",
    "disable",
    "enable",
    "gated",
    "metrics",
    "paused",
    "scalars",
    "scheduler",
]

__version__ = "0.1.0"
