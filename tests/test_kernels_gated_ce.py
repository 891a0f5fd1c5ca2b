"""Triton cross-entropy gradient rows (kernels/gated_ce.py) against the PyTorch reference.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
CPU cases stay small; the ``gpu`` cases run at full size on a CUDA device.
"""

import pytest
import torch

import cggr_hook.kernels as K
from cggr_hook.kernels import force_backend, gated_ce, reference

from common import DEVICE, make_logits, nan_empty

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "shifted", "vocab_strided"]
# (label_smoothing, with class weights)
LOSS_OPTIONS = [(0.0, False), (0.1, False), (0.0, True), (0.2, True)]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    force_backend("triton")
    calls = []
    for name in ("ce_grad_rows", "ce_grad_dense_"):
        real = getattr(gated_ce, name)

        def spy(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(gated_ce, name, spy)
    return calls


@pytest.fixture(params=["default_block", "small_block", "chunked"])
def block(request, monkeypatch):
    """The default block; a 16-wide one so a row of 127 spans 8 blocks of one program; and
    programs of two such blocks, so that row is written by 4 programs, the last one partial."""
    if request.param in ("small_block", "chunked"):
        monkeypatch.setattr(gated_ce, "MAX_BLOCK_V", 16)
    if request.param == "chunked":
        monkeypatch.setattr(gated_ce, "CHUNK_BLOCKS", 2)
    return request.param


def lse_of(x):
    return torch.logsumexp(x.float(), dim=-1).reshape(-1)


def loss_args(V, options, gen):
    eps, with_weight = options
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE) if with_weight else None
    return w, eps


