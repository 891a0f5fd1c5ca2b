"""Hugging Face ``Trainer`` integration: the gate's figures in every reporter, the scheduler in the
checkpoints.

    import cggr_hook
    from cggr_hook.hf import CGGRCallback

    cggr_hook.enable(model)
    trainer = Trainer(model=model, args=args, train_dataset=...)
    CGGRCallback.attach(trainer)                     # ahead of the reporters
    trainer.train()                                  # or train(resume_from_checkpoint=True)

- Logs: every Trainer log entry of a training step gains ``cggr/<figure>`` (``token_ratio``,
  ``tokens_selected``, ``tokens_total``, ``avg_confidence``, ``avg_entropy``, ``avg_difficulty``: the
  model's last gated call, ``cggr_hook.scalars(model)``; a step that the default or ``'auto'``
  ran as the plain loss has ``token_ratio``, the token counts and the choice's figures,
  ``auto_fraction``, ``auto_choice``, ``step_ms_<candidate>``, and no averages) and ``cggr/step``
  (the Trainer's step);
  ``state.log_history`` gets them too. The Trainer calls its reporters (TensorBoard, W&B, ...) before
  the callbacks given as ``callbacks=[...]``, in one shared log entry: only a callback that runs
  before them puts figures into what they write. ``attach(trainer)`` puts it first (and moves one
  already given there); a ``CGGRCallback`` left behind the reporters warns once.
- Checkpoints: ``cggr_scheduler.pt`` (the global scheduler's ``state_dict()``) is written into each
  ``checkpoint-<step>`` folder, and read back when training resumes from one.

Importing this module imports transformers (``pip install "cggr_hook[hf]"``); ``import cggr_hook``
alone does not.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as e:  # a clear way out instead of a bare missing module
    raise ModuleNotFoundError(
        f"cggr_hook.hf needs transformers (and accelerate for its Trainer), which are not installed ({e}); "
        'install them with: pip install "cggr_hook[hf]"',
        name=e.name,
    ) from e

from .figures import as_scalars
from .registry import metrics, scheduler

STATE_FILE = "cggr_scheduler.pt"


def _reporters(args: Any) -> list[str]:
    """The reporting integrations the Trainer's arguments name (none for 'none' / [])."""
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return [r for r in report_to if r not in ("none", None)]


class CGGRCallback(TrainerCallback):
    """Gate figures into the Trainer's logs and reporters; the scheduler's state into and out of
    checkpoints. ``resume_from``: the checkpoint folder to read the scheduler from, when it is not
    ``<output_dir>/checkpoint-<step>``."""

    def __init__(self, resume_from: str | None = None) -> None:
        self.resume_from = resume_from
        self._first = False  # placed ahead of the reporters by attach()
        self._warned = False

    @classmethod
    def attach(cls, trainer: Any, resume_from: str | None = None) -> CGGRCallback:
        """Put a CGGRCallback first among ``trainer``'s callbacks, ahead of the reporters, so that
        TensorBoard, W&B and every other reporter log ``cggr/*`` too; returns it. A CGGRCallback
        already given in ``callbacks=[...]`` is moved there rather than added twice."""
        handler = getattr(trainer, "callback_handler", None)
        callbacks = getattr(handler, "callbacks", None)
        if not isinstance(callbacks, list):
            raise ValueError(
                f"CGGRCallback.attach: trainer must be a transformers Trainer (with .callback_handler), got "
                f"{type(trainer).__name__}; call it after Trainer(...) and before trainer.train()"
            )
        cb = next((c for c in callbacks if isinstance(c, cls)), None)
        if cb is None:
            cb = cls(resume_from)
        else:
            callbacks.remove(cb)
            if resume_from is not None:
                cb.resume_from = resume_from
        callbacks.insert(0, cb)
        cb._first = True
        return cb

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:  # training-step logs only, not evaluation's
            return
        m = metrics(model) if model is not None else {}
        if not m:  # a model the Trainer holds under another object than the gated one
            m = metrics()
        if not m:
            return
        figures = as_scalars(m, "cggr/")
        figures["cggr/step"] = m["step"]  # the optimizer step of the loss: the Trainer's step
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")  # pyright: ignore[reportCallIssue, reportArgumentType]
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(scheduler.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_begin(self, args, state, control, **kwargs):
        reporters = _reporters(args)
        if reporters and not self._first and not self._warned:
            self._warned = True
            warnings.warn(
                f"cggr_hook: a CGGRCallback given as callbacks=[...] runs after the Trainer's reporters "
                f"({', '.join(map(str, reporters))}), so they log no cggr/* figures (the Trainer's own "
                "log_history still has them); add it with CGGRCallback.attach(trainer) after Trainer(...) "
                "instead",
                RuntimeWarning,
                stacklevel=2,
            )
        # the Trainer has already restored its own state from the checkpoint it resumes
        if state.global_step <= 0:
            return
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")  # pyright: ignore[reportCallIssue, reportArgumentType]
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            scheduler.load_state_dict(torch.load(path, weights_only=True))
        else:
            warnings.warn(  # noqa: B028 - points at the callback, where the resume happens
                f"cggr_hook: resuming at step {state.global_step} without {path}; the curriculum continues "
                f"from step {state.global_step} and the confidence average restarts. Pass "
                "CGGRCallback(resume_from='<checkpoint folder>') when the checkpoint is elsewhere",
                RuntimeWarning,
            )
            scheduler.load_state_dict({"step_count": state.global_step, "calls_in_step": 0, "confidence_avg": {}})
