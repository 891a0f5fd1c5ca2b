"""Selection: which rows contribute to the loss, given their difficulty.

``SELECTIONS`` names the strategies (``topk``, ``stratified``, ``sequence_aware``, ``importance``)
and what each needs. Every strategy works on whole tensors on the logits' device (no per-token
Python) and is split in two around the gated call's single host synchronisation:

1. ``rank_rows`` (before the sync): the stable descending order of difficulty, plus what
   ``sequence_aware`` must know to count its selection;
2. after it, with k and the number of valid rows on the host: ``selection_as_key`` describes the
   selected rows as ``key < threshold`` for the loss kernel (top-k: the rank, no new work), and
   ``choose_rows`` lists them, sorted ascending, as an int64 tensor whose length the host knows (no
   second sync) where a gradient over K rows needs them. ``importance`` draws its rows with
   weights instead (``importance_draw``).

Ties are broken by row index (lower first) through stable sorts, so ``topk`` takes exactly k rows
and the same ones on every device. Ignored rows carry difficulty -inf and sort after every valid row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from . import kernels
from .kernels.spec import strata_quotas, strata_sizes  # noqa: F401  (the strategies' public names)

if TYPE_CHECKING:
    from .config import GateConfig


@dataclass(frozen=True)
class Selection:
    """A selection strategy and what it needs from the gated call."""

    name: str
    draws: bool = False  # draws random numbers, seeded by (seed, step, call)
    # needs the rows' sequences, and its kept ranks on the host with the counts where k is read there
    per_sequence: bool = False
    weighted: bool = False  # each drawn row carries its own weight (Horvitz-Thompson)


# in the order the options list them
SELECTIONS: dict[str, Selection] = {
    s.name: s
    for s in (
        Selection("topk"),
        Selection("stratified", draws=True),
        Selection("sequence_aware", per_sequence=True),
        Selection("importance", draws=True, weighted=True),
    )
}


@dataclass
class Ranking:
    """The rows in difficulty order, as ``rank_rows`` leaves them for the selection."""

    order: Tensor  # (N,) rows by difficulty, hardest first, ties by row index
    rank: Tensor  # (N,) position of each row in ``order``
    keep: Tensor | None = None  # (N,) bool, rows every sequence keeps (sequence_aware)
    keep_ranks: Tensor | None = None  # (S*m,) ``rank`` of the kept rows, padded with N: synced with the stats


def rank_rows(diff: Tensor, valid: Tensor | None, config: GateConfig, seq: int | tuple[Tensor, int] | None) -> Ranking:
    """The difficulty order of the rows (and, for ``sequence_aware``, the rows each sequence keeps).

    ``seq`` says which sequence each row belongs to, for ``sequence_aware``: an int (rows per
    sequence, rows in order), a pair (int64 per-row sequence ids, number of sequences), or None
    (one sequence)."""
    # the order and each row's rank in it: top-k is then ``rank < k``, with k known only after the sync
    order, rank = kernels.difficulty_rank(diff)
    if not SELECTIONS[config.selection].per_sequence:
        return Ranking(order, rank)
    N = order.numel()
    m = config.min_tokens_per_sequence
    seq_id, pos_in_seq, n_seq = _sequence_places(order, seq)
    keep = cast(Tensor, valid) & (pos_in_seq < m)
    # a fixed-size vector (n_seq * m) of the kept rows' global ranks, padded with N, for the host
    # to count the selection; rows not kept scatter into one spare slot past the end (no boolean
    # indexing: that would sync)
    spare = n_seq * m
    slot = torch.where(keep, seq_id * m + pos_in_seq, torch.full_like(seq_id, spare))
    keep_ranks = torch.full((spare + 1,), N, dtype=torch.long, device=order.device)
    keep_ranks.scatter_(0, slot, torch.where(keep, rank, torch.full_like(rank, N)))
    return Ranking(order, rank, keep, keep_ranks[:spare])


def sequences(seq: int | tuple[Tensor, int] | None, n_rows: int) -> int:
    """The number of sequences ``seq`` (``rank_rows``) splits ``n_rows`` rows into."""
    if isinstance(seq, tuple):
        return int(seq[1])
    L = seq if seq else max(n_rows, 1)
    return (n_rows + L - 1) // L


def sequence_keep(order: Tensor, valid: Tensor, m: int, seq: int | tuple[Tensor, int] | None) -> Tensor:
    """``sequence_aware``'s rows that every sequence keeps whatever k is, the ``m`` hardest valid
    rows of each (``order``: the difficulty order; ``seq`` as ``rank_rows`` takes it), bool (N,);
    device operations of fixed sizes only, nothing read on the host."""
    return valid & (_sequence_places(order, seq)[1] < m)


def _sequence_places(order: Tensor, seq: int | tuple[Tensor, int] | None) -> tuple[Tensor, Tensor, int]:
    """(seq_id, pos_in_seq, n_seq): each row's sequence, its place in its sequence's difficulty
    order (0 the hardest), and the number of sequences."""
    N = order.numel()
    dev = order.device
    n_seq = sequences(seq, N)
    if isinstance(seq, tuple):
        seq_id = seq[0].to(device=dev, dtype=torch.long)
    else:
        seq_id = torch.arange(N, device=dev) // (seq if seq else max(N, 1))
    # within each sequence, rows by difficulty: a stable sort by sequence of the difficulty order
    by_seq = order[torch.sort(seq_id[order], stable=True).indices]
    # rows per sequence without bincount, which would read its maximum back to the host
    counts = torch.zeros(n_seq, dtype=torch.long, device=dev).index_add_(0, seq_id, torch.ones_like(seq_id))
    starts = torch.cumsum(counts, 0) - counts
    pos_in_seq = torch.empty_like(order)
    pos_in_seq[by_seq] = torch.arange(N, device=dev) - starts[seq_id[by_seq]]
    return seq_id, pos_in_seq, n_seq


def count_selected(config: GateConfig, k: int, n_rows: int, keep_ranks: list[int] | None) -> int:
    """How many rows ``choose_rows`` returns, known on the host: k, plus for sequence_aware the kept
    rows that the top k misses (``keep_ranks`` is padded with ``n_rows``)."""
    if not SELECTIONS[config.selection].per_sequence or keep_ranks is None:
        return k
    return k + sum(1 for r in keep_ranks if k <= r < n_rows)


def _topk(
    ranking: Ranking, n_valid: int, k: int, n_selected: int, config: GateConfig, generator: torch.Generator | None
) -> Tensor:
    return ranking.order[:k]


def _strata_take(n: int | Tensor, num_strata: int, keys: Tensor, quota_of: Tensor) -> tuple[Tensor, Tensor]:
    """``stratified``'s draw over the positions of the difficulty order: (grouped, take), ``grouped``
    the N positions by bucket and, inside a bucket, by their uniform ``keys`` (fp32 (N,), position p
    taking key p; ties by position), ``take`` whether each of them is drawn: the first
    ``quota_of[b]`` of bucket b. The n valid positions (the order's first n; ``n`` an int or an
    int64 device scalar) fall into S = min(num_strata, n) equal-count buckets, larger first; the
    ignored ones into bucket ``num_strata``, which gives none. ``quota_of``: int64 (num_strata + 1,)
    or more, indexed by bucket. No host synchronisation."""
    N = keys.numel()
    dev = keys.device
    pos = torch.arange(N, device=dev)
    # host numbers stay Python numbers and device ones stay there: a host number made a device
    # tensor would be copied from pageable memory, which waits for the stream (a hidden sync)
    if isinstance(n, Tensor):
        s_eff = torch.clamp(torch.clamp(n, max=num_strata), min=1)
        q = torch.div(n, s_eff, rounding_mode="floor")
        r = n - q * s_eff
        q_div = torch.clamp(q, min=1)
    else:
        s_eff = max(1, min(num_strata, n))
        q, r = divmod(n, s_eff)
        q_div = max(q, 1)
    big = r * (q + 1)
    bucket = torch.where(
        pos < big,
        torch.div(pos, q + 1, rounding_mode="floor"),
        r + torch.div(pos - big, q_div, rounding_mode="floor"),
    )
    bucket = torch.where(pos < n, bucket, num_strata)
    by_key = torch.sort(keys, stable=True).indices
    grouped = by_key[torch.sort(bucket[by_key], stable=True).indices]
    b = bucket[grouped]
    start = torch.where(b < r, b * (q + 1), big + (b - r) * q)
    take = (b < num_strata) & (pos - start < quota_of[b])
    return grouped, take


def stratified_keys(n_rows: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``stratified``'s random numbers: one uniform key per row of the call (fp32 (N,)), position p
    of the difficulty order taking key p. One per row, not per valid row, so that their number is
    known before the valid rows are counted and both paths (``_stratified``,
    ``stratified_at_ratio``) take the same numbers."""
    return torch.rand(n_rows, generator=generator, device=device)