def tol(dtype):
    """Tolerances of a gradient stored in ``dtype``. The interpreter truncates fp32 -> bf16 where the
    GPU and torch round to nearest, so bf16 may differ by one unit in the last place."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    if dtype == torch.bfloat16:
        return dict(rtol=2**-7, atol=1e-6)
    return dict(rtol=2e-3, atol=1e-6)


def assert_grad_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


# --------------------------------------------------------------------------- compact rows


# every vocabulary size, dtype and layout with the plain loss; every loss option on a few of them
CASES = [(V, dtype, layout, LOSS_OPTIONS[0]) for V in (1, 2, 3, 127) for dtype in DTYPES for layout in LAYOUTS]
CASES += [
    (V, dtype, layout, options)
    for options in LOSS_OPTIONS[1:]
    for V, dtype, layout in [
        (1, torch.float32, "contiguous"),
        (3, torch.bfloat16, "vocab_strided"),
        (127, torch.float16, "shifted"),
        (127, torch.bfloat16, "vocab_strided"),
    ]
]


def case_id(case):
    V, dtype, layout, (eps, with_weight) = case
    return f"V{V}-{str(dtype)[6:]}-{layout}-eps{eps}-w{int(with_weight)}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ce_grad_rows_matches_reference(case, block, triton_backend):
    V, dtype, layout, options = case
    gen = torch.Generator().manual_seed(V + len(layout))
    x = make_logits(2, 3, V, dtype, layout, gen=gen)
    tg = torch.randint(0, V, (6,), generator=gen).to(DEVICE)
    lse = lse_of(x)
    w, eps = loss_args(V, options, gen)
    rows = torch.tensor([4, 0, 5], device=DEVICE)
    row_scale = torch.tensor([2.0, 9.0, 9.0, 9.0, 0.5, -1.0], device=DEVICE)  # read at the rows only
    for out_dtype in {dtype, torch.float32}:
        for grad_output in (None, torch.tensor(0.75, device=DEVICE), torch.linspace(-1, 1, 6, device=DEVICE)):
            with nan_empty():
                got = K.ce_grad_rows(x, tg, lse, rows, row_scale, w, eps, out_dtype, grad_output)
            want = reference.ce_grad_rows(x, tg, lse, rows, row_scale, w, eps, out_dtype, grad_output)
            assert_grad_close(got, want, out_dtype)
    assert triton_backend, "the Triton backend did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smooth_weighted"])
def test_ce_grad_rows_vocab_32001(dtype, options):
    V = 32001
    gen = torch.Generator().manual_seed(11)
    x = make_logits(3, 1, V, dtype, "shifted", gen=gen)
    tg = torch.tensor([0, V - 1, 17], device=DEVICE)
    lse = lse_of(x)
    w, eps = loss_args(V, options, gen)
    rows = torch.tensor([2, 0], device=DEVICE)
    scale = torch.tensor([1.0, 0.0, 0.25], device=DEVICE)
    with nan_empty():
        got = K.ce_grad_rows(x, tg, lse, rows, scale, w, eps, dtype)
    want = reference.ce_grad_rows(x, tg, lse, rows, scale, w, eps, dtype)
    assert_grad_close(got, want, dtype)


def test_ce_grad_rows_empty_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for zero rows")

    monkeypatch.setattr(gated_ce, "_ce_grad_rows_kernel", NoLaunch())
    x = torch.randn(2, 3, 9, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    got = K.ce_grad_rows(
        x,
        torch.zeros(6, dtype=torch.long, device=DEVICE),
        lse_of(x),
        empty,
        torch.zeros(6, device=DEVICE),
        None,
        0.0,
        torch.bfloat16,
    )
    assert got.shape == (0, 9) and got.dtype == torch.bfloat16


def test_scales_and_upstream_gradients_of_another_size_are_errors():
    x = torch.randn(2, 3, 9, device=DEVICE)
    args = (x, torch.zeros(6, dtype=torch.long, device=DEVICE), lse_of(x), torch.tensor([1, 4], device=DEVICE))
    for kernels_module in (K, reference):
        with pytest.raises(ValueError, match="grad_output has 5 elements for 6 rows"):
            kernels_module.ce_grad_rows(*args, torch.ones(6, device=DEVICE), None, 0.0, torch.float32, torch.ones(5))
        # a compact scale, one per selected row, is not a scale per row of the logits
        with pytest.raises(ValueError, match=r"row_scale of shape \(2,\) must have one scale per row"):
            kernels_module.ce_grad_rows(*args, torch.ones(2, device=DEVICE), None, 0.0, torch.float32)
    with pytest.raises(ValueError, match=r"row_scale of shape \(5,\)"):
        K.ce_grad_dense_(x, args[1], args[2], torch.ones(5, device=DEVICE), None, 0.0, torch.empty_like(x))


def test_ce_grad_rows_negative_infinity_logits():
    V = 40
    gen = torch.Generator().manual_seed(12)
    x = make_logits(1, 3, V, torch.float32, "contiguous", gen=gen).clone()
    x[0, 0, ::2] = float("-inf")
    x[0, 1, 1:] = float("-inf")  # a single finite logit, the target: gradient 0
    tg = torch.tensor([1, 0, 5], device=DEVICE)
    lse = lse_of(x)
    rows = torch.tensor([0, 1, 2], device=DEVICE)
    scale = torch.ones(3, device=DEVICE)  # one per row of the logits
    got = K.ce_grad_rows(x, tg, lse, rows, scale, None, 0.0, torch.float32)
    want = reference.ce_grad_rows(x, tg, lse, rows, scale, None, 0.0, torch.float32)
    assert_grad_close(got, want, torch.float32)
    assert torch.equal(got[0, ::2], torch.zeros(V // 2, device=DEVICE))
    assert torch.equal(got[1], torch.zeros(V, device=DEVICE))


def test_gradient_is_the_cross_entropy_gradient():
    """Independent of the reference: autograd of torch's own cross entropy (smoothing + weights)."""
    V = 50
    gen = torch.Generator().manual_seed(13)
    x = make_logits(1, 4, V, torch.float32, "contiguous", gen=gen)
    tg = torch.randint(0, V, (4,), generator=gen).to(DEVICE)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE)
    xr = x.reshape(4, V).clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(xr, tg, weight=w, label_smoothing=0.1, reduction="sum")
    loss.backward()
    got = K.ce_grad_rows(
        x, tg, lse_of(x), torch.arange(4, device=DEVICE), torch.ones(4, device=DEVICE), w, 0.1, torch.float32
    )
    torch.testing.assert_close(got, xr.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dense


def dense_case(V, dtype, layout, options, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(2, 4, V, dtype, layout, gen=gen)
    tg = torch.randint(0, V, (8,), generator=gen).to(DEVICE)
    tg[6] = -100  # an unselected, ignored row: never selected, never read
    lse = lse_of(x)
    w, eps = loss_args(V, options, gen)
    row_scale = torch.zeros(8, device=DEVICE)
    row_scale[[0, 3, 5, 7]] = torch.tensor([1.0, 0.5, -2.0, 3.0], device=DEVICE)
    return x, tg, lse, w, eps, row_scale


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ce_grad_dense_matches_reference(case, block, triton_backend):
    V, dtype, layout, options = case
    x, tg, lse, w, eps, row_scale = dense_case(V, dtype, layout, options, seed=V + 3)
    want = reference.ce_grad_dense_(x, tg, lse, row_scale, w, eps, torch.empty_like(x))
    # into a fresh NaN-filled output of another layout: every element is written
    out = torch.full((2, 4, V), float("nan"), dtype=dtype, device=DEVICE)
    got = K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, out)
    assert got is out
    assert_grad_close(out, want, dtype)
    unselected = torch.nonzero(row_scale == 0).flatten()
    rows_out = out.reshape(8, V)[unselected]
    assert torch.equal(rows_out, torch.zeros_like(rows_out))
    assert not torch.signbit(rows_out).any()
    assert triton_backend, "the Triton backend did not run"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smooth_weighted"])
def test_ce_grad_dense_in_place(dtype, layout, options, block):
    V = 127
    x, tg, lse, w, eps, row_scale = dense_case(V, dtype, layout, options, seed=21)
    want = reference.ce_grad_dense_(x, tg, lse, row_scale, w, eps, torch.empty_like(x))
    base = x._base if x._base is not None else x
    snapshot = base.clone()
    got = K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, x)
    assert got is x
    assert_grad_close(x, want, dtype)
    if layout == "shifted":
        # the column of the underlying tensor outside the view is untouched
        assert torch.equal(base[:, -1], snapshot[:, -1])


