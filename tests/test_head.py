"""Finding the LM head and tracing a loss input back to it (head.py), on real model families."""

from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cggr_hook
from cggr_hook import head as head_mod
from cggr_hook import trace as trace_mod

from common import TinyLM, check_gated_gradients, masked_reference_loss, reference_topk_rows

transformers = pytest.importorskip("transformers")
# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
ORIGINAL_CE = F.cross_entropy


def _hf(family: str, vocab: int = 61):
    T = transformers
    torch.manual_seed(0)
    small = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if family == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = T.GPT2LMHeadModel(cfg)
    elif family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**small, tie_word_embeddings=False))
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**small))
    elif family == "gemma":  # tied embeddings
        model = T.GemmaForCausalLM(T.GemmaConfig(**small, head_dim=8))
    elif family == "gemma3":
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**small, head_dim=8))
    else:
        raise AssertionError(family)
    return model.train()


FAMILIES = ["gpt2", "llama", "qwen2", "gemma", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_head_is_found(family):
    model = _hf(family)
    gate = cggr_hook.enable(model)
    assert gate.head is model.get_output_embeddings()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_items", [False, True])
def test_hf_labels_loss_is_gated_with_exact_gradients(family, num_items):
    """Hugging Face's own loss (fp32 upcast, label shift, flatten; reduction='sum' with
    num_items_in_batch) gives the masked reference's loss and every parameter's gradient."""
    model = _hf(family)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    cggr_hook.enable(model, **FIXED, min_tokens_ratio=0.3)
    kw = {}
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    n_valid = int((shifted != -100).sum())
    if num_items:
        kw["num_items_in_batch"] = torch.tensor(n_valid + 5)
    out = model(input_ids=ids, labels=labels, **kw)
    assert (
        "GatedHead" in type(out.loss.grad_fn.next_functions[0][0]).__name__
        or "GatedHead" in type(out.loss.grad_fn).__name__
    )
    out.loss.backward()

    X = ref(input_ids=ids).logits.float().reshape(-1, 61)
    rows = reference_topk_rows(X.detach(), shifted, 0.3)
    if num_items:
        expected = masked_reference_loss(X, shifted, rows, "sum") / (n_valid + 5)
    else:
        expected = masked_reference_loss(X, shifted, rows, "mean")
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert cggr_hook.metrics()["tokens_total"] == n_valid


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_hf_eval_loss_is_plain(family):
    model = _hf(family)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 61, (2, 9))
    cggr_hook.enable(model, **FIXED)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)


def test_nanogpt_sequential_and_vocab_width_heads():
    tiny = TinyLM()
    assert cggr_hook.enable(tiny).head is tiny.lm_head
    seq = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30))
    assert cggr_hook.enable(seq).head is seq[2]

    class Custom(nn.Module):  # no lm_head name: found as the Linear of vocabulary width
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(40, 8)
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 40)

        def forward(self, x):
            return self.out(self.proj(self.tok(x)))

    c = Custom()
    assert cggr_hook.enable(c).head is c.out


def test_head_override_by_module_and_name():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.lm_head = nn.Linear(8, 20)
            self.decoder = nn.ModuleDict({"vocab": nn.Linear(8, 20)})

    m = TwoHeads()
    assert cggr_hook.enable(m).head is m.lm_head
    cggr_hook.disable(m)
    assert cggr_hook.enable(m, head="decoder.vocab").head is m.decoder["vocab"]
    cggr_hook.disable(m)
    assert cggr_hook.enable(m, head=m.decoder["vocab"]).head is m.decoder["vocab"]
    with pytest.raises(ValueError, match="already gated on another head"):
        cggr_hook.enable(m, head=m.lm_head)
    cggr_hook.disable(m)
    with pytest.raises(ValueError, match="head="):
        cggr_hook.enable(m, head="decoder.nothing")
    with pytest.raises(ValueError, match="nn.Linear"):
        cggr_hook.enable(m, head=m.emb)


def test_model_without_head_is_a_clear_error_and_installs_nothing():
    body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="head="):
        cggr_hook.enable(body)
    assert F.cross_entropy is ORIGINAL_CE
    assert not body[0]._forward_hooks


