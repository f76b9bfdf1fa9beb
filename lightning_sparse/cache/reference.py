"""Plain-Python twin of :class:`~lightning_sparse.cache.lookahead.LookaheadPlanner`: dicts and lists, no tensors.

It states the planner's rule in the most literal form: for each missing row of the new batch, the victim
is the slot with the furthest next use within the window (no use in the window counts as beyond it; a
slot some window batch needs is never taken); beyond the window, first the slots whose row no batch of
``ahead`` needs, the lowest ``rate * exp(-rate * age)`` first (``rate`` from the decayed use count, ``age``
the batches since the last use), then those a batch of ``ahead`` needs, the furthest next use first; ties
broken by the least recent use, then the lowest slot.
The tests feed both the same batches and compare every move; :func:`lru_moves` and
:func:`prefetch_moves` are the baselines of ``benchmarks/lookahead_cache.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from lightning_sparse.cache.lookahead import rate_unit, use_weight


class ReferencePlanner:
    """The same slots and moves as ``LookaheadPlanner`` for the same batches."""

    def __init__(self, rows: int, slots: int, score_decay: float = 0.997) -> None:
        self.slots = min(slots, rows)
        self.score: dict[int, float] = {}
        self.growth, self.decay, self.origin = 1.0 / score_decay, score_decay, 0
        self.slot_of: dict[int, int] = {}
        self.row_of: list[Optional[int]] = [None] * self.slots
        self.last_use: list[int] = [-1] * self.slots
        self.window: list[tuple[int, set[int]]] = []

    def push(
        self, seq: int, ids: Iterable[int], ahead: Sequence[tuple[int, Iterable[int]]] = ()
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """(load rows, load slots, evicted rows, their slots), rows ascending as the planner returns them.
        ``ahead``: ``(batch, ids)`` of later batches known but not in the window."""
        rows = sorted(set(int(i) for i in ids))
        weight = use_weight(self, seq)
        for row in rows:
            self.score[row] = float(np.float32(self.score.get(row, 0.0)) + np.float32(weight))  # float32, as stored
        missing = [r for r in rows if r not in self.slot_of]

        def next_use(slot: int) -> float:
            row = self.row_of[slot]
            if row is None:
                return float("inf")
            if row in rows:
                return seq
            return min((s for s, batch in self.window if row in batch), default=float("inf"))

        candidates = [s for s in range(self.slots) if next_use(s) == float("inf")]
        if len(candidates) < len(missing):
            raise ValueError(f"batch {seq}: the window's rows do not fit in {self.slots} slots")
        unit = rate_unit(self, seq)

        known: dict[int, int] = {}
        for later, later_ids in ahead:
            for row in later_ids:
                known.setdefault(int(row), later)

        def order(slot: int) -> tuple:
            row = self.row_of[slot]
            if row is None:
                return (0, -1.0, self.last_use[slot], slot)
            if row in known:
                return (1, -known[row], self.last_use[slot], slot)
            rate = self.score[row] * unit
            return (0, rate * math.exp(-rate * (seq - self.last_use[slot])), self.last_use[slot], slot)

        candidates.sort(key=order)
        victims = candidates[: len(missing)]
        evicted = [(self.row_of[s], s) for s in victims if self.row_of[s] is not None]
        for row, _ in evicted:
            del self.slot_of[row]
        for row, slot in zip(missing, victims):
            self.slot_of[row] = slot
            self.row_of[slot] = row
        for row in rows:
            self.last_use[self.slot_of[row]] = seq
        self.window.append((seq, set(rows)))
        return missing, victims, [r for r, _ in evicted], [s for _, s in evicted]

    def retire(self, seq: int) -> None:
        self.window = [(s, b) for s, b in self.window if s > seq]


def schedule(num_batches: int, lookahead: int, horizon: int) -> Iterator[tuple[int, list[tuple[int, range]]]]:
    """CachedTables' planning schedule over a known list of ``num_batches`` batches (the twin, the tests and the
    benchmarks replay it): before step ``t`` the planner retires batch ``t - 1`` (the caller does), then plans
    batch ``t + lookahead`` (batches ``0 .. lookahead`` at step 0), each with the batches after it up to
    ``t + horizon`` as ``ahead``. Yields ``(t, [(seq, its ahead batch numbers), ...])``."""
    last = num_batches - 1
    for t in range(num_batches):
        seqs = range(0 if t == 0 else t + lookahead, min(t + lookahead, last) + 1)
        yield t, [(seq, range(seq + 1, min(t + horizon, last) + 1)) for seq in seqs]


def lookahead_moves(
    batches: Sequence[Sequence[int]],
    rows: int,
    slots: int,
    lookahead: int,
    score_decay: float = 0.997,
    horizon: Optional[int] = None,
) -> list[int]:
    """Rows copied (in + back) per training step by the look-forward planner over ``batches``, copying
    ``lookahead`` batches ahead and choosing victims with the ids ``horizon`` (default: ``lookahead``) ahead."""
    horizon = lookahead if horizon is None else horizon
    planner = ReferencePlanner(rows, slots, score_decay)
    per_step = [0] * len(batches)
    dirty: set[int] = set()
    for step, plans in schedule(len(batches), lookahead, horizon):
        planner.retire(step - 1)
        for seq, later in plans:
            loads, _, evicted, _ = planner.push(seq, batches[seq], [(s, batches[s]) for s in later])
            per_step[step] += len(loads) + sum(1 for r in evicted if r in dirty)
            dirty -= set(evicted)
        dirty |= set(int(i) for i in batches[step])
    return per_step


def lru_moves(
    batches: Sequence[Sequence[int]], slots: int, ahead: int = 0, misses: Optional[list[int]] = None
) -> list[int]:
    """Rows copied (in + back) per step by an LRU cache of ``slots`` rows that loads a batch's misses at its
    lookup (``ahead=0``), or one batch ahead with the current batch's rows locked (``ahead=1``: fbgemm's
    ``prefetch_pipeline``). Every trained row is dirty, so an evicted trained row is written back. ``misses``,
    if given, gets each step's rows loaded at their own lookup."""
    cache: "OrderedDict[int, bool]" = OrderedDict()  # row -> dirty, least recently used first
    per_step = [0] * len(batches)

    def admit(step: int, batch: Sequence[int], locked: set[int]) -> int:
        loaded = 0
        for row in sorted(set(int(i) for i in batch)):
            if row in cache:
                cache.move_to_end(row)
                continue
            if len(cache) >= slots:
                victim = next((r for r in cache if r not in locked), None)
                if victim is None:
                    raise ValueError(f"step {step}: the locked rows fill all {slots} slots")
                per_step[step] += int(cache.pop(victim))
            cache[row] = False
            per_step[step] += 1
            loaded += 1
        return loaded

    for step, batch in enumerate(batches):
        missed = 0
        if ahead == 0 or step == 0:
            missed = admit(step, batch, set(int(i) for i in batch))
        if misses is not None:
            misses.append(missed)
        if ahead and step + 1 < len(batches):
            admit(step, batches[step + 1], set(int(i) for i in batch) | set(int(i) for i in batches[step + 1]))
        for row in set(int(i) for i in batch):
            cache[row] = True
    return per_step