def _stratified(
    ranking: Ranking, n_valid: int, k: int, n_selected: int, config: GateConfig, generator: torch.Generator | None
) -> Tensor:
    order = ranking.order
    dev = order.device
    S = config.num_strata
    quotas = kernels.spec.strata_quotas(n_valid, k, S)
    keys = stratified_keys(order.numel(), dev, generator)
    # the quotas by bucket, from host numbers as scalars (no copy from pageable memory)
    quota_of = torch.zeros(S + 1, dtype=torch.long, device=dev)
    for i, qi in enumerate(quotas):
        quota_of[i] = qi
    grouped, take = _strata_take(n_valid, S, keys, quota_of)
    return _first_marked(order[grouped], take, k)


def stratified_at_ratio(ranking: Ranking, strata: Tensor, keys: Tensor, num_strata: int) -> tuple[Tensor, Tensor]:
    """``stratified`` where the host knows neither n nor k: (order, rank) of a permutation of the
    rows whose first k are the drawn ones (the rows ``_stratified`` chooses with the same keys), so
    that the loss kernel and the head gradient take them as top-k's (``rank < k``, the order's
    first rows). ``strata``: ``kernels.strata_at_ratio``'s quotas and n; ``keys``:
    ``stratified_keys``'. No host synchronisation."""
    n = strata[num_strata]
    grouped, take = _strata_take(n, num_strata, keys, strata)
    # the drawn positions first, in their grouped order, then the rest
    first = grouped[torch.sort((~take).to(torch.int8), stable=True).indices]
    order = ranking.order[first]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return order, rank