@pytest.mark.parametrize("in_place", [False, True])
def test_unselected_rows_are_zero_and_unread(in_place, block):
    """NaN logits in unselected rows: their gradient is exactly 0 and selected rows are unaffected."""
    V = 127
    x, tg, lse, w, eps, row_scale = dense_case(V, torch.bfloat16, "shifted", (0.1, True), seed=31)
    want = reference.ce_grad_dense_(x, tg, lse, row_scale, w, eps, torch.empty_like(x))
    flat = torch.arange(8, device=DEVICE)
    dropped = flat[row_scale == 0]
    x[dropped // 4, dropped % 4] = float("nan")
    lse = lse.clone()
    lse[dropped] = float("nan")
    out = x if in_place else torch.full_like(x, float("nan"))
    K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, out)
    assert not torch.isnan(out).any()
    assert torch.equal(out[dropped // 4, dropped % 4], torch.zeros(len(dropped), V, dtype=x.dtype, device=DEVICE))
    assert_grad_close(out, want, torch.bfloat16)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "shifted"])
def test_ce_grad_dense_order_changes_the_schedule_not_the_result(in_place, layout, block):
    """Rows taken in the reverse of a given permutation (selected rows last, as a top-k call
    passes them): bit for bit the gradient of the row-order launch, every row written once."""
    V = 127
    x, tg, lse, w, eps, row_scale = dense_case(V, torch.bfloat16, layout, (0.1, True), seed=23)
    want = K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, torch.full_like(x, float("nan")))
    selected = torch.nonzero(row_scale != 0).flatten()
    order = torch.cat([selected, torch.nonzero(row_scale == 0).flatten()]).flip(0).roll(3)
    out = x if in_place else torch.full_like(x, float("nan"))
    got = K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, out, None, order)
    assert got is out
    assert torch.equal(out, want)


def test_ce_grad_dense_rejects_an_order_that_is_not_a_row_permutation():
    x, tg, lse, w, eps, row_scale = dense_case(11, torch.float32, "contiguous", (0.0, False), seed=1)
    for order in (torch.arange(7, device=DEVICE), torch.arange(8, device=DEVICE, dtype=torch.int32)):
        with pytest.raises(ValueError, match="order must be an int64 permutation of the 8 rows"):
            K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, torch.empty_like(x), None, order)
    # logits of the wrong rank: the shape is what is wrong, whatever the order
    with pytest.raises(ValueError, match=r"needs \(B, T, V\) logits"):
        K.ce_grad_dense_(x[0], tg, lse, row_scale, w, eps, x[0], None, torch.arange(8, device=DEVICE))