def test_compiled_model_shares_the_gate():
    model = TinyLM()
    compiled = torch.compile(model)  # not run: finding the head needs no compilation
    gate = cggr_hook.enable(compiled)
    assert gate.head is model.lm_head
    assert cggr_hook.enable(model) is gate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_model_is_gated():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = TinyLM()
        ref = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        gate = cggr_hook.enable(ddp, **FIXED)
        assert gate.head is model.lm_head
        idx = torch.randint(0, 37, (2, 9))
        logits = ddp(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        loss.backward()
        X = ref(idx)[:, :-1].reshape(-1, 37)
        t = idx[:, 1:].reshape(-1)
        expected = masked_reference_loss(X, t, reference_topk_rows(X.detach(), t, 0.25))
        expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad)
    finally:
        cggr_hook.disable()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# trace: which loss inputs map back to the head, and how rows map
# --------------------------------------------------------------------------------------------------
def _tapped(B=2, T=6, V=11, dtype=torch.float32):
    h = torch.randn(B, T, 4, requires_grad=True)
    lin = nn.Linear(4, V).to(dtype)
    out = lin(h.to(dtype))
    call = head_mod.HeadCall(gate_id=None, head=lin, hidden=h, output=out)
    return head_mod.tap_output(call), call


def test_trace_maps_rows_through_shifts_casts_and_transposes():
    logits, call = _tapped()
    rows = torch.arange(12).view(2, 6)
    cases = [
        (logits[:, :-1].reshape(-1, 11), 1, rows[:, :-1].reshape(-1)),
        (logits[:, 1:].contiguous().view(-1, 11), 1, rows[:, 1:].reshape(-1)),
        (logits.transpose(1, 2), 1, rows.reshape(-1)),
        (logits[1], 1, rows[1]),
        (logits[:, ::2].flatten(0, 1), 1, rows[:, ::2].reshape(-1)),
        (logits[0, 3], 0, rows[0, 3].reshape(-1)),
    ]
    for x, class_dim, expected in cases:
        tr = trace_mod.trace(x, class_dim)
        assert tr is not None and tr.call is call
        assert torch.equal(tr.rows, expected), (x.shape, tr.rows, expected)
        assert tr.exact and not tr.identity


def test_trace_of_the_head_rows_in_order_builds_no_row_map():
    """Casts, copies and reshapes that keep the vocabulary last leave loss row i at head row i: the
    trace says so instead of building the map (one launch, and the route's targets scatter, fewer)."""
    logits, call = _tapped()
    for x in (
        logits,
        logits.float(),
        logits.float().view(-1, 11),
        logits.reshape(12, 11).clone(),
        logits[None],
        logits[None].squeeze(0),
    ):
        tr = trace_mod.trace(x, x.dim() - 1)
        assert tr is not None and tr.call is call and tr.identity and tr.rows is None and tr.exact
    # the same rows through a transpose (class dim 1 of (B, V, T)) or a slice are mapped row by row
    assert trace_mod.trace(logits.transpose(1, 2), 1).rows is not None
    assert trace_mod.trace(logits[:, 1:], 2).rows is not None


def test_trace_rejects_what_is_not_the_heads_logits():
    logits, _ = _tapped()
    assert trace_mod.trace((logits * 2).view(-1, 11), 1) is None  # rescaled
    assert trace_mod.trace(logits[..., :5].reshape(-1, 5), 1) is None  # part of the vocabulary
    assert trace_mod.trace(logits.reshape(2, -1), 1) is None  # vocabulary mixed with time
    assert trace_mod.trace(logits.transpose(1, 2), 2) is None  # class dim is not the vocabulary
    assert trace_mod.trace(torch.randn(3, 11, requires_grad=True) * 1, 1) is None
    lossy, _ = _tapped(dtype=torch.float32)
    assert not trace_mod.trace(lossy.to(torch.bfloat16).view(-1, 11), 1).exact


