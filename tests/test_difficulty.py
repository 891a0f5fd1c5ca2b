"""Scoring: cggr_hook.difficulty against formulas recomputed here in float64, and the reference row
statistics (kernels.reference.row_stats) against torch's own cross entropy and logsumexp."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from cggr_hook.difficulty import difficulty
from cggr_hook.kernels import RowStats, reference

SHAPES = [(1, 1, 2), (2, 3, 5), (3, 7, 11), (1, 13, 97), (5, 4, 3)]
MODES = ["entropy", "margin", "loss", "combined"]


def random_case(B, T, V, seed, n_ignored=0, ignore_index=-100, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (B * T,), generator=g)
    if n_ignored:
        targets[torch.randperm(B * T, generator=g)[:n_ignored]] = ignore_index
    return logits, targets


def oracle(logits, targets, ignore_index=-100):
    """float64 lse, entropy, top-1/top-2 probabilities and target NLL of each row, plain torch."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).double()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    lse = torch.logsumexp(x, dim=-1)
    ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    ps = torch.sort(p, dim=-1, descending=True).values
    p1 = ps[:, 0]
    p2 = ps[:, 1] if V > 1 else torch.zeros_like(p1)
    valid = (targets != ignore_index) & (targets >= 0) & (targets < V)
    safe = torch.where(valid, targets, 0)
    nll = torch.where(valid, -logp.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    return dict(lse=lse, entropy=ent, p_top1=p1, p_top2=p2, nll=nll, valid=valid)


def expected_difficulty(o, mode, V):
    if mode == "entropy":
        d = o["entropy"]
    elif mode == "margin":
        d = 1 - (o["p_top1"] - o["p_top2"])
    elif mode == "loss":
        d = o["nll"]
    else:
        d = o["entropy"] / math.log(V) + (1 - (o["p_top1"] - o["p_top2"])) + o["nll"] / math.log(V)
    return torch.where(o["valid"], d, torch.full_like(d, -math.inf))


def stats_of(logits, targets, ignore_index=-100):
    return reference.row_stats(logits, targets, ignore_index)


# --------------------------------------------------------------------------------------------------
# difficulty
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, T, V", [s for s in SHAPES if s[2] > 1])
def test_difficulty_matches_the_formula(mode, B, T, V):
    logits, targets = random_case(B, T, V, seed=B * 100 + T * 10 + V, n_ignored=(B * T) // 3)
    o = oracle(logits, targets)
    d = difficulty(stats_of(logits, targets, -100), mode, V, o["valid"])
    assert d.dtype == torch.float32 and d.shape == (B * T,)
    want = expected_difficulty(o, mode, V)
    torch.testing.assert_close(d.double(), want, rtol=2e-5, atol=2e-5)


def test_difficulty_modes_on_hand_made_stats():
    st = RowStats(
        lse=torch.tensor([0.0, 1.0, 2.0]),
        entropy=torch.tensor([0.5, 1.0, 2.0]),
        p_top1=torch.tensor([0.9, 0.5, 0.25]),
        p_top2=torch.tensor([0.05, 0.5, 0.125]),
        nll=torch.tensor([0.1, 3.0, 0.0]),
    )
    valid = torch.tensor([True, True, False])
    V = 8
    ln = math.log(8)
    cases = {
        "entropy": [0.5, 1.0],
        "margin": [1 - 0.85, 1.0],
        "loss": [0.1, 3.0],
        "combined": [0.5 / ln + 0.15 + 0.1 / ln, 1.0 / ln + 1.0 + 3.0 / ln],
    }
    for mode, want in cases.items():
        d = difficulty(st, mode, V, valid)
        torch.testing.assert_close(d[:2].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        assert d[2].item() == -math.inf, mode


def test_combined_ranks_an_uncertain_wrong_row_above_a_confident_right_one():
    V = 6
    logits = torch.tensor([[[8.0, 0, 0, 0, 0, 0], [0.1, 0.2, 0.0, 0.1, 0.3, 0.0]]])
    targets = torch.tensor([0, 2])
    d = difficulty(stats_of(logits, targets), "combined", V, torch.ones(2, dtype=torch.bool))
    assert d[1] > d[0]
    assert 0 <= d[0] < 0.1


@pytest.mark.parametrize("n", [1, 7, 64, 257])
def test_random_is_uniform_in_unit_interval_and_reproducible(n):
    st = RowStats(*(torch.zeros(n) for _ in range(5)))
    valid = torch.ones(n, dtype=torch.bool)
    a = difficulty(st, "random", 5, valid, torch.Generator().manual_seed(42))
    b = difficulty(st, "random", 5, valid, torch.Generator().manual_seed(42))
    c = difficulty(st, "random", 5, valid, torch.Generator().manual_seed(43))
    assert a.dtype == torch.float32 and a.shape == (n,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert bool(((a >= 0) & (a < 1)).all())
    # the noise is the generator's uniform draw, not a function of the statistics
    expect = torch.rand(n, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, expect)


def test_random_gives_ignored_rows_minus_inf():
    n = 50
    st = RowStats(*(torch.zeros(n) for _ in range(5)))
    valid = torch.arange(n) % 3 != 0
    d = difficulty(st, "random", 5, valid, torch.Generator().manual_seed(0))
    assert bool((d[~valid] == -math.inf).all())
    assert bool(((d[valid] >= 0) & (d[valid] < 1)).all())


@pytest.mark.parametrize("mode", MODES + ["random"])
def test_ignored_rows_are_minus_inf_in_every_mode(mode):
    logits, targets = random_case(3, 5, 7, seed=1, n_ignored=6)
    valid = targets != -100
    d = difficulty(stats_of(logits, targets), mode, 7, valid, torch.Generator().manual_seed(0))
    assert bool((d[~valid] == -math.inf).all())
    assert bool(torch.isfinite(d[valid]).all())


@pytest.mark.parametrize("mode", ["entropy", "margin", "loss", "combined"])
def test_nan_difficulty_becomes_plus_inf(mode):
    logits, targets = random_case(2, 4, 9, seed=2)
    logits[0, 1, 3] = math.nan
    logits[1, 2, :] = math.nan
    logits[1, 3, 0] = math.nan
    valid = torch.ones(8, dtype=torch.bool)
    valid[7] = False  # an ignored NaN row stays -inf
    d = difficulty(stats_of(logits, targets), mode, 9, valid)
    assert not bool(torch.isnan(d).any())
    assert d[1].item() == math.inf and d[6].item() == math.inf
    assert d[7].item() == -math.inf
    assert bool(torch.isfinite(d[[0, 2, 3, 4, 5]]).all())


def test_nan_in_hand_made_stats_becomes_plus_inf():
    st = RowStats(
        lse=torch.zeros(3),
        entropy=torch.tensor([math.nan, 0.2, 0.3]),
        p_top1=torch.tensor([0.5, math.nan, 0.4]),
        p_top2=torch.tensor([0.1, 0.1, 0.1]),
        nll=torch.tensor([0.3, 0.2, math.nan]),
    )
    valid = torch.ones(3, dtype=torch.bool)
    assert difficulty(st, "entropy", 4, valid).tolist()[0] == math.inf
    assert difficulty(st, "margin", 4, valid).tolist()[1] == math.inf
    assert difficulty(st, "loss", 4, valid).tolist()[2] == math.inf
    assert difficulty(st, "combined", 4, valid).tolist() == [math.inf] * 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 5)])
def test_vocab_of_one_does_not_divide_by_zero(mode, B, T):
    g = torch.Generator().manual_seed(B + T)
    logits = torch.randn(B, T, 1, generator=g) * 5
    targets = torch.zeros(B * T, dtype=torch.long)
    targets[0] = -100
    valid = targets != -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = stats_of(logits, targets)
        d = difficulty(st, mode, 1, valid)
    assert not bool(torch.isnan(d).any())
    # one class: p = 1, no entropy, no margin, no loss
    assert bool((d[valid] == 0).all()), d
    assert d[0].item() == -math.inf
    assert bool((st.p_top2 == 0).all()) and bool((st.p_top1 == 1).all())


@pytest.mark.parametrize("mode", MODES + ["random"])
@pytest.mark.parametrize("B, T, V", [(2, 3, 5), (3, 7, 33), (1, 11, 130)])
def test_bf16_logits_are_scored_in_fp32(mode, B, T, V):
    logits, targets = random_case(B, T, V, seed=V, n_ignored=2, dtype=torch.bfloat16)
    valid = targets != -100
    d16 = difficulty(stats_of(logits, targets), mode, V, valid, torch.Generator().manual_seed(5))
    d32 = difficulty(stats_of(logits.float(), targets), mode, V, valid, torch.Generator().manual_seed(5))
    assert d16.dtype == torch.float32
    assert torch.equal(d16, d32)  # the bf16 -> fp32 upcast is exact
    if mode != "random":
        # and not the bf16-rounded figure: equal to the float64 formula at fp32 precision
        want = expected_difficulty(oracle(logits.float(), targets), mode, V)
        torch.testing.assert_close(d16.double(), want, rtol=2e-5, atol=2e-5)


def test_float64_stats_come_back_as_float32():
    st = RowStats(*(torch.full((4,), 0.25, dtype=torch.float64) for _ in range(5)))
    d = difficulty(st, "combined", 3, torch.ones(4, dtype=torch.bool))
    assert d.dtype == torch.float32


def test_unknown_mode_is_a_value_error():
    st = RowStats(*(torch.zeros(2) for _ in range(5)))
    with pytest.raises(ValueError, match="nope"):
        difficulty(st, "nope", 3, torch.ones(2, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# reference.row_stats
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B, T, V", SHAPES)
@pytest.mark.parametrize("ignore_index", [-100, 2, 1000])
def test_row_stats_match_torch(B, T, V, ignore_index):
    logits, targets = random_case(B, T, V, seed=B + T + V, n_ignored=(B * T + 1) // 3, ignore_index=ignore_index)
    st = stats_of(logits, targets, ignore_index)
    x = logits.reshape(-1, V)
    for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
        t = getattr(st, name)
        assert t.dtype == torch.float32 and t.shape == (B * T,), name
    ce = F.cross_entropy(x.double(), targets, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(st.nll.double(), ce, rtol=1e-5, atol=1e-5)
    # ignored rows (ignore_index inside the vocabulary or not) have no loss
    assert bool((st.nll[targets == ignore_index] == 0).all())
    torch.testing.assert_close(st.lse.double(), torch.logsumexp(x.double(), -1), rtol=1e-6, atol=1e-6)
    o = oracle(logits, targets, ignore_index)
    for name in ("entropy", "p_top1", "p_top2"):
        torch.testing.assert_close(getattr(st, name).double(), o[name], rtol=1e-5, atol=1e-6, msg=name)
    assert st.wsum is None


def test_row_stats_ignored_rows_have_zero_nll():
    logits, targets = random_case(2, 9, 6, seed=3, n_ignored=7, ignore_index=-100)
    st = stats_of(logits, targets, -100)
    assert bool((st.nll[targets == -100] == 0).all())
    assert bool((st.nll[targets != -100] > 0).all())


@pytest.mark.parametrize("ignore_index", [-1, 7, 10**6, -(2**40)])
def test_ignore_index_outside_the_vocabulary_is_never_an_address(ignore_index):
    V = 7
    logits, targets = random_case(3, 4, V, seed=4, n_ignored=5, ignore_index=ignore_index)
    # an index of 10**6 or -2**40 would raise if gathered; the statistics stay finite
    st = stats_of(logits, targets, ignore_index)
    ig = targets == ignore_index
    assert bool((st.nll[ig] == 0).all())
    ce = F.cross_entropy(logits.reshape(-1, V).double(), targets, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(st.nll.double(), ce, rtol=1e-5, atol=1e-5)
    for t in st[:5]:
        assert bool(torch.isfinite(t).all())


def test_out_of_range_targets_get_zero_nll_without_indexing():
    logits, _ = random_case(1, 5, 4, seed=6)
    targets = torch.tensor([0, 4, -3, 3, 99])
    st = stats_of(logits, targets, -100)
    x = logits.reshape(-1, 4).double()
    assert st.nll[[1, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    want = torch.logsumexp(x[[0, 3]], -1) - x[[0, 3], [0, 3]]
    torch.testing.assert_close(st.nll[[0, 3]].double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("V", [2, 3, 10, 51])
def test_tied_maximum_counts_twice(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(4, V, generator=g)
    x[:, 0] = 5.0
    x[:, V - 1] = 5.0  # the max appears twice in every row
    if V == 2:
        x[1] = torch.tensor([1.0, 1.0])
    st = stats_of(x[None], torch.zeros(4, dtype=torch.long))
    assert torch.equal(st.p_top1, st.p_top2)
    want = torch.softmax(x.double(), -1).max(-1).values
    torch.testing.assert_close(st.p_top1.double(), want, rtol=1e-6, atol=1e-7)
    d = difficulty(st, "margin", V, torch.ones(4, dtype=torch.bool))
    assert bool((d == 1).all())


def test_minus_inf_logits_give_no_nan():
    V = 6
    x = torch.tensor(
        [
            [0.0, -math.inf, 1.0, -math.inf, 2.0, 0.5],
            [3.0, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf],  # a single finite logit
            [-math.inf, -math.inf, 1.0, 1.0, -math.inf, -math.inf],  # a tie between the finite ones
        ]
    )
    targets = torch.tensor([2, 0, 3])
    st = stats_of(x[None], targets)
    for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
        assert not bool(torch.isnan(getattr(st, name)).any()), name
    o = oracle(x[None], targets)
    for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
        torch.testing.assert_close(getattr(st, name).double(), o[name], rtol=1e-6, atol=1e-7, msg=name)
    assert st.entropy[1].item() == 0 and st.p_top1[1].item() == 1 and st.p_top2[1].item() == 0
    assert st.entropy[2].item() == pytest.approx(math.log(2), abs=1e-6)
    ce = F.cross_entropy(x.double(), targets, reduction="none")
    torch.testing.assert_close(st.nll.double(), ce, rtol=1e-6, atol=1e-6)
    for mode in MODES:
        assert bool(torch.isfinite(difficulty(st, mode, V, torch.ones(3, dtype=torch.bool))).all())


@pytest.mark.parametrize("where", ["one_logit", "whole_row"])
def test_nan_logits_give_nan_entropy_like_torch(where):
    logits, targets = random_case(1, 3, 5, seed=12)
    if where == "one_logit":
        logits[0, 1, 2] = math.nan
    else:
        logits[0, 1, :] = math.nan
    st = stats_of(logits, targets)
    x = logits[0].double()
    plain = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)  # torch's own: NaN in row 1
    assert math.isnan(plain[1].item())
    assert math.isnan(st.lse[1].item()) and math.isnan(st.nll[1].item())
    assert math.isnan(st.entropy[1].item())
    assert bool(torch.isfinite(st.entropy[[0, 2]]).all())


def test_target_at_minus_inf_logit_has_infinite_nll_like_torch():
    x = torch.tensor([[[0.0, -math.inf, 1.0]]])
    st = stats_of(x, torch.tensor([1]))
    assert st.nll.item() == math.inf
    assert F.cross_entropy(x[0].double(), torch.tensor([1]), reduction="none").item() == math.inf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_the_stats_of_their_fp32_upcast(dtype):
    logits, targets = random_case(3, 5, 19, seed=8, n_ignored=3, dtype=dtype)
    a = stats_of(logits, targets)
    b = stats_of(logits.float(), targets)
    for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
        assert getattr(a, name).dtype == torch.float32
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("B, T, V", [(2, 5, 7), (3, 9, 13)])
def test_non_contiguous_logits_give_the_same_stats(B, T, V):
    g = torch.Generator().manual_seed(T)
    full = torch.randn(B, T + 1, V, generator=g)
    shifted = full[:, :-1]  # the usual next-token shift: rows strided
    vocab_strided = torch.randn(B, V, T, generator=g).transpose(1, 2)  # vocab not unit-stride
    targets = torch.randint(0, V, (B * T,), generator=g)
    targets[::4] = -100
    for logits in (shifted, vocab_strided):
        assert not logits.is_contiguous()
        a = stats_of(logits, targets)
        b = stats_of(logits.contiguous(), targets)
        for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)


def test_chunked_rows_give_the_same_stats(monkeypatch):
    logits, targets = random_case(3, 11, 17, seed=9, n_ignored=5)
    whole = stats_of(logits, targets)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 17 * 4)  # 4 rows a chunk: 9 chunks, the last partial
    chunked = stats_of(logits, targets)
    for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    o = oracle(logits, targets)
    torch.testing.assert_close(chunked.nll.double(), o["nll"], rtol=1e-5, atol=1e-5)


def test_wsum_is_the_weighted_sum_of_logits():
    logits, targets = random_case(2, 3, 5, seed=10)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0])
    x = logits.reshape(-1, 5).double()
    st = reference.row_stats(logits, targets, -100, w, with_wsum=True)
    torch.testing.assert_close(st.wsum.double(), (x * w.double()).sum(-1), rtol=1e-6, atol=1e-6)
    st = reference.row_stats(logits, targets, -100, None, with_wsum=True)
    torch.testing.assert_close(st.wsum.double(), x.sum(-1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# gradnorm
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("B, T, V", [s for s in SHAPES if s[2] > 1])
def test_gradnorm_is_the_norm_of_the_logit_gradient(label_smoothing, B, T, V):
    """s = ||d ce / d x|| of each row, from autograd on torch's own cross entropy (float64)."""
    logits, targets = random_case(B, T, V, seed=B + T + V, n_ignored=(B * T) // 4)
    stats = reference.row_stats(logits, targets, -100, with_p2=True)
    valid = targets != -100
    d = difficulty(stats, "gradnorm", V, valid, label_smoothing=label_smoothing)
    x = logits.reshape(-1, V).double().requires_grad_()
    per_row = F.cross_entropy(x, targets, reduction="none", label_smoothing=label_smoothing)
    per_row.sum().backward()
    want = torch.where(valid, x.grad.norm(dim=-1), torch.full((B * T,), -math.inf, dtype=torch.float64))
    # s^2 = sum p^2 - 2 p_t + 1 cancels in fp32 where p_t is near 1: an absolute error of a few
    # 1e-6 on a small s (it only sets a sampling probability)
    torch.testing.assert_close(d.double(), want, rtol=2e-5, atol=1e-5)


def test_gradnorm_times_hidden_norm_is_the_head_weight_gradient_norm():
    """For logits = h W^T + b, token i's gradient on W is the rank-1 g_i h_i^T: its norm is s_i ||h_i||."""
    g = torch.Generator().manual_seed(3)
    N, D, V = 6, 5, 9
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    logits = h @ W.t()
    stats = reference.row_stats(logits.detach().float().unsqueeze(0), targets, -100, with_p2=True)
    s = difficulty(stats, "gradnorm", V, torch.ones(N, dtype=torch.bool)).double()
    for i in range(N):
        (gw,) = torch.autograd.grad(F.cross_entropy(logits[i : i + 1], targets[i : i + 1]), W, retain_graph=True)
        assert float(gw.norm()) == pytest.approx(float(s[i] * h[i].norm()), rel=1e-5)


def test_gradnorm_of_a_near_one_hot_row_is_zero_not_nan():
    """sum p^2 - 2 p_t + 1 can round below zero where p is one-hot on the target: s = 0."""
    x = torch.tensor([[[60.0, -60.0, -60.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([0, 1])
    stats = reference.row_stats(x, targets, -100, with_p2=True)
    d = difficulty(stats, "gradnorm", 3, torch.ones(2, dtype=torch.bool))
    assert d[0].item() == 0.0
    assert d[1].item() == pytest.approx(math.sqrt(2 / 3), rel=1e-6)