def test_ce_grad_dense_vocab_32001():
    V = 32001
    gen = torch.Generator().manual_seed(41)
    x = make_logits(1, 3, V, torch.bfloat16, "contiguous", gen=gen)
    tg = torch.tensor([3, -100, V - 1], device=DEVICE)
    lse = lse_of(x)
    row_scale = torch.tensor([0.5, 0.0, 1.0], device=DEVICE)
    want = reference.ce_grad_dense_(x, tg, lse, row_scale, None, 0.0, torch.empty_like(x))
    K.ce_grad_dense_(x, tg, lse, row_scale, None, 0.0, x)
    assert_grad_close(x, want, torch.bfloat16)


def test_ce_grad_dense_empty_batch():
    x = torch.randn(0, 3, 7, device=DEVICE)
    out = K.ce_grad_dense_(
        x,
        torch.zeros(0, dtype=torch.long, device=DEVICE),
        torch.zeros(0, device=DEVICE),
        torch.zeros(0, device=DEVICE),
        None,
        0.0,
        x,
    )
    assert out is x


@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smooth_weighted"])
def test_rows_with_invalid_targets_get_zeros(options, block):
    """A selected row whose target is not a class (ignored, or out of range) gets exact zeros, as torch
    gives an ignored token; its target is never an address and its (NaN) logits are never used."""
    V = 29
    gen = torch.Generator().manual_seed(51)
    x = make_logits(2, 4, V, torch.float32, "shifted", gen=gen)
    w, eps = loss_args(V, options, gen)
    tg = torch.randint(0, V, (8,), generator=gen).to(DEVICE)
    bad = torch.tensor([1, 2, 5, 6], device=DEVICE)
    tg[bad] = torch.tensor([-100, V, 1 << 40, -(1 << 40)], device=DEVICE)
    good = torch.tensor([0, 3, 4, 7], device=DEVICE)
    lse = lse_of(x)
    x[bad // 4, bad % 4] = float("nan")
    rows = torch.arange(8, device=DEVICE)
    scale = torch.full((8,), 0.5, device=DEVICE)
    got = K.ce_grad_rows(x, tg, lse, rows, scale, w, eps, torch.float32)
    assert torch.equal(got[bad], torch.zeros(4, V, device=DEVICE))
    want = reference.ce_grad_rows(x, tg, lse, good, scale, w, eps, torch.float32)
    assert_grad_close(got[good], want, torch.float32)

    out = torch.full_like(x, float("nan"))
    K.ce_grad_dense_(x, tg, lse, scale, w, eps, out)
    assert torch.equal(out[bad // 4, bad % 4], torch.zeros(4, V, device=DEVICE))
    assert_grad_close(out[good // 4, good % 4], want, torch.float32)


# --------------------------------------------------------------------------- full size, GPU


@pytest.mark.gpu
@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smooth_weighted"])
def test_gated_ce_full_size_gpu(options):
    torch.manual_seed(0)
    B, T, V = 4, 2048, 128256
    N = B * T
    x = (torch.randn(B, T + 1, V, device="cuda") * 2).to(torch.bfloat16)[:, :-1]
    tg = torch.randint(0, V, (N,), device="cuda")
    lse = lse_of(x)
    eps, with_weight = options
    w = torch.rand(V, device="cuda") + 0.5 if with_weight else None
    rows = torch.randperm(N, device="cuda")[: N // 4]
    row_scale = torch.zeros(N, device="cuda")
    row_scale[rows] = torch.rand(N // 4, device="cuda")
    got = K.ce_grad_rows(x, tg, lse, rows, row_scale, w, eps, torch.bfloat16)
    want = reference.ce_grad_rows(x, tg, lse, rows, row_scale, w, eps, torch.bfloat16)
    # on the GPU both round fp32 -> bf16 to nearest; exp differs by a few fp32 ulps
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    del got
    want = reference.ce_grad_dense_(x, tg, lse, row_scale, w, eps, torch.empty_like(x))
    K.ce_grad_dense_(x, tg, lse, row_scale, w, eps, x)
    torch.testing.assert_close(x.float(), want.float(), rtol=2**-7, atol=1e-6)


# --------------------------------------------------------------------------- the selected rows' loss


def loss_inputs(N, V, seed, with_wsum):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, N, V, generator=gen) * 2).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::4] = -100
    targets = targets.to(DEVICE)
    stats = reference.row_stats(logits, targets, -100, None, with_wsum)
    return stats, targets, gen


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's 0 / 0 of k = 0
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: f"eps{o[0]}-w{int(o[1])}")
@pytest.mark.parametrize("N, V, k", [(1, 1, 1), (5, 3, 2), (300, 127, 77), (300, 127, 0)])
def test_selected_loss_matches_reference(reduction, options, N, V, k, monkeypatch):
    """Loss and row scales of the rows with key < k; 64-row blocks so N = 300 spans five."""
    monkeypatch.setattr(gated_ce, "LOSS_BLOCK", 64)
    eps, with_weight = options
    stats, targets, gen = loss_inputs(N, V, seed=N * 7 + k, with_wsum=eps > 0)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE) if with_weight else None
    valid = targets != -100
    n_valid = int(valid.sum())
    # the key: the rank of a random order of the valid rows (ignored rows rank last)
    order = torch.argsort(torch.where(valid, torch.rand(N, generator=gen).to(DEVICE), 2.0))
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=DEVICE))
    k = min(k, n_valid)
    got = K.selected_loss(stats, targets, V, rank, k, k, n_valid, reduction, eps, w)
    want = reference.selected_loss(stats, targets, V, rank, k, k, n_valid, reduction, eps, w)
    for g, r, name in zip(got, want, ("loss", "row_scale")):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[1] != 0, rank < k)  # the selection, exactly
    if reduction == "mean" and k == 0:
        assert torch.isnan(got[0])  # 0 / 0, as torch's mean over an all-ignored batch


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's 0 / 0 of n = 0
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smoothed_weighted"])
@pytest.mark.parametrize("counts_kind", ["target_counts", "difficulty_partials"])
@pytest.mark.parametrize(
    "N, V, ratio, ignored",
    [(1, 3, 0.25, False), (1, 3, 0.25, True), (13, 5, 0.3, False), (300, 37, 0.25, False), (300, 37, 0.45, True)],
)
def test_selected_loss_with_k_counted_on_the_device_is_the_loss_with_k_given(
    reduction, options, counts_kind, N, V, ratio, ignored, monkeypatch
):
    """Top-k at a fixed ratio: n from partial counts' first column (int64 or float64, split over
    several rows, other columns not counts), k = keep_count(ratio, n) and the sum's factor n / k on
    the device give the loss and row scales of the same call with n and k given, bit for bit; the
    reference agrees. ``ignored``: every target ignored (n = 0, nothing selected)."""
    monkeypatch.setattr(gated_ce, "LOSS_BLOCK", 64)
    eps, with_weight = options
    stats, targets, gen = loss_inputs(N, V, seed=N * 3 + int(ignored), with_wsum=eps > 0)
    if ignored:
        targets = torch.full_like(targets, -100)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE) if with_weight else None
    valid = targets != -100
    n_valid = int(valid.sum())
    order = torch.argsort(torch.where(valid, torch.rand(N, generator=gen).to(DEVICE), 2.0))
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=DEVICE))
    if counts_kind == "target_counts":
        counts = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
        counts[0, 0], counts[2, 0] = n_valid - n_valid // 3, n_valid // 3
    else:
        counts = (torch.rand(4, 5, generator=gen, dtype=torch.float64) * 100).to(DEVICE)
        counts[:, 0] = 0.0
        counts[1, 0], counts[3, 0] = float(n_valid - n_valid // 2), float(n_valid // 2)
    k = K.spec.keep_count(ratio, n_valid)
    given = K.selected_loss(stats, targets, V, rank, k, k, n_valid, reduction, eps, w)
    got = K.selected_loss(stats, targets, V, rank, 0, 0, 0, reduction, eps, w, counts=counts, ratio=ratio)
    want = reference.selected_loss(stats, targets, V, rank, 0, 0, 0, reduction, eps, w, counts=counts, ratio=ratio)
    for g, h, r, name in zip(got, given, want, ("loss", "row_scale")):
        torch.testing.assert_close(g, h, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[1] != 0, rank < k)


def _check_kept_rows(reduction, options, N, V, ratio, n_keep, seed):
    """The rows of rank below k = keep_count(ratio, n) (n counted on the device) joined by the rows
    of ``keep``: the loss and row scales of that union given as a key, bit for bit, with its size
    written to ``selected`` (the sum's factor n over it); the reference agrees."""
    eps, with_weight = options
    stats, targets, gen = loss_inputs(N, V, seed=seed, with_wsum=eps > 0)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE) if with_weight else None
    valid = targets != -100
    n_valid = int(valid.sum())
    order = torch.argsort(torch.where(valid, torch.rand(N, generator=gen).to(DEVICE), 2.0))
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=DEVICE))
    keep = torch.zeros(N, dtype=torch.bool)
    keep[torch.randperm(N, generator=gen)[:n_keep]] = True
    keep = keep.to(DEVICE) & valid  # (kept rows are valid ones)
    counts = torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)
    counts[0, 0], counts[1, 0] = n_valid // 2, n_valid - n_valid // 2
    k = K.spec.keep_count(ratio, n_valid)
    union = (rank < k) | keep
    n_sel = int(union.sum())
    key = (~union).to(torch.int64)
    given = K.selected_loss(stats, targets, V, key, 1, n_sel, n_valid, reduction, eps, w)
    sel_got = torch.full((1,), -1, dtype=torch.int64, device=DEVICE)
    sel_want = torch.full((1,), -1, dtype=torch.int64, device=DEVICE)
    got = K.selected_loss(
        stats, targets, V, rank, 0, 0, 0, reduction, eps, w, counts=counts, ratio=ratio, keep=keep, selected=sel_got
    )
    want = reference.selected_loss(
        stats, targets, V, rank, 0, 0, 0, reduction, eps, w, counts=counts, ratio=ratio, keep=keep, selected=sel_want
    )
    for g, h, r, name in zip(got, given, want, ("loss", "row_scale")):
        torch.testing.assert_close(g, h, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[1] != 0, union)
    assert int(sel_got) == int(sel_want) == n_sel


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's 0 / 0 of n = 0
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smoothed_weighted"])
@pytest.mark.parametrize(
    "N, V, ratio, n_keep",
    [(1, 3, 0.25, 1), (13, 5, 0.3, 0), (13, 5, 0.3, 4), (300, 37, 0.25, 40), (300, 37, 0.45, 300)],
)
def test_selected_loss_with_kept_rows_is_the_loss_of_the_union(reduction, options, N, V, ratio, n_keep, monkeypatch):
    """sequence_aware at a fixed ratio (``_check_kept_rows``), in 64-row blocks."""
    monkeypatch.setattr(gated_ce, "LOSS_BLOCK", 64)
    _check_kept_rows(reduction, options, N, V, ratio, n_keep, seed=N * 5 + n_keep)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "options", [(0.0, False), (0.0, True), (0.1, True)], ids=["plain", "weighted", "smoothed_weighted"]
)
def test_selected_loss_with_kept_rows_at_full_size_gpu(reduction, options):
    """The same at the shipped block size on the device, where the compiled walk fixes the sums'
    order: the kept rows must not change the order of the loss's sums."""
    for i, N in enumerate((300, 517, 1003, 8191, 20000)):
        _check_kept_rows(reduction, options, N, 64, 0.3, N // 7, seed=100 + i)


def test_selected_loss_keep_is_checked():
    stats, targets, _ = loss_inputs(6, 5, seed=0, with_wsum=False)
    rank = torch.arange(6, device=DEVICE)
    counts = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    keep = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    sel = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="keep only with counts"):
        K.selected_loss(stats, targets, 5, rank, 1, 1, 1, "mean", 0.0, None, keep=keep, selected=sel)
    with pytest.raises(ValueError, match="selected, an int64"):
        K.selected_loss(stats, targets, 5, rank, 0, 0, 0, "mean", 0.0, None, counts=counts, ratio=0.5, keep=keep)
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape \\(6,\\)"):
        K.selected_loss(
            stats, targets, 5, rank, 0, 0, 0, "mean", 0.0, None, counts=counts, ratio=0.5, keep=keep[:5], selected=sel
        )


