"""``CGGRLoss``: the standalone gated cross entropy (the original package's API).

A call runs the gated forward (``pipeline.gated_forward``: score, select, the loss of the selected
rows) and hands its result to ``functions.GatedCrossEntropy``, whose backward writes the dense
gradient of the logits, exact zeros on the unselected rows.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from . import auto as auto_mod
from . import figures as figures_mod
from . import kernels, patch
from .config import OPTION_NAMES, GateConfig
from .functions import GatedCrossEntropy
from .kernels.spec import check_reduction
from .pipeline import LossSpec, PendingTargetCheck, check_targets, gated_forward
from .schedule import Scheduler

__all__ = ["CGGRLoss", "LossSpec"]


class CGGRLoss(torch.nn.Module):
    """The standalone gated cross entropy (the original package's API).

    ``criterion(logits, targets)`` with logits (B, T, V) and targets (B, T) (rows of a sequence
    for ``sequence_aware``), or (N, V) and (N,) (one sequence); contiguous or not, any float dtype.
    Options are GateConfig's plus the cross-entropy arguments; ``.step()`` advances its own
    curriculum once per optimizer step.

    inplace_backward: write the gradient into the logits' buffer during backward (no second
        logits-sized buffer); the logits must not be read after ``backward()``.

    Where the timed choice runs a step as the plain loss (``min_tokens_ratio='auto'``, or a fixed
    1.0 with ``plain_when_faster``: ``GateConfig.auto_candidates``), the call returns torch's own
    ``F.cross_entropy`` of the rows; ``.step()`` times the candidates.
    """

    def __init__(
        self,
        scoring: str = "combined",
        selection: str = "topk",
        min_tokens_ratio: float = 0.25,
        warmup_steps: int = 1000,
        dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5,
        num_strata: int = 4,
        min_tokens_per_sequence: int = 1,
        seed: int = 0,
        importance_floor: float = GateConfig.importance_floor,
        *,
        plain_when_faster: bool = GateConfig.plain_when_faster,
        cuda_graphs: bool = GateConfig.cuda_graphs,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        weight: Tensor | None = None,
        inplace_backward: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:  # a ValueError naming them, as enable() and GateConfig give, not Python's TypeError
            known = OPTION_NAMES + ("ignore_index", "reduction", "label_smoothing", "weight", "inplace_backward")
            raise ValueError(
                f"cggr_hook.CGGRLoss: unknown option(s) {', '.join(sorted(unknown))}; "
                f"the options are {', '.join(known)}"
            )
        super().__init__()
        self.config = GateConfig(
            scoring=scoring,
            selection=selection,
            min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps,
            dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity,
            num_strata=num_strata,
            min_tokens_per_sequence=min_tokens_per_sequence,
            seed=seed,
            importance_floor=importance_floor,
            plain_when_faster=plain_when_faster,
            cuda_graphs=cuda_graphs,
        )
        self.spec = LossSpec(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, weight=None
        )
        check_reduction(reduction)
        self.register_buffer("weight", weight, persistent=False)
        self.inplace_backward = bool(inplace_backward)
        self.scheduler = Scheduler()
        self._metrics: dict = {}

    def __getstate__(self) -> dict:
        # the last call's figures as numbers: those left on the device hold CUDA events, which
        # neither pickle nor copy
        state = super().__getstate__()
        state["_metrics"] = figures_mod.resolve(self._metrics)
        return state

    @property
    def step_count(self) -> int:
        return self.scheduler.step_count

    def step(self) -> None:
        """Advance the curriculum by one optimizer step."""
        self.scheduler.step()

    def get_metrics(self) -> dict:
        """The last call's figures (same keys as ``cggr_hook.metrics()``)."""
        m = self._metrics
        resolved = figures_mod.resolve(m)
        PendingTargetCheck.poll(wait=True)  # the counts are in by now: a bad target raises here
        if self._metrics is m:  # keep the resolved figures unless a newer call replaced them
            self._metrics = resolved
        return dict(resolved)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if not isinstance(logits, Tensor) or logits.dim() not in (2, 3) or not logits.is_floating_point():
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"cggr_hook.CGGRLoss: logits of shape {shape} must be a float tensor (B, T, V) or (N, V)")
        if not isinstance(targets, Tensor) or tuple(targets.shape) != tuple(logits.shape[:-1]):
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"cggr_hook.CGGRLoss: targets of shape {shape} must match logits of shape {tuple(logits.shape)} "
                f"without the vocabulary dim: {tuple(logits.shape[:-1])}"
            )
        if targets.is_floating_point():
            raise ValueError("cggr_hook.CGGRLoss: targets must be integer class indices (use .long())")
        if logits.device.type == "meta" or targets.device.type == "meta":
            raise ValueError(
                "cggr_hook.CGGRLoss: logits and targets on the meta device have no values to score and select "
                "by; compute the loss on real tensors, or use torch.nn.functional.cross_entropy for a meta run"
            )
        weight = cast("Tensor | None", self.weight)  # a buffer (None without class weights)
        spec = LossSpec(self.spec.ignore_index, self.spec.reduction, self.spec.label_smoothing, weight)
        spec.check(logits.shape[-1])
        seq = logits.shape[1] if logits.dim() == 3 else None
        targets = targets.to(device=logits.device, dtype=torch.long)
        cands = self.config.auto_candidates
        if cands is not None and self.scheduler.auto_state("loss", cands).candidate() == auto_mod.PLAIN:
            return self._plain_loss(logits, targets, spec)
        with torch.no_grad():
            fwd = gated_forward(
                kernels.as_rows(logits.detach()),
                targets.reshape(-1),
                config=self.config,
                scheduler=self.scheduler,
                key="loss",
                spec=spec,
                seq=seq,
            )
        self._metrics = fwd.figures
        return GatedCrossEntropy.apply(logits, targets, fwd, spec, self.inplace_backward)

    def _plain_loss(self, logits: Tensor, targets: Tensor, spec: LossSpec) -> Tensor:
        """A step that the timed choice (``config.auto_candidates``) runs as the plain loss: torch's
        own ``F.cross_entropy`` (the original, whether or not a gate has patched it) on the rows,
        after the gated steps' check of the targets (so that both reject the same input, with the
        same error, where torch would raise a device-side assert), on fp32 logits, as the gated
        steps compute it (torch's loss of bf16 logits is bf16-accurate, and its dtype bf16).
        ``inplace_backward`` does not apply to it (torch's own gradient)."""
        V = logits.shape[-1]
        n_valid = check_targets(targets.reshape(-1), V, spec.ignore_index)
        state = self.scheduler.plain_call(
            "loss", cast(tuple, self.config.auto_candidates), logits.device, rows=targets.numel()
        )
        self._metrics = figures_mod.plain_figures(self.scheduler.step_count + 1, self.config.scoring, state, n_valid)
        # in fp32, as the gated steps compute it (torch's loss of bf16 logits is bf16-accurate)
        x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        loss = patch.original_cross_entropy()(
            x.reshape(-1, V),
            targets.reshape(-1),
            weight=None if spec.weight is None else spec.weight.to(x.dtype),
            ignore_index=spec.ignore_index,
            reduction=spec.reduction,
            label_smoothing=spec.label_smoothing,
        )
        loss = loss.float()
        return loss.view(targets.shape) if spec.reduction == "none" else loss

    def extra_repr(self) -> str:
        return f"{self.config}, reduction={self.spec.reduction!r}"
