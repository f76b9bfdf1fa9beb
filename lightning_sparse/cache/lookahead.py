"""The look-forward planner of a cached table: which scratchpad slot holds which row, and what to copy.

ScratchPipe (ISCA'22) trains a table in a small scratchpad of ``C`` slots while its rows live in a large,
slow backing store. Unlike an LRU cache, which learns that a row is missing when the lookup asks for it, the
planner reads the ids of the next ``k`` batches ahead of time: a batch enters the *window* ``k`` steps before
it is trained (:meth:`LookaheadPlanner.push`), its missing rows get slots then, and the copies run while the
current step computes. At the lookup every row is already in the scratchpad: a guaranteed hit.

Eviction is Belady's rule within the window: the victim is the slot whose next use is furthest ahead. A slot
whose row some batch of the window needs is never a victim (evicting it would cost a copy back within the
window). Copying a row in ``k`` batches early pins its slot for those batches, so the window is kept short;
the loader reads ids further, ``K`` batches ahead (``CacheConfig.horizon``), and those batches, known but not
yet planned, are passed to :meth:`LookaheadPlanner.push` as ``ahead``. Belady's rule continues over them: a
slot whose row no batch within ``K`` needs is evicted before one whose row is needed there, and among the
latter the furthest next use goes first. The slots no batch within ``K`` needs are a tie Belady cannot
break; the planner breaks it by an estimate of how soon each row is needed again. A row's rate of use (batches using it, per
batch) is estimated from its use count decayed by ``score_decay`` per batch (Kraken's feature score):
``rate = (1 - score_decay) * count`` (with ``score_decay`` 1, the plain count over the batches so far). Its
use is then expected within ``1 / rate`` batches; a row not used for ``a`` batches since has probability
``exp(-rate * a)`` of that under its estimated rate, so the estimate is discounted by it:
``key = rate * exp(-rate * a)``. The lowest key goes first (ties: the least recently used, then the lowest
slot). Frequency alone keeps rows that were hot and have gone cold (on a drifting stream they fill the
scratchpad); recency alone (LRU's order) evicts a hot row as readily as one used once. Both are measured in
``benchmarks/lookahead_cache.py``. When the rows of the window do not fit in ``C`` slots the planner stops
with :class:`WorkingSetTooLarge`, naming the batch and its rows.

The ids of a cached table are rows ``[0, N)``, so the map row -> slot is a dense int32 tensor of ``N``
entries (4 bytes a row, against ``4 * dim`` and more for the row itself) rather than the dynamic tables' hash
index, whose admission and expiry policies have no role here. The decayed counts are one float32 per row
(4 bytes: on a table larger than its memory budget the planner's bytes a row are taken from the scratchpad
and the page cache), kept as counts of growing weight (``1 / score_decay`` to the batch number, rescaled
when large) so that a use adds one number instead of decaying all rows. :mod:`lightning_sparse.cache.reference` is a
plain-Python twin of this planner; the tests compare their moves batch by batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


class WorkingSetTooLarge(ValueError):
    """The rows of the window's batches do not fit in the scratchpad."""


@dataclass(frozen=True)
class Moves:
    """The copies that make batch ``seq`` resident: write ``evict_rows`` back from ``evict_slots`` first
    (their rows' last use is over), then copy ``load_rows`` into ``load_slots``."""

    seq: int
    load_rows: Tensor
    load_slots: Tensor
    evict_rows: Tensor
    evict_slots: Tensor