def test_lossy_cast_keeps_the_plain_loss_with_a_warning():
    model = TinyLM()
    from cggr_hook.registry import registry

    registry.reset()
    cggr_hook.enable(model, **FIXED)
    idx = torch.randint(0, 37, (2, 7))
    x = model(idx).to(torch.bfloat16).reshape(-1, 37)
    with pytest.warns(RuntimeWarning, match="lossy cast"):
        loss = F.cross_entropy(x, idx.reshape(-1))
    assert torch.equal(loss, ORIGINAL_CE(x, idx.reshape(-1)))


def test_hf_loss_skips_the_fp32_copy_while_gated_and_is_restored(monkeypatch):
    """While gated, Hugging Face's loss runs on the logits' own dtype (no fp32 copy of the whole
    logits); eval keeps Hugging Face's own function; disable() restores the model's loss_function."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = _hf("llama")
    ref = copy.deepcopy(model)
    assert model.loss_function is ForCausalLMLoss
    cggr_hook.enable(model, **FIXED)
    assert model.loss_function is not ForCausalLMLoss
    seen = []
    real_trace = trace_mod.trace
    monkeypatch.setattr(trace_mod, "trace", lambda x, d: seen.append(x.dtype) or real_trace(x, d))
    ids = torch.randint(0, 61, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert seen == [torch.bfloat16]  # the loss input is the head's bf16 logits, not an fp32 copy
    assert "GatedHead" in type(out.loss.grad_fn).__name__ and out.loss.dtype == torch.float32
    # same value as gating Hugging Face's own fp32 path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        X = ref(input_ids=ids).logits.float()[:, :-1].reshape(-1, 61)
    t = ids[:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, masked_reference_loss(X, t, reference_topk_rows(X.detach(), t, 0.25)))
    model.eval()
    with torch.no_grad():
        seen.clear()
        model(input_ids=ids, labels=ids)
    assert seen == []  # eval: Hugging Face's own loss, not even offered to the gate
    cggr_hook.disable(model)
    assert model.loss_function is ForCausalLMLoss
    assert "_loss_function" not in model.__dict__


def test_trace_with_negative_dims_and_squeeze():
    """Autograd saves negative dims as unsigned numbers: the replay must read them as negative."""
    logits, call = _tapped(B=3, T=3, V=11)  # B == T: a wrong axis would still pass the shape check
    rows = torch.arange(9).view(3, 3)
    cases = [
        (logits.select(-3, 0), 1, rows[0]),
        (logits.select(-2, 1), 1, rows[:, 1]),
        (logits.transpose(-1, -2), 1, rows.reshape(-1)),
        (logits.narrow(-2, 1, 2).reshape(-1, 11), 1, rows[:, 1:].reshape(-1)),
        (logits[:1].squeeze(0), 1, rows[0]),
        (logits[:, :1].squeeze(), 1, rows[:, 0]),
        (logits[:1, :, None].squeeze((0, 2)), 1, rows[0]),
        (logits.unsqueeze(-2).squeeze(-2)[:, 1:].reshape(-1, 11), 1, rows[:, 1:].reshape(-1)),
        (logits[:, 1:].unsqueeze(-2).squeeze(-2).reshape(-1, 11), 1, rows[:, 1:].reshape(-1)),
    ]
    for x, class_dim, expected in cases:
        tr = trace_mod.trace(x, class_dim)
        assert tr is not None, x.grad_fn
        assert torch.equal(tr.rows, expected), (x.grad_fn, tr.rows, expected)
    # without the slice, the same unsqueeze and squeeze keep the head rows in order
    assert trace_mod.trace(logits.unsqueeze(-2).squeeze(-2).reshape(-1, 11), 1).identity


# --------------------------------------------------------------------------------------------------
# heads whose forward is not the plain affine map: the gradient goes through the logits
# --------------------------------------------------------------------------------------------------
class HalfLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: logits = (h W^T + b) / 2."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 0.5


class WithHead(nn.Module):
    """TinyLM's body with any head module."""

    def __init__(self, head: nn.Module, vocab: int = 37, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = head

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.mix(self.emb(idx))))


