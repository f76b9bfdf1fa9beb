"""One cached table on one rank: its planner, its scratchpad tensors, its backing store and the copies between.

The scratchpad is the native route's table itself: the TBE holds ``C`` rows and the native optimizer's
per-row state ``C`` rows, and the batch's ids are replaced by slots before the lookup, so our kernels
update slot rows exactly as they would update the table's rows (each row's update reads only that row,
its state and its gradient, which the kernels sum in batch order whatever the row's number). The
optimizer's step counter of the Adam kinds is one per table and stays with the scratchpad.

Every rank runs the same planner over the same (all ranks') batches, so each rank replaces its own ids by
the same slots; only the rank holding the table has a backing store and copies. Copies run on one side
thread, in the order they were planned: evicted slots' dirty rows (weight and state) are written back,
then the window's missing rows are copied in. A batch is planned ``k`` steps before it is trained, and
its victims are slots no batch of the window uses, so the copies never touch rows the current step reads
or updates; the thread is joined before the next plan, a checkpoint or an evaluation lookup.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch
from torch import Tensor

from lightning_sparse.cache.backing import BackingStore
from lightning_sparse.cache.lookahead import LookaheadPlanner, Moves

COUNTERS = ("lookups", "hits", "rows_in", "rows_back", "bytes_moved")


class CachedTable:
    """A scratchpad of ``slots`` rows over a backing store of ``rows`` rows.

    Args:
        name: the table's name.
        rows: the table's rows N.
        slots: scratchpad slots C.
        scratch: the scratchpad's per-row tensors on the rank holding the table (``weight`` and per-row
            optimizer state, each ``[C, ...]``), ``None`` on other ranks.
        store: the backing store with the same names, ``[N, ...]`` (``None`` on other ranks).
        score_decay: see :class:`~lightning_sparse.config.CacheConfig`.
    """

    def __init__(
        self,
        name: str,
        rows: int,
        slots: int,
        scratch: Optional[dict[str, Tensor]],
        store: Optional[BackingStore],
        score_decay: float = 0.997,
    ) -> None:
        self.name = name
        self.planner = LookaheadPlanner(rows, slots, name, score_decay)
        self.scratch = scratch
        self.store = store
        self.dirty = torch.zeros(self.planner.slots, dtype=torch.bool)
        self.row_bytes = store.row_bytes if store is not None else 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"cache-{name}") if store is not None else None
        self._pending: list[Future] = []
        self.counters = dict.fromkeys(COUNTERS, 0)

    @property
    def holds_rows(self) -> bool:
        return self.store is not None

    # ------------------------------------------------------------ planning
    def plan(self, seq: int, ids: Tensor, ahead: Sequence[tuple[int, Tensor]] = ()) -> Moves:
        """Batch ``seq`` (all ranks' ids) enters the window; its copies start on the side thread. ``ahead``: the
        later batches read (:meth:`LookaheadPlanner.push`)."""
        moves = self.planner.push(seq, ids, ahead)
        dirty = self.dirty[moves.evict_slots]
        self.dirty[moves.load_slots] = False
        back_rows, back_slots = moves.evict_rows[dirty], moves.evict_slots[dirty]
        self.counters["rows_in"] += int(moves.load_rows.numel())
        self.counters["rows_back"] += int(back_rows.numel())
        self.counters["bytes_moved"] += (int(moves.load_rows.numel()) + int(back_rows.numel())) * self.row_bytes
        if self._executor is not None and (moves.load_rows.numel() or back_rows.numel()):
            self._pending.append(
                self._executor.submit(self._copy, back_rows, back_slots, moves.load_rows, moves.load_slots)
            )
        return moves

    def _copy(self, back_rows: Tensor, back_slots: Tensor, load_rows: Tensor, load_slots: Tensor) -> None:
        with torch.no_grad():
            if back_rows.numel():
                device = next(iter(self.scratch.values())).device
                slots = back_slots.to(device)
                self.store.write(back_rows, {n: t.index_select(0, slots).cpu() for n, t in self.scratch.items()})
            if load_rows.numel():
                values = self.store.read(load_rows)
                for name, tensor in self.scratch.items():
                    tensor.index_copy_(
                        0, load_slots.to(tensor.device), values[name].to(tensor.device, non_blocking=True)
                    )

    def wait(self) -> None:
        """Joins the copies in flight (re-raising their error, if any)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def lookup(self, ids: Tensor) -> Tensor:
        """Slots of this rank's ``ids``."""
        return self.planner.lookup(ids)

    def mark_trained(self, ids: Tensor) -> None:
        """The step trains these rows (all ranks' ids): their slots become dirty."""
        if ids.numel():
            self.dirty[self.planner.lookup(ids).long()] = True

    # --------------------------------------------------------- checkpoints
    @torch.no_grad()
    def flush(self) -> None:
        """Writes every dirty slot back: the backing store then holds the whole table."""
        self.wait()
        if self.store is not None:
            slots = self.dirty.nonzero().squeeze(1)
            if slots.numel():
                rows = self.planner.row_of[slots]
                device = next(iter(self.scratch.values())).device
                self.store.write(rows, {n: t.index_select(0, slots.to(device)).cpu() for n, t in self.scratch.items()})
            self.store.flush()
        self.dirty.zero_()

    def take_counters(self) -> dict[str, int]:
        counters, self.counters = self.counters, dict.fromkeys(COUNTERS, 0)
        return counters

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
