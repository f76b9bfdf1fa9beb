"""A planner hint: for each table, the bytes per step each sharding type would send for the batches seen.

:class:`BatchStats` are counted from the training batches themselves (samples, ids, and how many ids fall
outside the rank's own row block if the table were split row-wise over the ranks); :func:`sharding_hint` turns
the stats of every rank into the bytes per step of ``table_wise``, ``column_wise``, ``row_wise`` and
``data_parallel``, summed over ranks, by the closed forms below (the ones ``benchmarks/communication.py``
checks against measured bytes, generalised from 2 to ``W`` ranks). Per table, per step, with ``B_r`` samples
and ``n_r`` ids on rank ``r``, ``x_r`` of them outside rank ``r``'s row block, dimension ``D``, ``N`` rows,
int64 ids and lengths, float32 values:

- ``table_wise`` (owner ``o``, the least loaded rank taken as the owner): ``sum_{r != o} 8 (B_r + n_r) + 2 * 4 B_r D``
- ``column_wise`` (``W`` shards of ``D / W`` on distinct ranks): ``sum_s sum_{r != h_s} 8 (B_r + n_r) + 2 * 4 B_r D / W``
- ``row_wise`` (DES): ``sum_r 8 (W - 1) B_r + 8 x_r`` (lengths to every rank, ids to their owners) plus
  ``2 (W - 1) * 4 D sum_r B_r`` (reduce-scatter of partial sums, all-gather of their gradients)
- ``data_parallel``: ``8 (W - 1) N (D + 1)`` (DDP all-reduce of the dense gradient and the union of rows read)

The KJT split counts (``3 * 8`` bytes per rank pair, shared by every table of a sharding group) are left out.
``sharding: auto`` uses it: the strategy reads the first training batches at setup, counts these stats on every
rank and gives each table its cheapest type that fits (``distributed/auto_sharding.py``). Dynamic tables are left
out (their raw ids are remapped to rows after the batch is seen here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sparse.config import ShardingType

HINT_TYPES = (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.ROW_WISE, ShardingType.DATA_PARALLEL)


@dataclass
class BatchStats:
    """One rank's totals over the counted steps, per table: samples, ids, ids outside its row block."""

    steps: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    outside_block: dict[str, int] = field(default_factory=dict)

    def add(self, kjt: Any, feature_to_table: dict[str, str], rows: dict[str, int], rank: int, world: int) -> None:
        """Counts one batch's KeyedJaggedTensor (features of tables in ``rows`` only)."""
        for feature in kjt.keys():
            table = feature_to_table.get(feature)
            if table not in rows:
                continue
            values = kjt[feature].values()
            block = (rows[table] + world - 1) // world
            self.samples[table] = self.samples.get(table, 0) + int(kjt.stride())
            self.ids[table] = self.ids.get(table, 0) + int(values.numel())
            self.outside_block[table] = self.outside_block.get(table, 0) + int(
                (torch.div(values, block, rounding_mode="floor") != rank).sum()
            )


def sharding_hint(stats: list[BatchStats], tables: dict[str, tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Table -> sharding type -> bytes per step over all ranks, from every rank's ``stats`` (index = rank) and
    each table's ``(rows, dim)``."""
    world = len(stats)
    steps = max(max(s.steps for s in stats), 1)
    hint: dict[str, dict[str, float]] = {}
    for name, (rows, dim) in tables.items():
        if not any(name in s.samples for s in stats):
            continue
        samples = [s.samples.get(name, 0) / steps for s in stats]
        ids = [s.ids.get(name, 0) / steps for s in stats]
        outside = [s.outside_block.get(name, 0) / steps for s in stats]
        to_holder = [8 * (b + n) for b, n in zip(samples, ids)]  # lengths and ids a rank sends to a holder
        owner = min(range(world), key=lambda r: to_holder[r] + 8 * samples[r] * dim)  # least traffic
        table_wise = sum(to_holder[r] + 8 * samples[r] * dim for r in range(world) if r != owner)
        column_wise = sum(
            to_holder[r] + 8 * samples[r] * dim / world for holder in range(world) for r in range(world) if r != holder
        )
        row_wise = sum(8 * (world - 1) * b + 8 * x for b, x in zip(samples, outside)) + 2 * (world - 1) * 4 * dim * sum(
            samples
        )
        data_parallel = 8 * (world - 1) * rows * (dim + 1)
        hint[name] = {
            ShardingType.TABLE_WISE.value: table_wise,
            ShardingType.COLUMN_WISE.value: column_wise,
            ShardingType.ROW_WISE.value: row_wise,
            ShardingType.DATA_PARALLEL.value: data_parallel,
        }
    return hint


def cheapest(
    hint: dict[str, dict[str, float]], allowed: tuple[str, ...] = tuple(t.value for t in HINT_TYPES)
) -> dict[str, str]:
    """Table -> the sharding type among ``allowed`` that sends the fewest bytes per step."""
    return {name: min((t for t in by_type if t in allowed), key=by_type.__getitem__) for name, by_type in hint.items()}
