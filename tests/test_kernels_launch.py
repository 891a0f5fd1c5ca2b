"""The lean launch path (kernels/launch.py): a key of its own per call, Triton's dispatch once per
key, the compiled kernel launched directly after it.

Triton's interpreter has no compiled kernels, so on the CPU a fake kernel stands in for a
``triton.jit`` function: it records whether a launch went through Triton's dispatch or straight to
the compiled launcher, and with which arguments. The ``gpu`` case launches the real kernels with
``CGGR_HOOK_LEAN_LAUNCH=check``, which asks Triton at every launch which kernel it would have run.
"""

import pytest
import torch

from cggr_hook.kernels import launch

from common import DEVICE


class FakeCompiled:
    def __init__(self, log):
        self.log = log
        self.function = "function"
        self.packed_metadata = "metadata"

    def run(self, *values):
        self.log.append(("lean", values))


class FakeJit:
    """Stands for a ``triton.jit`` function with parameters (x, n, f, FLAG): Triton's dispatch
    returns one compiled kernel per specialisation, made on first use."""

    __name__ = "fake_kernel"
    arg_names = ["x", "n", "f", "FLAG"]

    def __init__(self):
        self.log = []
        self.compiled = {}

    def _spec(self, args, kwargs):
        x, n = args[0], args[1]
        return (x.dtype, x.data_ptr() % 16 == 0, n == 1, n % 16 == 0, kwargs.get("FLAG"), kwargs.get("num_warps"))

    def __getitem__(self, grid):
        def dispatch(*args, **kwargs):
            self.log.append(("triton", grid))
            return self.compiled.setdefault(self._spec(args, kwargs), FakeCompiled(self.log))

        return dispatch

    def warmup(self, *args, grid, **kwargs):
        return self.compiled.get(self._spec(args, kwargs))


class Runtime:
    launch_enter_hook = None
    launch_exit_hook = None


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch._Mode, "read", True)
    monkeypatch.setattr(launch._Mode, "lean", True)
    monkeypatch.setattr(launch._Mode, "check", False)
    monkeypatch.setattr(launch._Mode, "runtime", Runtime())
    monkeypatch.setattr(launch._Mode, "device", lambda: 0)
    monkeypatch.setattr(launch._Mode, "stream", lambda device: 1234)
    fn = FakeJit()
    return fn, launch.LeanKernel(fn)


def paths(fn):
    return [entry[0] for entry in fn.log]


def test_a_key_seen_before_launches_the_compiled_kernel_directly(fake):
    fn, k = fake
    x = torch.zeros(64)
    k[(3,)](x, 7, 0.5, FLAG=True, num_warps=4)
    direct = launch.LeanKernel.direct_launches
    k[(5, 2)](x, 9, 1.5, FLAG=True, num_warps=4)
    assert paths(fn) == ["triton", "lean"]
    assert launch.LeanKernel.direct_launches == direct + 1
    # the grid padded to three dims, the stream, the handles, no launch metadata or hooks, then every
    # parameter in order (the constexpr by name), never the options
    assert fn.log[1][1] == (5, 2, 1, 1234, "function", "metadata", None, None, None, x, 9, 1.5, True)


@pytest.mark.parametrize(
    "change",
    ["unaligned tensor", "other dtype", "int one", "int multiple of 16", "int64", "constexpr", "option"],
)
def test_what_triton_specialises_on_makes_a_new_key(fake, change):
    fn, k = fake
    x = torch.zeros(64)
    args, kw = [x, 7, 0.5], dict(FLAG=True, num_warps=4)
    k[(1,)](*args, **kw)
    if change == "unaligned tensor":
        args[0] = x[1:]
    elif change == "other dtype":
        args[0] = torch.zeros(64, dtype=torch.float64)
    elif change == "int one":
        args[1] = 1
    elif change == "int multiple of 16":
        args[1] = 32
    elif change == "int64":
        args[1] = 2**31 + 7
    elif change == "constexpr":
        kw["FLAG"] = False
    else:
        kw["num_warps"] = 8
    k[(1,)](*args, **kw)
    assert paths(fn) == ["triton", "triton"]


def test_values_triton_does_not_specialise_on_share_a_key(fake):
    fn, k = fake
    x, y = torch.zeros(64), torch.ones(128)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    k[(1,)](y, 23, -3.0, FLAG=True, num_warps=4)
    assert paths(fn) == ["triton", "lean"]
    assert fn.log[1][1][9:] == (y, 23, -3.0, True)


def test_an_argument_the_key_does_not_describe_takes_tritons_path(fake):
    fn, k = fake
    k[(1,)](torch.zeros(4), 7, 0.5, FLAG=object(), num_warps=4)  # unhashable-by-design stand-in
    k[(1,)](torch.zeros(4), 7, [0.5], FLAG=True, num_warps=4)  # a list: not an argument kind it knows
    k[(1,)](torch.zeros(4), 7, [0.5], FLAG=True, num_warps=4)
    assert paths(fn) == ["triton", "triton", "triton"]