def test_selected_loss_counts_are_checked():
    stats, targets, _ = loss_inputs(6, 5, seed=0, with_wsum=False)
    rank = torch.arange(6, device=DEVICE)
    for bad in (torch.zeros(2, 2, dtype=torch.float32), torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="counts must be partial counts"):
            K.selected_loss(stats, targets, 5, rank, 0, 0, 0, "mean", 0.0, None, counts=bad.to(DEVICE), ratio=0.5)
    with pytest.raises(ValueError, match="ratio in \\[0, 1\\]"):
        counts = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
        K.selected_loss(stats, targets, 5, rank, 0, 0, 0, "mean", 0.0, None, counts=counts, ratio=1.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [(0.0, False), (0.1, True)], ids=["plain", "smoothed_weighted"])
@pytest.mark.parametrize("N, V", [(1, 3), (13, 5), (300, 37)])
def test_selected_loss_with_row_weights_matches_reference(reduction, options, N, V, monkeypatch):
    """Each selected row carries its own factor (importance sampling): a weighted sum for mean and
    sum, weighted rows for none, row_scale = the factor on the selection, 0 elsewhere (even where
    a factor is given off the selection)."""
    monkeypatch.setattr(gated_ce, "LOSS_BLOCK", 64)
    eps, with_weight = options
    stats, targets, gen = loss_inputs(N, V, seed=N * 3 + V, with_wsum=eps > 0)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE) if with_weight else None
    valid = targets != -100
    key = torch.where(valid & (torch.rand(N, generator=gen).to(DEVICE) < 0.5), 0, 1)
    k = int((key == 0).sum())
    rho = (torch.rand(N, generator=gen) * 4 + 0.1).to(DEVICE)  # also off the selection: must be ignored
    got = K.selected_loss(stats, targets, V, key, 1, k, int(valid.sum()), reduction, eps, w, rho)
    want = reference.selected_loss(stats, targets, V, key, 1, k, int(valid.sum()), reduction, eps, w, rho)
    for g, r, name in zip(got, want, ("loss", "row_scale")):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    sel = key == 0
    torch.testing.assert_close(got[1], torch.where(sel, rho, 0.0))
    # the definition: sum over the selection of rho times the row's cross entropy
    ce = reference.selected_loss(stats, targets, V, key, 1, k, int(valid.sum()), "none", eps, w)[0]
    want_loss = ce * rho if reduction == "none" else (ce * rho).sum()
    torch.testing.assert_close(got[0], want_loss, rtol=1e-5, atol=1e-6)


