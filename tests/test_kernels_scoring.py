"""Triton row statistics (kernels/scoring.py) against the PyTorch reference.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
CPU cases stay small; the ``gpu`` cases run at full size on a CUDA device.
"""

import math

import pytest
import torch

import cggr_hook.kernels as K
from cggr_hook.kernels import force_backend, reference, scoring

from common import DEVICE, make_logits, nan_empty

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "shifted", "vocab_strided"]
FIELDS = ("lse", "entropy", "p_top1", "p_top2", "nll")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    force_backend("triton")
    calls = []
    real = scoring.row_stats

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "row_stats", spy)
    return calls


def make_targets(N, V, gen=None, ignore_index=-100):
    t = torch.randint(0, V, (N,), generator=gen)
    if N >= 3:
        t[1] = ignore_index
        t[N - 1] = V  # out of range: never an address, nll 0
    return t.to(DEVICE)


def run(logits, targets, ignore_index=-100, weight=None, with_wsum=False, with_p2=True):
    with nan_empty():
        got = K.row_stats(logits, targets, ignore_index, weight, with_wsum, with_p2)
    want = reference.row_stats(logits, targets, ignore_index, weight, with_wsum, with_p2)
    return got, want


def assert_stats_close(got, want, rtol=1e-5, atol=2e-6, rows=None, equal_nan=False):
    # the outputs are fp32 computed from the same (upcast) logits whatever their dtype, so one
    # tolerance fits every dtype: only the summation order differs
    names = FIELDS + (("wsum",) if want.wsum is not None else ()) + (("p2sum",) if want.p2sum is not None else ())
    assert (got.p2sum is None) == (want.p2sum is None)
    for name in names:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        if rows is not None:
            g, w = g[rows], w[rows]
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")


@pytest.fixture(params=["default_block", "small_block"])
def block(request, monkeypatch):
    """The default block, and a 16-wide one so a row of 127 spans 8 blocks (the merges run)."""
    if request.param == "small_block":
        monkeypatch.setattr(scoring, "MAX_BLOCK_V", 16)
    return request.param


@pytest.mark.parametrize("V", [1, 2, 3, 127])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_stats_matches_reference(V, dtype, layout, block, triton_backend):
    gen = torch.Generator().manual_seed(V * 7 + len(layout))
    x = make_logits(2, 3, V, dtype, layout, gen=gen)
    tg = make_targets(6, V, gen=gen)
    got, want = run(x, tg, with_wsum=True)
    assert triton_backend, "the Triton backend did not run"
    assert_stats_close(got, want)
    if V == 1:
        assert torch.equal(got.p_top2, torch.zeros_like(got.p_top2))
        torch.testing.assert_close(got.p_top1, torch.ones_like(got.p_top1))
        torch.testing.assert_close(got.entropy, torch.zeros_like(got.entropy), atol=1e-6, rtol=0)


@pytest.mark.parametrize("V", [1, 37, 127])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_stats_at_an_address_reads_the_logits_there(V, dtype, layout, block):
    """With ``address``, the kernel reads the logits at that address, ``logits`` giving only the
    layout (a replayed graph's scoring pass): the statistics of the tensor there, bit for bit
    those of the launch on it, and nothing of ``logits``' own values."""
    gen = torch.Generator().manual_seed(V + len(layout))
    there = make_logits(2, 3, V, dtype, layout, gen=gen)
    layout_only = make_logits(2, 3, V, dtype, layout, gen=gen)
    assert layout_only.stride() == there.stride()
    tg = make_targets(6, V, gen=gen)
    address = torch.tensor([there.data_ptr()], dtype=torch.int64, device=there.device)
    with nan_empty():
        got = K.row_stats(layout_only, tg, -100, None, True, True, address=address)
        want = K.row_stats(there, tg, -100, None, True, True)
    for name in FIELDS + ("wsum", "p2sum"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    with pytest.raises(ValueError, match="address must be one int64"):
        K.row_stats(layout_only, tg, -100, address=address.int())


def test_row_stats_at_an_address_needs_triton():
    force_backend("torch")
    x = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="Triton backend only"):
        K.row_stats(x, torch.zeros(2, dtype=torch.long), -100, address=torch.zeros(1, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "shifted"])
