"""Rules for the rows beyond the look-ahead window, measured in the planner's place (issue 16).

Within the window the planner follows Belady (the slot next used furthest ahead goes first); beyond it every
row is a tie that an estimate of the row's next use breaks (``LookaheadPlanner.expected_use``). This script
swaps that estimate for others and prints the rows moved per step against LRU, on the streams and schedule of
``benchmarks/lookahead_cache.py`` (same batches, same counting: rows copied in + dirty rows written back,
after the warm-up):

- ``current``: the planner's rule, ``rate * exp(-rate * age)``, ``rate`` from the use count decayed by 0.997
  per batch;
- ``shrunk a=0.95``: the same with the count less ``a`` (floored at 1e-6 uses): a row's popularity has a
  power-law prior (Zipf(s) ranks: density ``p^(-1-1/s)``), so after ``n`` uses the posterior mean rate is
  about ``(n - 1/s) / T``, not ``n / T``: a row seen once is almost surely a tail row, evicted (least recently
  used first) before any row seen twice;
- ``shrunk a=0.95, decay 0.995``: the same with a faster decay;
- ``probation``: a TinyLFU-style doorkeeper: rows used once so far go first (least recently used first),
  then the current rule;
- ``inter-arrival``: ``rate = 1 / max(gap, age)``, ``gap`` the batches between the row's last two uses
  (infinite for a row used once), discounted as the current rule.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=.. python planner_estimators.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch
from lookahead_cache import add_stream_arguments, stream  # benchmarks/, next to this script
from torch import Tensor

from lightning_sparse.cache import LookaheadPlanner, Moves, WorkingSetTooLarge
from lightning_sparse.cache.lookahead import rate_unit
from lightning_sparse.cache.reference import lru_moves
from lightning_sparse.cache.scratchpad import CachedTable


class Estimating(LookaheadPlanner):
    """The planner with another ``expected_use``; keeps each row's uses and the gap between its last two."""

    def __init__(self, rows: int, slots: int, rule: str, shrink: float = 0.0, decay: float = 0.997) -> None:
        super().__init__(rows, slots, "bench", decay)
        self.rule, self.shrink = rule, shrink
        self.seen = torch.full((rows,), -1, dtype=torch.int32)
        self.uses = torch.zeros(rows, dtype=torch.int32)
        self.slot_gap = torch.full((self.slots,), float("inf"), dtype=torch.float64)
        self.slot_uses = torch.zeros(self.slots, dtype=torch.int32)

    def push(self, seq: int, ids: Tensor, ahead: Sequence[tuple[int, Tensor]] = ()) -> Moves:
        moves = super().push(seq, ids, ahead)
        rows = torch.unique(ids.reshape(-1).long())
        before = self.seen[rows].double()
        slots = self.slot_of[rows].long()
        self.slot_gap[slots] = torch.where(before >= 0, seq - before, torch.full_like(before, float("inf")))
        self.seen[rows] = seq
        self.uses[rows] += 1
        self.slot_uses[slots] = self.uses[rows]
        return moves

    def expected_use(self, seq: int) -> Tensor:
        age = (seq - self.last_use).double()
        unit = rate_unit(self, seq)
        rate = self.slot_score.clamp(min=0.0) * unit
        if self.rule == "shrunk":
            uses = rate / (1.0 - self.decay)  # the decayed count in uses
            rate = (uses - self.shrink).clamp(min=1e-6) * (1.0 - self.decay)
        elif self.rule == "inter-arrival":
            rate = 1.0 / torch.maximum(self.slot_gap, age)
        key = rate * torch.exp(-rate * age)
        if self.rule == "probation":
            key[self.slot_uses <= 1] = 0.0  # ties: least recently used first
        return key


RULES = {
    "current": dict(rule="current"),
    "shrunk a=0.95": dict(rule="shrunk", shrink=0.95),
    "shrunk a=0.95, decay 0.995": dict(rule="shrunk", shrink=0.95, decay=0.995),
    "probation": dict(rule="probation"),
    "inter-arrival": dict(rule="inter-arrival"),
}


def moved(batches: list[Tensor], rows: int, slots: int, k: int, warm: int, rule: dict) -> float:
    """Rows moved per step after the warm-up, by the schedule of ``lookahead_cache.ours`` with the window's ids
    alone (K = k): every slot beyond the window is then ordered by the estimate under test."""
    table = CachedTable("bench", rows, slots, None, None)
    table.planner = Estimating(rows, slots, **rule)
    total = 0
    for t, ids in enumerate(batches):
        table.planner.retire(t - 1)
        for seq in range(0 if t == 0 else t + k, min(t + k, len(batches) - 1) + 1):
            table.plan(seq, batches[seq])
        table.mark_trained(ids)
        counters = table.take_counters()
        if t >= warm:
            total += counters["rows_in"] + counters["rows_back"]
    return total / (len(batches) - warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_stream_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"Rows moved per step / LRU's, {args.rows} rows, {args.ids} ids a batch, {args.steps} steps ({args.warm} warm-up)\n"
    )
    print("| stream | C | rule | k=1 | k=2 | k=4 |")
    print("|---|---:|---|---:|---:|---:|")
    for kind in ("zipf", "drifting"):
        batches = stream(kind, args.steps, args.rows, args.ids, args.drift)
        plain = [b.tolist() for b in batches]
        for fraction in (0.05, 0.10, 0.25):
            slots = int(args.rows * fraction)
            lru = sum(lru_moves(plain, slots)[args.warm :]) / (args.steps - args.warm)
            for name, rule in RULES.items():
                cells = []
                for k in (1, 2, 4):
                    try:
                        cells.append(f"{moved(batches, args.rows, slots, k, args.warm, rule) / lru:.3f}x")
                    except WorkingSetTooLarge:
                        cells.append("window does not fit")
                print(f"| {kind} | {fraction:.0%} | {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