def _with_head(make_head):
    def make():
        torch.manual_seed(0)
        return WithHead(make_head()).train()

    return make


def _call(model, ids):
    return model(ids)


IDS = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_linear_subclass_with_its_own_forward_gets_exact_gradients(ratio):
    """Before: the selected-rows backward assumed logits = h W^T, so every gradient was 2x."""
    check_gated_gradients(_with_head(lambda: HalfLinear(16, 37)), _call, IDS, ratio, 37, head_route="logits")


def test_plain_linear_and_subclass_keeping_its_forward_take_the_head_route():
    class Tagged(nn.Linear):  # a subclass that keeps nn.Linear's forward
        pass

    for make in (lambda: nn.Linear(16, 37), lambda: Tagged(16, 37), lambda: nn.Linear(16, 37, bias=True)):
        check_gated_gradients(_with_head(make), _call, IDS, 0.3, 37, head_route="head")


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_parametrized_weight_norm_head_gets_exact_gradients(ratio):
    from torch.nn.utils.parametrizations import weight_norm

    check_gated_gradients(
        _with_head(lambda: weight_norm(nn.Linear(16, 37))), _call, IDS, ratio, 37, head_route="logits"
    )


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_old_style_weight_norm_head_takes_the_head_route_with_exact_gradients(ratio):
    """torch.nn.utils.weight_norm computes the weight in a forward pre-hook: the gate reads the
    weight the forward used, and the gradient reaches weight_g and weight_v."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        grads = check_gated_gradients(
            _with_head(lambda: torch.nn.utils.weight_norm(nn.Linear(16, 37))), _call, IDS, ratio, 37, head_route="head"
        )
    assert {"lm_head.weight_g", "lm_head.weight_v"} <= set(grads)


def test_head_replaced_on_the_instance_goes_through_the_logits():
    def make():
        lin = nn.Linear(16, 37)
        lin.forward = lambda x: F.linear(x, lin.weight, lin.bias) * 3.0
        return lin

    check_gated_gradients(_with_head(make), _call, IDS, 0.5, 37, head_route="logits")


def test_hook_that_changes_the_heads_output_before_the_tap_goes_through_the_logits():
    """A global forward hook runs before the head's own hooks: the output the tap sees is not the
    affine map any more, so the call takes the route through the logits."""
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: out * 2.0 if isinstance(m, nn.Linear) and m.out_features == 37 else None
    )
    try:
        check_gated_gradients(_with_head(lambda: nn.Linear(16, 37)), _call, IDS, 0.5, 37, head_route="logits")
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# which module is the head
# --------------------------------------------------------------------------------------------------
def test_head_that_is_not_part_of_the_model_is_an_error():
    model = TinyLM()
    stray = nn.Linear(16, 37)
    with pytest.raises(ValueError, match="head=.*not a submodule of TinyLM"):
        cggr_hook.enable(model, head=stray)
    assert F.cross_entropy is ORIGINAL_CE and not stray._forward_hooks
    assert cggr_hook.enable(model).head is model.lm_head  # nothing of the failed call stayed


class NanoGPT(nn.Module):
    """nanoGPT-shaped, with the head written as F.linear(h, wte.weight) (no head module) and an MLP
    whose up-projection has the vocabulary's width."""

    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, dim),
                h=nn.ModuleList(
                    nn.ModuleDict(dict(c_fc=nn.Linear(dim, 4 * dim), c_proj=nn.Linear(4 * dim, dim)))
                    for _ in range(layers)
                ),
            )
        )

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for blk in self.transformer.h:
            x = x + blk.c_proj(F.gelu(blk.c_fc(x)))
        return F.linear(x, self.transformer.wte.weight)


def test_layer_projection_of_vocabulary_width_is_not_taken_for_the_head():
    """Before: c_fc (Linear(64, 256), V = 256) was gated and training ran on the plain loss."""
    with pytest.raises(ValueError, match=r"sit inside stacks of layers") as e:
        cggr_hook.enable(NanoGPT())
    msg = str(e.value)
    assert "transformer.h.0.c_fc" in msg
    # no head module: the fix names CGGRLoss and a Linear head sharing the embedding's weight
    assert "CGGRLoss" in msg and "self.lm_head.weight = self.transformer.wte.weight" in msg
    assert F.cross_entropy is ORIGINAL_CE


