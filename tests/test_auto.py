"""min_tokens_ratio='auto' (cggr_hook/auto.py): the policy on synthetic figures, its probe schedule
and resume, the head's noise estimator against per-token gradients computed directly, and a gated
training loop that runs it."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import cggr_hook
from cggr_hook import auto
from cggr_hook.auto import PLAIN, AutoState

from common import TinyLM, count_target_counts


def rate(f, t, B, n):
    """The model of progress per second, written out again: 1 / ((1 + noise / |G|^2) t)."""
    noise = (B + (1 - f) / f * (B + 1)) / n
    return 1 / ((1 + noise) * t)


# --------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------
TIMES = {1.0: 0.100, 0.75: 0.080, 0.5: 0.060, 0.25: 0.050, PLAIN: 0.110}


@pytest.mark.parametrize("B, n", [(10.0, 32768), (3000.0, 32768), (3e5, 32768), (50.0, 4096), (0.0, 100)])
def test_choose_takes_the_fraction_the_model_of_progress_says(B, n):
    rates = {c: rate(1.0 if c == PLAIN else c, t, B, n) for c, t in TIMES.items()}
    best = max((c for c in TIMES if c not in (1.0, PLAIN)), key=rates.get)
    one_wins = TIMES[1.0] < TIMES[PLAIN] * (1 - auto.MARGIN)
    full = rates[1.0] if one_wins else rates[PLAIN]
    want = best if rates[best] > full * (1 + auto.MARGIN) else (1.0 if one_wins else PLAIN)
    assert auto.choose(TIMES, B, n) == want


def test_choose_keeps_every_token_where_no_fraction_pays():
    # dropping tokens makes steps no faster (a small batch): the faster full-token candidate wins
    times = {1.0: 0.029, 0.75: 0.028, 0.5: 0.027, 0.25: 0.026, PLAIN: 0.022}
    assert auto.choose(times, 200.0, 4096) == PLAIN
    # the gate's kernels are faster than plain, but noise makes every fraction below 1.0 lose
    times = {1.0: 0.064, 0.75: 0.061, 0.5: 0.057, 0.25: 0.053, PLAIN: 0.110}
    assert auto.choose(times, 1e6, 32768) == 1.0
    # a fraction within the margin does not move the choice off the full tokens
    times = {1.0: 0.100, 0.5: 0.0985, PLAIN: 0.2}
    assert auto.choose(times, 0.0, 32768) == 1.0
    # 1.0 replaces the plain loss only where it is faster by the margin (a tie, or a few % from
    # the timing's noise, keeps the user's own loss)
    assert auto.choose({1.0: 0.0990, 0.5: 0.09, PLAIN: 0.100}, 1e6, 32768) == PLAIN
    assert auto.choose({1.0: 0.0960, 0.5: 0.09, PLAIN: 0.100}, 1e6, 32768) == 1.0
    assert auto.choose({1.0: 0.100, PLAIN: 0.100}, None, 32768) == PLAIN
    # no noise estimate yet: the faster full-token candidate
    assert auto.choose(TIMES, None, 32768) == 1.0
    assert auto.choose({1.0: 0.2, 0.5: 0.01, PLAIN: 0.1}, None, 32768) == PLAIN


def test_noise_only_or_no_noise_are_handled():
    assert auto.choose(TIMES, math.inf, 32768) == 1.0  # pure noise: f / t is largest at 1.0 here
    assert auto.choose(TIMES, 0.0, 32768) == 0.25  # no noise: the fastest step wins


# --------------------------------------------------------------------------------------------------
# the probe schedule, decisions and resume
# --------------------------------------------------------------------------------------------------
def drive(state: AutoState, steps: int, times: dict, t0: float = 0.0, noise=(4.0, 0.01)) -> tuple[list, float]:
    """Run ``steps`` optimizer steps on synthetic step times; returns the candidates run and the clock."""
    seen, now = [], t0
    for _ in range(steps):
        c = state.candidate()
        seen.append(c)
        state.add_tokens(1000)
        if state.measures_noise():
            state.add_noise(torch.tensor(noise, dtype=torch.float64))
        now += times[c]
        state.on_step(now)
    return seen, now


def test_a_probe_window_runs_every_candidate_then_the_choice():
    state = AutoState()
    times = {1.0: 0.10, 0.75: 0.08, 0.5: 0.06, 0.25: 0.05, PLAIN: 0.11}
    n_window = auto.PROBE_STEPS * len(auto.CANDIDATES)
    seen, _ = drive(state, n_window + 5, times)
    assert seen[:n_window] == [c for c in auto.CANDIDATES for _ in range(auto.PROBE_STEPS)]
    assert state.decisions == 1
    # the first step of each run is not timed; the others are the candidate's step time
    assert state.step_seconds == pytest.approx(times)
    assert state.noise_scale() == pytest.approx(400.0)  # tr / |G|^2 of the figures fed in
    want = auto.choose(times, 400.0, 1000)
    assert seen[n_window:] == [want] * 5 and state.choice == want


def test_the_first_step_of_a_run_is_not_timed():
    state = AutoState()
    now = 0.0
    times = {1.0: 0.10, 0.75: 0.08, 0.5: 0.06, 0.25: 0.05, PLAIN: 0.11}
    while state.decisions == 0:
        first = state.probe_steps == 0
        # compilation and switching land on the first step of each candidate's run
        now += 10.0 if first else times[state.candidate()]
        state.on_step(now)
    assert state.step_seconds == pytest.approx(times)


def test_a_fraction_no_faster_than_every_token_is_left_after_two_timed_steps():
    """Where dropping tokens makes no step faster (a small batch, a CPU), each fraction runs three
    steps (its first, untimed, and two timed) instead of PROBE_STEPS, and the choice keeps every
    token: the window costs few gated steps."""
    state = AutoState()
    times = {1.0: 0.030, PLAIN: 0.022, 0.75: 0.029, 0.5: 0.028, 0.25: 0.023}
    seen, _ = drive(state, 40, times)
    full = [1.0] * auto.PROBE_STEPS + [PLAIN] * auto.PROBE_STEPS
    short = [c for c in (0.75, 0.5, 0.25) for _ in range(auto.LEAVE_AFTER + 1)]
    assert seen[: len(full) + len(short)] == full + short
    assert state.decisions == 1 and state.choice == PLAIN
    assert seen[len(full) + len(short) :] == [PLAIN] * (40 - len(full) - len(short))
    assert set(state.step_seconds) == set(auto.CANDIDATES)  # each was timed
    # a fraction faster than the full-token candidates runs its whole probe
    state = AutoState()
    times = {1.0: 0.030, PLAIN: 0.040, 0.75: 0.029, 0.5: 0.031, 0.25: 0.020}
    seen, _ = drive(state, 4 * auto.PROBE_STEPS + auto.LEAVE_AFTER + 1, times)
    assert seen.count(0.75) == auto.PROBE_STEPS and seen.count(0.25) == auto.PROBE_STEPS
    assert seen.count(0.5) == auto.LEAVE_AFTER + 1 and state.decisions == 1


def test_one_slow_step_does_not_end_a_fractions_probe():
    """An evaluation or a checkpoint between two optimizer steps makes one step look slow: the
    fraction is left only when both of its first two timed steps are no faster than every token,
    so it still runs its probe and can be chosen."""
    state = AutoState()
    times = {1.0: 0.10, PLAIN: 0.12, 0.75: 0.08, 0.5: 0.05, 0.25: 0.06}
    seen, now = [], 0.0
    while state.decisions == 0:
        c = state.candidate()
        seen.append(c)
        state.add_tokens(1000)
        if state.measures_noise():
            state.add_noise(torch.tensor((0.0, 1.0), dtype=torch.float64))  # no noise: the fastest wins
        slow = c == 0.5 and state.probe_steps == 1  # its first timed step
        now += 0.2 if slow else times[c]
        state.on_step(now)
    assert seen.count(0.5) == auto.PROBE_STEPS
    assert state.step_seconds[0.5] == pytest.approx(0.05) and state.choice == 0.5


def test_a_state_saved_by_0_1_0_loads_at_the_same_place_in_its_window():
    """0.1.0 saved no probe position (its window ran three steps of 1.0, 0.75, 0.5, 0.25, plain in
    that order): its state loads at the candidate it was running, or outside the window."""
    base = dict(choice=1.0, step_seconds={}, noise=None, tokens=0.0, decisions=0, times={}, acc=None)
    s = AutoState.from_state(dict(base, steps=7, window_start=0))  # 0.1.0: the third step of 0.5
    assert s.candidate() == 0.5 and s.probe_steps == 1
    s = AutoState.from_state(dict(base, steps=13, window_start=0))  # the second step of plain
    assert s.candidate() == PLAIN and s.probe_steps == 1
    s = AutoState.from_state(dict(base, steps=520, window_start=500, choice=0.25))  # past the window
    assert not s.in_window() and s.candidate() == 0.25


def test_windows_repeat_every_interval_steps():
    state = AutoState()
    # noiseless figures: the choice is the fastest fraction, so a run of 1.0 marks a window
    seen, _ = drive(state, 2 * auto.INTERVAL + auto.PROBE_STEPS * len(auto.CANDIDATES), TIMES, noise=(0.0, 1.0))
    assert state.choice == 0.25
    starts = [i for i in range(len(seen) - 3) if seen[i : i + 3] == [1.0, 1.0, 1.0] and (i == 0 or seen[i - 1] != 1.0)]
    assert starts[:3] == [0, auto.INTERVAL, 2 * auto.INTERVAL]
    assert state.decisions == 3


def drive_rows(state: AutoState, rows, times: dict, now: float = 0.0) -> tuple[list, float]:
    """One optimizer step per entry of ``rows``, each step's calls that many rows of logits (and
    tokens, and noise figures on the steps that measure it); returns the candidates run and the
    clock."""
    seen = []
    for r in rows:
        c = state.candidate()
        seen.append(c)
        state.add_tokens(r)
        if state.measures_noise():
            state.add_noise(torch.tensor((4.0, 0.01), dtype=torch.float64))
        state.add_call(torch.device("cpu"), r)
        now += times[c]
        state.on_step(now)
    return seen, now


def full_tokens_faster(cands: tuple) -> dict:
    """Step times where the plain loss is the fastest candidate."""
    return {c: 0.03 for c in cands} | {PLAIN: 0.02}


@pytest.mark.usefixtures("probe_the_reference")
def test_a_change_of_batch_starts_a_new_window_before_the_interval():
    """The choice depends on the batch: once all but one of the recent steps ran RESHAPE times, or
    1 / RESHAPE of, the last window's rows, a new window starts at once instead of after INTERVAL
    steps, exactly twofold included; batches that vary less, alternate, or hold one outlying step,
    do not start one; a large change starts one window, not two."""
    times = {1.0: 0.030, PLAIN: 0.022}
    state = AutoState(candidates=auto.FULL_TOKENS)
    n_window = 2 * auto.PROBE_STEPS
    seen, now = drive_rows(state, [1000] * n_window, times)
    assert state.decisions == 1 and state.choice == PLAIN and state.decided_rows == 1000
    # batches of 600..1500 rows, a step of 10000 (a long batch) and two more close together, 600
    # and 1400 in turn
    varying = [600, 1500, 1000, 800, 1200, 10000] + [1000, 1400, 700] * 20 + [10000, 1000, 10000] + [600, 1400] * 20
    seen, now = drive_rows(state, varying, times, now)
    assert not state.in_window() and state.decisions == 1 and seen == [PLAIN] * len(varying)
    # twice the batch: a window once all but one of the recent steps hold it, long before INTERVAL
    before = state.steps
    seen, now = drive_rows(state, [2000] * 120, times, now)
    assert state.window_start == before + auto.RECENT_STEPS - 1 and state.steps < auto.INTERVAL
    assert 1.0 in seen and state.decisions == 2 and state.decided_rows == 2000
    # half of it again: another
    before = state.steps
    seen, now = drive_rows(state, [1000] * 120, times, now)
    assert state.window_start == before + auto.RECENT_STEPS - 1 and state.decisions == 3
    # sixteen times more, then fewer, rows: one window each, not a second one once the old batch
    # has left the recent steps
    seen, now = drive_rows(state, [16000] * 120, times, now)
    assert state.decisions == 4 and state.decided_rows == 16000
    seen, now = drive_rows(state, [1000] * 150, times, now)
    assert state.decisions == 5 and state.decided_rows == 1000 and not state.in_window()


def test_a_change_of_batch_during_a_window_starts_another_at_once():
    """A window whose last steps ran twice (or half) the rows of its first ones timed its
    candidates on two batches: a new window starts right after it, on the new batch alone, and then
    the choice holds."""
    for cands, change_at in ((auto.FULL_TOKENS, 5), (auto.CANDIDATES, 15)):
        for new in (2000, 500):
            state = AutoState(candidates=cands)
            drive_rows(state, [1000] * change_at + [new] * (300 - change_at), full_tokens_faster(cands))
            assert state.decisions == 2 and state.decided_rows == new, (cands, new, state.decisions)


@pytest.mark.parametrize(
    "rows_at",
    [
        lambda i: 100 if i % 8 < 4 else 1000,  # blocks as long as the default's window
        lambda i: 1000 if i % 5 == 4 else 100,  # a large size one step in five
        lambda i: 100 + 40 * (i % 25),  # a sawtooth as long as auto's window
    ],
)
@pytest.mark.parametrize("cands", [auto.FULL_TOKENS, auto.CANDIDATES])
def test_mixed_batch_sizes_probe_at_most_once_in_batch_gap_steps(rows_at, cands):
    """Batches that mix sizes in ways the check cannot tell from a change start at most one
    window in BATCH_GAP steps (and none right after one that a change started): the probing stays
    a bounded share of the run instead of all of it."""
    state = AutoState(candidates=cands)
    seen, _ = drive_rows(state, map(rows_at, range(2000)), full_tokens_faster(cands))
    # a plain step outside a window is the choice; every other step ran in a window
    in_window = sum(c != PLAIN for c in seen) + auto.PROBE_STEPS * state.decisions
    window = 2 * auto.PROBE_STEPS if cands == auto.FULL_TOKENS else auto.PROBE_STEPS * len(cands)
    # about one window in BATCH_GAP steps at most (a steady batch: one in INTERVAL)
    assert in_window / 2000 <= window / auto.BATCH_GAP + 0.01


@pytest.mark.parametrize("pattern", ["alternating", "random"])
@pytest.mark.parametrize("cands", [auto.FULL_TOKENS, auto.CANDIDATES])
def test_two_batch_sizes_twofold_apart_start_no_window_after_the_first(pattern, cands):
    """Length buckets: batches of 2048 and 4096 rows in turn, or at random, from the start. The
    recent rows stay between the two sizes (a median would jump from one to the other and start a
    window every few steps)."""
    gen = torch.Generator().manual_seed(5)
    if pattern == "alternating":
        rows = [2048, 4096] * 200
    else:
        rows = [2048 if b else 4096 for b in torch.randint(0, 2, (400,), generator=gen).tolist()]
    state = AutoState(candidates=cands)
    drive_rows(state, rows, full_tokens_faster(cands))
    assert state.decisions == 1 and state.window_start == 0


def test_trls_fused_heads_plain_steps_book_the_shifted_rows():
    """TRL's fused head: a plain step (the head is not called; the model's pre-hook books it)
    books the rows a gated step's shifted loss takes, B (T - 1) from labels, B T' from
    shift_labels, so that an exact halving of the batch is seen."""
    model = TinyLM(vocab=37, dim=16)
    gate = cggr_hook.enable(model)
    model.train()
    state = cggr_hook.scheduler.auto_state(gate.key, auto.FULL_TOKENS)
    assert state.candidate() == PLAIN
    gate._on_root_forward(model, (), {"fused_lm_head": True, "labels": torch.zeros(4, 12, dtype=torch.long)})
    assert state._step_rows == 4 * 11
    state._step_rows = 0
    gate._on_root_forward(model, (), {"fused_lm_head": True, "shift_labels": torch.zeros(4, 11, dtype=torch.long)})
    assert state._step_rows == 4 * 11


@pytest.mark.usefixtures("probe_the_reference")
def test_rows_booked_by_plain_and_gated_steps_agree_on_the_head_route():
    """A loss that reads some of the head's rows (the last position of each sequence): its plain
    steps and its gated steps book the loss's rows alike (the gated route's targets cover every
    head row), so a fixed batch never looks like a new one."""
    model = TinyLM(vocab=37, dim=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    key = cggr_hook.enable(model).key
    idx = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(3))
    booked = {}
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    for _ in range(2 * auto.PROBE_STEPS):
        c = state.candidate()
        F.cross_entropy(model(idx)[:, -1], idx[:, 0]).backward()
        booked.setdefault(c, set()).add(state._step_rows)
        opt.step()
        opt.zero_grad()
    assert booked == {PLAIN: {4}, 1.0: {4}}, booked
    assert state.decisions == 1 and state.decided_rows == 4


@pytest.mark.usefixtures("probe_the_reference")
def test_the_rows_of_a_step_come_from_gated_and_plain_calls_and_survive_a_checkpoint():
    """Both kinds of step feed the running rows: a CGGRLoss default (the plain loss first, then
    the gate's kernels) sees each call's rows; the state dict keeps them, and a state saved before
    they were kept loads as unknown (no new window from them)."""
    # every token, plain_when_faster: the plain loss first, then the gate's kernels
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, 23, generator=g, requires_grad=True)
    targets = torch.randint(0, 23, (6, 11), generator=g)
    ran, rows = [], []
    for _ in range(2 * auto.PROBE_STEPS):
        crit(logits, targets).backward()
        ran.append(crit.get_metrics().get("auto_plain"))
        crit.step()
        rows.append(crit.scheduler.auto_state("loss", auto.FULL_TOKENS)._recent_rows[-1])
    state = crit.scheduler.auto_state("loss", auto.FULL_TOKENS)
    assert ran[0] is True and False in ran  # the plain loss first, then the gate's kernels
    assert rows[0] == 66  # from the plain step alone
    assert set(state._recent_rows) == {66} and state.decided_rows == 66
    saved = state.state_dict()
    loaded = AutoState.from_state(saved)
    assert loaded.decided_rows == 66 and loaded._recent_rows == state._recent_rows
    old = {k: v for k, v in saved.items() if k not in ("decided_rows", "recent_rows", "window_rows", "batch_started")}
    loaded = AutoState.from_state(old)
    assert loaded._recent_rows == [] and loaded.decided_rows == 0 and not loaded._reshaped()


def test_the_head_routes_plain_steps_report_their_rows():
    """Through enable(): the default's plain steps (the original cross entropy) report the rows of
    their loss, as its gated steps do."""
    model = TinyLM(vocab=37, dim=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    key = cggr_hook.enable(model).key
    idx = torch.randint(0, 37, (4, 12), generator=torch.Generator().manual_seed(2))
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert state.candidate() == PLAIN
    F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1)).backward()
    opt.step()
    assert cggr_hook.metrics(model)["auto_plain"] and state._recent_rows == [44]


def test_auto_state_resumes_exactly_from_the_scheduler_state():
    from cggr_hook.schedule import Scheduler

    times = {1.0: 0.10, 0.75: 0.07, 0.5: 0.05, 0.25: 0.045, PLAIN: 0.12}
    a = Scheduler()
    sa = a.auto_state("m")
    _, now = drive(sa, 7, times)  # stop inside the probe window
    b = Scheduler()
    b.load_state_dict(a.state_dict())
    sb = b.auto["m"]
    rest_a, _ = drive(sa, 40, times, now)
    rest_b, _ = drive(sb, 40, times, now)
    assert rest_a == rest_b
    assert sa.choice == sb.choice and sa.step_seconds == sb.step_seconds and sa.noise == sb.noise
    b.reset()
    assert b.auto == {}


# --------------------------------------------------------------------------------------------------
# the noise estimator
# --------------------------------------------------------------------------------------------------
def per_token_head_grads(model, idx):
    """Each predicted token's gradient on the head weight, by autograd one token at a time."""
    logits = model(idx)[:, :-1]
    V = logits.shape[-1]
    x, t = logits.reshape(-1, V), idx[:, 1:].reshape(-1)
    return torch.stack(
        [
            torch.autograd.grad(F.cross_entropy(x[i : i + 1], t[i : i + 1]), model.lm_head.weight, retain_graph=True)[0]
            for i in range(len(t))
        ]
    )


def test_one_calls_noise_figures_equal_the_direct_computation():
    torch.manual_seed(0)
    model = TinyLM(vocab=29, dim=12)
    idx = torch.randint(0, 29, (3, 9), generator=torch.Generator().manual_seed(1))
    g = per_token_head_grads(model, idx).double()  # (n, V, D)
    n = g.shape[0]
    S = g.pow(2).sum((1, 2)).mean()
    Bn = g.mean(0).pow(2).sum()
    trace = (S - Bn) * n / (n - 1)
    want = torch.stack([trace, Bn - trace / n])

    gate = cggr_hook.enable(model, min_tokens_ratio="auto")
    state = cggr_hook.scheduler.auto_state(gate.key)
    assert state.measures_noise()
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, 29), idx[:, 1:].reshape(-1)).backward()
    got = state._acc
    assert got is not None and float(got[2]) == 1.0
    torch.testing.assert_close(got[:2], want, rtol=1e-4, atol=1e-9)


