"""The libraries people train with: PEFT (LoRA, modules_to_save, enable before wrapping), TRL's
SFTTrainer, bitsandbytes and torchao heads, Accelerate and Lightning.

These packages are in the ``integrations`` extra that CI installs: a missing one fails the
collection of this file rather than skipping it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import accelerate
import bitsandbytes as bnb
import lightning
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
import trl  # noqa: F401 - installed by the integrations extra: a missing one fails here
from torch import nn

import cggr_hook

from common import TinyLM, check_gated_gradients, masked_reference_loss, reference_topk_rows

# a fixed ratio of the original configuration (hard top-k by the combined score): the references are
# written for it
FIXED = dict(preset="seed", warmup_steps=0, dynamic_threshold=False, plain_when_faster=False)
V = 61
IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _llama(vocab: int = V):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).train()


def _logits(model, ids):
    return model(input_ids=ids).logits


def _lora(**kw):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    cfg.update(kw)
    return peft.LoraConfig(**cfg)


def _peft_model(**kw):
    def make():
        base = _llama()
        torch.manual_seed(1)
        return peft.get_peft_model(base, _lora(**kw)).train()

    return make


# --------------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_lora_model_is_gated_with_exact_gradients(ratio):
    grads = check_gated_gradients(_peft_model(), _logits, IDS, ratio, V, head_route="head")
    assert any("lora_A" in n for n in grads)


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_lora_on_the_head_gates_the_lora_layer_with_exact_gradients(ratio):
    """Before: the vocabulary-width rule found lora_B (Linear(4, V)), whose output is not the logits."""
    model = _peft_model(target_modules=["q_proj", "lm_head"])()
    head = cggr_hook.enable(model).head
    assert head is model.base_model.model.lm_head and isinstance(head, peft.tuners.lora.LoraLayer)
    cggr_hook.disable(model)
    grads = check_gated_gradients(
        _peft_model(target_modules=["q_proj", "lm_head"]), _logits, IDS, ratio, V, head_route="logits"
    )
    assert any("lm_head.lora_B" in n for n in grads)


def _train(model, steps: int, params=None):
    opt = torch.optim.SGD(params if params is not None else [p for p in model.parameters() if p.requires_grad], lr=0.01)
    for s in range(steps):
        ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(s))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return out


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_enable_before_get_peft_model_is_gated_and_counts_steps(modules_to_save):
    """Before: the optimizer held only LoRA parameters, made after enable, so no step was counted and
    the curriculum never left 100%; with modules_to_save the head was deep-copied and the copy, which
    the model calls, was not gated."""
    base = _llama()
    cggr_hook.enable(base, min_tokens_ratio=0.5, warmup_steps=2, dynamic_threshold=False)
    model = peft.get_peft_model(base, _lora(modules_to_save=modules_to_save))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no watchdog warning either
        out = _train(model, 4)
    assert type(out.loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward"
    assert cggr_hook.scheduler.step_count == 4
    m = cggr_hook.metrics()
    assert m["tokens_selected"] == round(0.5 * m["tokens_total"])  # the curriculum reached its end
    if modules_to_save:
        copy = model.base_model.model.lm_head.modules_to_save["default"]
        assert copy.weight.grad is None and copy.weight.requires_grad  # stepped and zeroed: it was trained
    assert _gate_hooks(model)
    cggr_hook.disable()
    assert not _gate_hooks(model)  # the copy PEFT made of the hooked head included


def test_enable_before_and_after_get_peft_model_is_one_gate():
    """enable(base), get_peft_model(base), enable(peft_model): the same model, one gate (two would tap
    the head twice and one of them would never see its loss); disable on either removes it."""
    base = _llama()
    gate = cggr_hook.enable(base, min_tokens_ratio=0.5, **FIXED)
    model = peft.get_peft_model(base, _lora(modules_to_save=["lm_head"]))
    again = cggr_hook.enable(model, min_tokens_ratio=0.4)
    assert again is gate and gate.config.min_tokens_ratio == 0.4
    assert gate.head is model.base_model.model.lm_head  # the wrapper PEFT put in the head's place
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(model, 4)
    assert cggr_hook.scheduler.step_count == 4
    cggr_hook.disable(model)
    assert cggr_hook.registry.gate_of(base) is None and not _gate_hooks(model)


def test_enable_before_get_peft_model_gives_exact_gradients():
    def make():
        base = _llama()
        cggr_hook.enable(base, min_tokens_ratio=0.3, **FIXED)
        torch.manual_seed(1)
        return peft.get_peft_model(base, _lora(modules_to_save=["lm_head"])).train()

    model = make()
    cggr_hook.disable()
    ref = make()
    cggr_hook.disable()
    cggr_hook.enable(model.base_model.model, min_tokens_ratio=0.3, **FIXED)  # on the base, now wrapped
    t = IDS[:, 1:].reshape(-1)
    loss = F.cross_entropy(model(input_ids=IDS).logits[:, :-1].reshape(-1, V), t)
    assert type(loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward"
    loss.backward()
    X = ref(input_ids=IDS).logits[:, :-1].reshape(-1, V)
    masked_reference_loss(X, t, reference_topk_rows(X.detach(), t, 0.3)).backward()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name].grad, p.grad, msg=name)


# --------------------------------------------------------------------------------------------------
# quantized and float8 heads: through the logits, exact
# --------------------------------------------------------------------------------------------------
class HeadOn(nn.Module):
    def __init__(self, head: nn.Module, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = head

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.mix(self.emb(idx))))


def _bnb_model(kind: str, vocab: int = 64, dim: int = 32):
    def make():
        torch.manual_seed(0)
        lin = nn.Linear(dim, vocab)
        if kind == "8bit":
            head = bnb.nn.Linear8bitLt(dim, vocab, has_fp16_weights=False, threshold=0.0)
        else:
            head = bnb.nn.Linear4bit(dim, vocab, compute_dtype=torch.float32, quant_type="nf4")
        head.load_state_dict(lin.state_dict())
        head = head.to("cpu")
        torch.manual_seed(1)
        return HeadOn(head, vocab, dim).train()

    return make


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_bitsandbytes_head_gets_exact_gradients(kind, ratio):
    """Before: a Linear8bitLt head's gradients were off by 2.5e3 (relative); Linear4bit's backward
    crashed on the packed weight."""
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(4))
    grads = check_gated_gradients(_bnb_model(kind), lambda m, i: m(i), ids, ratio, 64, head_route="logits")
    assert {"emb.weight", "mix.weight"} <= set(grads)


def test_torchao_float8_head_gets_exact_gradients():
    from torchao.float8.float8_linear import Float8Linear

    def make():
        torch.manual_seed(0)
        return HeadOn(Float8Linear.from_float(nn.Linear(32, 64, bias=False)), 64, 32).train()

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    check_gated_gradients(make, lambda m, i: m(i), ids, 1.0, 64, head_route="logits")
    check_gated_gradients(make, lambda m, i: m(i), ids, 0.5, 64, head_route="logits")


def test_qlora_with_a_float_head_is_gated():
    """4-bit layers inside the model, LoRA adapters on them, a float head: the narrow head route."""
    base = _llama()
    for layer in base.model.layers:
        lin = layer.mlp.up_proj
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32)
        q.load_state_dict(lin.state_dict())
        layer.mlp.up_proj = q.to("cpu")
    model = peft.get_peft_model(base, _lora(target_modules=["up_proj"]))
    cggr_hook.enable(model, min_tokens_ratio=0.5, **FIXED)
    out = _train(model, 2)
    assert type(out.loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward"
    assert cggr_hook.scheduler.step_count == 2


# --------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------
def _gate_hooks(model: nn.Module) -> list:
    """Hooks of a cggr_hook Gate left on any module of ``model``."""
    found = []
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for fn in hooks.values():
                fn = getattr(fn, "_fn", fn)  # a gate's hooks are _GateHook wrappers
                owner = getattr(getattr(fn, "__wrapped__", fn), "__self__", None)
                if isinstance(owner, cggr_hook.Gate):
                    found.append((type(m).__name__, fn))
    return found


def _trl_sft():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import trl_sft
    finally:
        sys.path.remove(str(EXAMPLES))
    return trl_sft


def _sft_pair(tmp_path, data, ratio, gate=True, **config):
    ex = _trl_sft()
    tok = ex.make_tokenizer()
    model, ref = ex.make_model(len(tok)), ex.make_model(len(tok))
    if gate:
        cggr_hook.enable(model, min_tokens_ratio=ratio, **FIXED)
    trainer = ex.make_trainer(model, tok, data, 2, str(tmp_path / "a"), **config)
    ref_trainer = ex.make_trainer(ref, tok, data, 2, str(tmp_path / "b"), **config)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, ref_trainer, model, ref, batch


@pytest.mark.parametrize("data", ["completions", "conversations"])
def test_sft_trainer_is_gated_with_exact_gradients(tmp_path, data):
    """Before: SFTTrainer's fused LM head never called the head or F.cross_entropy; nothing was gated.
    Completion-only and assistant-only masks: the gate selects among the tokens TRL trains on."""
    trainer, _, model, ref, batch = _sft_pair(tmp_path, data, 0.3)
    labels = batch["labels"]
    t = labels[:, 1:].reshape(-1)
    assert (t == -100).any() and (t != -100).any()  # prompts / user turns are masked
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    m = cggr_hook.metrics()
    assert m["tokens_total"] == int((t != -100).sum())
    X = (
        ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .logits[:, :-1]
        .reshape(-1, len(trainer.processing_class))
    )
    rows = reference_topk_rows(X.detach(), t, 0.3)
    assert m["tokens_selected"] == len(rows)
    expected = masked_reference_loss(X, t, rows)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # TRL's metrics read the same values as its own fused head gives
    assert trainer._metrics["train"]["entropy"] and trainer._metrics["train"]["mean_token_accuracy"]


def test_sft_trainer_at_ratio_one_equals_trls_own_loss(tmp_path):
    trainer, ref_trainer, model, ref, batch = _sft_pair(tmp_path, "completions", 1.0)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    m = cggr_hook.metrics()
    assert m and m["tokens_selected"] == m["tokens_total"] > 0  # gated, at ratio 1.0
    expected = ref_trainer.compute_loss(ref, dict(batch))  # TRL's fused head, not gated
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for mode in ("entropy", "mean_token_accuracy"):
        assert trainer._metrics["train"][mode] == pytest.approx(ref_trainer._metrics["train"][mode], rel=1e-5)


def test_sft_trainer_auto_plain_step_runs_trls_own_fused_head(tmp_path):
    """min_tokens_ratio='auto' on a step it runs as the plain loss: TRL's fused head as without the
    gate (the head module is not called, no full logits), TRL's own loss and gradients, the step
    booked as plain."""
    from cggr_hook import auto

    trainer, ref_trainer, model, ref, batch = _sft_pair(tmp_path, "completions", 1.0, gate=False)
    key = cggr_hook.enable(model, min_tokens_ratio="auto").key
    state = cggr_hook.scheduler.auto_state(key)
    state.choice, state.probe = auto.PLAIN, len(auto.CANDIDATES)  # past the probe window, plain chosen
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    expected = ref_trainer.compute_loss(ref, dict(batch))
    expected.backward()
    assert calls == []  # TRL's fused path computes from the weight without calling the head
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=0, atol=0, msg=name)
    m = cggr_hook.metrics()
    assert m["selection"] == "plain" and m["auto_plain"] is True


def test_sft_trainer_dft_loss_is_a_clear_error(tmp_path):
    """A loss that weighs TRL's log_probs per token cannot be served by a gated loss: the first
    backward raises before any step."""
    trainer, _, model, _, batch = _sft_pair(tmp_path, "completions", 0.5, loss_type="dft")
    loss = trainer.compute_loss(model, dict(batch))
    with pytest.raises(RuntimeError, match="loss_type='nll'"):
        loss.backward()


def test_sft_example_runs_gated_with_lora(capsys):
    """examples/trl_sft.py: enable, then SFTTrainer wraps the model with LoRA (modules_to_save
    lm_head); every optimizer step is counted and the curriculum advances."""
    ex = _trl_sft()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer = ex.main(["--max-steps", "6", "--warmup-steps", "3", "--lora"])
    assert cggr_hook.scheduler.step_count == 6
    assert "cggr/token_ratio" in trainer.state.log_history[-2]
    assert "gated optimizer steps counted: 6" in capsys.readouterr().out
    assert not _gate_hooks(trainer.model)  # main() disabled the gate: nothing left on any module


# --------------------------------------------------------------------------------------------------
# Accelerate and Lightning (already working: kept so)
# --------------------------------------------------------------------------------------------------
def test_accelerate_with_gradient_accumulation():
    acc = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = TinyLM()
    cggr_hook.enable(model, min_tokens_ratio=0.5, **FIXED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    for s in range(6):
        idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(s))
        with acc.accumulate(model):
            logits = model(idx)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
            assert type(loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward"
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
    assert cggr_hook.scheduler.step_count == 3  # optimizer steps, not micro-batches


class LitLM(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyLM()

    def training_step(self, batch, _):
        (idx,) = batch
        logits = self.net(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 37), idx[:, 1:].reshape(-1))
        assert type(loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward"
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_with_gradient_accumulation(precision):
    module = LitLM()
    gate = cggr_hook.enable(module, min_tokens_ratio=0.5, **FIXED)
    assert gate.head is module.net.lm_head
    data = torch.utils.data.TensorDataset(torch.randint(0, 37, (16, 9), generator=torch.Generator().manual_seed(0)))
    trainer = lightning.Trainer(
        max_steps=3,
        accumulate_grad_batches=2,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert cggr_hook.scheduler.step_count == 3
    assert cggr_hook.metrics()["tokens_selected"] == 8  # half of 2 x 8 tokens
