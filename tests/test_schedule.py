"""The scheduler: curriculum ratio, token count k, dynamic ratio, running confidence, checkpoints, and
the global scheduler's step counting through real optimizers."""

import io
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optim_mod
from torch import nn

import cggr_hook
from cggr_hook import GateConfig, Scheduler
from cggr_hook.schedule import curriculum_ratio, dynamic_ratio, tokens_to_keep


def expected_k(r_decimal: str, n: int) -> int:
    """k for the decimal ratio ``r_decimal`` in exact arithmetic: max(1, floor(r n + 1/2)), at most n."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(Fraction(r_decimal) * n + Fraction(1, 2))))


# --------------------------------------------------------------------------------------------------
# curriculum
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "min_ratio, warmup, step, expected",
    [
        (0.25, 1000, 0, 1.0),
        (0.25, 1000, 1, 1.0 - 0.75 / 1000),
        (0.25, 1000, 500, 0.625),
        (0.25, 1000, 999, 1.0 - 0.999 * 0.75),
        (0.25, 1000, 1000, 0.25),
        (0.25, 1000, 1001, 0.25),
        (0.25, 1000, 10**6, 0.25),
        (0.3, 7, 3, 1.0 - 3 / 7 * 0.7),
        (0.3, 7, 8, 0.3),
        (1.0, 13, 5, 1.0),
        (0.5, 0, 0, 0.5),
        (0.5, 0, 17, 0.5),
        (0.1, 1, 0, 1.0),
        (0.1, 1, 1, 0.1),
    ],
)
def test_curriculum_ratio_formula(min_ratio, warmup, step, expected):
    c = GateConfig(min_tokens_ratio=min_ratio, warmup_steps=warmup)
    assert curriculum_ratio(step, c) == pytest.approx(expected, abs=1e-12)


def test_curriculum_ratio_decreases_linearly_then_stays():
    c = GateConfig(min_tokens_ratio=0.2, warmup_steps=9)
    rs = [curriculum_ratio(s, c) for s in range(15)]
    diffs = [a - b for a, b in zip(rs, rs[1:])]
    assert all(d == pytest.approx(0.8 / 9, abs=1e-12) for d in diffs[:9])
    assert all(d == 0 for d in diffs[9:])


def test_scheduler_ratio_uses_its_step_count():
    s = Scheduler()
    c = GateConfig(min_tokens_ratio=0.4, warmup_steps=5)
    assert s.ratio(c) == 1.0
    for _ in range(3):
        s.step()
    assert s.ratio(c) == pytest.approx(1 - 3 / 5 * 0.6, abs=1e-12)
    # default options when no config: every token
    assert s.ratio() == 1.0
    assert s.ratio(GateConfig.preset("seed")) == pytest.approx(1 - 3 / 1000 * 0.75, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# tokens_to_keep
# --------------------------------------------------------------------------------------------------
RATIOS = ["0.01", "0.1", "0.25", "0.3", "1/3", "0.5", "0.625", "0.75", "0.9", "0.99", "1"]


@pytest.mark.parametrize("r_decimal", RATIOS)
def test_tokens_to_keep_rounds_half_up_with_a_floor_of_one(r_decimal):
    r = float(Fraction(r_decimal))
    for n in range(0, 130):
        assert tokens_to_keep(r, n) == expected_k(r_decimal, n), (r_decimal, n)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 31, 97])
def test_tokens_to_keep_bounds(n):
    assert tokens_to_keep(0.0, n) == 1
    assert tokens_to_keep(1e-9, n) == 1
    assert tokens_to_keep(1.0, n) == n
    assert tokens_to_keep(1.5, n) == n  # never more than n
    assert all(1 <= tokens_to_keep(i / 50, n) <= n for i in range(0, 60))


@pytest.mark.parametrize("r", [0.0, 0.25, 1.0, 1.5])
def test_tokens_to_keep_is_zero_without_valid_tokens(r):
    assert tokens_to_keep(r, 0) == 0


def test_tokens_to_keep_is_monotone_in_ratio_and_count():
    for n in (5, 17, 64):
        ks = [tokens_to_keep(i / 200, n) for i in range(201)]
        assert ks == sorted(ks)
    for r in (0.1, 0.37, 0.8):
        ks = [tokens_to_keep(r, n) for n in range(1, 150)]
        assert ks == sorted(ks)


@pytest.mark.parametrize(
    "r, noisy, n, k",
    [
        (0.45, 0.45000000000000007, 10, 5),
        (0.25, 1 - 0.75, 10, 3),
        (0.25, 1 - 0.75, 6, 2),
        (0.25, 1 - 3 * 0.25, 2, 1),
        (0.3, 0.1 + 0.2, 5, 2),
        (0.7, 1 - 0.3, 15, 11),
        (0.625, 1 - 0.5 * 0.75, 12, 8),
    ],
)
def test_float_noise_in_the_ratio_does_not_move_k(r, noisy, n, k):
    assert tokens_to_keep(r, n) == k
    assert tokens_to_keep(noisy, n) == k


def test_float_noise_away_from_half_integers_does_not_move_k():
    for i in range(1, 100):
        dec = f"{i / 100:.2f}"
        r = float(dec)
        for n in range(1, 120, 2):
            exact = Fraction(dec) * n
            if abs(exact - math.floor(exact) - Fraction(1, 2)) < Fraction(1, 10**6):
                continue  # the half-integer cases: see the test below
            want = expected_k(dec, n)
            for noisy in (r, math.nextafter(r, 2.0), math.nextafter(r, -1.0), r * (1 + 4e-16), r * (1 - 4e-16)):
                assert tokens_to_keep(noisy, n) == want, (dec, noisy, n)


def _after_warmup(min_ratio: float) -> float:
    return curriculum_ratio(10, GateConfig(min_tokens_ratio=min_ratio, warmup_steps=10))


@pytest.mark.parametrize(
    "ratio, r_decimal, n",
    [
        (_after_warmup(0.45), "0.45", 30),  # curriculum gives 0.44999999999999996: k 13, not 14
        (_after_warmup(0.1), "0.1", 15),  # curriculum gives 0.09999999999999998: k 1, not 2
        (0.29, "0.29", 50),  # 0.29 * 50 == 14.499999999999998: k 14, not 15
        (math.nextafter(0.25, 0.0), "0.25", 6),
        (curriculum_ratio(88, GateConfig.preset("seed")), "0.934", 250),  # the seed options, step 88: k 233, not 234
    ],
    ids=["curriculum-0.45-n30", "curriculum-0.1-n15", "direct-0.29-n50", "ulp-below-0.25-n6", "defaults-step88-n250"],
)
def test_float_noise_at_half_integers_does_not_move_k(ratio, r_decimal, n):
    assert tokens_to_keep(ratio, n) == expected_k(r_decimal, n)


# --------------------------------------------------------------------------------------------------
# dynamic ratio
# --------------------------------------------------------------------------------------------------
def dyn_expected(r, c, avg, s):
    dev = max(-1.0, min(1.0, (avg - c) / avg))
    return min(max(r * (1 + s * dev), r * (1 - s)), min(1.0, r * (1 + s)))


@pytest.mark.parametrize("r, s", [(0.25, 0.5), (0.4, 0.3), (0.7, 0.5), (1.0, 0.5), (0.25, 1.0)])
def test_less_confident_batch_keeps_more_tokens_up_to_the_cap(r, s):
    avg = 0.8
    prev = r
    for c in (0.79, 0.7, 0.5, 0.3, 0.1, 0.0):
        got = dynamic_ratio(r, c, avg, s)
        want = r * (1 + s * (avg - c) / avg)
        assert got == pytest.approx(min(want, 1.0), abs=1e-12)
        assert got >= prev - 1e-15  # less confident -> at least as many
        prev = got
    # the least confident batch reaches r (1 + s), at most 1
    assert dynamic_ratio(r, 0.0, avg, s) == pytest.approx(min(1.0, r * (1 + s)), abs=1e-12)
    assert dynamic_ratio(r, 0.0, avg, s) <= 1.0


@pytest.mark.parametrize("r, s", [(0.25, 0.5), (0.4, 0.3), (0.9, 0.5), (0.6, 1.0)])
def test_more_confident_batch_keeps_fewer_tokens_down_to_the_floor(r, s):
    avg = 0.4
    prev = r
    for c in (0.41, 0.5, 0.6, 0.8, 1.0):
        got = dynamic_ratio(r, c, avg, s)
        assert got == pytest.approx(dyn_expected(r, c, avg, s), abs=1e-12)
        assert got < r
        assert got <= prev + 1e-15
        prev = got
    # (avg - c) / avg = -1 at c = 2 avg: the floor r (1 - s); beyond it, clamped there
    assert dynamic_ratio(r, 0.8, avg, s) == pytest.approx(r * (1 - s), abs=1e-12)
    assert dynamic_ratio(r, 1.0, avg, s) == pytest.approx(r * (1 - s), abs=1e-12)


def test_dynamic_ratio_matches_the_formula_on_random_inputs():
    g = torch.Generator().manual_seed(3)
    vals = torch.rand(300, 4, generator=g, dtype=torch.float64).tolist()
    for r, c, avg, s in vals:
        r, avg = max(r, 1e-3), max(avg, 1e-3)
        assert dynamic_ratio(r, c, avg, s) == pytest.approx(dyn_expected(r, c, avg, s), abs=1e-12)


@pytest.mark.parametrize("r", [0.25, 0.5, 1.0])
def test_dynamic_ratio_without_average_or_sensitivity_is_r(r):
    assert dynamic_ratio(r, 0.1, None, 0.5) == r
    assert dynamic_ratio(r, 0.9, None, 0.5) == r
    assert dynamic_ratio(r, 0.1, 0.8, 0.0) == pytest.approx(r, abs=1e-15)
    assert dynamic_ratio(r, 0.8, 0.8, 0.5) == pytest.approx(r, abs=1e-15)
    assert dynamic_ratio(r, math.nan, 0.8, 0.5) == r


# --------------------------------------------------------------------------------------------------
# Scheduler.begin_call: running confidence
# --------------------------------------------------------------------------------------------------
def test_begin_call_updates_the_running_confidence_with_momentum_0_9():
    s = Scheduler()
    c = GateConfig(min_tokens_ratio=0.4, warmup_steps=0, dynamic_threshold=True, threshold_sensitivity=0.5)
    confs = [0.6, 0.3, 0.9, 0.5, 0.5, 0.05]
    avg = None
    for i, conf in enumerate(confs):
        r, step, call = s.begin_call(c, "a", conf)
        want = 0.4 if avg is None else dyn_expected(0.4, conf, avg, 0.5)
        assert r == pytest.approx(want, abs=1e-12)
        assert (step, call) == (0, i)
        avg = conf if avg is None else 0.9 * avg + 0.1 * conf
        assert s.confidence_avg["a"] == pytest.approx(avg, abs=1e-12)


def test_begin_call_keeps_one_average_per_key_and_counts_calls_per_step():
    s = Scheduler()
    c = GateConfig(min_tokens_ratio=0.5, warmup_steps=4, dynamic_threshold=True)
    s.begin_call(c, "a", 0.8)
    s.begin_call(c, "b", 0.2)
    s.begin_call(c, "a", 0.4)
    assert s.confidence_avg["a"] == pytest.approx(0.9 * 0.8 + 0.1 * 0.4)
    assert s.confidence_avg["b"] == pytest.approx(0.2)
    s.step()
    r, step, call = s.begin_call(c, "b", 0.2)
    assert (step, call) == (1, 0)
    assert r == pytest.approx(1 - 0.25 * 0.5)  # equal to the average: curriculum ratio


def test_begin_call_without_dynamic_threshold_uses_the_curriculum_and_keeps_no_average():
    s = Scheduler()
    c = GateConfig(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    for conf in (0.9, 0.1, 0.5):
        r, _, _ = s.begin_call(c, "a", conf)
        assert r == 0.25
    assert "a" not in s.confidence_avg


def test_begin_call_with_nan_confidence_leaves_the_average():
    s = Scheduler()
    c = GateConfig(min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=True)
    s.begin_call(c, "a", 0.7)
    r, _, _ = s.begin_call(c, "a", math.nan)
    assert r == pytest.approx(0.3)
    assert s.confidence_avg["a"] == pytest.approx(0.7)


def test_a_running_confidence_kept_on_a_device_is_one_record_with_the_hosts():
    """``confidence_on`` moves a key's running confidence into a tensor (made from the host's
    float; the same tensor call after call); ``confidence_avg`` and ``state_dict`` read it there; a
    call that reads its sums on the host (``begin_call`` with a confidence) takes it back and goes
    on from it; an old pickle that saved the floats alone loads."""
    import pickle

    cpu = torch.device("cpu")
    s = Scheduler()
    c = GateConfig(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=True)
    s.begin_call(c, "a", 0.8)
    t = s.confidence_on("a", cpu)
    assert t.dtype == torch.float64 and t.tolist() == [0.8, 1.0] and s.confidence_on("a", cpu) is t
    assert s.confidence_on("b", cpu).tolist() == [0.0, 0.0]  # no average yet
    t[0] = 0.6  # as a call on the device updates it
    assert s.confidence_avg == {"a": 0.6} and s.state_dict()["confidence_avg"] == {"a": 0.6}
    r, _, _ = s.begin_call(c, "a", 0.3)
    assert r == dynamic_ratio(0.5, 0.3, 0.6, 0.5)
    assert "a" not in s._confidence_dev and s.confidence_avg == {"a": 0.9 * 0.6 + (1 - 0.9) * 0.3}
    old = Scheduler()
    state = old.__getstate__()
    state["confidence_avg"] = state.pop("_confidence_host")
    state.pop("_confidence_dev")
    state["confidence_avg"]["k"] = 0.25
    restored = Scheduler.__new__(Scheduler)
    restored.__setstate__(state)
    assert restored.confidence_avg == {"k": 0.25}
    assert pickle.loads(pickle.dumps(s)).confidence_avg == s.confidence_avg
    before = s.state_dict()
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=r"confidence_avg of \['a'\] is not a finite number"):
            s.load_state_dict({"step_count": 99, "calls_in_step": 7, "confidence_avg": {"a": bad}})
        assert s.state_dict() == before  # a refused state changes nothing


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def _drive(s: Scheduler, c: GateConfig, confs, step_every=3):
    out = []
    for i, conf in enumerate(confs):
        out.append(s.begin_call(c, "k", conf))
        if i % step_every == step_every - 1:
            s.step()
    return out


def test_state_dict_round_trip_through_torch_save_continues_exactly():
    torch.manual_seed(0)
    c = GateConfig(min_tokens_ratio=0.3, warmup_steps=7, threshold_sensitivity=0.4)
    confs = torch.rand(23, dtype=torch.float64).tolist()
    a = Scheduler()
    _drive(a, c, confs[:10])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    b = Scheduler()
    b.load_state_dict(state)
    assert b.step_count == a.step_count == 3
    assert b.calls_in_step == a.calls_in_step == 1
    assert b.confidence_avg == a.confidence_avg
    assert b.state_dict() == a.state_dict()
    rest_a = _drive(a, c, confs[10:])
    rest_b = _drive(b, c, confs[10:])
    assert rest_a == rest_b  # exact: same ratios, steps and call indices
    assert a.state_dict() == b.state_dict()


def test_load_state_dict_replaces_the_previous_history():
    c = GateConfig(warmup_steps=5)
    a = Scheduler()
    state = a.state_dict()
    b = Scheduler()
    _drive(b, c, [0.2, 0.5, 0.9, 0.1])
    b.load_state_dict(state)
    assert (b.step_count, b.calls_in_step, b.confidence_avg) == (0, 0, {})


@pytest.mark.parametrize("missing", ["step_count", "calls_in_step", "confidence_avg"])
def test_load_state_dict_with_a_missing_key_is_a_value_error(missing):
    a = Scheduler()
    a.step()
    state = a.state_dict()
    del state[missing]
    b = Scheduler()
    with pytest.raises(ValueError) as err:
        b.load_state_dict(state)
    assert missing in str(err.value)
    assert b.step_count == 0


def test_reset_returns_to_a_fresh_run():
    s = Scheduler()
    _drive(s, GateConfig.preset("seed"), [0.3, 0.6, 0.2, 0.8])
    s.reset()
    assert s.state_dict() == Scheduler().state_dict()


# --------------------------------------------------------------------------------------------------
# the global scheduler, counted through real optimizers
# --------------------------------------------------------------------------------------------------
V, D, B, T = 13, 6, 3, 9


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.body = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def lm_loss(model, x):
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))


def batch():
    return torch.randint(0, V, (B, T))


@pytest.fixture
def gated_model():
    torch.manual_seed(0)
    model = TinyLM().train()
    cggr_hook.enable(model, warmup_steps=0, min_tokens_ratio=0.25)
    return model


def test_training_loop_counts_one_step_per_optimizer_step(gated_model):
    opt = torch.optim.SGD(gated_model.parameters(), lr=0.1)
    sched = cggr_hook.scheduler
    assert sched.step_count == 0
    for i in range(5):
        loss = lm_loss(gated_model, batch())
        m = cggr_hook.metrics()
        assert m["tokens_total"] == B * (T - 1)
        assert m["tokens_selected"] < m["tokens_total"]  # the loss really is gated
        assert m["step"] == i + 1  # the optimizer step this loss belongs to
        loss.backward()
        assert sched.step_count == i
        opt.step()
        opt.zero_grad()
        assert sched.step_count == i + 1


def test_curriculum_follows_the_counted_steps():
    torch.manual_seed(1)
    model = TinyLM().train()
    cggr_hook.enable(model, warmup_steps=4, min_tokens_ratio=0.25, dynamic_threshold=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    n = B * (T - 1)
    for step in range(6):
        loss = lm_loss(model, batch())
        r = 1 - min(1, step / 4) * 0.75
        assert cggr_hook.metrics()["tokens_selected"] == max(1, math.floor(r * n + 0.5))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches(gated_model):
    opt = torch.optim.AdamW(gated_model.parameters(), lr=1e-3)
    for step in range(3):
        for _ in range(4):
            (lm_loss(gated_model, batch()) / 4).backward()
            assert cggr_hook.scheduler.step_count == step
        opt.step()
        opt.zero_grad()
        assert cggr_hook.scheduler.step_count == step + 1


def test_second_optimizer_on_the_same_model_does_not_count_twice(gated_model):
    body = [p for n, p in gated_model.named_parameters() if not n.startswith("lm_head")]
    opt_body = torch.optim.SGD(body, lr=0.1)
    opt_head = torch.optim.Adam(gated_model.lm_head.parameters(), lr=1e-3)
    opt_all = torch.optim.SGD(gated_model.parameters(), lr=0.01)
    for i in range(3):
        lm_loss(gated_model, batch()).backward()
        opt_body.step()
        opt_head.step()
        opt_all.step()
        for o in (opt_body, opt_head, opt_all):
            o.zero_grad()
        assert cggr_hook.scheduler.step_count == i + 1


def test_optimizer_over_an_unrelated_model_does_not_count(gated_model):
    other = nn.Linear(4, 3)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    opt = torch.optim.SGD(gated_model.parameters(), lr=0.1)
    lm_loss(gated_model, batch()).backward()
    other(torch.randn(2, 4)).sum().backward()
    opt_other.step()
    assert cggr_hook.scheduler.step_count == 0
    opt_other.step()
    assert cggr_hook.scheduler.step_count == 0
    # the gated loss is still pending: the model's own optimizer counts it
    opt.step()
    assert cggr_hook.scheduler.step_count == 1
    opt_other.step()
    assert cggr_hook.scheduler.step_count == 1


def test_step_without_a_gated_loss_since_the_last_count_is_not_counted(gated_model):
    opt = torch.optim.SGD(gated_model.parameters(), lr=0.1)
    # no loss at all yet
    opt.step()
    assert cggr_hook.scheduler.step_count == 0
    lm_loss(gated_model, batch()).backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 1
    opt.step()  # nothing gated since the last counted step
    assert cggr_hook.scheduler.step_count == 1
    # plain losses only: eval mode, paused()
    opt.zero_grad()
    gated_model.eval()
    lm_loss(gated_model, batch()).backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 1
    gated_model.train()
    with cggr_hook.paused():
        lm_loss(gated_model, batch()).backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 1
    lm_loss(gated_model, batch()).backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 2


def test_steps_after_disable_are_not_counted(gated_model):
    opt = torch.optim.SGD(gated_model.parameters(), lr=0.1)
    lm_loss(gated_model, batch()).backward()
    opt.step()
    assert cggr_hook.scheduler.step_count == 1
    # a gated loss computed, then the gate removed before its step: that step still belongs to
    # the gated loss and counts (``with gated(model):`` around the forward), then the hook goes
    lm_loss(gated_model, batch()).backward()
    cggr_hook.disable()
    assert len(optim_mod._global_optimizer_post_hooks) == 1
    opt.step()
    assert cggr_hook.scheduler.step_count == 2
    assert len(optim_mod._global_optimizer_post_hooks) == 0  # the hook itself is gone
    for _ in range(3):
        opt.zero_grad()
        lm_loss(gated_model, batch()).backward()
        opt.step()
    assert cggr_hook.scheduler.step_count == 2


def test_disable_without_a_pending_loss_removes_the_hook_at_once(gated_model):
    opt = torch.optim.SGD(gated_model.parameters(), lr=0.1)
    lm_loss(gated_model, batch()).backward()
    opt.step()
    cggr_hook.disable()
    assert len(optim_mod._global_optimizer_post_hooks) == 0


def test_disable_of_one_model_keeps_counting_for_another():
    torch.manual_seed(2)
    a, b = TinyLM().train(), TinyLM().train()
    cggr_hook.enable(a, warmup_steps=0)
    cggr_hook.enable(b, warmup_steps=0)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    cggr_hook.disable(a)
    lm_loss(b, batch()).backward()
    opt_a.step()  # a is no longer gated: its optimizer does not count
    assert cggr_hook.scheduler.step_count == 0
    opt_b.step()
    assert cggr_hook.scheduler.step_count == 1