def test_selected_loss_is_masked_cross_entropy():
    """The kernel's loss is torch's cross entropy over the selected rows (definition check)."""
    N, V = 50, 11
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, V, generator=gen).to(DEVICE)
    t = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEVICE)
    stats = reference.row_stats(x.unsqueeze(0), t, -100, w, with_wsum=True)
    key = torch.ones(N, dtype=torch.long, device=DEVICE)
    rows = torch.tensor([1, 4, 9, 30, 49], device=DEVICE)
    key[rows] = 0
    loss, scale = K.selected_loss(stats, t, V, key, 1, 5, N, "mean", 0.1, w)
    want = torch.nn.functional.cross_entropy(x[rows], t[rows], weight=w, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scale[rows], (1.0 / w[t[rows]].sum()).expand(5))


@pytest.mark.parametrize("per_row", [False, True])
def test_ce_grad_dense_scales_by_the_upstream_gradient(per_row, block):
    """row_scale times grad_output (one element or one per row); rows with scale 0 stay zero even
    where grad_output is not."""
    gen = torch.Generator().manual_seed(11)
    x = make_logits(2, 9, 37, torch.bfloat16, "contiguous", gen=gen)
    tg = torch.randint(0, 37, (18,), generator=gen).to(DEVICE)
    lse = lse_of(x)
    row_scale = torch.zeros(18, device=DEVICE)
    row_scale[[0, 5, 17]] = torch.tensor([0.5, 2.0, 1.0], device=DEVICE)
    g_out = (torch.rand(18, generator=gen) + 0.5).to(DEVICE) if per_row else torch.tensor(3.0, device=DEVICE)
    got = K.ce_grad_dense_(x, tg, lse, row_scale, None, 0.0, torch.empty_like(x), g_out)
    combined = row_scale * (g_out if per_row else g_out.expand(18))
    want = reference.ce_grad_dense_(x, tg, lse, combined, None, 0.0, torch.empty_like(x))
    assert_grad_close(got, want, torch.bfloat16)
    with pytest.raises(ValueError, match="grad_output"):
        K.ce_grad_dense_(x, tg, lse, row_scale, None, 0.0, torch.empty_like(x), torch.ones(5, device=DEVICE))
