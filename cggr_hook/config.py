"""GateConfig: every option of a gate as one validated, immutable object."""

from __future__ import annotations

import dataclasses
import functools
import numbers
from dataclasses import dataclass
from typing import Any

from . import auto as auto_mod
from .kernels.spec import SCORINGS as _SCORING_MODES
from .selection import SELECTIONS as _STRATEGIES

# the option values, from the tables that define them (kernels/spec.py, selection.py)
SCORINGS = tuple(_SCORING_MODES)
SELECTIONS = tuple(_STRATEGIES)


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"cggr_hook: {name}={value!r} is not valid: {fix}")


def _python_scalar(value: Any) -> Any:
    """The Python number held by a NumPy scalar, a 0-d array or a 0-d tensor (what torch takes for
    a number, e.g. a learning rate); anything else as it is."""
    if isinstance(value, (bool, int, float, str)) or getattr(value, "shape", None) != ():
        return value
    try:
        return value.item()
    except Exception:  # noqa: BLE001 - a meta tensor, or an object with a shape and no item(): not a number
        return value


def _wrong_type(name: str, value: Any, kind: str, fix: str) -> None:
    raise ValueError(f"cggr_hook: {name}={value!r} is a {type(value).__name__}, not {kind}: {fix}")


def _real(name: str, value: Any, fix: str) -> float:
    """``value`` as a float when it is a real number (bools are not), else a ValueError naming its type."""
    v = _python_scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        _wrong_type(name, value, "a real number", fix)
    return float(v)


def _whole(name: str, value: Any, fix: str) -> int:
    """``value`` as an int when it is an integer (bools are not), else a ValueError naming its type."""
    v = _python_scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        _wrong_type(name, value, "a whole number", fix)
    return int(v)


def _flag(name: str, value: Any, fix: str) -> bool:
    v = _python_scalar(value)
    if not isinstance(v, bool):
        _wrong_type(name, value, "True or False", fix)
    return v


def zero_floor_is_biased(scoring: str, label_smoothing: float = 0.0) -> bool:
    """Whether ``importance_floor=0`` would bias importance sampling with this scoring: the floor
    can be 0 only where a score of 0 means a zero gradient, so that no token that moves the model
    goes undrawn. gradnorm's does always; the target loss's and combined's do without label
    smoothing (a zero score is a one-hot prediction of the target); entropy's and margin's never
    (a confidently wrong token scores 0); random draws uniformly (``kernels.spec.SCORINGS``)."""
    rule = _SCORING_MODES[scoring].zero_is_no_gradient
    if rule == "always":
        return False
    if rule == "unsmoothed":
        return label_smoothing > 0
    return True


def check_zero_floor(config: GateConfig, label_smoothing: float = 0.0) -> None:
    if (
        config.selection == "importance"
        and config.importance_floor == 0.0
        and zero_floor_is_biased(config.scoring, label_smoothing)
    ):
        _fail(
            "importance_floor",
            config.importance_floor,
            f"with scoring={config.scoring!r}"
            + (f" and label_smoothing={label_smoothing}" if label_smoothing else "")
            + " a score of 0 does not mean a zero gradient, so such tokens could never be drawn and the "
            "loss would be biased: give a floor > 0 (e.g. 0.2) or scoring='gradnorm'",
        )


