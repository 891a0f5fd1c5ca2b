"""The measurement scripts under scripts/ on the CPU, at tiny sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_breakdown_times_the_draw_and_unwraps_everything(tmp_path):
    """The breakdown attributes a gated call's time to the gate's functions (the draw at a ratio
    among them) and leaves every function it wrapped as it found it."""
    hb = _load("host_breakdown")
    before = [
        (owner, name, owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None))
        for owner, name in hb.WRAPPED
    ]
    assert (
        hb.main(
            ["--tokens", "48", "--vocab", "40", "--hidden", "8", "--reps", "2", "--warmup", "1", "--out", str(tmp_path)]
        )
        == 0
    )
    text = (tmp_path / "host_breakdown.md").read_text()
    for row in (
        "| pipeline._at_ratio |",
        "| GatedHeadCrossEntropy.backward |",
        "| torch.empty(8192) |",
        "## head/enable 25%",
    ):
        assert row in text
    for owner, name, fn in before:
        now = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        assert now is fn, f"{name} left wrapped"
