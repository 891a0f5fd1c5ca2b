"""capture.py: a fixed-ratio call's kernels replayed as one CUDA graph give what the launches
from Python give, bit for bit; results a caller keeps are its own. The bookkeeping (when a key is
captured, how many are kept, results copied out of the graph's buffer) is checked on a CPU with a
stand-in graph; the replays themselves on the GPU."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import cggr_hook
from cggr_hook import CGGRLoss, capture

from common import DEVICE, TinyLM

FIXED = dict(warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_graphs_left():
    capture.clear()
    yield
    capture.clear()


class _StandInGraph:
    """A graph whose replay runs ``compute`` again into the captured buffer, as a replay writes it."""

    def __init__(self, compute):
        self.compute, self.entry = compute, None
        self.replays = 0

    def replay(self):
        self.replays += 1
        out = self.compute(self.entry.inputs, self.entry.generator)
        for (_, start, n, dtype, shape), t in zip(self.entry.layout, out.values(), strict=True):
            capture._view(self.entry.flat, start, n, dtype, shape).copy_(t)


class _Made(list):
    """The stand-in graphs made so far; ``.capture`` the stand-in itself."""

    capture: object = None


@pytest.fixture
def stand_in(monkeypatch):
    """capture._capture on a CPU: this call eagerly on the graph's inputs, then the results'
    layout packed and an entry with a stand-in graph kept, as a capture keeps it."""
    made = _Made()

    def fake_capture(key, device, fill, compute, generation, seed):
        inputs = fill(None)
        generator = None if seed is None else capture.seeded(device, seed)
        result = compute(inputs, generator)
        graph = _StandInGraph(compute)
        flat, layout = capture._pack(compute(inputs, generator), device)
        graph.entry = capture._Entry(graph, inputs, flat, layout, generator=generator)  # pyright: ignore[reportArgumentType]
        if hasattr(fake_capture, "during"):
            fake_capture.during()  # what another thread does meanwhile
        capture._keep(key, graph.entry, generation)
        made.append(graph)
        return result

    made.capture = fake_capture

    monkeypatch.setattr(capture, "_capture", fake_capture)
    return made


def _counting_inputs(state):
    x = torch.arange(5, dtype=torch.float32)

    def eager():
        state["calls"].append("eager")
        return {"r": torch.full((3,), float(len(state["calls"]) - 1))}

    def fill(into):
        state["calls"].append("fill" if into is None else "refill")
        r = torch.full((3,), float(len(state["calls"]) - 1))
        if into is None:
            return {"r": r}
        into["r"].copy_(r)
        return into

    def compute(inputs, gen):
        return {"loss": (x * inputs["r"][0]).sum(), "rows": torch.arange(4), "sums": x.double()[:3]}

    return eager, fill, compute


def test_a_key_is_captured_once_it_repeats_and_then_replayed(stand_in):
    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    results = [capture.replayed(("k",), torch.device("cpu"), eager, fill, compute, alone=("loss",)) for _ in range(5)]
    # two eager calls, the third captured (its inputs the graph's), the last two replays that
    # write their inputs into the graph's
    assert state["calls"] == ["eager", "eager", "fill", "refill", "refill"]
    assert len(stand_in) == 1 and stand_in[0].replays == 2
    for i, r in enumerate(results):
        assert r["loss"].item() == 10.0 * i  # each call's own input reached its loss
        assert r["rows"].dtype == torch.int64 and r["sums"].dtype == torch.float64
        assert torch.equal(r["rows"], torch.arange(4))
    # a result is a copy: the next replay does not write into what an earlier call returned
    assert results[3]["loss"].item() == 30.0 and results[4]["loss"].item() == 40.0
    # a loss kept is its own storage; the other results share one copy of the graph's buffer
    for r in results[3:]:
        assert r["loss"].untyped_storage().nbytes() == 4
        assert r["rows"].untyped_storage().data_ptr() == r["sums"].untyped_storage().data_ptr()
    assert capture.count() == 1


def test_a_replay_draws_what_an_eager_call_of_its_seed_draws(stand_in):
    """Each call draws from a generator seeded with its own seed: the eager calls from a new one,
    the replays from the graph's, seeded again before each replay (without that, a replay would
    go on from where the last one stopped)."""
    cpu = torch.device("cpu")

    def eager():
        return {"r": torch.zeros(1)}

    def fill(into):
        return into if into is not None else {"r": torch.zeros(1)}

    def compute(inputs, gen):
        return {"loss": torch.rand(3, generator=gen).sum() + inputs["r"][0], "draw": torch.rand(4, generator=gen)}

    for seed in (11, 12, 13, 14, 15, 16):
        got = capture.replayed(("k",), cpu, eager, fill, compute, alone=("loss",), seed=seed)
        g = capture.seeded(cpu, seed)
        assert torch.equal(got["loss"], torch.rand(3, generator=g).sum()), seed
        assert torch.equal(got["draw"], torch.rand(4, generator=g)), seed
    assert len(stand_in) == 1 and stand_in[0].replays == 3


class _Event:
    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


def _entry_last_replayed_on(stream, home="home"):
    entry = capture._Entry(None, {}, torch.empty(1, dtype=torch.uint8), [])  # pyright: ignore[reportArgumentType]
    entry.done, entry.stream, entry.home = _Event(), stream, home  # pyright: ignore[reportAttributeAccessIssue]
    return entry


def test_a_graph_dropped_after_a_replay_on_another_stream_waits_for_it(monkeypatch):
    """Dropping a graph (clear(), or eviction past MAX_GRAPHS) whose last replay ran on another
    stream than its home one waits for that replay on the host before its memory (its pool, its
    generator's seed and offset) can be handed out; one last replayed on its home stream does not
    wait (the allocator orders a reuse there by itself)."""
    foreign, home = _entry_last_replayed_on("other"), _entry_last_replayed_on("home")
    with capture._lock:
        capture._graphs[("foreign",)], capture._graphs[("home",)] = foreign, home
    capture.clear()
    assert (foreign.done.waits, home.done.waits) == (1, 0)  # pyright: ignore[reportOptionalMemberAccess, reportAttributeAccessIssue]

    monkeypatch.setattr(capture, "MAX_GRAPHS", 2)
    oldest, middle = _entry_last_replayed_on("other"), _entry_last_replayed_on("other")
    capture._keep(("a",), oldest, capture._generation)
    capture._keep(("b",), middle, capture._generation)
    capture._keep(("c",), _entry_last_replayed_on("home"), capture._generation)  # evicts ("a",)
    assert (oldest.done.waits, middle.done.waits) == (1, 0)  # pyright: ignore[reportOptionalMemberAccess, reportAttributeAccessIssue]
    capture.clear()


def test_at_most_max_graphs_keys_are_kept(stand_in):
    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    for k in range(capture.MAX_GRAPHS + 3):
        for _ in range(capture.CAPTURE_AFTER + 1):
            capture.replayed((k,), torch.device("cpu"), eager, fill, compute)
    assert capture.count() == capture.MAX_GRAPHS
    capture.clear()
    assert capture.count() == 0


def test_a_key_whose_capture_fails_runs_eagerly(monkeypatch):
    calls = []

    def failing(key, device, fill, compute, generation, seed):
        calls.append("capture")
        with capture._lock:
            capture._bounded_put(capture._failed, key, None, capture.MAX_KEYS)
        return compute(fill(None), None)

    monkeypatch.setattr(capture, "_capture", failing)
    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    for _ in range(6):
        capture.replayed(("k",), torch.device("cpu"), eager, fill, compute)
    assert calls == ["capture"] and capture.count() == 0
    assert state["calls"] == ["eager", "eager", "fill", "eager", "eager", "eager"]


def test_keys_seen_once_do_not_evict_graphs(stand_in):
    """Only captured keys count against MAX_GRAPHS: many one-off keys (every call's shape new)
    leave a repeating key's graph in place."""
    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    for _ in range(capture.CAPTURE_AFTER + 1):
        capture.replayed(("main",), torch.device("cpu"), eager, fill, compute)
    for k in range(3 * capture.MAX_KEYS):
        capture.replayed(("once", k), torch.device("cpu"), eager, fill, compute)
    assert len(capture._seen) == capture.MAX_KEYS
    capture.replayed(("main",), torch.device("cpu"), eager, fill, compute)
    assert capture.count() == 1 and stand_in[0].replays == 1


def test_two_threads_never_capture_one_key_at_once(stand_in):
    import threading

    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    for _ in range(capture.CAPTURE_AFTER):
        capture.replayed(("k",), torch.device("cpu"), eager, fill, compute)
    inside, release = threading.Event(), threading.Event()

    def during():
        inside.set()
        release.wait(10)

    stand_in.capture.during = during
    first = threading.Thread(target=capture.replayed, args=(("k",), torch.device("cpu"), eager, fill, compute))
    first.start()
    assert inside.wait(10)
    del stand_in.capture.during
    for _ in range(capture.CAPTURE_AFTER + 1):  # meanwhile: eager, no second capture
        capture.replayed(("k",), torch.device("cpu"), eager, fill, compute)
    release.set()
    first.join()
    assert len(stand_in) == 1 and capture.count() == 1


def test_a_capture_that_a_clear_overtakes_is_not_kept(stand_in):
    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    stand_in.capture.during = capture.clear  # disable() in another thread during the capture
    for _ in range(capture.CAPTURE_AFTER + 1):
        capture.replayed(("k",), torch.device("cpu"), eager, fill, compute)
    assert len(stand_in) == 1 and capture.count() == 0


def test_new_keys_run_eagerly_after_max_captures(stand_in, monkeypatch):
    monkeypatch.setattr(capture, "MAX_CAPTURES", 3)
    state = {"calls": []}
    eager, fill, compute = _counting_inputs(state)
    for k in range(5):
        for _ in range(capture.CAPTURE_AFTER + 2):
            capture.replayed((k,), torch.device("cpu"), eager, fill, compute)
    assert len(stand_in) == 3 and capture.count() == 3
    capture.clear()  # a fresh start captures again
    for _ in range(capture.CAPTURE_AFTER + 1):
        capture.replayed(("after",), torch.device("cpu"), eager, fill, compute)
    assert capture.count() == 1


def test_concurrent_calls_of_one_key_each_get_their_own_result(stand_in):
    """Two threads replaying one graph: one at a time writes the inputs, replays and copies, so
    each gets the result of its own inputs."""
    import threading

    x = torch.arange(5, dtype=torch.float32)

    def compute(inputs, gen):
        return {"loss": (x * inputs["r"][0]).sum()}

    def make(v):
        def eager():
            return {"r": torch.full((3,), v)}

        def fill(into):
            if into is None:
                return {"r": torch.full((3,), v)}
            into["r"].fill_(v)
            time.sleep(0.002)  # widen the window between writing the inputs and replaying
            return into

        return eager, fill

    for _ in range(capture.CAPTURE_AFTER + 1):
        capture.replayed(("k",), torch.device("cpu"), *make(0.0), compute)
    wrong = []

    def worker(v):
        eager, fill = make(v)
        for _ in range(30):
            got = capture.replayed(("k",), torch.device("cpu"), eager, fill, compute)["loss"].item()
            if got != 10.0 * v:
                wrong.append((v, got))

    threads = [threading.Thread(target=worker, args=(float(v),)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_cuda_graphs_is_a_validated_option():
    assert cggr_hook.GateConfig().cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs"):
        cggr_hook.GateConfig(cuda_graphs="yes")
    assert CGGRLoss(cuda_graphs=False).config.cuda_graphs is False


# --- on the GPU -------------------------------------------------------------------------------------

CASES = [
    dict(scoring="gradnorm", selection="importance"),
    dict(scoring="combined", selection="topk"),
    dict(scoring="random", selection="importance", importance_floor=0.2),
    dict(scoring="gradnorm", selection="importance", reduction="sum", label_smoothing=0.1),
    dict(scoring="entropy", selection="topk", reduction="none"),
    dict(scoring="gradnorm", selection="importance", weight=True),
    dict(scoring="combined", selection="stratified"),
    dict(scoring="random", selection="stratified", num_strata=5, reduction="sum"),
    dict(scoring="combined", selection="sequence_aware", min_tokens_per_sequence=3),
    dict(scoring="gradnorm", selection="sequence_aware", reduction="sum", label_smoothing=0.1),
]


def _pair(options, V, device="cuda"):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(V, device=device, generator=torch.Generator(device).manual_seed(1)) + 0.5
    return [
        CGGRLoss(min_tokens_ratio=0.25, cuda_graphs=graphs, **FIXED, **options).to(device) for graphs in (True, False)
    ]


@gpu
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replayed_calls_give_the_loss_gradient_and_figures_of_launched_ones(options, dtype):
    B, T, V = 3, 37, 1001
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.empty(B, T, V, device="cuda", dtype=dtype).requires_grad_()
    t = torch.empty(B, T, device="cuda", dtype=torch.long)
    graphed, launched = _pair(options, V)
    for call in range(6):
        with torch.no_grad():  # new values at the same addresses: the graph reads them where they are
            x.copy_(torch.randn(B, T, V, device="cuda", generator=g) * 3)
            t.copy_(torch.randint(0, V, (B, T), device="cuda", generator=g))
            t[:, ::5] = -100
        got = []
        for crit in (graphed, launched):
            x.grad = None
            loss = crit(x, t)
            loss.sum().backward()
            got.append((loss.detach().clone(), x.grad.clone(), crit.get_metrics()))
            crit.step()
        (lg, gg, mg), (ll, gl, ml) = got
        assert torch.equal(lg, ll), call
        assert torch.equal(gg, gl), call
        assert mg == ml
    assert capture.count() == 1  # the graph's: the launched criterion captures nothing


@gpu
def test_results_kept_across_replays_are_each_calls_own():
    """A loss logged after later calls, and five forwards before one backward, see their own call
    (each call of a step draws its own rows)."""
    V = 517
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(64, V, device="cuda", generator=g).requires_grad_()
    t = torch.randint(0, V, (64,), device="cuda", generator=g)
    graphed, launched = _pair(dict(scoring="gradnorm", selection="importance"), V)
    runs = {}
    for name, crit in (("graphed", graphed), ("launched", launched)):
        x.grad = None
        losses = [crit(x, t) for _ in range(5)]
        if name == "graphed":
            # each kept loss holds its own 4 bytes, not the call's other results (calls 4 and 5
            # are replays)
            assert all(loss.untyped_storage().nbytes() == 4 for loss in losses)
        # every loss so far, backward once: their plans were not overwritten by later replays
        torch.stack(losses).sum().backward()
        runs[name] = (torch.stack([ls.detach() for ls in losses]), x.grad.clone())
    assert torch.equal(runs["graphed"][0], runs["launched"][0])
    assert torch.equal(runs["graphed"][1], runs["launched"][1])
    assert len(set(runs["graphed"][0].tolist())) == 5


@gpu
@pytest.mark.parametrize("selection", ["importance", "topk", "stratified", "sequence_aware"])
def test_a_gated_model_trains_the_same_with_graphs(selection):
    torch.manual_seed(0)
    base = TinyLM(vocab=1003, dim=64).cuda()
    idx = torch.randint(0, 1003, (8, 33), device="cuda")
    params = {}
    for graphs in (True, False):
        model = TinyLM(vocab=1003, dim=64).cuda()
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        cggr_hook.scheduler.reset()  # both runs from step 0: the draws are a function of the step
        cggr_hook.enable(model, min_tokens_ratio=0.25, selection=selection, cuda_graphs=graphs, **FIXED)
        for _ in range(6):
            logits = model(idx)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 1003), idx[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
        if graphs:
            captured = capture.count()
        cggr_hook.disable()
        assert capture.count() == 0  # disable() leaves no graph behind
        params[graphs] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(params[True], params[False], strict=True):
        assert torch.equal(a, b)
    assert captured >= 1, "nothing was captured: the head's calls did not repeat one key"


@gpu
def test_a_replayed_call_waits_for_nothing():
    x = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, 32000, (4096,), device="cuda")
    crit = CGGRLoss(min_tokens_ratio=0.25, scoring="gradnorm", selection="importance", **FIXED)
    for _ in range(capture.CAPTURE_AFTER + 1):
        crit(x, t).backward()
    assert capture.count() == 1
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # tens of ms ahead of the call: a read in it would wait them out
    crit(x, t).backward()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "the replayed call waited for the device"
    assert crit.get_metrics()["tokens_selected"] == round(0.25 * 4096)


@pytest.mark.parametrize("graphs, graph_safe_rng", [(True, True), (False, True), (True, False)])
def test_graphs_are_asked_for_from_the_curriculums_end(monkeypatch, graphs, graph_safe_rng):
    """Which calls go to ``capture.replayed``: at a fixed ratio with ``cuda_graphs``, from the
    step the curriculum ends (each warm-up step has its own ratio, so its own graph); never
    without ``cuda_graphs``, nor for a call that draws where torch cannot register a generator
    with a graph. The rest of a call is the same either way (here on the CPU, with the
    Triton interpreter standing in for the device without one)."""
    from cggr_hook.kernels import force_backend

    force_backend("triton")
    asked = []

    def spy(key, device, eager, fill, compute, alone=(), seed=None):
        asked.append(crit.step_count)
        return compute(eager(), None if seed is None else capture.seeded(device, seed))

    monkeypatch.setattr(capture, "capturable", lambda t: True)
    monkeypatch.setattr(capture, "GRAPH_SAFE_RNG", graph_safe_rng)
    monkeypatch.setattr(capture, "replayed", spy)
    crit = CGGRLoss(
        min_tokens_ratio=0.25,
        warmup_steps=2,
        dynamic_threshold=False,
        plain_when_faster=False,
        scoring="gradnorm",
        selection="importance",
        cuda_graphs=graphs,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 13, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 13, (24,), generator=g).to(DEVICE)
    for _ in range(4):
        crit(x, t).backward()
        crit.step()
    assert asked == ([2, 3] if graphs and graph_safe_rng else [])


@gpu
def test_calls_in_inference_mode_leave_later_training_calls_working():
    """A validation loop under ``torch.inference_mode()`` neither captures nor replays (its
    tensors could not be written by a later call outside it); training calls after it capture and
    replay as usual, with the loss of the launches."""
    V = 301
    x = torch.randn(96, V, device="cuda")
    t = torch.randint(0, V, (96,), device="cuda")
    graphed, launched = _pair(dict(scoring="gradnorm", selection="importance"), V)
    for _ in range(capture.CAPTURE_AFTER + 2):
        with torch.inference_mode():
            graphed(x, t)
    assert capture.count() == 0
    for _ in range(capture.CAPTURE_AFTER + 2):
        for crit in (graphed, launched):
            xi = x.clone().requires_grad_()
            loss = crit(xi, t)
            loss.backward()
            crit.step()
        assert torch.isfinite(loss)
    assert capture.count() == 1
