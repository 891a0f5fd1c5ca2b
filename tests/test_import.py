"""Importing cggr_hook changes nothing global, checked in a fresh interpreter started outside the repo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

IMPORT_PROBE = r"""
import json, sys
import torch
import torch.nn.functional as F
import torch.optim.optimizer as oo

out = {}
out["has_post_hooks_attr"] = hasattr(oo, "_global_optimizer_post_hooks")
out["has_pre_hooks_attr"] = hasattr(oo, "_global_optimizer_pre_hooks")
ce_before = F.cross_entropy
mods_before = set(sys.modules)
out["triton_before"] = "triton" in sys.modules
flags = lambda: [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_float32_matmul_precision(), str(torch.get_default_dtype())]
out["flags_before"] = flags()
hooks = lambda: [len(oo._global_optimizer_post_hooks), len(oo._global_optimizer_pre_hooks)]
out["hooks_before"] = hooks()
rng_before = torch.get_rng_state()

import cggr_hook

out["ce_same"] = F.cross_entropy is ce_before and torch.nn.functional.cross_entropy is ce_before
new = set(sys.modules) - mods_before
out["new_triton_modules"] = sorted(m for m in new if m == "triton" or m.startswith("triton."))
out["triton_after"] = "triton" in sys.modules
out["flags_after"] = flags()
out["hooks_after"] = hooks()
out["rng_same"] = bool(torch.equal(rng_before, torch.get_rng_state()))
out["kernels_file"] = cggr_hook.kernels.__file__
out["kernels_name"] = cggr_hook.kernels.__name__
out["reference_file"] = cggr_hook.kernels.reference.__file__
out["kernels_api"] = all(callable(getattr(cggr_hook.kernels, n, None))
                         for n in ("row_stats", "ce_grad_rows", "ce_grad_dense_", "as_rows"))
out["global_kernels_loaded"] = "kernels" in sys.modules
try:
    import kernels
    out["global_kernels_import"] = getattr(kernels, "__file__", None) or "namespace"
except ModuleNotFoundError:
    out["global_kernels_import"] = None
out["cggr_file"] = cggr_hook.__file__

# after the import checks: enable installs the globals, disable takes them away
from torch import nn
ce = F.cross_entropy
model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11))
cggr_hook.enable(model)
out["wrapped_while_enabled"] = F.cross_entropy is not ce
out["post_hooks_while_enabled"] = len(oo._global_optimizer_post_hooks)
cggr_hook.disable(model)
out["ce_restored"] = F.cross_entropy is ce
out["post_hooks_after_disable"] = len(oo._global_optimizer_post_hooks)
out["forward_hooks_after_disable"] = sum(len(m._forward_hooks) for m in model.modules())
print(json.dumps(out))
"""


def run_probe(code):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd="/tmp", env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe():
    return run_probe(IMPORT_PROBE)


def test_probe_runs_outside_the_repo(probe):
    # the package comes from the editable install, not from the working directory
    assert Path(probe["cggr_file"]).resolve() == REPO / "cggr_hook" / "__init__.py"


def test_import_leaves_cross_entropy_the_same_object(probe):
    assert probe["ce_same"] is True


def test_import_does_not_import_triton(probe):
    assert probe["new_triton_modules"] == []
    if not probe["triton_before"]:
        assert probe["triton_after"] is False


def test_import_leaves_precision_flags_alone(probe):
    assert probe["flags_after"] == probe["flags_before"]


def test_import_leaves_the_global_rng_alone(probe):
    assert probe["rng_same"] is True


def test_import_registers_no_global_optimizer_hooks(probe):
    # the attribute must exist in this torch, or the check below would be vacuous
    assert probe["has_post_hooks_attr"] is True and probe["has_pre_hooks_attr"] is True
    assert probe["hooks_before"] == [0, 0]
    assert probe["hooks_after"] == [0, 0]


def test_kernels_resolve_inside_the_package(probe):
    assert probe["kernels_name"] == "cggr_hook.kernels"
    assert Path(probe["kernels_file"]).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(probe["reference_file"]).resolve() == REPO / "kernels" / "reference.py"
    assert probe["kernels_api"] is True


def test_top_level_kernels_name_is_not_claimed(probe):
    assert probe["global_kernels_loaded"] is False
    assert probe["global_kernels_import"] is None


def test_enable_then_disable_restores_the_globals(probe):
    out = probe
    assert out["wrapped_while_enabled"] is True
    assert out["post_hooks_while_enabled"] == 1
    assert out["ce_restored"] is True
    assert out["post_hooks_after_disable"] == 0
    assert out["forward_hooks_after_disable"] == 0
