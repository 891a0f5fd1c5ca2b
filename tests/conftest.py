"""Test session set-up.

Without a CUDA device, Triton's kernels run under its interpreter on the CPU. Triton reads
TRITON_INTERPRET when a kernel is defined, and cggr_hook imports its Triton modules lazily, so
setting it here, before any test runs, is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_gate_left_behind():
    """Every test starts and ends with no gate enabled, a fresh global scheduler, every warning
    given once still to give, and the kernel backend the environment chose."""
    from cggr_hook import kernels
    from cggr_hook.registry import registry

    registry.reset()
    backend = kernels.forced_backend()
    yield
    registry.reset()
    kernels.force_backend(backend)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def probe_the_reference(monkeypatch):
    """The default's probe also times its kernels on the CPU, where it ships without (they are the
    PyTorch reference there, never the faster): for the tests of the probe's mechanics."""
    from cggr_hook import auto

    monkeypatch.setattr(auto, "PROBE_THE_REFERENCE", True)
