"""End-to-end checks that need a CUDA device (skipped elsewhere; run on the GPU machine)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import cggr_hook
from cggr_hook import CGGRLoss
from cggr_hook.kernels import force_backend

from common import TinyLM, masked_reference_loss, reference_topk_rows

pytestmark = pytest.mark.gpu
FIXED = dict(warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
# the hard top-k selection the references in common.py compute (the defaults draw by importance)
TOPK25 = dict(scoring="combined", selection="topk", min_tokens_ratio=0.25, **FIXED)


def both_backends(monkeypatch, logits, targets, **options):
    """One CGGRLoss forward + backward on each backend: {backend: (loss, logits.grad, metrics)}."""
    out = {}
    for backend in ("torch", "triton"):
        force_backend(backend)
        x = logits.clone().requires_grad_()
        crit = CGGRLoss(**options)
        loss = crit(x, targets)
        loss.backward()
        out[backend] = (loss.detach(), x.grad, crit.get_metrics())
    return out


@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_loss_matches_torch_backend_on_cuda(monkeypatch, V, reduction):
    g = torch.Generator(device="cuda").manual_seed(V)
    logits = (torch.randn(4, 1023, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (4, 1023), device="cuda", generator=g)
    targets[:, :50] = -100
    out = both_backends(
        monkeypatch, logits, targets, min_tokens_ratio=0.25, label_smoothing=0.1, reduction=reduction, **FIXED
    )
    (lt, gt, mt), (lr, gr, mr) = out["triton"], out["torch"]
    assert mt["tokens_selected"] == mr["tokens_selected"]
    # fp32 sums over a whole row (the smoothing term) round differently in each backend
    torch.testing.assert_close(lt, lr, rtol=5e-4, atol=1e-3)
    sel_t = gt.reshape(-1, V).abs().sum(-1) > 0
    sel_r = gr.reshape(-1, V).abs().sum(-1) > 0
    # identical scores up to fp32 rounding: the selected sets may differ only at exact near-ties
    assert int((sel_t ^ sel_r).sum()) <= 2
    both = sel_t & sel_r
    torch.testing.assert_close(gt.reshape(-1, V)[both].float(), gr.reshape(-1, V)[both].float(), rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n_tokens", [1, 2, 3])
def test_tiny_batches_match_torch_backend_on_cuda(monkeypatch, n_tokens, dynamic):
    """One, two or three tokens: Triton compiles an int argument equal to 1 as a constant, so every
    kernel of the call must build for that too (the interpreter, which CI runs, never does this)."""
    g = torch.Generator(device="cuda").manual_seed(n_tokens)
    V = 1000
    logits = (torch.randn(1, n_tokens, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (1, n_tokens), device="cuda", generator=g)
    out = both_backends(monkeypatch, logits, targets, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=dynamic)
    (lt, gt, mt), (lr, gr, mr) = out["triton"], out["torch"]
    assert mt["tokens_total"] == mr["tokens_total"] == n_tokens
    assert mt["tokens_selected"] == mr["tokens_selected"]
    torch.testing.assert_close(lt, lr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gt.float(), gr.float(), rtol=2e-2, atol=1e-4)


def test_descriptor_path_with_small_blocks_on_cuda(monkeypatch):
    """The descriptor path with the smallest blocks the settings allow, on aligned bf16 rows of
    several blocks: boxes under 128 bytes fault on an H100, so the block never goes below that."""
    from cggr_hook.kernels import reference, scoring

    monkeypatch.setattr(scoring, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(scoring, "TMA_MIN_BYTES", 0)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the descriptor path needs a Hopper or newer GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    for V in (17, 127, 300):
        x = (torch.randn(2, 3, V + 8 - V % 8, device="cuda", generator=g) * 3).to(torch.bfloat16)[..., :V]
        t = torch.randint(0, V, (6,), device="cuda", generator=g)
        assert scoring.load_path(x) == "tma"
        got = scoring.row_stats(x, t, -100)
        torch.cuda.synchronize()
        want = reference.row_stats(x, t, -100)
        for name in ("lse", "entropy", "p_top1", "p_top2", "nll"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        dict(selection="sequence_aware"),
        dict(selection="sequence_aware", dynamic_threshold=True, min_tokens_ratio=0.25),
        dict(selection="sequence_aware", dynamic_threshold=False, min_tokens_ratio=0.25, min_tokens_per_sequence=2),
        dict(selection="topk", dynamic_threshold=False),
        dict(selection="topk", dynamic_threshold=False, min_tokens_ratio=0.25),
        dict(selection="stratified", dynamic_threshold=False),
        dict(selection="stratified", dynamic_threshold=False, min_tokens_ratio=0.25),
        dict(selection="importance", scoring="gradnorm", dynamic_threshold=False),
        dict(selection="importance", scoring="gradnorm", dynamic_threshold=False, min_tokens_ratio=0.25),
        dict(selection="importance", scoring="random", dynamic_threshold=False, min_tokens_ratio=0.5),
        dict(selection="importance", scoring="gradnorm", min_tokens_ratio="auto", auto_at=0.25),
        dict(selection="topk", min_tokens_ratio="auto", auto_at=0.5),
        dict(selection="topk", dynamic_threshold=True, min_tokens_ratio=0.25),
        dict(selection="stratified", dynamic_threshold=True, min_tokens_ratio=0.25),
        dict(selection="importance", scoring="gradnorm", dynamic_threshold=True, min_tokens_ratio=0.25),
        dict(selection="importance", scoring="gradnorm", dynamic_threshold=True, min_tokens_ratio=0.25, micro=4),
        dict(selection="topk", dynamic_threshold=True, min_tokens_ratio=0.25, micro=4),
    ],
)
def test_one_host_sync_per_gated_step(monkeypatch, options):
    """At most one host wait per gated call, with the device busy when the step starts: one wait
    for the target counts' event at a ratio of 1.0; none at all where importance sampling, top-k,
    stratified or sequence_aware selects at a ratio below 1, fixed or moved by the dynamic
    threshold on the device (n, k and the ratio computed there; the previous step's target check
    still pending), so the whole step is queued while the device still sleeps, ``micro``
    accumulated micro-batches too; so too a step that ``'auto'`` runs at a fraction
    (``auto_at``)."""
    options = dict(options)
    auto_at = options.pop("auto_at", None)
    micro = options.pop("micro", 1)
    model = TinyLM(vocab=5000, dim=64).cuda()
    gate = cggr_hook.enable(model, warmup_steps=0, plain_when_faster=False, **options)
    if auto_at is not None:  # the window's steps of that fraction (no optimizer here: no step counts)
        state = cggr_hook.scheduler.auto_state(gate.key, gate.config.auto_candidates)
        state.probe = state.candidates.index(auto_at)
    idx = torch.randint(0, 5000, (4, 256), device="cuda")
    F_loss = lambda: F.cross_entropy(model(idx)[:, :-1].reshape(-1, 5000), idx[:, 1:].reshape(-1))
    # warm-up: kernels compiled, caches filled; before several micro-batches, a graph captured too
    # (its capture's host time is not a step's)
    for _ in range(1 if micro == 1 else 3):
        F_loss().backward()
    torch.cuda.synchronize()
    waits = []
    real_wait = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda ev: (waits.append(1), real_wait(ev))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda._sleep(100_000_000)  # tens of ms: a read in this step has to wait for it
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(micro):
                F_loss().backward()
            busy = not torch.cuda.current_stream().query()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    none = auto_at is not None or options.get("min_tokens_ratio", 1.0) < 1.0
    assert len(syncs) + len(waits) == (0 if none else 1), ([f"{w.filename}:{w.lineno}" for w in syncs], len(waits))
    if none:
        assert busy, "the step waited for the device"


@pytest.mark.parametrize(
    "options",
    [
        dict(selection="topk"),
        dict(selection="stratified", num_strata=7),
        dict(selection="sequence_aware", min_tokens_per_sequence=3),
        dict(selection="importance", scoring="gradnorm"),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_dynamic_threshold_on_the_device_is_the_read_path_on_cuda(options, reduction, monkeypatch):
    """At the shipped launch shapes (several partial rows, graphs captured from the third call):
    call after call the dynamic ratio computed on the device selects what the path that reads the
    sums selects, with the same loss and gradient (bit for bit but importance's mean, whose sum
    runs in another order), and leaves the same running confidence."""
    from cggr_hook import capture, pipeline

    V = 2003
    batches = []
    for i, scale in enumerate([2.0, 2.5, 1.5, 3.0, 1.8, 2.2, 1.2]):  # confidence up and down
        g = torch.Generator(device="cuda").manual_seed(i)
        x = (torch.randn(3, 1500, V, device="cuda", generator=g) * scale).to(torch.bfloat16)
        t = torch.randint(0, V, (3, 1500), device="cuda", generator=g)
        t[:, : 200 * (i % 3)] = -100
        batches.append((x, t))
    real = pipeline.at_ratio
    runs = []
    for path in ("device", "read"):
        monkeypatch.setattr(pipeline, "at_ratio", real if path == "device" else (lambda *a: False))
        crit = CGGRLoss(min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=True, reduction=reduction, **options)
        calls = []
        for x, t in batches:
            x = x.clone().requires_grad_()
            loss = crit(x, t)
            loss.backward()
            calls.append((loss.detach(), x.grad, crit.get_metrics()))
        runs.append((calls, crit.scheduler.state_dict()["confidence_avg"]))
    (dev, avg_dev), (host, avg_host) = runs
    assert avg_dev == avg_host
    exact = options["selection"] != "importance"
    ratios = set()
    for (l_d, g_d, m_d), (l_h, g_h, m_h) in zip(dev, host):
        assert (m_d["tokens_total"], m_d["tokens_selected"]) == (m_h["tokens_total"], m_h["tokens_selected"])
        torch.testing.assert_close(l_d, l_h, rtol=0 if exact else 1e-6, atol=0)
        torch.testing.assert_close(g_d, g_h, rtol=0 if exact else 1e-2, atol=0 if exact else 1e-6)
        ratios.add(m_h["token_ratio"])
    assert len(ratios) >= 3, "the batches did not move the ratio"
    assert capture.count() >= 1  # the device path replayed a graph


def test_the_dynamic_threshold_across_streams_and_a_pickled_loss_on_cuda():
    """Calls of one gate alternating between two CUDA streams (each behind a sleep) keep the
    running confidence that calls on one stream keep: each waits for the other stream's update.
    A CGGRLoss whose last figures are still on the device pickles and copies, with those figures
    read."""
    import pickle

    V = 3001
    batches = []
    for i, scale in enumerate([2.0, 2.5, 1.5, 3.0, 1.8, 2.2]):
        g = torch.Generator(device="cuda").manual_seed(i)
        x = (torch.randn(2048, V, device="cuda", generator=g) * scale).to(torch.bfloat16)
        batches.append((x, torch.randint(0, V, (2048,), device="cuda", generator=g)))
    options = dict(selection="topk", min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=True)
    one = CGGRLoss(**options)
    for x, t in batches:
        one(x, t)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    two = CGGRLoss(**options)
    for i, (x, t) in enumerate(batches):
        s = streams[i % 2]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000 if i % 2 == 0 else 1)  # the first stream's update comes late
            two(x, t)
    torch.cuda.synchronize()
    assert two.scheduler.confidence_avg == one.scheduler.confidence_avg
    crit = CGGRLoss(**options)
    crit(*batches[0])
    assert any(k.startswith("_") for k in crit._metrics)  # figures still on the device
    copy_ = pickle.loads(pickle.dumps(crit))
    assert copy_.get_metrics() == crit.get_metrics()
    assert copy.deepcopy(crit).get_metrics() == crit.get_metrics()


def test_fixed_ratio_forward_does_not_wait_for_the_scoring_pass():
    """With a ratio that does not depend on the logits, the host reads nothing: the forward over 4 GB
    of logits returns while the device is still busy with the work queued before it (a scoring pass
    alone can finish within the call's host time, so the call is queued behind a sleep)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 128256, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randint(0, 128256, (16384,), device="cuda", generator=g)
    crit = CGGRLoss(min_tokens_ratio=0.25, **FIXED)
    crit(x, t)  # compiled and warm
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # tens of ms ahead of the call: a read in it would wait them out
    crit(x, t)
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "the forward waited for the device"
    m = crit.get_metrics()  # the averages were left on the device and are read now
    assert m["tokens_selected"] == round(0.25 * 16384) and 0.0 < m["avg_confidence"] < 1.0
    assert "_sums" not in m


def test_importance_at_a_fixed_ratio_waits_for_nothing_forward_or_backward():
    """Importance sampling at a fixed ratio counts n and k on the device: the forward and the
    backward are queued while the device still sleeps ahead of them, with the previous
    call's target check still pending; the figures are read when asked for."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 128256, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    t = torch.randint(0, 128256, (16384,), device="cuda", generator=g)
    t[::7] = -100
    crit = CGGRLoss(scoring="gradnorm", selection="importance", min_tokens_ratio=0.25, **FIXED)
    crit(x, t).backward()  # compiled and warm
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda._sleep(100_000_000)  # tens of ms ahead of the step: a read in it would wait them out
    crit(x, t).backward()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "the forward or the backward waited for the device"
    n = int((t >= 0).sum())
    m = crit.get_metrics()
    assert (m["tokens_total"], m["tokens_selected"]) == (n, cggr_hook.kernels.spec.keep_count(0.25, n))
    assert m["ess"] > 1 and 0.0 < m["avg_confidence"] < 1.0
    drawn = (x.grad.float().abs().sum(-1) > 0).sum()
    assert int(drawn) == m["tokens_selected"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hf_llama_gated_on_cuda_under_autocast(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=3001,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda().train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 3001, (2, 129), device="cuda")
    cggr_hook.enable(model, **TOPK25)
    with torch.autocast("cuda", dtype=dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.autocast("cuda", dtype=dtype):
        X = ref(input_ids=ids).logits.float()[:, :-1].reshape(-1, 3001)
    t = ids[:, 1:].reshape(-1)
    rows = reference_topk_rows(X.detach().cpu(), t.cpu(), 0.25).cuda()
    expected = masked_reference_loss(X, t, rows)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    w, w_ref = model.get_output_embeddings().weight.grad, ref.get_output_embeddings().weight.grad
    assert (w - w_ref).norm() / w_ref.norm() < 2e-2


def test_compiled_model_matches_eager_without_recompiling():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(vocab=1000, dim=64).cuda()
    ref = copy.deepcopy(model)
    cggr_hook.enable(model, **TOPK25)
    cggr_hook.enable(ref, **TOPK25)
    compiled = torch.compile(model)
    counts = []
    for _ in range(3):
        idx = torch.randint(0, 1000, (4, 65), device="cuda")
        la = F.cross_entropy(compiled(idx)[:, :-1].reshape(-1, 1000), idx[:, 1:].reshape(-1))
        lb = F.cross_entropy(ref(idx)[:, :-1].reshape(-1, 1000), idx[:, 1:].reshape(-1))
        la.backward(), lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-3, atol=1e-5)
    assert counts[-1] == counts[0], counts  # no new graph after the first step


@pytest.mark.parametrize("mode", ["combined", "margin", "loss", "random"])
def test_difficulty_and_loss_kernels_match_reference_on_cuda(mode):
    """On the GPU the difficulty is bit-identical to the reference (launched without FMA
    contraction, so both backends rank rows the same) and the selected rows' loss agrees."""
    from cggr_hook import kernels as K
    from cggr_hook.kernels import reference

    g = torch.Generator(device="cuda").manual_seed(1)
    N, V = 8191, 4099
    x = (torch.randn(1, N, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100
    w = torch.rand(V, device="cuda", generator=g) + 0.5
    stats = K.row_stats(x, t, -100, w, with_wsum=True)
    noise = torch.rand(N, device="cuda", generator=g)
    d, part = K.row_difficulty(stats, t, V, -100, mode, noise)
    d_ref, part_ref = reference.row_difficulty(stats, t, V, -100, mode, noise)
    assert torch.equal(d, d_ref)
    torch.testing.assert_close(part.sum(0), part_ref.sum(0), rtol=1e-9, atol=1e-6)
    rank = torch.empty(N, dtype=torch.long, device="cuda")
    rank.scatter_(0, torch.sort(d, descending=True, stable=True).indices, torch.arange(N, device="cuda"))
    n_valid = int((t != -100).sum())
    k = n_valid // 4
    for reduction in ("mean", "sum", "none"):
        got = K.selected_loss(stats, t, V, rank, k, k, n_valid, reduction, 0.1, w)
        want = reference.selected_loss(stats, t, V, rank, k, k, n_valid, reduction, 0.1, w)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("dynamic", [False, True])
def test_tensors_on_a_device_that_is_not_current(dynamic, monkeypatch):
    """Logits on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and the host read
    waits on cuda:1's stream; loss and gradient equal the reference backend's."""
    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda:1").manual_seed(3)
    logits = (torch.randn(4, 1023, 32000, device="cuda:1", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 32000, (4, 1023), device="cuda:1", generator=g)
    targets[:, :40] = -100
    out = both_backends(monkeypatch, logits, targets, min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=dynamic)
    assert torch.cuda.current_device() == 0
    (lt, gt, mt), (lr, gr, mr) = out["triton"], out["torch"]
    assert mt["tokens_total"] == mr["tokens_total"] == int((targets != -100).sum())
    assert mt["tokens_selected"] == mr["tokens_selected"]
    torch.testing.assert_close(lt, lr, rtol=1e-4, atol=1e-4)
    assert int(((gt.reshape(-1, 32000).abs().sum(-1) > 0) ^ (gr.reshape(-1, 32000).abs().sum(-1) > 0)).sum()) <= 2


def test_lazy_averages_follow_the_stream_that_computed_them():
    """A fixed-ratio call on a side stream, its metrics read from the default stream at once: the
    averages are those of the call (the read is ordered after the kernels that wrote them). A call
    on other logits runs just before, so a read that raced the kernels would find that call's sums
    (or zeros) in the reused buffer."""
    g = torch.Generator(device="cuda").manual_seed(2)
    # 32768 rows: a ~3 ms scoring pass, far longer than the host's work after its one wait
    x = (torch.randn(32768, 128256, device="cuda", generator=g) * 2).to(torch.bfloat16)
    t = torch.randint(0, 128256, (32768,), device="cuda", generator=g)
    t[::9] = -100
    crit = CGGRLoss(min_tokens_ratio=0.25, **FIXED)
    crit(x, t)
    torch.cuda.synchronize()
    want = crit.get_metrics()
    crit(x * 0.25, t)  # other figures, left in the buffer the next call reuses
    torch.cuda.synchronize()
    other = crit.get_metrics()
    assert other["avg_confidence"] != pytest.approx(want["avg_confidence"], rel=1e-3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        crit(x, t)
    got = crit.get_metrics()  # outside the side stream, without synchronising first
    torch.cuda.synchronize()
    for key in ("avg_confidence", "avg_entropy", "avg_difficulty"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_importance_sampling_matches_torch_backend_on_cuda(monkeypatch, V, reduction):
    """gradnorm + importance at full size: the same k rows drawn by both backends (scores equal up
    to an ulp, so a draw may differ only where a point falls within rounding of a boundary) and
    the same Horvitz-Thompson loss and gradient rows."""
    g = torch.Generator(device="cuda").manual_seed(V + 1)
    logits = (torch.randn(4, 1023, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (4, 1023), device="cuda", generator=g)
    targets[:, :50] = -100
    out = both_backends(
        monkeypatch,
        logits,
        targets,
        scoring="gradnorm",
        selection="importance",
        min_tokens_ratio=0.25,
        label_smoothing=0.1,
        reduction=reduction,
        **FIXED,
    )
    (lt, gt, mt), (lr, gr, mr) = out["triton"], out["torch"]
    assert mt["tokens_selected"] == mr["tokens_selected"] == round(0.25 * 4 * 973)
    assert mt["ess"] == pytest.approx(mr["ess"], rel=1e-3)
    sel_t = gt.reshape(-1, V).abs().sum(-1) > 0
    sel_r = gr.reshape(-1, V).abs().sum(-1) > 0
    assert int(sel_t.sum()) == mt["tokens_selected"] and int((sel_t ^ sel_r).sum()) <= 2
    assert not bool(sel_t.reshape(4, 1023)[:, :50].any())
    torch.testing.assert_close(lt, lr, rtol=5e-3, atol=1e-3)
    both = sel_t & sel_r
    torch.testing.assert_close(gt.reshape(-1, V)[both].float(), gr.reshape(-1, V)[both].float(), rtol=2e-2, atol=1e-5)


def test_gradnorm_difficulty_matches_reference_on_cuda():
    from cggr_hook import kernels as K
    from cggr_hook.kernels import reference

    g = torch.Generator(device="cuda").manual_seed(2)
    N, V = 8191, 4099
    x = (torch.randn(1, N, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100
    stats = K.row_stats(x, t, -100, with_p2=True)
    want_stats = reference.row_stats(x, t, -100, with_p2=True)
    torch.testing.assert_close(stats.p2sum, want_stats.p2sum, rtol=2e-5, atol=1e-7)
    d, _ = K.row_difficulty(stats, t, V, -100, "gradnorm", None, 0.1)
    d_ref, _ = reference.row_difficulty(stats, t, V, -100, "gradnorm", None, 0.1)
    torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=1e-7)


def test_fsdp2_world_size_one_runs_the_head_backward_over_the_selected_rows():
    """FSDP2 over NCCL on one GPU: the gated head backward gathers the resharded head weight again
    and multiplies the selected rows only (tests/dist/worker.py checks the matmul shapes and the
    gradients against the reference), with the head in its own group and tied to the embedding."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).parent / "dist" / "worker.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(port),
            str(worker),
            "fsdp",
            "fsdp_tied",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fsdp ok (cuda" in proc.stdout and "fsdp_tied ok (cuda" in proc.stdout


def test_default_gate_times_both_full_token_paths_on_the_device():
    """The default (every token, ``plain_when_faster``) on a CUDA model: a window of the gate's
    kernels then the plain loss, timed by events on the device's stream, read at the decision;
    every step's loss is the plain loss."""
    from cggr_hook import auto

    torch.manual_seed(0)
    model = TinyLM(vocab=5000, dim=64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    key = cggr_hook.enable(model).key
    idx = torch.randint(0, 5000, (4, 256), device="cuda")
    with torch.no_grad():
        plain = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 5000), idx[:, 1:].reshape(-1))
    for _ in range(2 * auto.PROBE_STEPS + 1):
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 5000), idx[:, 1:].reshape(-1))
        torch.testing.assert_close(loss.detach(), plain, rtol=1e-5, atol=1e-5)
        loss.backward()
        opt.step()
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert state.decisions == 1 and state.device.type == "cuda" and state._marked == []
    assert set(state.step_seconds) == {1.0, auto.PLAIN} and all(0 < t < 1 for t in state.step_seconds.values())
    assert state.choice in (1.0, auto.PLAIN)