def _sequence_aware(
    ranking: Ranking, n_valid: int, k: int, n_selected: int, config: GateConfig, generator: torch.Generator | None
) -> Tensor:
    mark = (ranking.rank < k) | cast(Tensor, ranking.keep)
    return _first_marked(torch.arange(ranking.order.numel(), device=ranking.order.device), mark, n_selected)


# the rows each strategy keeps when it keeps some of the valid rows (0 < k < n valid); importance
# draws its rows with weights instead (importance_draw)
_CHOOSERS = {"topk": _topk, "stratified": _stratified, "sequence_aware": _sequence_aware}


def choose_rows(
    ranking: Ranking, n_valid: int, k: int, n_selected: int, config: GateConfig, generator: torch.Generator | None
) -> Tensor:
    """Selected rows, ascending, int64 of length ``n_selected`` (= count_selected(...))."""
    order = ranking.order
    if k <= 0:
        return order[:0]
    if k >= n_valid:
        rows = order[:k]
    else:
        choose = _CHOOSERS.get(config.selection)
        if choose is None:
            raise ValueError(f"cggr_hook: unknown selection {config.selection!r}")
        rows = choose(ranking, n_valid, k, n_selected, config, generator)
    return torch.sort(rows).values


def selection_as_key(
    ranking: Ranking, n_valid: int, k: int, n_selected: int, config: GateConfig, generator: torch.Generator | None
) -> tuple[Tensor, int, Tensor | None]:
    """(key, threshold, rows): the selected rows are those with ``key < threshold``, which is how
    the loss kernel reads a selection; ``rows`` is ``choose_rows``'s list where building the key
    needed it, else None (top-k needs no new work: its key is the rank in the difficulty order)."""
    if k <= 0 or config.selection == "topk" or k >= n_valid:
        return ranking.rank, max(k, 0), None
    rows = choose_rows(ranking, n_valid, k, n_selected, config, generator)
    key = torch.ones_like(ranking.rank).index_fill_(0, rows, 0)
    return key, 1, rows