class LookaheadPlanner:
    """Slots of a scratchpad of ``slots`` rows for a table of ``rows`` rows, planned over a window of batches.

    Args:
        rows: the table's rows N (ids are ``0 <= id < N``).
        slots: scratchpad slots C.
        table: the table's name, for error messages.
        score_decay: per-batch decay of a row's use count (1: plain counts).
    """

    def __init__(self, rows: int, slots: int, table: str = "table", score_decay: float = 0.997) -> None:
        if slots > rows:
            slots = rows  # a scratchpad larger than the table holds it whole
        self.rows, self.slots, self.table = rows, slots, table
        self.slot_of = torch.full((rows,), -1, dtype=torch.int32)
        self.row_of = torch.full((slots,), -1, dtype=torch.int64)
        self.last_use = torch.full((slots,), -1, dtype=torch.int64)
        self.window: deque[tuple[int, Tensor]] = deque()  # (seq, sorted unique rows) of batches not yet retired
        self.score = torch.zeros(rows, dtype=torch.float32)  # decayed use counts, times growth ** (seq - origin)
        self.slot_score = torch.full(
            (self.slots,), -1.0, dtype=torch.float64
        )  # the score of each slot's row; -1: empty
        self.growth = 1.0 / score_decay
        self.decay = score_decay
        self.origin = 0

    def state(self) -> dict[str, Tensor]:
        """The planner as tensors of fixed shapes, for a checkpoint: ``row_of``, ``last_use``, ``slot_score`` [C],
        ``score`` [N], ``origin`` [1], and ``window_seq`` [C], the last batch of the window using each slot's row
        (-1: none). That last batch is all the window means for the choice of victims: a slot is protected while
        any batch using its row is in the window, i.e. until that last one retires."""
        window_seq = torch.full((self.slots,), -1, dtype=torch.int64)
        for seq, rows in self.window:  # in batch order: a later batch overwrites an earlier one
            window_seq[self.slot_of[rows].long()] = seq
        return {
            "row_of": self.row_of.clone(),
            "last_use": self.last_use.clone(),
            "slot_score": self.slot_score.clone(),
            "score": self.score,
            "origin": torch.tensor([self.origin]),
            "window_seq": window_seq,
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Takes :meth:`state`'s tensors (of a planner of the same rows, slots and ``score_decay``)."""
        self.row_of.copy_(state["row_of"])
        self.last_use.copy_(state["last_use"])
        self.slot_score.copy_(state["slot_score"])
        if state["score"].data_ptr() != self.score.data_ptr():
            self.score.copy_(state["score"])
        self.origin = int(state["origin"][0])
        self.slot_of.fill_(-1)
        held = (self.row_of >= 0).nonzero().squeeze(1)
        self.slot_of[self.row_of[held]] = held.int()
        window_seq = state["window_seq"]
        self.window = deque(
            (int(seq), torch.sort(self.row_of[window_seq == seq]).values)
            for seq in torch.unique(window_seq[window_seq >= 0]).tolist()
        )

    def push(self, seq: int, ids: Tensor, ahead: Sequence[tuple[int, Tensor]] = ()) -> Moves:
        """Batch ``seq`` (its ids, any order, duplicates allowed) enters the window; returns the copies.
        ``ahead``: ``(batch, rows)`` of later batches already read (rows unique, batches ascending), whose next
        uses order the victims (module docstring); they do not enter the window."""
        rows = torch.unique(ids.reshape(-1).long().cpu())
        weight = use_weight(self, seq)  # first: it may rescale every count
        self.score[rows] += weight
        slot = self.slot_of[rows].long()
        missing = rows[slot < 0]
        empty = torch.empty(0, dtype=torch.int64)
        victims = empty
        if missing.numel():
            victims = self._victims(seq, rows, int(missing.numel()), ahead)
        evicted_rows = self.row_of[victims]
        held = evicted_rows >= 0
        evict_rows, evict_slots = evicted_rows[held], victims[held]
        self.slot_of[evict_rows] = -1
        self.slot_of[missing] = victims.int()
        self.row_of[victims] = missing
        slots = self.slot_of[rows].long()
        self.last_use[slots] = seq
        self.slot_score[slots] = self.score[rows].double()
        self.window.append((seq, rows))
        return Moves(seq, missing, victims, evict_rows, evict_slots)

    def retire(self, seq: int) -> None:
        """Batches up to ``seq`` are trained: their rows no longer hold slots for the window."""
        while self.window and self.window[0][0] <= seq:
            self.window.popleft()

    def lookup(self, ids: Tensor) -> Tensor:
        """The slots of ``ids`` (same shape and dtype); every id must be resident (a pushed batch's)."""
        slots = self.slot_of[ids.long().cpu()]
        if slots.numel() and int(slots.min()) < 0:
            absent = ids.reshape(-1)[(slots < 0).reshape(-1).to(ids.device)][:5].tolist()
            raise RuntimeError(
                f"cached table {self.table!r}: ids {absent} are not in the scratchpad at the lookup; their batch "
                "did not pass through the look-ahead loader (was the train loader iterated outside the trainer?)"
            )
        return slots.to(device=ids.device, dtype=ids.dtype)

    def resident(self, ids: Tensor) -> Tensor:
        """Whether each id has a slot now."""
        return self.slot_of[ids.long().cpu()] >= 0

    def _victims(self, seq: int, rows: Tensor, needed: int, ahead: Sequence[tuple[int, Tensor]] = ()) -> Tensor:
        """``needed`` slots holding no row of the window (nor of ``rows``): empty ones, then the rows no batch of
        ``ahead`` needs by their expected use, then those rows by their next use there, furthest first."""
        protected = torch.zeros(self.slots, dtype=torch.bool)
        for _, window_rows in self.window:
            held = self.slot_of[window_rows].long()
            protected[held[held >= 0]] = True
        held = self.slot_of[rows].long()
        protected[held[held >= 0]] = True
        if self.slots - int(protected.sum()) < needed:
            union = torch.unique(torch.cat([r for _, r in self.window] + [rows]))
            raise WorkingSetTooLarge(
                f"cached table {self.table!r}: batch {seq} needs {rows.numel()} rows and, with the "
                f"{len(self.window)} batch(es) before it in the look-ahead window, {union.numel()} distinct rows, "
                f"more than the scratchpad's {self.slots} slots. Raise TableConfig.cache.rows to at least "
                f"{union.numel()}, lower cache.lookahead, or use smaller batches."
            )
        # empty slots (never protected) first, by slot; then the lowest expected use (module docstring), the least
        # recent use, the lowest slot: only slots at or below the needed-th smallest key can be chosen, so only
        # those are sorted
        empty = (self.slot_score < 0).nonzero().squeeze(1)[:needed]
        needed -= int(empty.numel())
        if needed == 0:
            return empty
        key = self.expected_use(seq)
        if ahead:
            known = torch.full((self.slots,), -1, dtype=torch.int64)
            for later, later_rows in reversed(ahead):  # the earliest use last: it overwrites later ones
                held = self.slot_of[later_rows].long()
                known[held[held >= 0]] = later
            next_use = known >= 0
            key[next_use] = KNOWN_USE - known[next_use].double()
        key.masked_fill_(protected, float("inf"))
        key[empty] = float("inf")
        threshold = torch.topk(key, needed, largest=False, sorted=False).values.max()
        chosen = (key <= threshold).nonzero().squeeze(1)
        chosen = chosen[torch.sort(self.last_use[chosen], stable=True).indices]
        return torch.cat([empty, chosen[torch.sort(key[chosen], stable=True).indices[:needed]]])

    def expected_use(self, seq: int) -> Tensor:
        """Each slot's ``rate * exp(-rate * age)`` at batch ``seq`` (module docstring), float64 [C]; the lowest
        is evicted first (``benchmarks/planner_estimators.py`` measures other rules in its place)."""
        rate = self.slot_score.clamp(min=0.0) * rate_unit(self, seq)
        return rate * torch.exp(-rate * (seq - self.last_use).double())


def rate_unit(planner: "LookaheadPlanner | object", seq: int) -> float:
    """The factor from a stored count (``growth ** (use - origin)`` per use) to a rate of use per batch at batch
    ``seq``: ``(1 - decay) / growth ** (seq - origin)``; with ``decay`` 1, ``1 / (seq + 1)``."""
    if planner.decay >= 1.0:
        return 1.0 / (seq + 1)
    return (1.0 - planner.decay) / planner.growth ** (seq - planner.origin)


KNOWN_USE = 2.0**52  # key of a slot next used at batch b of ``ahead``: KNOWN_USE - b, above every expected use (<= 1)

RESCALE_AT = 2.0**64  # use weights (and counts, up to 1 / (1 - score_decay) of them) stay far from float32's overflow


def use_weight(planner: "LookaheadPlanner | object", seq: int) -> float:
    """The weight a use at batch ``seq`` adds to a row's count: ``growth ** (seq - origin)``; when it would
    pass ``RESCALE_AT`` every count is divided by it first (the same on ``planner.score``, a float32 tensor or
    a dict of floats the twin rounds to float32)."""
    weight = planner.growth ** (seq - planner.origin)
    if weight > RESCALE_AT:
        scores = planner.score
        if isinstance(scores, dict):
            for row in scores:
                scores[row] = float(np.float32(scores[row]) / np.float32(weight))
        else:
            scores /= weight
            held = (planner.slot_score >= 0).nonzero().squeeze(1)
            planner.slot_score[held] = scores[planner.row_of[held]].double()  # a held row's score, as at its use
        planner.origin, weight = seq, 1.0
    return weight