def test_noise_scale_estimate_matches_the_population_value():
    """Over many small batches the averaged estimate approaches B = tr(Sigma) / |G|^2 of the
    population the batches are drawn from (computed from every token's own gradient)."""
    torch.manual_seed(3)
    model = TinyLM(vocab=17, dim=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    pool = torch.randint(0, 17, (64, 9), generator=torch.Generator().manual_seed(4))
    g = per_token_head_grads(model, pool).double().flatten(1)  # every token of the population
    G = g.mean(0)
    true_b = float((g - G).pow(2).sum(1).mean() / G.pow(2).sum())

    key = cggr_hook.enable(model, min_tokens_ratio="auto").key
    gen = torch.Generator().manual_seed(5)
    sums = torch.zeros(2, dtype=torch.float64)
    draws = 300
    for _ in range(draws):
        cggr_hook.scheduler.reset()  # every call a noise-measuring one
        state = cggr_hook.scheduler.auto_state(key)
        idx = pool[torch.randint(0, 64, (4,), generator=gen)]
        F.cross_entropy(model(idx)[:, :-1].reshape(-1, 17), idx[:, 1:].reshape(-1)).backward()
        sums += state._acc[:2]
    est_b = float(sums[0] / sums[1])
    assert est_b == pytest.approx(true_b, rel=0.2), (est_b, true_b)


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------
def test_a_gated_loop_runs_the_probe_window_and_the_plain_candidate_is_the_plain_loss():
    torch.manual_seed(0)
    model = TinyLM(vocab=37, dim=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: the plain loss is comparable
    key = cggr_hook.enable(model, min_tokens_ratio="auto").key
    n_window = auto.PROBE_STEPS * len(auto.CANDIDATES)
    idx = torch.randint(0, 37, (4, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    fractions, nodes, tapped, probing = [], [], [], []
    for _ in range(n_window + 2):
        probing.append(cggr_hook.scheduler.auto_state(key).in_window())
        logits = model(idx)
        tapped.append(type(logits.grad_fn).__name__ == "HeadTapBackward")
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        del logits
        nodes.append(type(loss.grad_fn).__name__)
        m = cggr_hook.metrics(model)
        fractions.append("plain" if m["auto_plain"] else m["auto_fraction"])
        if m["auto_plain"]:
            assert torch.equal(loss.detach(), plain)  # the original function's result, bit for bit
        else:
            assert m["tokens_selected"] == max(1, math.floor(m["auto_fraction"] * m["tokens_total"] + 0.5))
        loss.backward()
        opt.step()
        opt.zero_grad()
    # the candidates in their order; a fraction no faster than every token leaves after two steps
    n_probe = probing.index(False)
    assert not any(probing[n_probe:])
    runs = [(c, len(list(g))) for c, g in itertools.groupby(fractions[:n_probe])]
    assert [c for c, _ in runs] == list(auto.CANDIDATES)
    assert all(n == auto.PROBE_STEPS if c in (1.0, "plain") else 2 <= n <= auto.PROBE_STEPS for c, n in runs)
    assert cggr_hook.scheduler.step_count == n_window + 2  # plain steps count too
    # the plain candidate's loss is the original function's node; the others the gate's
    assert all((node == "GatedHeadCrossEntropyBackward") == (f != "plain") for node, f in zip(nodes, fractions))
    # a plain step's logits are the head's own output, untapped: nothing of the gate in its graph
    assert tapped == [f != "plain" for f in fractions]
    state = cggr_hook.scheduler.auto[key]
    assert state.decisions == 1 and set(state.step_seconds) == set(auto.CANDIDATES)
    m = cggr_hook.metrics(model)
    assert m["noise_scale"] >= 0 and "step_ms_plain" in m and "step_ms_25" in m  # inf: noise only
    saved = cggr_hook.scheduler.state_dict()
    assert saved["auto"][key]["decisions"] == 1


def test_auto_is_a_valid_ratio_and_other_strings_are_not():
    assert cggr_hook.GateConfig(min_tokens_ratio="auto").min_tokens_ratio == "auto"
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        cggr_hook.GateConfig(min_tokens_ratio="half")


# --------------------------------------------------------------------------------------------------
# the default: every token, through the gate's kernels or the plain loss, whichever is faster
# --------------------------------------------------------------------------------------------------
def test_which_configurations_choose_by_step_time():
    C = cggr_hook.GateConfig
    assert C().auto_candidates == (PLAIN, 1.0)  # the default: the user's own loss first
    assert C(min_tokens_ratio=1.0, warmup_steps=500).auto_candidates == (PLAIN, 1.0)  # r stays 1.0
    assert C(plain_when_faster=False).auto_candidates is None
    assert C(dynamic_threshold=True).auto_candidates is None  # the threshold can lower r below 1.0
    assert C(min_tokens_ratio=0.5).auto_candidates is None  # a fraction changes the loss: never swapped
    assert C(min_tokens_ratio="auto").auto_candidates == auto.CANDIDATES
    assert C(min_tokens_ratio="auto", plain_when_faster=False).auto_candidates == (1.0, 0.75, 0.5, 0.25)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="plain_when_faster"):
            C(plain_when_faster=bad)


@pytest.mark.parametrize(
    "one, plain, want, one_steps",
    [
        (0.10, 0.08, PLAIN, 1 + auto.LEAVE_AFTER),  # slower: left after two timed steps
        (0.06, 0.08, 1.0, auto.PROBE_STEPS),  # faster by more than the margin: its whole probe
        (0.079, 0.08, PLAIN, 1 + auto.LEAVE_AFTER),  # faster, but within the margin
    ],
)
def test_full_token_candidates_take_the_faster_without_measuring_noise(one, plain, want, one_steps):
    state = AutoState(candidates=auto.FULL_TOKENS)
    seen, now = [], 0.0
    while len(seen) < auto.PROBE_STEPS + one_steps + 3:
        seen.append(state.candidate())
        assert not state.measures_noise()  # same loss either way: no fraction needs the noise
        state.add_tokens(1000)
        now += {1.0: one, PLAIN: plain}[seen[-1]]
        state.on_step(now)
    n_window = auto.PROBE_STEPS + one_steps
    assert seen[:n_window] == [PLAIN] * auto.PROBE_STEPS + [1.0] * one_steps
    assert state.decisions == 1 and state.noise is None
    assert seen[n_window:] == [want] * 3


def test_a_gates_default_and_auto_states_are_kept_apart_and_survive_a_checkpoint():
    """Two gates of one key (two models of one kind, or one gate whose options change) choosing
    among different candidates each keep their own state: neither resets the other's probe."""
    from cggr_hook.schedule import Scheduler, auto_key

    s = Scheduler()
    default = s.auto_state("m", auto.FULL_TOKENS)
    full = s.auto_state("m", auto.CANDIDATES)
    assert default is not full and set(s.auto) == {"m", "m/plain,1.0"} == {
        auto_key("m", c) for c in (auto.CANDIDATES, auto.FULL_TOKENS)
    }
    for _ in range(3):  # interleaved: each advances alone
        default.on_step()
        full.on_step()
        assert s.auto_state("m", auto.FULL_TOKENS) is default and s.auto_state("m", auto.CANDIDATES) is full
    t = Scheduler()
    t.load_state_dict(s.state_dict())
    assert t.auto_state("m", auto.FULL_TOKENS).candidates == auto.FULL_TOKENS
    assert t.auto_state("m", auto.FULL_TOKENS).probe_steps == 3 == t.auto_state("m", auto.CANDIDATES).probe_steps


@pytest.mark.usefixtures("probe_the_reference")
def test_the_default_gate_runs_the_plain_loss_then_the_kernels_and_keeps_the_loss():
    torch.manual_seed(0)
    model = TinyLM(vocab=37, dim=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: every step's loss comparable
    key = cggr_hook.enable(model).key
    idx = torch.randint(0, 37, (4, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
    nodes, ran, n_window = [], [], None
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    while state.decisions == 0 or len(ran) < 2 * auto.PROBE_STEPS + 2:
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        m = cggr_hook.metrics(model)
        ran.append(PLAIN if m["auto_plain"] else m["auto_fraction"])
        nodes.append(type(loss.grad_fn).__name__)
        if m["auto_plain"]:
            assert torch.equal(loss.detach(), plain)  # the original function's result, bit for bit
        else:
            assert m["tokens_selected"] == m["tokens_total"] == 44
            torch.testing.assert_close(loss.detach(), plain)
        loss.backward()
        opt.step()
        opt.zero_grad()
        state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
        if n_window is None and state.decisions:
            n_window = len(ran)  # the probe window's steps
    # the plain loss first (the user's own steps), then the gate's kernels for 3 to 5 steps
    runs = [(c, len(list(g))) for c, g in itertools.groupby(ran[:n_window])]
    assert runs[0] == (PLAIN, auto.PROBE_STEPS) and runs[1][0] == 1.0 and len(runs) == 2
    assert 1 + auto.LEAVE_AFTER <= runs[1][1] <= auto.PROBE_STEPS
    assert all((n == "GatedHeadCrossEntropyBackward") == (c == 1.0) for n, c in zip(nodes, ran))
    assert state.decisions == 1 and set(state.step_seconds) == {1.0, PLAIN} and state.noise is None
    assert ran[n_window:] == [state.choice] * (len(ran) - n_window)
    m = cggr_hook.metrics(model)
    assert "step_ms_plain" in m and "step_ms_100" in m


def test_off_a_cuda_device_the_default_runs_the_plain_loss_without_probing_its_kernels():
    """On a CPU the gate's kernels are the PyTorch reference, never faster than torch's own loss:
    the default's windows time the plain loss alone and choose it, and 'auto' still probes."""
    model = TinyLM(vocab=37, dim=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    key = cggr_hook.enable(model).key
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(4))
    for _ in range(auto.INTERVAL + 3 * auto.PROBE_STEPS):  # the first window and the next
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        assert cggr_hook.metrics(model)["auto_plain"] and type(loss.grad_fn).__name__ != "GatedHeadCrossEntropyBackward"
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert state.decisions == 2 and state.choice == PLAIN and set(state.step_seconds) == {PLAIN}
    cggr_hook.disable(model)
    cggr_hook.scheduler.reset()
    key = cggr_hook.enable(model, min_tokens_ratio="auto").key
    ran = set()
    for _ in range(3 * auto.PROBE_STEPS):
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        m = cggr_hook.metrics(model)
        ran.add(PLAIN if m["auto_plain"] else m["auto_fraction"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert 1.0 in ran and PLAIN in ran


def test_without_plain_when_faster_every_step_runs_the_gates_kernels():
    model = TinyLM(vocab=37, dim=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cggr_hook.enable(model, plain_when_faster=False)
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(3))
    for _ in range(auto.PROBE_STEPS * 2 + 2):
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        assert type(loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward"
        assert "auto_plain" not in cggr_hook.metrics(model)
        loss.backward()
        opt.step()
    assert cggr_hook.scheduler.auto == {}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cggrloss_plain_step_is_torchs_loss_and_gradient(reduction):
    w = torch.rand(7) + 0.5
    crit = cggr_hook.CGGRLoss(
        min_tokens_ratio=1.0,
        warmup_steps=0,
        dynamic_threshold=False,
        reduction=reduction,
        label_smoothing=0.1,
        weight=w,
    )
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = -100
    assert crit.scheduler.auto_state("loss", auto.FULL_TOKENS).candidate() == PLAIN  # the plain loss first
    x = logits.detach().requires_grad_()
    loss = crit(x, targets)
    m = crit.get_metrics()
    assert m["auto_plain"] and m["selection"] == "plain"
    assert m["tokens_selected"] == m["tokens_total"] == 9  # one of the ten targets is ignored
    y = logits.detach().requires_grad_()
    ref = F.cross_entropy(y.reshape(-1, 7), targets.reshape(-1), weight=w, reduction=reduction, label_smoothing=0.1)
    ref = ref.view(targets.shape) if reduction == "none" else ref
    assert loss.shape == ref.shape and torch.equal(loss.detach(), ref.detach())
    g = torch.randn_like(ref)
    loss.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, y.grad)


def test_the_default_reports_no_noise_scale_it_never_measures():
    from cggr_hook import figures

    assert "noise_scale" not in figures.auto_figures(AutoState(candidates=auto.FULL_TOKENS), 1.0)
    assert math.isnan(figures.auto_figures(AutoState(), 1.0)["noise_scale"])  # 'auto' before its estimate


def test_on_a_cuda_device_steps_are_timed_on_the_devices_timeline(monkeypatch):
    """The host can run plain steps ahead of the device (nothing in them waits): its clock would
    call them fast. On a CUDA device a step's time is read from events recorded on the device's
    stream at each counted step, waited for once, at the window's decision."""
    device_clock = {"now": 0.0}
    waits = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self, stream=None):
            self.t = device_clock["now"]

        def query(self):
            return False  # the device is behind: nothing is read before the decision

        def synchronize(self):
            waits.append(self)

        def elapsed_time(self, end):
            return 1e3 * (end.t - self.t)  # ms, as torch gives

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    state = AutoState(candidates=auto.FULL_TOKENS)
    state.add_call(torch.device("cuda", 0))
    # a copy inside the window (a deep copy, a pickle of a model holding a CGGRLoss) reads the
    # events so far and leaves them behind: they cannot be pickled
    for _ in range(3):
        device_clock["now"] += 0.1
        state.on_step()
    twin = pickle.loads(pickle.dumps(state))
    assert twin._mark is None and twin._marked == [] and twin.probe_steps == 3
    assert twin._times[PLAIN] == pytest.approx([0.1, 0.1]) and len(waits) == 1  # the first step untimed
    waits.clear()
    state = AutoState(candidates=auto.FULL_TOKENS)
    state.add_call(torch.device("cuda", 0))
    device_step = {1.0: 0.060, PLAIN: 0.100}  # the gate's kernels are faster on the device
    host_step = {1.0: 0.060, PLAIN: 0.010}  # but the host queues plain steps ahead of it
    host = 0.0
    while state.decisions == 0:
        c = state.candidate()
        device_clock["now"] += device_step[c]
        host += host_step[c]
        state.on_step(host)
    assert state.step_seconds == pytest.approx(device_step)
    assert state.choice == 1.0
    assert len(waits) == 1  # one wait, at the decision, for the last mark; the others are read then
    assert state._marked == [] and state._mark is None


@pytest.mark.parametrize("bad", [7, -1, -5])
def test_cggrloss_plain_step_rejects_the_targets_a_gated_step_rejects(bad):
    crit = cggr_hook.CGGRLoss(min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False)
    assert crit.scheduler.auto_state("loss", auto.FULL_TOKENS).candidate() == PLAIN
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (2, 5))
    assert crit(logits, targets).dtype == torch.float32  # as a gated step's loss
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=r"target has 1 value\(s\) outside \[0, 7\)"):
        crit(logits, targets)
    gated = cggr_hook.CGGRLoss(min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
    with pytest.raises(ValueError, match=r"target has 1 value\(s\) outside \[0, 7\)"):
        gated(logits, targets)


def test_a_window_whose_full_token_candidates_were_never_timed_decides_without_raising():
    """``'auto'`` without the plain candidate, whose 1.0 steps gated no loss (a warm-up with
    another loss): the probe moves past 1.0 untimed and times the fractions, and the decision,
    which has no full-token time to hold them against, falls back to 1.0 instead of raising in
    the user's ``optimizer.step()``."""
    state = AutoState(candidates=(1.0, 0.75, 0.5, 0.25))
    for _ in range(auto.LEAVE_AFTER):
        state.no_gated_loss()
    assert state.candidate() == 0.75
    now = 0.0
    while state.decisions == 0:
        now += 0.05
        state.on_step(now)
    assert state.choice == 1.0 and 1.0 not in state.step_seconds
    # with the plain candidate, the plain loss
    state = AutoState(candidates=auto.CANDIDATES)
    state.probe = 2  # the fractions' turn, neither full-token candidate timed
    now = 0.0
    while state.decisions == 0:
        now += 0.05
        state.on_step(now)
    assert state.choice == PLAIN


# --------------------------------------------------------------------------------------------------
# a fraction's calls read nothing on the host
# --------------------------------------------------------------------------------------------------
class _Arriving:
    """A count that reaches the host when told to."""

    def __init__(self, n: int) -> None:
        self.n, self.arrived, self.reads = n, False, 0

    def done(self) -> bool:
        return self.arrived

    def count(self) -> int:
        self.reads += 1
        return self.n


def test_tokens_still_on_the_device_are_folded_in_step_order_once_they_arrive():
    """A step's valid tokens counted on the device join the running figure once their copy is in,
    oldest step first, as the host's own counts would have; a decision or state_dict folds the
    rest at once."""
    reference, state = AutoState(), AutoState()
    late = [_Arriving(n) for n in (100, 300, 50)]
    for n, pending in zip((100, 300, 50), late):
        reference.add_tokens(n)
        reference.on_step(now=0.0)
        state.add_tokens(pending)
        state.on_step(now=0.0)
    assert state.tokens == 0.0  # nothing in yet
    late[1].arrived = True
    state.on_step(now=0.0)  # (a step of no gated call)
    assert state.tokens == 0.0  # the second step waits for the first
    late[0].arrived = True
    state.on_step(now=0.0)
    assert state.tokens == pytest.approx(0.9 * 100 + 0.1 * 300)
    assert state.state_dict()["tokens"] == reference.tokens  # the third folded now, not yet arrived
    assert [p.reads for p in late] == [1, 1, 1]


def test_a_steps_host_and_device_counts_add_up():
    state = AutoState()
    state.add_tokens(7)
    state.add_tokens(_Arriving(5))
    state.on_step(now=0.0)
    assert state.state_dict()["tokens"] == 12


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("selection", ["importance", "topk", "sequence_aware"])
def test_an_auto_fraction_reads_nothing_and_matches_the_read_path(backend, selection, monkeypatch):
    """A step that ``'auto'`` runs at a fraction below 1.0 counts n and k on the device like a
    fixed ratio (no target count launched, the figures left on the device): the same loss,
    gradients (to the last bits through the head), figures and auto state as the call that reads
    the counts first."""
    from cggr_hook import figures, kernels, pipeline

    kernels.force_backend(backend)
    idx = torch.randint(0, 37, (3, 10), generator=torch.Generator().manual_seed(4))
    real_resolve = figures.resolve
    counted_on_host = []  # whether the call's figures came with n, known on the host
    monkeypatch.setattr(figures, "resolve", lambda m: counted_on_host.append("tokens_total" in m) or real_resolve(m))
    counted = count_target_counts(monkeypatch)
    runs = []
    for device_k in (True, False):
        if not device_k:
            monkeypatch.setattr(pipeline, "at_ratio", lambda *a: False)
        torch.manual_seed(0)
        model = TinyLM(vocab=37, dim=16)
        cggr_hook.scheduler.reset()
        gate = cggr_hook.enable(model, min_tokens_ratio="auto", selection=selection)
        state = cggr_hook.scheduler.auto_state(gate.key, gate.config.auto_candidates)
        state.probe = state.candidates.index(0.25)  # the window's 25% steps
        try:
            counted.clear()
            counted_on_host.clear()
            loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
            loss.backward()
            m = cggr_hook.metrics(model)
            reads = (list(counted), counted_on_host[0])
            cggr_hook.scheduler.step()
            runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()], m, reads, state.tokens))
        finally:
            cggr_hook.disable(model)
    (l_dev, g_dev, m_dev, r_dev, t_dev), (l_host, g_host, m_host, r_host, t_host) = runs
    # (sequence_aware's read path reads the scoring pass's sums with its kept ranks instead)
    assert r_dev[0] == [] and r_host[0] == ([] if selection == "sequence_aware" else [1])
    assert r_dev[1] is False and r_host[1] is True
    torch.testing.assert_close(l_dev, l_host, rtol=1e-6, atol=0)  # (importance: its sum in another order)
    for a, b in zip(g_dev, g_host):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (
        m_dev["auto_fraction"] == 0.25
        and math.isnan(m_dev.pop("noise_scale"))
        and math.isnan(m_host.pop("noise_scale"))
    )
    assert m_dev.keys() == m_host.keys()
    for key, value in m_host.items():
        if isinstance(value, float):
            assert m_dev[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert m_dev[key] == value, key
    assert t_dev == t_host == m_host["tokens_total"]


def test_an_auto_state_with_counts_on_their_way_copies_with_them_read():
    """A copy or pickle of a state (``torch.save`` of a model holding ``CGGRLoss('auto')``) reads
    the counts still on their way, and the copy holds none of them (their events belong to this
    process); the original folds them as before."""
    state, reference = AutoState(), AutoState()
    for n in (100, 300):
        reference.add_tokens(n)
        reference.on_step(now=0.0)
    reference.add_tokens(40)
    first, second, third = _Arriving(100), _Arriving(300), _Arriving(40)
    state.add_tokens(first)
    state.on_step(now=0.0)
    state.add_tokens(second)
    state.on_step(now=0.0)
    state.add_tokens(third)  # in the step under way
    copy = pickle.loads(pickle.dumps(state))
    assert copy._unfolded == [] and copy._step_pending == []
    assert copy.tokens == reference.tokens and copy._step_tokens == 40
    copy.on_step(now=0.0)
    reference.on_step(now=0.0)
    assert copy.tokens == reference.tokens


def test_a_count_already_in_is_added_at_once():
    """Calls with no step between them (an evaluation loop's) keep no count of theirs waiting."""
    state = AutoState()
    arrived = _Arriving(5)
    arrived.arrived = True
    for _ in range(1000):
        state.add_tokens(arrived)
    assert state._step_pending == [] and state._step_tokens == 5000