def test_row_stats_vocab_32001(dtype, layout):
    gen = torch.Generator().manual_seed(1)
    x = make_logits(3, 1, 32001, dtype, layout, gen=gen)
    tg = torch.tensor([5, 32000, -100], device=DEVICE)
    got, want = run(x, tg)
    assert_stats_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_row_stats_vocab_strided_32001():
    gen = torch.Generator().manual_seed(2)
    x = make_logits(1, 2, 32001, torch.float16, "vocab_strided", gen=gen)
    assert x.stride(-1) == 2
    got, want = run(x, torch.tensor([0, 31999], device=DEVICE))
    assert_stats_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tied_maxima_count_twice(dtype, block):
    """A maximum that occurs twice is also the second largest: p_top1 == p_top2."""
    V = 127
    gen = torch.Generator().manual_seed(3)
    x = make_logits(1, 8, V, torch.float32, "contiguous", gen=gen).clone()
    cases = [
        (0, [3, 4]),  # neighbours in one block
        (1, [0, 126]),  # first and last column (the last is in the ragged tail block)
        (2, [5, 21]),  # same lane, blocks 0 and 1 of a 16-wide block
        (3, [7, 64]),  # different lanes, different blocks
        (4, [2, 50, 90]),  # three times
    ]
    for r, cols in cases:
        x[0, r, cols] = 20.0
    # unique maximum whose runner-up sits in the same lane, one block later (16-wide blocks)
    x[0, 5, 9] = 20.0
    x[0, 5, 25] = 19.0
    # unique maximum whose runner-up is in another lane of the same block
    x[0, 6, 40] = 20.0
    x[0, 6, 41] = 19.5
    # row 7: no tie
    x = x.to(dtype)
    tg = torch.zeros(8, dtype=torch.long, device=DEVICE)
    got, want = run(x, tg)
    assert_stats_close(got, want)
    for r, _ in cases:
        assert got.p_top2[r] == got.p_top1[r], r
    for r in (5, 6, 7):
        assert got.p_top2[r] < got.p_top1[r], r
    ratio = got.p_top1[5] / got.p_top2[5]
    assert math.isclose(ratio.item(), math.e, rel_tol=1e-4)
    ratio = got.p_top1[6] / got.p_top2[6]
    assert math.isclose(ratio.item(), math.exp(0.5), rel_tol=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaNs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_infinity_logits(dtype, block):
    V = 127
    gen = torch.Generator().manual_seed(4)
    x = make_logits(1, 6, V, torch.float32, "contiguous", gen=gen).clone()
    ninf = float("-inf")
    x[0, 0, ::3] = ninf  # scattered -inf
    x[0, 1, :40] = ninf  # the first blocks entirely -inf
    x[0, 2, 1:] = ninf  # a single finite logit: p_top1 = 1, entropy 0
    x[0, 3, 10] = ninf  # the target logit is -inf: nll = inf
    x[0, 4, :] = ninf  # every logit -inf: NaN, as in the reference
    x[0, 5, 100:] = ninf  # the ragged tail -inf
    x = x.to(dtype)
    tg = torch.tensor([3, 60, 0, 10, 0, 1], device=DEVICE)
    with nan_empty():
        got = K.row_stats(x, tg, -100, with_p2=True)
    want = reference.row_stats(x, tg, -100, with_p2=True)
    assert_stats_close(got, want, equal_nan=True)
    rows = torch.tensor([0, 1, 2, 3, 5], device=DEVICE)
    for name in FIELDS + ("p2sum",):
        assert not torch.isnan(getattr(got, name)[rows]).any(), name
    assert got.nll[3] == float("inf")
    assert got.p_top1[2] == 1.0 and got.p_top2[2] == 0.0 and got.entropy[2] == 0.0 and got.p2sum[2] == 1.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaNs
@pytest.mark.parametrize("V", [1, 2, 37])
def test_row_of_only_negative_infinity(V, block):
    """Such a row gives what the reference gives (lse -inf, NaN entropy and probabilities, p_top2 = 0
    when V = 1, NaN nll for a valid target, 0 for an ignored one) and leaves the other rows alone."""
    gen = torch.Generator().manual_seed(8)
    x = make_logits(1, 4, V, torch.bfloat16, "contiguous", gen=gen).clone()
    x[0, 1] = float("-inf")
    x[0, 2] = float("-inf")
    tg = torch.tensor([0, 0, -100, V - 1], device=DEVICE)
    with nan_empty():
        got = K.row_stats(x, tg, -100, None, True, True)
    want = reference.row_stats(x, tg, -100, None, True, True)
    for name in FIELDS + ("wsum", "p2sum"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=2e-6, equal_nan=True, msg=lambda m: f"{name}: {m}"
        )
    assert torch.isnan(got.p2sum[1]) and not torch.isnan(got.p2sum[[0, 3]]).any()
    assert got.lse[1] == float("-inf") and got.nll[2] == 0.0
    assert torch.isnan(got.entropy[1]) and torch.isnan(got.p_top1[1]) and torch.isnan(got.nll[1])
    assert (got.p_top2[1] == 0.0) if V == 1 else torch.isnan(got.p_top2[1])
    assert not torch.isnan(torch.stack(got[:5])[:, [0, 3]]).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaNs
@pytest.mark.parametrize("V", [1, 2, 37])
def test_nan_logit_makes_its_row_nan(V, block):
    """A NaN logit anywhere in a row (first, last, beside -inf) keeps the row's statistics NaN, as the
    reference does (nll 0 for an ignored target, p_top2 0 when V = 1); other rows are unaffected."""
    gen = torch.Generator().manual_seed(9)
    x = make_logits(1, 5, V, torch.float32, "contiguous", gen=gen).clone()
    x[0, 0, 0] = float("nan")
    x[0, 1, V - 1] = float("nan")
    x[0, 2, :] = float("-inf")
    x[0, 2, V // 2] = float("nan")
    tg = torch.tensor([0, -100, V - 1, 0, 0], device=DEVICE)
    got, want = run(x, tg, with_wsum=True)
    for name in FIELDS + ("wsum", "p2sum"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=2e-6, equal_nan=True, msg=lambda m: f"{name}: {m}"
        )
    for name in ("lse", "entropy", "p_top1", "p2sum"):
        assert torch.isnan(getattr(got, name)[:3]).all(), name
    assert not torch.isnan(torch.stack(got[:5])[:, 3:]).any()


def aligned_view(B, T, V, dtype, gen):
    """(B, T, V) logits whose rows start on 16-byte boundaries (a padded buffer, so an odd V has
    real memory past its end): what the descriptor path reads."""
    align = 16 // torch.tensor([], dtype=dtype).element_size()
    Vp = (V // align + 1) * align
    return (torch.randn(B, T, Vp, generator=gen) * 3.0).to(dtype=dtype, device=DEVICE)[..., :V]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaNs
@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("V", [1, 2, 17, 127, 136])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_load_paths_match_reference(path, V, dtype, block, monkeypatch):
    """The descriptor path (full blocks unmasked, the partial last block masked) and the plain-load
    path on the same aligned logits: ties, -inf (scattered, leading blocks, the ragged tail, a whole
    row), a NaN, ignored and out-of-range targets, class weights."""
    if path == "tma" and dtype == torch.float32:
        pytest.skip("fp32 logits always take the plain loads (test_load_path_rules)")
    monkeypatch.setattr(scoring, "USE_TMA", path == "tma")
    monkeypatch.setattr(scoring, "TMA_MIN_BYTES", 0)
    gen = torch.Generator().manual_seed(V * 3 + len(path))
    x = aligned_view(2, 4, V, dtype, gen)
    ninf = float("-inf")
    x[0, 0, (V - 1) // 2 :] = 30.0  # tied maxima (V > 1): p_top2 == p_top1
    x[0, 1, ::3] = ninf
    x[0, 2, : V // 2] = ninf
    x[0, 3] = ninf  # every logit -inf
    x[1, 0, V - 1] = float("nan")
    x[1, 1, max(V - 5, 1) :] = ninf
    assert scoring.load_path(x) == path
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE)
    tg = torch.tensor([0, V - 1, -100, 0, 0, V, V // 2, 1 % V], device=DEVICE)
    got, want = run(x, tg, weight=w, with_wsum=True)
    assert_stats_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)
    if V > 1:
        assert got.p_top1[0] == got.p_top2[0]
    assert got.lse[3] == ninf and torch.isnan(got.lse[4])


def test_load_path_rules(monkeypatch):
    """The descriptor path needs unit stride along V and 16-byte aligned base and row strides (a
    dim of size 1 has no stride to speak of) and logits of at least TMA_MIN_BYTES; anything else
    reads with plain loads."""
    gen = torch.Generator().manual_seed(11)
    bf = torch.bfloat16
    x = aligned_view(2, 3, 128, bf, gen)
    monkeypatch.setattr(scoring, "TMA_MIN_BYTES", x.numel() * 2 + 1)
    assert scoring.load_path(x) == "pointer"  # too small to pay for the descriptor's host time
    monkeypatch.setattr(scoring, "TMA_MIN_BYTES", x.numel() * 2)
    assert scoring.load_path(x) == "tma"
    monkeypatch.setattr(scoring, "TMA_MIN_BYTES", 0)
    assert scoring.load_path(aligned_view(2, 3, 128, bf, gen)) == "tma"
    assert scoring.load_path(aligned_view(2, 3, 127, bf, gen)) == "tma"  # padded rows
    assert scoring.load_path(make_logits(2, 3, 127, bf, "contiguous", gen=gen)) == "pointer"  # 254-byte rows
    assert scoring.load_path(make_logits(1, 1, 127, bf, "contiguous", gen=gen)) == "tma"  # one row
    assert scoring.load_path(aligned_view(2, 3, 129, bf, gen)[..., 1:]) == "pointer"  # base off by 2 bytes
    assert scoring.load_path(make_logits(2, 3, 128, bf, "vocab_strided", gen=gen)) == "pointer"
    assert scoring.load_path(make_logits(2, 3, 128, bf, "shifted", gen=gen)) == "tma"
    assert scoring.load_path(make_logits(2, 3, 128, torch.float16, "shifted", gen=gen)) == "tma"
    assert scoring.load_path(aligned_view(2, 3, 128, torch.float32, gen)) == "pointer"  # slower there
    real = scoring.TensorDescriptor
    monkeypatch.setattr(scoring, "TensorDescriptor", None)  # a Triton without host descriptors
    assert scoring.load_path(aligned_view(2, 3, 128, bf, gen)) == "pointer"
    monkeypatch.setattr(scoring, "TensorDescriptor", real)
    monkeypatch.setattr(scoring, "USE_TMA", False)
    assert scoring.load_path(aligned_view(2, 3, 128, bf, gen)) == "pointer"
    if DEVICE == "cpu":  # no GPU and no interpreter: no Triton at all
        monkeypatch.setattr(scoring, "USE_TMA", True)
        monkeypatch.delenv("TRITON_INTERPRET")
        assert scoring.load_path(aligned_view(2, 3, 128, bf, gen)) == "pointer"


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_ignored_and_out_of_range_targets(ignore_index):
    V = 37
    gen = torch.Generator().manual_seed(5)
    x = make_logits(2, 4, V, torch.float32, "shifted", gen=gen)
    tg = torch.tensor([ignore_index, 5, 0, V, -1, 1 << 40, -(1 << 40), V - 1], device=DEVICE)
    got, want = run(x, tg, ignore_index=ignore_index)
    assert_stats_close(got, want)
    invalid = [0, 3, 4, 5, 6] + ([1] if ignore_index == 5 else [])
    for r in range(8):
        if r in invalid:
            assert got.nll[r] == 0.0, r
        else:
            assert got.nll[r] > 0.0, r


def test_all_targets_ignored():
    gen = torch.Generator().manual_seed(6)
    x = make_logits(2, 3, 11, torch.bfloat16, "contiguous", gen=gen)
    tg = torch.full((6,), -100, device=DEVICE)
    got, want = run(x, tg, with_wsum=True)
    assert torch.equal(got.nll, torch.zeros(6, device=DEVICE))
    assert_stats_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_weight", [False, True])
def test_wsum(dtype, with_weight, block):
    V = 127
    gen = torch.Generator().manual_seed(7)
    x = make_logits(2, 2, V, dtype, "vocab_strided", gen=gen)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE) if with_weight else None
    tg = make_targets(4, V, gen=gen)
    got, want = run(x, tg, weight=w, with_wsum=True)
    assert_stats_close(got, want, rtol=1e-5, atol=1e-4)
    no_sum = K.row_stats(x, tg, -100, w, False)
    assert no_sum.wsum is None
    assert_stats_close(no_sum, reference.row_stats(x, tg, -100, w, False))


def test_empty_batch_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for zero rows")

    monkeypatch.setattr(scoring, "_row_stats_kernel", NoLaunch())
    monkeypatch.setattr(scoring, "_row_stats_tma_kernel", NoLaunch())
    x = torch.randn(0, 4, 9, device=DEVICE)
    got = K.row_stats(x, torch.zeros(0, dtype=torch.long, device=DEVICE), -100, None, True, True)
    for t in got:
        assert t.shape == (0,) and t.dtype == torch.float32


# --------------------------------------------------------------------------- full size, GPU


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("layout", ["contiguous", "shifted"])
def test_row_stats_full_size_gpu(layout, path, monkeypatch):
    torch.manual_seed(0)
    B, T, V = 4, 2048, 128256
    if layout == "contiguous":
        x = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16)
    else:
        x = (torch.randn(B, T + 1, V, device="cuda") * 2).to(torch.bfloat16)[:, :-1]
    monkeypatch.setattr(scoring, "USE_TMA", path == "tma")
    if torch.cuda.get_device_capability()[0] < 9 and path == "tma":
        pytest.skip("the descriptor path needs a Hopper or newer GPU")
    assert scoring.load_path(x) == path
    tg = torch.randint(0, V, (B * T,), device="cuda")
    tg[::7] = -100
    got = K.row_stats(x, tg, -100, None, True, True)
    want = reference.row_stats(x, tg, -100, None, True, True)
    assert_stats_close(got._replace(wsum=None), want._replace(wsum=None), rtol=2e-5, atol=2e-5)
    # a sum of 128256 terms of either sign: the order of the fp32 additions shows at ~1e-9 of sum |x|
    bound = 1e-8 * x.float().abs().sum(-1).reshape(-1)
    assert ((got.wsum - want.wsum).abs() <= bound).all()


@pytest.mark.gpu
def test_row_stats_int64_offsets_gpu():
    """8192 rows of 262144: row * stride passes 2^31 elements; vocab-strided rows pass it too."""
    torch.manual_seed(0)
    N, V = 8192, 262144
    x = torch.randn(1, N, V, device="cuda", dtype=torch.bfloat16)
    tg = torch.randint(0, V, (N,), device="cuda")
    got = K.row_stats(x, tg, -100)  # the descriptor path on Hopper and newer
    rows = torch.arange(N - 64, N, device="cuda")
    want = reference.row_stats(x[:, N - 64 :], tg[rows], -100)
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name)[rows], getattr(want, name), rtol=2e-5, atol=2e-5)
    del x
    # vocabulary the slow dimension: column j of row r sits at j * N + r
    xt = torch.randn(V, 1, N, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0)
    got = K.row_stats(xt, tg, -100)
    want = reference.row_stats(xt[:, N - 64 :], tg[rows], -100)
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name)[rows], getattr(want, name), rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------- difficulty and host sums