class HookChain:
    """Triton's knobs keep a chain of launch hooks, never None; empty, it runs nothing."""

    def __init__(self, calls):
        self.calls = calls


@pytest.mark.parametrize("hook", ["callable", "chain with a hook"])
def test_a_launch_hook_sends_every_launch_through_triton(fake, monkeypatch, hook):
    fn, k = fake
    x = torch.zeros(64)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    set_hook = (lambda *a: None) if hook == "callable" else HookChain([lambda *a: None])
    monkeypatch.setattr(launch._Mode.runtime, "launch_exit_hook", set_hook)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    assert paths(fn) == ["triton", "triton"]


def test_empty_hook_chains_leave_launches_lean(fake, monkeypatch):
    fn, k = fake
    monkeypatch.setattr(launch._Mode.runtime, "launch_enter_hook", HookChain([]))
    monkeypatch.setattr(launch._Mode.runtime, "launch_exit_hook", HookChain([]))
    x = torch.zeros(64)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    assert paths(fn) == ["triton", "lean"]


def test_lean_off_sends_every_launch_through_triton(fake, monkeypatch):
    fn, k = fake
    monkeypatch.setattr(launch._Mode, "lean", False)
    x = torch.zeros(64)
    for _ in range(3):
        k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    assert paths(fn) == ["triton"] * 3


def test_check_mode_raises_where_triton_would_have_run_another_kernel(fake, monkeypatch):
    fn, k = fake
    monkeypatch.setattr(launch._Mode, "check", True)
    x = torch.zeros(64)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)
    k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)  # the same kernel: launched
    assert paths(fn) == ["triton", "lean"]
    fn.compiled.clear()  # Triton now answers with another kernel for that key
    fn.compiled[fn._spec((x, 7), dict(FLAG=True, num_warps=4))] = FakeCompiled(fn.log)
    with pytest.raises(RuntimeError, match="CGGR_HOOK_LEAN_LAUNCH=0"):
        k[(1,)](x, 7, 0.5, FLAG=True, num_warps=4)


@pytest.mark.parametrize("value", ["0", "1", "check", " Check "])
def test_the_setting_is_read_from_the_environment(monkeypatch, value):
    monkeypatch.setenv("CGGR_HOOK_LEAN_LAUNCH", value)
    monkeypatch.setattr(launch._Mode, "read", False)
    launch._read_mode()
    has_knobs = launch._Mode.runtime is not None
    assert launch._Mode.lean == (value != "0" and has_knobs)
    assert launch._Mode.check == (value.strip().lower() == "check" and has_knobs)
    monkeypatch.setattr(launch._Mode, "read", False)


def test_an_unknown_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("CGGR_HOOK_LEAN_LAUNCH", "fast")
    monkeypatch.setattr(launch._Mode, "read", False)
    with pytest.raises(ValueError, match="CGGR_HOOK_LEAN_LAUNCH='fast'"):
        launch._read_mode()


def test_under_the_interpreter_a_kernel_is_left_as_it_is(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn = FakeJit()
    assert launch.lean(fn) is fn
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(launch.lean(fn), launch.LeanKernel)


@pytest.mark.gpu
def test_lean_launches_match_tritons_on_the_device(monkeypatch):
    """Every kernel of gated calls over odd sizes and unaligned views, each launched twice (the
    second through the lean path), with Triton asked at each launch which kernel it would run;
    the losses and gradients equal those of Triton's own launch path."""
    import cggr_hook

    assert DEVICE == "cuda"
    results = {}
    direct = launch.LeanKernel.direct_launches
    for mode in ("0", "check"):
        launch.set_lean(mode)
        assert launch.status() == ("lean, checked" if mode == "check" else "off (CGGR_HOOK_LEAN_LAUNCH=0)")
        try:
            out = []
            for N, V, offset in ((37, 1000, 0), (37, 1000, 1), (300, 4099, 3), (1, 17, 0)):
                gen = torch.Generator().manual_seed(N + V + offset)
                base = torch.randn(N * V + offset, generator=gen).to(DEVICE, torch.bfloat16)
                logits = base[offset:].view(N, V).requires_grad_()
                targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
                targets[::5] = -100
                for selection in ("importance", "topk"):
                    for _ in range(2):
                        crit = cggr_hook.CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, selection=selection, seed=1)
                        loss = crit(logits, targets)
                        (g,) = torch.autograd.grad(loss, logits)
                        out.append((loss.detach().clone(), g.clone()))
            results[mode] = out
        finally:
            launch.set_lean(None)
    # the lean path ran (and Triton agreed each time)
    assert launch.LeanKernel.direct_launches > direct, launch.status()
    for (l0, g0), (l1, g1) in zip(results["0"], results["check"]):
        torch.testing.assert_close(l1, l0, rtol=0, atol=0, equal_nan=True)  # (1, 17): no valid row
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)
