"""End-to-end checks that need a CUDA device (skipped elsewhere; run on the GPU machine)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import cggr_hook
from cggr_hook import CGGRLoss

from common import TinyLM, masked_reference_loss, reference_topk_rows

pytestmark = pytest.mark.gpu
FIXED = dict(warmup_steps=0, dynamic_threshold=False)


@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_loss_matches_torch_backend_on_cuda(monkeypatch, V, reduction):
    g = torch.Generator(device="cuda").manual_seed(V)
    logits = (torch.randn(4, 1023, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (4, 1023), device="cuda", generator=g)
    targets[:, :50] = -100
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CGGR_HOOK_BACKEND", backend)
        x = logits.clone().requires_grad_()
        crit = CGGRLoss(min_tokens_ratio=0.25, label_smoothing=0.1, reduction=reduction, **FIXED)
        loss = crit(x, targets)
        loss.backward()
        out[backend] = (loss.detach(), x.grad, crit.get_metrics())
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


def test_one_host_sync_per_gated_step():
    model = TinyLM(vocab=5000, dim=64).cuda()
    cggr_hook.enable(model, warmup_steps=0, selection="sequence_aware")
    idx = torch.randint(0, 5000, (4, 256), device="cuda")
    F_loss = lambda: F.cross_entropy(model(idx)[:, :-1].reshape(-1, 5000), idx[:, 1:].reshape(-1))
    F_loss().backward()  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            F_loss().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, [f"{w.filename}:{w.lineno}" for w in syncs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hf_llama_gated_on_cuda_under_autocast(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=3001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda().train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 3001, (2, 129), device="cuda")
    cggr_hook.enable(model, **FIXED)
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
    cggr_hook.enable(model, **FIXED)
    cggr_hook.enable(ref, **FIXED)
    compiled = torch.compile(model)
    counts = []
    for step in range(3):
        idx = torch.randint(0, 1000, (4, 65), device="cuda")
        la = F.cross_entropy(compiled(idx)[:, :-1].reshape(-1, 1000), idx[:, 1:].reshape(-1))
        lb = F.cross_entropy(ref(idx)[:, :-1].reshape(-1, 1000), idx[:, 1:].reshape(-1))
        la.backward(), lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-3, atol=1e-5)
    assert counts[-1] == counts[0], counts  # no new graph after the first step