def every_valid_row(diff: Tensor, n_valid: int, need_rows: bool) -> tuple[Tensor, int, Tensor | None]:
    """``selection_as_key``'s (key, threshold, rows) where every valid row is kept (k = n valid),
    without the difficulty order: key 0 on the valid rows (difficulty > -inf), 1 on the ignored
    ones, threshold 1, and the valid rows ascending where ``need_rows``. The same rows as the
    order's first n, so the same loss and gradient; it spares the order (``kernels.difficulty_rank``:
    one Triton launch up to 8192 rows, a sort and a scatter past that)."""
    key = (diff == float("-inf")).to(torch.int64)
    return key, 1, kernels.reference.selected_rows(key, 1, n_valid) if need_rows else None


def _first_marked(candidates: Tensor, mark: Tensor, count: int) -> Tensor:
    """The ``count`` candidates where ``mark`` is True, without a data-dependent size (no sync)."""
    key = torch.where(mark, torch.zeros_like(candidates), torch.ones_like(candidates))
    idx = torch.sort(key, stable=True).indices[:count]
    return candidates[idx]


# --------------------------------------------------------------------------------------------------
# importance sampling
# --------------------------------------------------------------------------------------------------
Draw = kernels.ImportanceDraw  # k rows drawn by ``importance_draw``: rows, inv_pi, row_weight, key, figures
DRAW_FIGURES = kernels.spec.DRAW_FIGURES


def inclusion_probabilities(scores: Tensor, k: int, floor: float) -> tuple[Tensor, Tensor]:
    """Water-filling: pi_i = min(1, c q_i) with sum pi = k, for scores sorted descending.

    scores: (n,) non-negative, descending (+inf allowed: such a row is certain). q_i = (1 - a)
    s_i / sum s + a / n (uniform when every s is 0). The m largest q are capped at pi = 1, where
    m is the first j < k with (k - j) q_j <= sum_{i >= j} q_i (that condition, once true, stays
    true, and at j = k - 1 always is); the rest get c q_i with c = (k - m) / sum_{i >= m} q_i.
    Where that tail is all zero (a = 0 and fewer than k positive scores) its rows share the
    remaining k - m uniformly. Requires 1 <= k < n. Returns (pi float64 (n,), m 0-d int64), no
    host synchronisation (``kernels.reference.inclusion_probabilities``, what the draw computes).
    """
    return kernels.reference.inclusion_probabilities(scores, k, floor)


