"""GateConfig: every option of a gate as one validated, immutable object."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SCORINGS = ("combined", "entropy", "margin", "loss", "gradnorm", "random")
SELECTIONS = ("topk", "stratified", "sequence_aware", "importance")


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"cggr_hook: {name}={value!r} is not valid: {fix}")


@dataclass(frozen=True)
class GateConfig:
    """Options of a confidence gate (the names and defaults of the original CGGR package).

    scoring: how a token's difficulty is read off its logits row, all in fp32:
        ``entropy`` H = -sum_v p_v log p_v, ``margin`` 1 - (p_top1 - p_top2), ``loss`` the target's
        NLL, ``combined`` H / ln V + margin + NLL / ln V, ``gradnorm`` ||softmax - target||_2 (the
        norm of the token's gradient on its logits; times ||h|| that of its gradient on the head
        weight), ``random`` uniform noise (a control arm).
    selection: ``topk`` (exactly the k hardest), ``stratified`` (``num_strata`` equal-count
        difficulty buckets, harder buckets give more, sampled inside a bucket),
        ``sequence_aware`` (topk, then every sequence keeps ``min_tokens_per_sequence`` of its
        hardest valid tokens) or ``importance`` (k tokens drawn with inclusion probabilities
        pi_i = min(1, c q_i), q_i = (1 - a) s_i / sum s + a / n, each weighted 1 / pi_i, so the
        loss is an unbiased estimate of the plain loss; a = ``importance_floor``).
    min_tokens_ratio, warmup_steps: the curriculum
        r = 1 - min(1, step / warmup_steps) * (1 - min_tokens_ratio); k = max(1, floor(r * n + 0.5))
        of the n valid tokens.
    dynamic_threshold, threshold_sensitivity: a batch less confident than the running average
        keeps more tokens (up to r * (1 + s), at most all), a more confident one fewer (down to
        r * (1 - s)).
    importance_floor: a in [0, 1], the uniform share of ``importance``'s sampling distribution
        (a = 1: uniform, k / n each; a = 0: proportional to the score).
    seed: seeds the draws of ``random`` scoring, ``stratified`` and ``importance`` sampling, which
        are a function of (seed, optimizer step, call within the step), so a resumed run draws the
        same tokens.
    """

    scoring: str = "combined"
    selection: str = "topk"
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 1000
    dynamic_threshold: bool = True
    threshold_sensitivity: float = 0.5
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    seed: int = 0
    importance_floor: float = 0.2

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            _fail("scoring", self.scoring, f"choose one of {', '.join(SCORINGS)}")
        if self.selection not in SELECTIONS:
            _fail("selection", self.selection, f"choose one of {', '.join(SELECTIONS)}")
        r = self.min_tokens_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0) or math.isnan(r):
            _fail("min_tokens_ratio", r, "give a fraction of tokens in (0, 1], e.g. 0.25")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            _fail("warmup_steps", w, "give a whole number of optimizer steps >= 0 (0: no curriculum)")
        if not isinstance(self.dynamic_threshold, bool):
            _fail("dynamic_threshold", self.dynamic_threshold, "give True or False")
        s = self.threshold_sensitivity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s <= 1.0):
            _fail("threshold_sensitivity", s, "give a number in [0, 1]")
        n = self.num_strata
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail("num_strata", n, "give a whole number of buckets >= 1")
        m = self.min_tokens_per_sequence
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            _fail("min_tokens_per_sequence", m, "give a whole number of tokens >= 0")
        a = self.importance_floor
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 <= a <= 1.0):  # NaN fails too
            _fail("importance_floor", a, "give the uniform share of importance sampling, a number in [0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "give an integer")
        object.__setattr__(self, "min_tokens_ratio", float(r))
        object.__setattr__(self, "threshold_sensitivity", float(s))
        object.__setattr__(self, "importance_floor", float(a))

    def replace(self, **options: Any) -> "GateConfig":
        """A copy with ``options`` changed; an unknown option name is a ValueError."""
        check_option_names(options)
        return dataclasses.replace(self, **options)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GateConfig))


def check_option_names(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"cggr_hook: unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}"
        )


def make_config(config: GateConfig | None, options: dict) -> GateConfig:
    """``config`` (or the defaults) with ``options`` applied, validated."""
    if config is not None and not isinstance(config, GateConfig):
        raise ValueError(f"cggr_hook: config={config!r} is not a GateConfig; build one with cggr_hook.GateConfig(...)")
    return (config or GateConfig()).replace(**options)