def test_model_without_head_module_points_to_cggrloss_and_a_shared_weight_head():
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 8)
            self.mix = nn.Linear(8, 8)

        def forward(self, idx):
            return torch.tanh(self.mix(self.wte(idx))) @ self.wte.weight.T

    with pytest.raises(ValueError, match="head=") as e:
        cggr_hook.enable(NoHead())
    assert "cggr_hook.CGGRLoss" in str(e.value) and "self.lm_head.weight = self.wte.weight" in str(e.value)


def test_several_vocabulary_width_candidates_ask_for_head():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(40, 8)
            self.out = nn.Linear(8, 40)
            self.aux = nn.Linear(8, 40)

    with pytest.raises(ValueError, match=r"several modules of vocabulary width 40 .*'out', 'aux'.*head="):
        cggr_hook.enable(Two())
    m = Two()
    assert cggr_hook.enable(m, head="aux").head is m.aux


def test_gated_module_that_is_not_the_head_warns_that_it_is_not():
    """A module named as the head whose output reaches the loss through further layers: the loss
    is plain, and the warning says the module is not the head (not that the logits were rescaled)."""
    model = NanoGPT(layers=1)
    cggr_hook.enable(
        model, head="transformer.h.0.c_fc", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False
    )
    idx = torch.randint(0, 256, (2, 9))
    with pytest.warns(RuntimeWarning, match="is not the one that produces the logits"):
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1))
    assert type(loss.grad_fn).__name__.startswith("Nll")


# --------------------------------------------------------------------------------------------------
# the head backward over every head row or over the selected rows
# --------------------------------------------------------------------------------------------------
class _BiasHead(nn.Module):
    def __init__(self, D: int, V: int):
        super().__init__()
        self.lm_head = nn.Linear(D, V, bias=True)


_SPECS = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smoothing": dict(label_smoothing=0.1),
    "weight": dict(weight=True),
}
# 512 or 514 head rows: dense up to 2 rows left out. Every case on the torch backend, the paths'
# corners on Triton (its interpreter is slow on the CPU)
_HEAD_BACKWARD_CASES = [
    pytest.param(n, shifted, _SPECS[name], "torch", id=f"torch-{name}-{'shifted' if shifted else 'rows'}-{n}")
    for n in (0, 2, 40)
    for shifted in (False, True)
    for name in _SPECS
] + [
    pytest.param(n, shifted, _SPECS[name], "triton", id=f"triton-{name}-{'shifted' if shifted else 'rows'}-{n}")
    for n, shifted, name in [(0, False, "none"), (0, True, "smoothing"), (40, True, "weight"), (2, False, "sum")]
    + [(2, False, "weight")]
]


