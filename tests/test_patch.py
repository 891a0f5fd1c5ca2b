"""The wrapt patch of torch.nn.functional.cross_entropy (patch.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import wrapt

from cggr_hook import patch

ORIGINAL_CE = F.cross_entropy


def _passthrough(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)


def test_install_wraps_and_uninstall_restores_the_same_object():
    assert not patch.installed()
    patch.install(_passthrough)
    try:
        assert F.cross_entropy is not ORIGINAL_CE
        assert isinstance(F.cross_entropy, wrapt.FunctionWrapper)
        assert patch.original_cross_entropy() is ORIGINAL_CE
        patch.install(_passthrough)  # idempotent: no second layer
        assert F.cross_entropy.__wrapped__ is ORIGINAL_CE
        x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
        assert torch.equal(F.cross_entropy(x, t), ORIGINAL_CE(x, t))
        # nn.CrossEntropyLoss looks F.cross_entropy up at call time, so it goes through the patch
        seen = []
        patch.uninstall()
        patch.install(lambda w, i, a, k: seen.append(1) or w(*a, **k))
        torch.nn.CrossEntropyLoss()(x, t)
        assert seen == [1]
    finally:
        patch.uninstall()
    assert F.cross_entropy is ORIGINAL_CE
    assert not patch.installed()


def test_a_later_wrapper_is_left_in_place_with_a_warning():
    patch.install(_passthrough)
    ours = F.cross_entropy
    theirs = wrapt.FunctionWrapper(ours, _passthrough)
    F.cross_entropy = theirs
    try:
        with pytest.warns(RuntimeWarning, match="re-wrapped"):
            patch.uninstall()
        assert F.cross_entropy is theirs  # their patch survives; ours is a pass-through inside it
    finally:
        F.cross_entropy = ORIGINAL_CE
    assert not patch.installed()
