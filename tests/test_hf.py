"""The Hugging Face Trainer integration (hf.py): gating, logs, evaluation, checkpoints and resume."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import cggr_hook

transformers = pytest.importorskip("transformers")
from cggr_hook.hf import STATE_FILE, CGGRCallback  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, T=16, V=97, seed=0):
        self.x = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i].clone()}


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def _trainer(model, out, max_steps, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=3,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        eval_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **kw,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=Rows(64), eval_dataset=Rows(8, seed=1), callbacks=[CGGRCallback()]
    )


def test_trainer_gates_logs_and_checkpoints(tmp_path):
    model = _model()
    cggr_hook.enable(model, warmup_steps=4, min_tokens_ratio=0.25, dynamic_threshold=False)
    trainer = _trainer(model, tmp_path, max_steps=6)
    trainer.train()
    # optimizer steps counted with gradient accumulation: 6 steps, not 12 micro-batches
    assert cggr_hook.scheduler.step_count == 6
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    assert all("cggr/token_ratio" in h for h in logged)
    ratios = [h["cggr/token_ratio"] for h in logged]
    assert ratios[0] > 0.9 and ratios[-1] < 0.4  # the curriculum ran down towards 25%
    state = torch.load(os.path.join(tmp_path, "checkpoint-3", STATE_FILE), weights_only=True)
    assert state["step_count"] == 3

    # evaluation is the plain loss
    ev = trainer.evaluate()["eval_loss"]
    cggr_hook.disable(model)
    assert ev == pytest.approx(trainer.evaluate()["eval_loss"], rel=0, abs=0)


def test_resume_restores_the_scheduler(tmp_path):
    model = _model()
    cggr_hook.enable(model, warmup_steps=10)
    _trainer(model, tmp_path, max_steps=6).train()
    full = cggr_hook.scheduler.state_dict()

    cggr_hook.disable()
    cggr_hook.scheduler.reset()
    model2 = _model()
    cggr_hook.enable(model2, warmup_steps=10)
    trainer = _trainer(model2, tmp_path, max_steps=6)
    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.setdefault("first", cggr_hook.scheduler.state_dict())

    trainer.add_callback(Probe())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    saved = torch.load(tmp_path / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert seen["first"]["step_count"] == 3
    assert seen["first"]["confidence_avg"] == saved["confidence_avg"]
    assert cggr_hook.scheduler.step_count == full["step_count"] == 6


# --------------------------------------------------------------------------------------------------
# the gate's figures in every reporter
# --------------------------------------------------------------------------------------------------
def _reporting_trainer(model, out, max_steps, attach=True, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        save_strategy="steps",
        report_to=["tensorboard"],
        use_cpu=True,
        eval_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **kw,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(64), callbacks=None if attach else [CGGRCallback()]
    )
    if attach:
        CGGRCallback.attach(trainer)  # what the README shows
    return trainer


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_readme_trainer_puts_the_figures_into_tensorboard_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = _model()
    cggr_hook.enable(model, warmup_steps=2, min_tokens_ratio=0.25, dynamic_threshold=False)
    _reporting_trainer(model, tmp_path / "out", max_steps=4).train()
    scalars = _scalars(tmp_path / "tb")  # the TensorBoard reporter files training logs under train/
    for tag in ("cggr/token_ratio", "cggr/tokens_selected", "cggr/tokens_total", "cggr/avg_confidence", "cggr/step"):
        assert [s for s, _ in scalars.get("train/" + tag, [])] == [1, 2, 3, 4], (tag, sorted(scalars))
    # cggr/step is the Trainer's own step, and the curriculum ran down to 25%
    assert [v for _, v in scalars["train/cggr/step"]] == [1, 2, 3, 4]
    ratios = [v for _, v in scalars["train/cggr/token_ratio"]]
    assert ratios[0] == pytest.approx(1.0) and ratios[-1] < 0.4
    for step in (2, 4):  # the scheduler's state still goes into every checkpoint
        state = torch.load(tmp_path / "out" / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert state["step_count"] == step


def test_attach_moves_a_callback_already_given_ahead_of_the_reporters(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = _model()
    cggr_hook.enable(model, warmup_steps=0, dynamic_threshold=False)
    trainer = _reporting_trainer(model, tmp_path / "out", max_steps=1, attach=False)
    given = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CGGRCallback))
    assert CGGRCallback.attach(trainer) is given
    assert trainer.callback_handler.callbacks[0] is given
    assert sum(isinstance(cb, CGGRCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert "train/cggr/token_ratio" in _scalars(tmp_path / "tb")


def test_a_callback_behind_the_reporters_says_how_to_attach_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = _model()
    cggr_hook.enable(model, warmup_steps=0, dynamic_threshold=False)
    trainer = _reporting_trainer(model, tmp_path / "out", max_steps=1, attach=False)
    with pytest.warns(RuntimeWarning, match=r"CGGRCallback\.attach\(trainer\)"):
        trainer.train()
    assert "cggr/token_ratio" in trainer.state.log_history[0]  # the Trainer's own history has them


def test_attach_rejects_what_is_not_a_trainer():
    with pytest.raises(ValueError, match="trainer"):
        CGGRCallback.attach(object())


def test_hf_module_names_the_extra_when_transformers_is_missing(monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "cggr_hook.hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it gives
    with pytest.raises(ModuleNotFoundError, match=r'pip install "cggr_hook\[hf\]"'):
        importlib.import_module("cggr_hook.hf")


@pytest.mark.usefixtures("probe_the_reference")
def test_default_gate_books_hugging_faces_plain_steps_and_gates_its_kernels_steps():
    """A Llama trained with ``labels=``: the default's plain steps are Hugging Face's own loss (its
    cross entropy books them), then the gate's kernels run, then the faster one; the loss is the
    plain loss throughout."""
    from cggr_hook import auto

    model = _model().train()
    ref = copy.deepcopy(model)
    key = cggr_hook.enable(model).key
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, labels=ids).loss
    ran = []
    for _ in range(2 * auto.PROBE_STEPS + 1):
        loss = model(input_ids=ids, labels=ids).loss
        ran.append("plain" if cggr_hook.metrics(model)["auto_plain"] else type(loss.grad_fn).__name__)
        torch.testing.assert_close(loss.detach(), want)
        loss.backward()
        opt.step()
    state = cggr_hook.scheduler.auto_state(key, auto.FULL_TOKENS)
    assert cggr_hook.scheduler.step_count == len(ran) and state.decisions == 1
    assert ran[: auto.PROBE_STEPS] == ["plain"] * auto.PROBE_STEPS
    assert ran[auto.PROBE_STEPS] != "plain"  # the gate's kernels next
