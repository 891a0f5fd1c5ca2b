"""Row kernels of the gated loss, behind one dispatch point (installed as ``cggr_hook.kernels``).

Every caller goes through the functions here, in the order of the data flow (target_counts ->
row_stats -> row_difficulty -> [dynamic_ratio] -> difficulty_rank -> [importance_draw] -> selected_loss -> a gradient
kernel). Each runs
the function of the same name in the backend ``backend_for`` picks for its tensors:

- ``CGGR_HOOK_BACKEND=torch`` or ``=triton`` forces one; the variable is read once, at the first
  kernel call, and ``force_backend`` changes the choice later (Triton on a CPU tensor needs
  ``TRITON_INTERPRET=1``, Triton's interpreter, which is how CI tests the kernels);
- otherwise CUDA tensors take Triton (``scoring``, ``dynamic``, ``ranking``, ``importance``, ``strata``, ``gated_ce``) and every other
  device the PyTorch reference (``reference``).

What every backend computes, by name (scoring modes, reductions, the per-row statistics), is in
``spec``. A kernel failure raises: there is no silent fallback to another backend.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

import torch
from torch import Tensor

from . import reference, spec
from .spec import ImportanceDraw, RowStats

__all__ = [
    "RowStats",
    "ImportanceDraw",
    "as_rows",
    "backend_for",
    "force_backend",
    "forced_backend",
    "target_counts",
    "row_stats",
    "row_difficulty",
    "difficulty_rank",
    "ascending_order",
    "importance_draw",
    "importance_draw_at_ratio",
    "strata_at_ratio",
    "dynamic_ratio",
    "selected_loss",
    "ce_grad_rows",
    "ce_grad_dense_",
]

BACKENDS = ("torch", "triton")

# the Triton module of each kernel, imported on first use: importing cggr_hook never imports triton
_TRITON_MODULES = {
    "target_counts": "scoring",
    "row_stats": "scoring",
    "row_difficulty": "scoring",
    "difficulty_rank": "ranking",
    "ascending_order": "ranking",
    "importance_draw": "importance",
    "importance_draw_at_ratio": "importance",
    "strata_at_ratio": "strata",
    "dynamic_ratio": "dynamic",
    "selected_loss": "gated_ce",
    "ce_grad_rows": "gated_ce",
    "ce_grad_dense_": "gated_ce",
}


class _Choice:
    """The backend forced for every call (None: by the tensors' device), read from the environment
    at first use."""

    read = False
    forced: str | None = None
    interpreter = False  # TRITON_INTERPRET=1: Triton may run on CPU tensors


def _read_environment() -> None:
    if _Choice.read:
        return
    forced = os.environ.get("CGGR_HOOK_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:  # not remembered: every call says so until it is fixed
        raise ValueError(
            f"cggr_hook: CGGR_HOOK_BACKEND={forced!r} is not a backend; set it to 'torch' or 'triton', or unset it"
        )
    _Choice.forced = forced or None
    _Choice.interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    _Choice.read = True


def forced_backend() -> str | None:
    """The backend every kernel call is forced onto ('torch' or 'triton'), or None (by device)."""
    _read_environment()
    return _Choice.forced


def force_backend(name: str | None) -> str | None:
    """Run every later kernel call on ``name`` ('torch' or 'triton'), or by the tensors' device with
    None, whatever ``CGGR_HOOK_BACKEND`` said; returns the previous choice."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"cggr_hook: backend {name!r} is not a backend; use 'torch', 'triton' or None")
    previous = forced_backend()
    _Choice.forced = name
    return previous


def backend_for(t: Tensor) -> str:
    """The backend that handles tensor ``t`` now."""
    _read_environment()
    forced = _Choice.forced
    if forced:
        if forced == "triton" and not t.is_cuda and not _Choice.interpreter:
            raise ValueError(
                "cggr_hook: CGGR_HOOK_BACKEND=triton on a CPU tensor needs Triton's interpreter: "
                "also set TRITON_INTERPRET=1, or move the tensors to a CUDA device"
            )
        return forced
    return "triton" if t.is_cuda else "torch"


def _on_device_of(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's device for the launch (a
    tensor on cuda:1 while cuda:0 is current must not be launched on cuda:0)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _triton(name: str) -> Any:
    return importlib.import_module(f".{_TRITON_MODULES[name]}", __name__)


def _run(name: str, t: Tensor, *args: Any) -> Any:
    """Kernel ``name`` of the backend that handles ``t`` (``backend_for``), called with ``args``."""
    if backend_for(t) == "triton":
        with _on_device_of(t):
            return getattr(_triton(name), name)(*args)
    return getattr(reference, name)(*args)


def as_rows(logits: Tensor) -> Tensor:
    """A (B, T, V) view of logits of shape (..., V) without copying where strides allow.

    (N, V) becomes (1, N, V); (B, T, V) stays, contiguous or not (a shifted ``logits[:, :-1]``);
    more leading dims are merged when they can be viewed, else copied.
    """
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    V = logits.shape[-1]
    try:
        return logits.view(1, -1, V)
    except RuntimeError:
        return logits.reshape(1, -1, V)


def reads_by_descriptor(logits: Tensor) -> bool:
    """Whether the Triton scoring pass reads ``logits`` (any shape (..., V)) through a tensor
    descriptor (``scoring.load_path``), which holds their address on the host."""
    return _triton("row_stats").load_path(as_rows(logits)) == "tma"


def target_counts(targets: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """int64 (P, 2) partial counts of valid and bad targets (``reference.target_counts``)."""
    return _run("target_counts", targets, targets, vocab, ignore_index)


def row_stats(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int,
    weight: Tensor | None = None,
    with_wsum: bool = False,
    with_p2: bool = False,
    address: Tensor | None = None,
) -> RowStats:
    """Per-row lse, entropy, top-1/top-2 probabilities, target NLL (and sum_v w_v x_v, sum_v p_v^2).

    logits: (B, T, V) any float dtype, any strides; targets: (B*T,) int64. Outputs fp32 (B*T,).
    ``address``: Triton only, the logits' address as an int64 (1,) device tensor, read by the
    kernel in place of ``logits``' own (``scoring.row_stats``; a captured launch).
    """
    if address is not None:
        if backend_for(logits) != "triton":
            raise ValueError("cggr_hook: row_stats reads its logits at an address on the Triton backend only")
        with _on_device_of(logits):
            return _triton("row_stats").row_stats(logits, targets, ignore_index, weight, with_wsum, with_p2, address)
    return _run("row_stats", logits, logits, targets, ignore_index, weight, with_wsum, with_p2)


def row_difficulty(
    stats: RowStats,
    targets: Tensor,
    vocab: int,
    ignore_index: int,
    scoring: str,
    noise: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """fp32 (N,) difficulty of every row (-inf where the target is not valid) and float64 (P, 5)
    partial sums of ``spec.SUM_FIELDS`` that the host adds up."""
    return _run("row_difficulty", stats.lse, stats, targets, vocab, ignore_index, scoring, noise, label_smoothing)


def difficulty_rank(diff: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank) int64 (N,): rows hardest first (ties by row index) and each row's place in
    that order (``reference.difficulty_rank``). Triton counts ranks in one launch up to
    ``ranking.MAX_ROWS`` rows; past that a sort does less work and runs (the same order)."""
    if backend_for(diff) == "triton" and diff.numel() > _triton("difficulty_rank").MAX_ROWS:
        return reference.difficulty_rank(diff)
    return _run("difficulty_rank", diff, diff)


def ascending_order(keys: Tensor) -> Tensor:
    """int64 (N,): the stable ascending order of ``keys`` (``reference.ascending_order``). Triton
    counts it in one launch up to ``ranking.MAX_ROWS`` keys (a sort takes several launches and more
    host time); past that the sort runs (the same order)."""
    if backend_for(keys) == "triton" and keys.numel() > _triton("ascending_order").MAX_ROWS:
        return reference.ascending_order(keys)
    return _run("ascending_order", keys, keys)


def importance_draw(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    n_valid: int,
    k: int,
    floor: float,
    uniform: bool = False,
    norm: int | Tensor | None = 1,
) -> ImportanceDraw:
    """Draw k of the ``n_valid`` valid rows with inclusion probabilities pi by water-filling over
    their difficulty ``diff`` (fp32 (N,)), systematic sampling over the random order ``perm`` (int64
    (n_valid,), a permutation of the valid rows' ordinals: the j-th valid row in row order is j) from u (float64 (1,), uniform in [0, 1)); ``order`` and
    ``rank`` are ``difficulty_rank``'s. Returns the rows ascending (k,), 1 / pi of each (k,),
    ``row_weight`` (1 / pi) / ``norm`` fp32 (N,) (an int, or a float64 0-d device tensor), the
    selection key int64 (N,) (``key < 1``) and float64 (7,) ``spec.DRAW_FIGURES``
    (``reference.importance_draw``); ``norm`` None: n. No host synchronisation."""
    N = diff.numel()
    if not 1 <= k < n_valid <= N:
        raise ValueError(f"cggr_hook: importance_draw needs 1 <= k < n_valid <= N, got k={k}, n_valid={n_valid}, N={N}")
    for name, t, size in (("order", order, N), ("rank", rank, N), ("perm", perm, n_valid)):
        if t.dim() != 1 or t.numel() != size or t.dtype != torch.int64:
            raise ValueError(f"cggr_hook: {name} must be int64 of {size} rows, got {t.dtype} of shape {tuple(t.shape)}")
    if u.numel() != 1 or u.dtype != torch.float64:
        raise ValueError(f"cggr_hook: u must be one float64, got {u.dtype} of shape {tuple(u.shape)}")
    return _run("importance_draw", diff, diff, order, rank, perm, u, n_valid, k, float(floor), bool(uniform), norm)


def importance_draw_at_ratio(
    diff: Tensor,
    order: Tensor,
    rank: Tensor,
    perm: Tensor,
    u: Tensor,
    counts: Tensor,
    ratio: float | Tensor,
    capacity: int,
    floor: float,
    uniform: bool = False,
    norm: int | Tensor | None = None,
) -> ImportanceDraw:
    """``importance_draw`` where the host knows neither n nor k: n is the sum of ``counts``' first
    column (the valid targets of ``target_counts``' int64 (P, 2) or of ``row_difficulty``'s
    float64 (P, 5) partial sums), k = ``spec.keep_count(ratio, n)``, both counted
    on the device (``DRAW_FIGURES`` ends with them), and ``rows`` / ``inv_pi`` have ``capacity``
    slots (at least ``keep_count(ratio, N)``), the drawn rows ascending and then undrawn rows that
    carry no weight. ``perm`` (int64 (N,)): the random order of one key per row, whose ordinals
    below n order the valid rows. Where k = n every valid row is kept with pi = 1
    (``reference.importance_draw_at_ratio``). ``ratio`` may be a float64 device scalar (the dynamic
    threshold's, ``dynamic_ratio``); ``capacity`` must then hold keep_count(ratio, N) for any value
    it can take (the rows past ``capacity`` are not listed). No host synchronisation on Triton."""
    N = diff.numel()
    for name, t, size in (("order", order, N), ("rank", rank, N), ("perm", perm, N)):
        if t.dim() != 1 or t.numel() != size or t.dtype != torch.int64:
            raise ValueError(f"cggr_hook: {name} must be int64 of {size} rows, got {t.dtype} of shape {tuple(t.shape)}")
    if u.numel() != 1 or u.dtype != torch.float64:
        raise ValueError(f"cggr_hook: u must be one float64, got {u.dtype} of shape {tuple(u.shape)}")
    _check_counts(counts)
    ratio = _check_ratio("importance_draw_at_ratio", ratio, counts)
    # (a ratio on the device: its bound is the caller's, the host cannot check it)
    least = 0 if isinstance(ratio, Tensor) else spec.keep_count(ratio, N)
    if not least <= capacity <= N:
        raise ValueError(
            f"cggr_hook: importance_draw_at_ratio needs keep_count(ratio, N) <= capacity <= N, "
            f"got ratio={ratio}, capacity={capacity}, N={N}"
        )
    return _run(
        "importance_draw_at_ratio",
        diff,
        diff,
        order,
        rank,
        perm,
        u,
        counts,
        ratio,
        int(capacity),
        float(floor),
        bool(uniform),
        norm,
    )


def strata_at_ratio(counts: Tensor, ratio: float | Tensor, num_strata: int) -> Tensor:
    """``stratified`` selection's quotas at a ratio the host knows, n counted on the device:
    int64 (num_strata + 1,), the buckets' quotas (``spec.strata_quotas(n, keep_count(ratio, n),
    num_strata)``, hardest first, zeros past min(num_strata, n)) and then n, the sum of
    ``counts``' first column (``target_counts``' or ``row_difficulty``'s partials). Up to
    ``spec.MAX_STRATA`` buckets on either backend; ``ratio`` a float or a float64 device scalar;
    no host synchronisation on Triton."""
    _check_counts(counts)
    ratio = _check_ratio("strata_at_ratio", ratio, counts)
    if not isinstance(num_strata, int) or not 1 <= num_strata <= spec.MAX_STRATA:
        raise ValueError(
            f"cggr_hook: strata_at_ratio handles num_strata from 1 to {spec.MAX_STRATA}, got {num_strata!r}; "
            "a selection with more buckets reads n on the host (selection.choose_rows)"
        )
    return _run("strata_at_ratio", counts, counts, ratio, num_strata)


def dynamic_ratio(sums: Tensor, ratio: float, sensitivity: float, average: Tensor) -> Tensor:
    """The dynamic threshold's ratio of one batch on the device, float64 (1,): ``spec.dynamic_ratio``
    of the curriculum's ``ratio`` and ``sensitivity`` at the batch's mean confidence, from the
    scoring pass's partial sums ``sums`` (``row_difficulty``'s float64 (P, 5)), and the running
    average in ``average`` (float64 (2,) on the same device: the average, and 1 where there is one,
    else 0), which is updated in place (``spec.running_confidence``) unless the sums count a bad
    target (the call raises where its counts are read: it moves nothing). The selection kernels take
    the result as their ratio (``selected_loss``, ``importance_draw_at_ratio``,
    ``strata_at_ratio``). No host synchronisation on Triton."""
    if sums.dim() != 2 or sums.shape[1] != len(spec.SUM_FIELDS) or sums.dtype != torch.float64:
        raise ValueError(
            f"cggr_hook: dynamic_ratio needs row_difficulty's float64 (P, {len(spec.SUM_FIELDS)}) partial sums, got "
            f"{sums.dtype} of shape {tuple(sums.shape)}"
        )
    if (
        average.dtype != torch.float64
        or average.shape != (2,)
        or average.device != sums.device
        or not average.is_contiguous()
    ):
        raise ValueError(
            f"cggr_hook: dynamic_ratio's average must be a contiguous float64 tensor of shape (2,) on {sums.device} "
            f"(it is updated in place), got {average.dtype} of shape {tuple(average.shape)} on {average.device}"
        )
    r, s = float(ratio), float(sensitivity)
    if not 0.0 <= r <= 1.0 or not 0.0 <= s <= 1.0:
        raise ValueError(
            f"cggr_hook: dynamic_ratio needs a ratio and a sensitivity in [0, 1], got {ratio}, {sensitivity}"
        )
    return _run("dynamic_ratio", sums, sums, r, s, average)


def _check_ratio(name: str, ratio: float | Tensor, counts: Tensor) -> float | Tensor:
    """A kernel's ratio at which n is counted on the device: a float in [0, 1], or one float64 on
    ``counts``' device (computed there: ``dynamic_ratio``), passed on as it is."""
    if isinstance(ratio, Tensor):
        if ratio.dtype != torch.float64 or ratio.numel() != 1 or ratio.device != counts.device:
            raise ValueError(
                f"cggr_hook: {name} takes a ratio on the device as one float64 on {counts.device}, got "
                f"{ratio.dtype} of shape {tuple(ratio.shape)} on {ratio.device}"
            )
        return ratio
    r = float(ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"cggr_hook: {name} needs a ratio in [0, 1], got {ratio}")
    return r


def _check_counts(counts: Tensor) -> None:
    if counts.dim() != 2 or counts.shape[1] < 1 or counts.dtype not in (torch.int64, torch.float64):
        raise ValueError(
            "cggr_hook: counts must be partial counts whose first column counts valid targets (target_counts' "
            f"int64 (P, 2) or row_difficulty's float64 (P, 5)), got {counts.dtype} of shape {tuple(counts.shape)}"
        )


def selected_loss(
    stats: RowStats,
    targets: Tensor,
    vocab: int,
    sel_key: Tensor,
    sel_k: int,
    n_selected: int,
    n_valid: int,
    reduction: str,
    label_smoothing: float,
    weight: Tensor | None,
    row_weight: Tensor | None = None,
    count: Tensor | None = None,
    counts: Tensor | None = None,
    ratio: float | Tensor = 0.0,
    keep: Tensor | None = None,
    selected: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, row_scale): the gated loss of the rows with ``sel_key < sel_k`` and d loss / d ce_r
    of every row, fp32 (N,); ``row_weight`` (fp32 (N,)): each selected row's own factor in place
    of the reduction's; ``count``: with it, the valid rows' number as a float64 device scalar (the
    mean is NaN where it is 0); ``counts`` and ``ratio``: n_valid, sel_k and n_selected counted
    on the device from partial counts (their first column) as n and ``spec.keep_count(ratio, n)``
    (``ratio`` a float, or a float64 device scalar);
    ``keep`` (bool (N,), with ``counts``, without ``row_weight``): rows selected besides those,
    rows with valid targets only, the union's size written into ``selected`` (int64 (1,))
    (``reference.selected_loss``)."""
    if counts is not None:
        _check_counts(counts)
        ratio = _check_ratio("selected_loss", ratio, counts)
    if keep is not None:
        N = targets.numel()
        if keep.dtype != torch.bool or keep.shape != (N,) or keep.device != sel_key.device:
            raise ValueError(
                f"cggr_hook: keep must be a bool tensor of shape ({N},) on {sel_key.device}, got {keep.dtype} of "
                f"shape {tuple(keep.shape)} on {keep.device}"
            )
        if (
            selected is None
            or selected.dtype != torch.int64
            or selected.numel() != 1
            or selected.device != sel_key.device
        ):
            raise ValueError(
                f"cggr_hook: selected_loss with keep needs selected, an int64 tensor of one element on {sel_key.device}"
            )
    return _run(
        "selected_loss",
        stats.lse,
        stats,
        targets,
        vocab,
        sel_key,
        sel_k,
        n_selected,
        n_valid,
        reduction,
        label_smoothing,
        weight,
        row_weight,
        count,
        counts,
        ratio if isinstance(ratio, Tensor) else float(ratio),
        keep,
        selected,
    )


def ce_grad_rows(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    rows: Tensor,
    row_scale: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    out_dtype: torch.dtype,
    grad_output: Tensor | None = None,
) -> Tensor:
    """(K, V) gradient of the selected rows ``rows`` (int64, K): row k scaled by
    ``row_scale[rows[k]] * grad_output`` (``row_scale`` (N,), as ``ce_grad_dense_`` takes it;
    ``grad_output`` one element or one per row (N,), read at ``rows[k]``; None = 1)."""
    return _run(
        "ce_grad_rows", logits, logits, targets, lse, rows, row_scale, weight, label_smoothing, out_dtype, grad_output
    )


def ce_grad_dense_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    row_scale: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    out: Tensor,
    grad_output: Tensor | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """Dense (B, T, V) gradient into ``out`` (may be ``logits``): row r scaled by
    ``row_scale[r] * grad_output`` (one element or (N,)), zeros where ``row_scale`` is 0.
    ``order``: a permutation of the rows whose reverse Triton's programs follow (the selected rows
    last when they lead it); it changes the schedule, never the result."""
    if order is not None and logits.dim() == 3:  # (other shapes: the backend's own shape error)
        n_rows = logits.shape[0] * logits.shape[1]
        if order.dim() != 1 or order.numel() != n_rows or order.dtype != torch.int64:
            raise ValueError(
                f"cggr_hook: order must be an int64 permutation of the {n_rows} rows, got "
                f"{order.dtype} of shape {tuple(order.shape)}"
            )
    return _run(
        "ce_grad_dense_", logits, logits, targets, lse, row_scale, weight, label_smoothing, out, grad_output, order
    )