@dataclass(frozen=True)
class GateConfig:
    """Options of a gate (the option names of the original CGGR package).

    The defaults keep every token (``min_tokens_ratio=1.0``: the plain loss, exactly), through the
    gate's kernels or through the plain loss itself, whichever the gate timed faster on this run
    (``plain_when_faster``), and draw by importance sampling on the gradient-norm score once a
    smaller fraction is asked for: an unbiased estimate of the plain loss. They are what the
    quality benchmark found best at equal wall-clock (README, "Does it train better?"). The original
    package's configuration (combined scoring, top-k, a curriculum to 25%, the dynamic threshold)
    is ``GateConfig.preset("seed")``, or ``cggr_hook.enable(model, preset="seed")``.

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
        of the n valid tokens. ``min_tokens_ratio='auto'``: the gate picks the fraction itself
        (``auto.py``: the most expected progress per second, from step times measured on the run and
        the head's gradient noise; the plain loss where no fraction pays); the curriculum and the
        dynamic threshold do not apply then.
    dynamic_threshold, threshold_sensitivity: a batch less confident than the running average
        keeps more tokens (up to r * (1 + s), at most all), a more confident one fewer (down to
        r * (1 - s)).
    importance_floor: a in [0, 1], the uniform share of ``importance``'s sampling distribution
        (a = 1: uniform, k / n each; a = 0: proportional to the score).
    seed: seeds the draws of ``random`` scoring, ``stratified`` and ``importance`` sampling, which
        are a function of (seed, optimizer step, call within the step), so a resumed run draws the
        same tokens.
    plain_when_faster: where every token is kept (a fixed ratio of 1.0 without the dynamic
        threshold), time a few steps of the plain ``F.cross_entropy`` and a few through the gate's
        kernels (``auto.PROBE_STEPS`` at most each, again every ``auto.INTERVAL`` steps) and run
        the faster: the same loss either way, so where the gate's fixed cost outweighs what its
        kernels save (short steps, a small vocabulary), the run is not slowed. Under
        ``min_tokens_ratio='auto'``, whether the plain loss is one of its candidates. False: every
        step through the gate's kernels (their memory saving every step: a plain step holds
        Hugging Face's fp32 copy of the logits).
    cuda_graphs: on CUDA, where a call reads nothing on the host between its kernels (importance
        and top-k at a fixed ratio, from the end of its curriculum on), replay them as one CUDA
        graph from the fourth call of the same shapes and options (``capture.py``): the same
        loss and gradient for less host time. The graph reads each call's logits where they are
        and keeps a few floats a row of its own until ``cggr_hook.disable()``. False: every launch
        from Python.
    """

    scoring: str = "gradnorm"
    selection: str = "importance"
    min_tokens_ratio: float | str = 1.0
    warmup_steps: int = 0
    dynamic_threshold: bool = False
    threshold_sensitivity: float = 0.5
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    seed: int = 0
    importance_floor: float = 0.2
    plain_when_faster: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        # NumPy scalars and 0-d tensors are taken as the numbers they hold, as torch takes them, and
        # stored as Python numbers (a config compares, hashes and pickles as plain values); a value
        # of another type is named with its type, a number out of range with the range
        for name, choices in (("scoring", SCORINGS), ("selection", SELECTIONS)):
            v = _python_scalar(getattr(self, name))
            if not isinstance(v, str):
                _wrong_type(name, getattr(self, name), "a str", f"choose one of {', '.join(choices)}")
            if v not in choices:
                _fail(name, v, f"choose one of {', '.join(choices)}")
            object.__setattr__(self, name, str(v))
        fix = "give a fraction of tokens in (0, 1], e.g. 0.25, or 'auto'"
        if self.min_tokens_ratio == "auto":
            r = "auto"
        else:
            r = _real("min_tokens_ratio", self.min_tokens_ratio, fix)
            if not (0.0 < r <= 1.0):  # NaN fails this too
                _fail("min_tokens_ratio", self.min_tokens_ratio, fix)
        fix = "give a whole number of optimizer steps >= 0 (0: no curriculum)"
        w = _whole("warmup_steps", self.warmup_steps, fix)
        if w < 0:
            _fail("warmup_steps", self.warmup_steps, fix)
        d = _flag("dynamic_threshold", self.dynamic_threshold, "give True or False")
        fix = "give a number in [0, 1]"
        s = _real("threshold_sensitivity", self.threshold_sensitivity, fix)
        if not (0.0 <= s <= 1.0):
            _fail("threshold_sensitivity", self.threshold_sensitivity, fix)
        fix = "give a whole number of buckets >= 1"
        n = _whole("num_strata", self.num_strata, fix)
        if n < 1:
            _fail("num_strata", self.num_strata, fix)
        fix = "give a whole number of tokens >= 0"
        m = _whole("min_tokens_per_sequence", self.min_tokens_per_sequence, fix)
        if m < 0:
            _fail("min_tokens_per_sequence", self.min_tokens_per_sequence, fix)
        fix = "give the uniform share of importance sampling, a number in [0, 1]"
        a = _real("importance_floor", self.importance_floor, fix)
        if not (0.0 <= a <= 1.0):  # NaN fails this too
            _fail("importance_floor", self.importance_floor, fix)
        seed = _whole("seed", self.seed, "give an integer")
        pwf = _flag("plain_when_faster", self.plain_when_faster, "give True or False")
        graphs = _flag("cuda_graphs", self.cuda_graphs, "give True or False")
        for name, value in (
            ("min_tokens_ratio", r),
            ("warmup_steps", w),
            ("dynamic_threshold", d),
            ("threshold_sensitivity", s),
            ("num_strata", n),
            ("min_tokens_per_sequence", m),
            ("importance_floor", a),
            ("seed", seed),
            ("plain_when_faster", pwf),
            ("cuda_graphs", graphs),
        ):
            object.__setattr__(self, name, value)
        check_zero_floor(self)

    @property
    def auto_candidates(self) -> tuple | None:
        """What the gate chooses among by measured step time (``auto.py``), in probe order, or None
        where the kept fraction is the configured one: every candidate of ``'auto'``; at a fixed
        ratio of 1.0 (no dynamic threshold, which could lower it) with ``plain_when_faster``, the
        gate's kernels and the plain loss, which compute the same loss. Without
        ``plain_when_faster`` no candidate is the plain loss."""
        r = self.min_tokens_ratio
        if isinstance(r, str):  # 'auto'
            cands = auto_mod.CANDIDATES
        elif r >= 1.0 and not self.dynamic_threshold and self.plain_when_faster:
            return auto_mod.FULL_TOKENS
        else:
            return None
        return cands if self.plain_when_faster else tuple(c for c in cands if c != auto_mod.PLAIN)

    def replace(self, **options: Any) -> GateConfig:
        """A copy with ``options`` changed; an unknown option name is a ValueError."""
        check_option_names(options)
        return dataclasses.replace(self, **options)

    @classmethod
    def preset(cls, name: str, **options: Any) -> GateConfig:
        """A named configuration (``PRESETS``) with ``options`` changed."""
        if name not in PRESETS:
            raise ValueError(f"cggr_hook: preset={name!r} is not valid: choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name]).replace(**options)


# named configurations: "seed" is the original CGGR package's (hard top-k selection by the combined
# score, a curriculum from every token down to 25% over 1000 steps, the dynamic threshold)
PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(
        scoring="combined",
        selection="topk",
        min_tokens_ratio=0.25,
        warmup_steps=1000,
        dynamic_threshold=True,
        threshold_sensitivity=0.5,
        num_strata=4,
        min_tokens_per_sequence=1,
    ),
}


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GateConfig))


def _checked_init(init: Any) -> Any:
    @functools.wraps(init)
    def __init__(self: GateConfig, *args: Any, **options: Any) -> None:
        check_option_names(options)  # GateConfig(bogus=1): a ValueError naming it, as enable() gives
        init(self, *args, **options)

    return __init__


GateConfig.__init__ = _checked_init(GateConfig.__init__)


def check_option_names(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"cggr_hook: unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}"
        )


def make_config(config: GateConfig | None, options: dict, preset: str | None = None) -> GateConfig:
    """``config`` (or the named ``preset``, or the defaults) with ``options`` applied, validated."""
    if config is not None and not isinstance(config, GateConfig):
        raise ValueError(f"cggr_hook: config={config!r} is not a GateConfig; build one with cggr_hook.GateConfig(...)")
    if preset is not None:
        if config is not None:
            raise ValueError("cggr_hook: give config= or preset=, not both (GateConfig.preset(name, ...) builds one)")
        return GateConfig.preset(preset, **options)
    return (config or GateConfig()).replace(**options)