MODES = ["entropy", "margin", "loss", "combined", "random", "gradnorm"]


def difficulty_inputs(N, V, seed, nan_rows=()):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, N, V, generator=gen) * 3).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::5] = -100
    targets = targets.to(DEVICE)
    stats = reference.row_stats(logits, targets, -100, with_p2=True)
    for r in nan_rows:
        for f in ("entropy", "p_top1", "nll", "p2sum"):
            getattr(stats, f)[r] = float("nan")
    noise = torch.rand(N, generator=gen).to(DEVICE)
    return stats, targets, noise


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N, V", [(1, 1), (7, 3), (300, 127)])
def test_row_difficulty_matches_reference(mode, N, V, monkeypatch):
    """Same difficulty bit for bit (same operations, no FMA contraction; gradnorm's exp and sqrt
    to an ulp), same sums; blocks of 64 rows so N = 300 spans five programs whose partial sums the
    host adds."""
    monkeypatch.setattr(scoring, "DIFFICULTY_BLOCK", 64)
    stats, targets, noise = difficulty_inputs(N, V, seed=N + V, nan_rows=(2,) if N > 2 else ())
    smoothing = 0.1 if mode == "gradnorm" else 0.0
    got_d, got_p = K.row_difficulty(stats, targets, V, -100, mode, noise, smoothing)
    want_d, want_p = reference.row_difficulty(stats, targets, V, -100, mode, noise, smoothing)
    assert got_d.dtype == torch.float32 and got_p.dtype == torch.float64
    if mode == "gradnorm":
        torch.testing.assert_close(got_d, want_d, rtol=3e-7, atol=0)
    else:
        assert torch.equal(got_d, want_d)
    assert got_p.shape == (-(-N // 64), 5) and want_p.shape == (1, 5)
    torch.testing.assert_close(got_p.sum(0), want_p.sum(0), rtol=1e-12, atol=1e-9, equal_nan=True)


def test_row_difficulty_counts_bad_targets_and_never_scores_them():
    stats, targets, _ = difficulty_inputs(9, 4, seed=1)
    targets = targets.clone()
    targets[0], targets[3], targets[4] = 4, -7, -100  # two bad, one ignored
    d, part = K.row_difficulty(stats, targets, 4, -100, "combined")
    n_valid, n_bad = part.sum(0).tolist()[:2]
    valid = (targets != -100) & (targets >= 0) & (targets < 4)
    assert (n_valid, n_bad) == (int(valid.sum()), 2)
    assert bool(torch.isneginf(d[~valid]).all()) and bool(torch.isfinite(d[valid]).all())


def test_row_difficulty_nan_is_hardest_and_ignore_index_in_range():
    """A NaN statistic gives +inf; an ignore_index inside [0, V) is ignored, not bad."""
    stats, targets, _ = difficulty_inputs(6, 5, seed=2, nan_rows=(1,))
    targets = targets.clone()
    targets[:] = torch.tensor([0, 1, 2, 3, 4, 3])
    d, part = K.row_difficulty(stats, targets, 5, 3, "entropy")
    assert d[1].item() == float("inf")
    assert torch.isneginf(d[3]) and torch.isneginf(d[5])
    assert part.sum(0)[:2].tolist() == [4.0, 0.0]


def test_row_difficulty_rejects_unknown_mode_and_missing_noise():
    stats, targets, _ = difficulty_inputs(4, 3, seed=3)
    with pytest.raises(ValueError, match="scoring"):
        K.row_difficulty(stats, targets, 3, -100, "confidence")
    with pytest.raises(ValueError, match="noise"):
        K.row_difficulty(stats, targets, 3, -100, "random")
    with pytest.raises(ValueError, match="p2sum"):
        K.row_difficulty(stats._replace(p2sum=None), targets, 3, -100, "gradnorm")


def test_row_difficulty_turns_negative_zero_into_zero():
    """-0 and +0 tie: both backends give +0, so no sort can order the two apart."""
    stats, targets, _ = difficulty_inputs(5, 4, seed=5)
    targets = torch.tensor([0, 1, 2, 3, 0], device=DEVICE)
    stats.entropy[:] = torch.tensor([-0.0, 0.0, 1.0, -0.0, 0.5], device=DEVICE)
    for fn in (K.row_difficulty, reference.row_difficulty):
        d, _ = fn(stats, targets, 4, -100, "entropy")
        assert d.tolist() == [0.0, 0.0, 1.0, 0.0, 0.5]
        assert not bool(torch.signbit(d).any())


# --------------------------------------------------------------------------- target counts


@pytest.mark.parametrize("N", [0, 1, 7, 300, 700])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_target_counts_match_reference(N, ignore_index, monkeypatch):
    """Valid and bad counts, summed over the per-program partials (blocks of 64, at most 8
    programs: N = 300 spans five, N = 700 makes each program loop)."""
    monkeypatch.setattr(scoring, "COUNT_BLOCK", 64)
    monkeypatch.setattr(scoring, "COUNT_PROGRAMS", 8)
    gen = torch.Generator().manual_seed(N)
    V = 11
    t = torch.randint(-3, V + 3, (N,), generator=gen)  # in range, below 0 and past V
    t[::4] = ignore_index
    t = t.to(DEVICE)
    got = K.target_counts(t, V, ignore_index)
    want = reference.target_counts(t, V, ignore_index)
    assert got.dtype == torch.int64 and got.shape == (min(8, max(1, -(-N // 64))), 2)
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    bad = (t != ignore_index) & ~((t >= 0) & (t < V))
    assert got.sum(0).tolist() == want.sum(0).tolist() == [int(valid.sum()), int(bad.sum())]


def test_target_counts_strided_targets():
    base = (torch.arange(40, device=DEVICE) % 7).view(20, 2)
    t = base[:, 1]  # every other element: stride 2
    t[0] = -100
    assert t.stride(0) == 2
    assert K.target_counts(t, 5, -100).sum(0).tolist() == [int(((t >= 0) & (t < 5)).sum()), int((t >= 5).sum())]
