"""A gated call's figures: the dict ``metrics()`` and ``CGGRLoss.get_metrics()`` hand out.

The gated forward (``pipeline.py``) builds them. A call whose host read did not need them leaves its
metric sums (``"_sums"``) and its importance draw's figures (``"_draw"``) on the device, as
``pipeline.HostRead``s whose events follow the kernels that wrote them; ``resolve`` reads them when
somebody asks. A selection at a fixed ratio leaves n and k there too: n in the sums, k =
``keep_count("_keep_ratio", n)`` (the dynamic threshold's ratio itself a ``HostRead``: it was
computed on the device), or sequence_aware's own count (``"_selected"``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from . import auto as auto_mod
from .kernels.spec import SUM_FIELDS, keep_count, sum_in_order


def add_partials(host: list, n_part: int) -> list:
    """The (P, 5) partial sums (``kernels.spec.SUM_FIELDS``), read row by row, each column added
    row after row (``sum_in_order``: the dynamic threshold's kernel adds them so too)."""
    n_fields = len(SUM_FIELDS)
    return [sum_in_order(host[j:n_part:n_fields]) for j in range(n_fields)]


def averages(sums: list, n_valid: int) -> dict:
    """The metric averages over valid tokens from the host sums (``kernels.spec.SUM_FIELDS``)."""
    avg = (lambda x: x / n_valid) if n_valid else (lambda x: math.nan)
    return {"avg_confidence": avg(sums[2]), "avg_entropy": avg(sums[3]), "avg_difficulty": avg(sums[4])}


def draw_figures(values: list, n_valid: int) -> dict:
    """An importance draw's figures (``selection.DRAW_FIGURES`` read on the host): the effective
    sample size of the Horvitz-Thompson weights w = 1 / pi, (sum w)^2 / sum w^2, the largest
    weight, the fraction of valid tokens kept with certainty (pi = 1), and the squared coefficient
    of variation of the scores, m2 / m1^2 - 1 (m1, m2: the mean score and squared score over valid
    tokens), from which the variance gain over uniform sampling at kept fraction f is predicted:
    (1 - f) (1 + cv2) / (1 - f (1 + cv2)) while no token is capped."""
    ess, max_w, n_certain, m1, m2 = values[:5]
    return {
        "ess": ess,
        "max_weight": max_w,
        "certain_fraction": n_certain / n_valid if n_valid else 0.0,
        "score_cv2": m2 / (m1 * m1) - 1.0 if m1 > 0 else math.nan,
    }


def plain_figures(step: int, scoring: str, state: auto_mod.AutoState, valid: Any = None) -> dict:
    """The figures of a call that the timed choice ran as the plain loss: every token kept
    (``token_ratio`` 1.0, and ``tokens_selected`` = ``tokens_total`` = ``valid``, the valid
    targets' count where the call's targets are known: an int, or a ``pipeline.HostRead`` read
    when asked) and the choice's figures; no averages (the plain loss computes none)."""
    m = dict(step=step, token_ratio=1.0, selection="plain", scoring=scoring, **auto_figures(state, auto_mod.PLAIN))
    if isinstance(valid, int):
        m["tokens_total"] = m["tokens_selected"] = valid
    elif valid is not None:
        m["_valid"] = valid
    return m


def resolve(m: dict) -> dict:
    """A call's figures with those left on the device read (a new dict; ``m`` itself when it has
    none left there)."""
    if "_sums" not in m and "_draw" not in m and "_valid" not in m:
        return m  # (a "_keep_ratio" always comes with its "_sums")
    m = dict(m)
    draw = m.pop("_draw").values() if "_draw" in m else None
    if draw is not None and "tokens_total" not in m:  # n and k were counted on the device
        n, k = int(draw[-2]), int(draw[-1])
        m.update(token_ratio=k / n if n else 0.0, tokens_selected=k, tokens_total=n)
    if "_valid" in m:
        m["tokens_total"] = m["tokens_selected"] = int(m.pop("_valid").values()[0])
    if "_sums" in m:
        host = m.pop("_sums").values()
        sums = add_partials(host, len(host))
        ratio = m.pop("_keep_ratio", None)
        if ratio is not None and not isinstance(ratio, numbers.Real):  # computed on the device
            ratio = ratio.values()[0]
        selected = m.pop("_selected", None)
        if ratio is not None and "tokens_total" not in m:  # a selection at a ratio: n and k on the device
            n = int(sums[0])
            # (sequence_aware's kernel counted its selection, the top k and the rows every sequence keeps)
            k = int(selected.values()[0]) if selected is not None else keep_count(float(ratio), n)
            m.update(token_ratio=k / n if n else 0.0, tokens_selected=k, tokens_total=n)
        m.update(averages(sums, m["tokens_total"]))
    if draw is not None:
        m.update(draw_figures(draw, m["tokens_total"]))
    return m


def auto_figures(state: auto_mod.AutoState, fraction: float | str) -> dict:
    """An auto gate's figures: the fraction this call ran (``auto_fraction``, 1.0 for the plain loss
    too, with ``auto_plain``), the current choice, the noise scale where a fraction below 1.0 is a
    candidate (NaN before the first estimate) and the step times of the last probe window
    (``step_ms_<candidate>``)."""
    out = {
        "auto_fraction": 1.0 if fraction == auto_mod.PLAIN else float(fraction),
        "auto_plain": fraction == auto_mod.PLAIN,
        "auto_choice": 1.0 if state.choice == auto_mod.PLAIN else float(state.choice),
        "auto_choice_plain": state.choice == auto_mod.PLAIN,
    }
    if state.has_fractions():
        b = state.noise_scale()
        out["noise_scale"] = math.nan if b is None else b
    for c, t in state.step_seconds.items():
        out[f"step_ms_{'plain' if c == auto_mod.PLAIN else round(100 * c)}"] = 1e3 * t
    return out


def as_scalars(figures: dict, prefix: str = "cggr/") -> dict:
    """The numeric figures of a ``metrics()`` dict but its ``step``, keys under ``prefix``."""
    return {
        prefix + k: v
        for k, v in figures.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
