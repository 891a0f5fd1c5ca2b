"""DDP and FSDP2 over two CPU processes (gloo), started with torchrun: see tests/dist/worker.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "dist" / "worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp_tied"])
def test_two_process_gated_training(wrapper):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(WORKER),
            wrapper,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count(f"{wrapper} ok") == 2
    # the gated model returns its head's logits as a tensor of their own, as the plain one does:
    # FSDP2 warns about a view, on which an in-place op would drop its pre-backward hook
    assert "returned a view tensor" not in proc.stderr, proc.stderr[-4000:]
