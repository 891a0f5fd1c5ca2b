"""Hugging Face ``Trainer`` integration: metrics in the logs, the scheduler in the checkpoints.

    import cggr_hook
    from cggr_hook.hf import CGGRCallback

    cggr_hook.enable(model)
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[CGGRCallback()])
    trainer.train()                                  # or train(resume_from_checkpoint=True)

- Logs: every Trainer log entry of a training step gains ``cggr/<metric>`` figures (the last gated
  call's ``token_ratio``, ``tokens_selected``, ``tokens_total``, ``avg_confidence``, ``avg_entropy``,
  ``avg_difficulty``) and ``cggr/step``; ``state.log_history`` gets them too. Reporters (wandb,
  tensorboard) are called before user callbacks; ``CGGRCallback.attach(trainer)`` puts the callback
  first so they see the figures as well.
- Checkpoints: ``cggr_scheduler.pt`` (the global scheduler's ``state_dict()``) is written into each
  ``checkpoint-<step>`` folder, and read back when training resumes from one.

Importing this module imports transformers; ``import cggr_hook`` alone does not.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from .gate import metrics, scheduler

STATE_FILE = "cggr_scheduler.pt"
_LOGGED = ("token_ratio", "tokens_selected", "tokens_total", "avg_confidence", "avg_entropy", "avg_difficulty", "step")


class CGGRCallback(TrainerCallback):
    """Gate metrics into the Trainer's logs; the scheduler's state into and out of checkpoints."""

    @classmethod
    def attach(cls, trainer: Any) -> "CGGRCallback":
        """Add a CGGRCallback to ``trainer`` ahead of the reporting callbacks; returns it."""
        cb = cls()
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def on_log(self, args, state, control, logs=None, **kwargs):
        m = metrics()
        if logs is None or not m or "loss" not in logs:  # training-step logs only, not eval's
            return
        extra = {f"cggr/{k}": m[k] for k in _LOGGED if k in m}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(scheduler.state_dict(), os.path.join(folder, STATE_FILE))

    def __init__(self, resume_from: str | None = None) -> None:
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        # the Trainer has already restored its own state from the checkpoint it resumes
        if state.global_step <= 0:
            return
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            scheduler.load_state_dict(torch.load(path, weights_only=True))
        else:
            warnings.warn(
                f"cggr_hook: resuming at step {state.global_step} without {path}; the curriculum continues "
                f"from step {state.global_step} and the confidence average restarts. Pass "
                "CGGRCallback(resume_from='<checkpoint folder>') when the checkpoint is elsewhere",
                RuntimeWarning,
            )
            scheduler.load_state_dict({"step_count": state.global_step, "calls_in_step": 0, "confidence_avg": {}})