def systematic_draw(
    pi: Tensor, m: Tensor, k: int, generator: torch.Generator | None, keys: Tensor | None = None
) -> Tensor:
    """Exactly k positions of ``pi`` (float64 (n,), sum k, each <= 1) with inclusion probability
    exactly pi_i, ascending: systematic sampling over a random order. The m certain positions
    (pi = 1, the first m) take the points u, ..., u + m - 1 (u uniform in [0, 1)); the others follow
    in a random order (by ``keys``, uniform in [0, 1), drawn here when not given), which spreads
    the joint inclusions, and a position spanning pi_i <= 1 of the line holds at most one of the
    points u + j, with probability pi_i (``kernels.reference.systematic_hits``). No host
    synchronisation."""
    n = pi.numel()
    dev = pi.device
    if keys is None:
        keys = torch.rand(n, generator=generator, device=dev)
    perm = torch.sort(keys, stable=True).indices
    u = torch.rand(1, generator=generator, device=dev, dtype=torch.float64)
    certain = torch.arange(n, device=dev) < m
    drawn = kernels.reference.systematic_hits(pi, certain, ~certain, m, k, perm, u)
    return torch.sort((~drawn).to(torch.int8), stable=True).indices[:k]


def random_keys(n_rows: int, device: torch.device, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The importance draw's random numbers, both from ``generator``: the start u (float64 (1,)),
    then one uniform key per row of the call (fp32 (N,)), the j-th valid row in row order taking
    the j-th key (a row's key goes with the row, not with its place in the difficulty order: scores
    equal up to rounding, as two backends give them, may swap places there without changing the
    draw). The stable ascending order of the valid rows' keys is the draw's random order.

    One key per row, not per valid row, so that their number is known before the valid rows are
    counted (``importance_draw_at_ratio``) and both draws take the same numbers. On a CPU generator
    the first n keys do not depend on N, so that the draw does not depend on how many rows are
    ignored (the logits' route and the head's, which also lists each sequence's last position,
    draw the same rows); a CUDA generator lays its numbers out by the tensor's size, so there it does."""
    u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
    keys = torch.rand(n_rows, generator=generator, device=device)
    return keys, u


def importance_draw(
    ranking: Ranking,
    diff: Tensor,
    n_valid: int,
    k: int,
    floor: float,
    generator: torch.Generator | None,
    uniform: bool = False,
    norm: int | Tensor | None = 1,
) -> Draw:
    """Draw k of the n valid rows with pi = ``inclusion_probabilities`` of their difficulty (the
    score s >= 0; ``uniform``: every s equal, pi = k / n), by systematic sampling over the rows in
    the random order of ``random_keys``, each drawn row weighted (1 / pi) / ``norm`` (None: n)
    (``kernels.importance_draw``, one launch). ``ranking.order`` lists the valid rows first, by
    descending difficulty, which is the order water-filling needs. 1 <= k < n."""
    keys, u = random_keys(diff.numel(), diff.device, generator)
    perm = kernels.ascending_order(keys[:n_valid])  # a stable sort's order, counted in one launch on Triton
    return kernels.importance_draw(diff, ranking.order, ranking.rank, perm, u, n_valid, k, floor, uniform, norm)


def importance_draw_at_ratio(
    ranking: Ranking,
    diff: Tensor,
    counts: Tensor,
    ratio: float | Tensor,
    capacity: int,
    floor: float,
    keys_u: tuple[Tensor, Tensor],
    uniform: bool = False,
    norm: int | Tensor | None = None,
) -> Draw:
    """``importance_draw`` with n (the sum of the first column of ``counts``: the valid targets of
    ``target_counts``' or the scoring pass's partials) and k = ``kernels.spec.keep_count(ratio, n)`` counted on the device: the same rows, keys and
    weights as ``importance_draw`` given n and k, with ``rows`` listed in ``capacity`` slots (the
    drawn ones first; the rest carry no weight) and nothing read on the host
    (``kernels.importance_draw_at_ratio``). ``keys_u``: ``random_keys`` of the call's generator,
    drawn by the caller (inside a replayed graph, from the graph's generator)."""
    keys, u = keys_u
    perm = kernels.ascending_order(keys)  # the valid rows' keys are the first n: their order is kept
    return kernels.importance_draw_at_ratio(
        diff, ranking.order, ranking.rank, perm, u, counts, ratio, capacity, floor, uniform, norm
    )