def _murmur_set(row: int, sets: int) -> int:
    """fbgemm's ``cache_slot``: MurmurHash3's 64-bit finaliser of the row's index, modulo the number of sets."""
    h = row & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    return h % sets


def fbgemm_lru_moves(
    batches: Sequence[Sequence[int]], slots: int, ways: int = 32, misses: Optional[list[int]] = None
) -> list[int]:
    """Rows moved per step by a cache laid out as fbgemm's LRU cache (``CacheAlgorithm.LRU``): ``slots // ways``
    sets of ``ways`` slots, a row's set chosen by fbgemm's hash of its index; a batch's misses in a set take
    the set's least recently used slots (stamped with the batch number), never one the batch itself uses; a
    miss that finds no such slot is read and updated in the backing store directly (counted as a row in and
    a row back). fbgemm writes every evicted row back (it keeps no dirty bit); every cached row was trained
    by the batch that loaded it, so this counts the same as a dirty write-back."""
    sets = max(1, slots // ways)
    rows_of = [[-1] * ways for _ in range(sets)]
    stamp_of = [[-1] * ways for _ in range(sets)]
    per_step = [0] * len(batches)
    for step, batch in enumerate(batches):
        missed: dict[int, list[int]] = {}
        for row in sorted(set(int(i) for i in batch)):
            s = _murmur_set(row, sets)
            if row in rows_of[s]:
                stamp_of[s][rows_of[s].index(row)] = step
            else:
                missed.setdefault(s, []).append(row)
        for s, rows in missed.items():
            order = sorted(range(ways), key=lambda w: stamp_of[s][w])
            for i, row in enumerate(rows):
                way = order[i] if i < ways else None
                if way is None or stamp_of[s][way] == step:
                    per_step[step] += 2
                    continue
                per_step[step] += 1 + int(rows_of[s][way] >= 0)
                rows_of[s][way], stamp_of[s][way] = row, step
        if misses is not None:
            misses.append(sum(len(rows) for rows in missed.values()))
    return per_step


def belady_moves(batches: Sequence[Sequence[int]], slots: int) -> list[int]:
    """Rows moved per step by Belady's MIN with the whole stream known (no planner can see that far): a
    batch's missing rows replace the rows, not in the batch, whose next use is furthest ahead. The bound the
    estimate beyond the look-ahead window aims at; the same counting as :func:`lru_moves`."""
    import heapq

    uses = [set(int(i) for i in batch) for batch in batches]
    following: list[dict[int, float]] = [{} for _ in uses]
    upcoming: dict[int, float] = {}
    for step in range(len(uses) - 1, -1, -1):
        following[step] = {row: upcoming.get(row, math.inf) for row in uses[step]}
        upcoming.update({row: step for row in uses[step]})
    cached: dict[int, float] = {}  # row -> its next use
    dirty: set[int] = set()
    heap: list[tuple[float, int]] = []  # (-next use, row); stale entries are skipped
    per_step = [0] * len(uses)
    for step, rows in enumerate(uses):
        per_step[step] += sum(1 for row in rows if row not in cached)
        for row in rows:
            cached[row] = following[step][row]
            heapq.heappush(heap, (-following[step][row], row))
        kept = []
        while len(cached) > slots:
            entry = heapq.heappop(heap)
            row = entry[1]
            if cached.get(row) != -entry[0]:
                continue
            if row in rows:
                kept.append(entry)
                continue
            del cached[row]
            per_step[step] += int(row in dirty)
            dirty.discard(row)
        for entry in kept:
            heapq.heappush(heap, entry)
        dirty |= rows
    return per_step