@pytest.mark.parametrize("n_ignored, shifted, spec, backend", _HEAD_BACKWARD_CASES)
def test_head_backward_over_every_row_or_the_selected_rows_equals_the_plain_gradient(
    monkeypatch, n_ignored, shifted, spec, backend
):
    """At a ratio of 1.0 the head's gradients (hidden, weight, bias) equal the plain loss's, whether
    the backward runs over every head row (the selection leaves out at most one row in 256, on
    Triton) or gathers the selected rows; which one ran is checked. Both kernel backends (Triton under its
    interpreter without a GPU)."""
    from cggr_hook import functions, kernels

    kernels.force_backend(backend)

    B, T, D, V = 2, 256 + shifted, 8, 23
    torch.manual_seed(n_ignored)
    head = _BiasHead(D, V)
    ref = copy.deepcopy(head)
    h = torch.randn(B, T, D, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_()
    ids = torch.randint(0, V, (B, T))
    kw = dict(spec)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(V) + 0.5
    cggr_hook.enable(head, min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
    ran = []
    for name in ("ce_grad_dense_", "ce_grad_rows"):
        original = getattr(kernels, name)
        monkeypatch.setattr(
            functions.kernels, name, lambda *a, _f=original, _n=name, **k: ran.append(_n) or _f(*a, **k)
        )

    def loss_of(module, hidden, ce):
        logits = module.lm_head(hidden)
        if shifted:  # a causal LM's shift: the loss rows are a map of the head rows
            x, t = logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1).clone()
        else:
            x, t = logits.reshape(-1, V), ids.reshape(-1).clone()
        t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(1))[:n_ignored]] = -100
        loss = ce(x, t, **kw)
        return loss.sum() * 0.5 if loss.dim() else loss * 0.5  # a grad_output that is not 1

    try:
        gated = loss_of(head, h, F.cross_entropy)
        node, names = gated.grad_fn, []
        while node is not None and len(names) < 5:  # the scaling and the sum, then the gated loss
            names.append(type(node).__name__)
            node = node.next_functions[0][0] if node.next_functions else None
        assert "GatedHeadCrossEntropyBackward" in names, names
        gated.backward()
    finally:
        cggr_hook.disable(head)
    expected = loss_of(ref, h_ref, ORIGINAL_CE)
    expected.backward()
    left_out = n_ignored + (B if shifted else 0)  # head rows no loss row reads: each sequence's last
    # over every row on Triton only: the torch backend's dense gradient is slower than its rows
    dense = backend == "triton" and left_out <= B * T // 256
    assert ran == (["ce_grad_dense_"] if dense else ["ce_grad_rows"])
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.lm_head.bias.grad, ref.lm_head.bias.grad, rtol=1e-5, atol=1e-6)
    if n_ignored:  # the rows of ignored targets get exact zeros either way
        assert (h.grad.reshape(-1, D)[h_ref.grad.reshape(-1, D).abs().sum(-1) == 0] == 0).all()


@pytest.mark.parametrize("through_logits", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gated_head_loss_can_be_modified_in_place_as_the_plain_one(through_logits, reduction):
    """`loss *= mask` on the gated loss of a head works as on torch's loss (the Functions return no
    view), on the selected-rows head route and through the logits."""
    B, T, D, V = 2, 6, 8, 13
    torch.manual_seed(0)
    head = _BiasHead(D, V)
    ref = copy.deepcopy(head)
    h = torch.randn(B, T, D)
    ids = torch.randint(0, V, (B * T,))
    mask = torch.rand(B * T) if reduction == "none" else torch.tensor(0.5)
    cggr_hook.enable(head, min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
    # a global forward hook that rescales the logits runs before the tap: the output is not the plain
    # affine map any more, and the call goes through the logits
    hook = torch.nn.modules.module.register_module_forward_hook
    handle = hook(lambda m, a, out: out * 2.0 if isinstance(m, nn.Linear) else None) if through_logits else None
    try:
        loss = F.cross_entropy(head.lm_head(h).view(-1, V), ids, reduction=reduction)
        node = "GatedCrossEntropyBackward" if through_logits else "GatedHeadCrossEntropyBackward"
        assert type(loss.grad_fn).__name__ == node
        loss.mul_(mask)
        loss.sum().backward()
    finally:
        cggr_hook.disable(head)
        expected = ORIGINAL_CE(ref.lm_head(h).view(-1, V), ids, reduction=reduction)
        if handle is not None:
            handle.remove()
    expected.mul_(mask)
    expected.sum().backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-5, atol=1e-6)


def test_one_class_head_squeezed_and_unsqueezed_keeps_the_plain_loss():
    """A shape of no dims between the head and the loss (V = 1, the class dim squeezed away and put
    back) is not the head's rows in order: the loss is the plain one, with no error."""
    head = _BiasHead(4, 1)
    cggr_hook.enable(head, min_tokens_ratio=1.0, warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
    logits = head.lm_head(torch.randn(1, 1, 4))
    x = logits.squeeze().unsqueeze(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = F.cross_entropy(x, torch.zeros((), dtype=torch.long))
    assert type(loss.grad_fn).__name__ == "NllLossBackward0"
    assert torch.equal(loss, ORIGINAL_CE(x, torch.zeros((), dtype=torch.long)))
