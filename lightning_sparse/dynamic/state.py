"""Layout of a dynamic table's hash-table state: which tensors, their dtypes, and named positions.

Every implementation of the kernels (``cuda_ops/hash_table.cpp``, ``hash_table.cu`` and ``reference.py``)
reads and writes exactly these tensors, in this order, so a checkpoint written by one is read by the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import torch

from lightning_sparse.dynamic.config import DynamicTableConfig, EvictionPolicy


class Meta(IntEnum):
    """Positions in the ``meta`` tensor (bookkeeping the kernels need, not metrics)."""

    FREE_COUNT = 0  # entries of free_list in use (a stack: the top is free_list[FREE_COUNT - 1])
    SKETCH_ADDS = 1  # occurrences recorded in the sketch since its last halving
    LAST_SWEEP_STEP = 2  # step of the last expiry sweep (-1: never)


class Counter(IntEnum):
    """Positions in the ``counters`` tensor (cumulative metrics)."""

    ADMITTED = 0  # ids given a slot
    EVICTED = 1  # live ids that lost their slot to an admitted one (table full)
    EXPIRED = 2  # live ids removed by an expiry sweep
    REJECTED_FULL = 3  # eligible ids refused because the table was full and no victim scored lower
    REJECTED_ADMISSION = 4  # (id, call) pairs where an unadmitted id did not pass the admission policy
    LOOKUPS = 5  # id occurrences remapped
    HITS = 6  # id occurrences that already had a slot
    SKETCH_HALVINGS = 7  # times the admission sketch was halved


POLICY_CODE = {EvictionPolicy.LFU: 0, EvictionPolicy.LRU: 1, EvictionPolicy.FEATURE_SCORE: 2}


class TableTensors(NamedTuple):
    """The state tensors, in the order the native ops take them. All of them are checkpointed.

    ``slot_*`` are indexed by local slot; a slot is live iff ``slot_count > 0`` (empty slots hold zeros).
    ``index`` is the open-addressing (linear probing, backward-shift deletion) map id -> slot, ``-1`` at
    an empty position; both implementations maintain it identically, so it is part of the exact state.
    """

    slot_ids: torch.Tensor  # int64[C]   raw id held by the slot
    slot_count: torch.Tensor  # int64[C]   occurrences since admission (+ the sketch estimate at admission)
    slot_last_step: torch.Tensor  # int64[C]   step the id was last seen
    slot_last_time: torch.Tensor  # float64[C] wall time (s) the id was last seen
    slot_score: torch.Tensor  # float64[C] decayed score as of slot_last_step
    free_list: torch.Tensor  # int32[C]   stack of free slots
    index: torch.Tensor  # int32[H]   id -> slot, H = power of two >= 2C
    sketch: torch.Tensor  # int32[D, W] count-min sketch of unadmitted ids
    meta: torch.Tensor  # int64[3]   see Meta
    counters: torch.Tensor  # int64[8]   see Counter


def index_size(capacity: int) -> int:
    """Positions of the index: the power of two >= 2 * capacity (load factor <= 1/2, short probes)."""
    return 1 << max(1, (2 * capacity - 1).bit_length())


def allocate(capacity: int, config: DynamicTableConfig) -> TableTensors:
    """Fresh state of an empty table of ``capacity`` slots (a shard's rows, or the whole table)."""
    if capacity < 1:
        raise ValueError(f"a dynamic table shard needs capacity >= 1, got {capacity}")
    width = config.admission.resolved_width(capacity)
    meta = torch.zeros(len(Meta), dtype=torch.int64)
    meta[Meta.FREE_COUNT] = capacity
    meta[Meta.LAST_SWEEP_STEP] = -1
    return TableTensors(
        slot_ids=torch.zeros(capacity, dtype=torch.int64),
        slot_count=torch.zeros(capacity, dtype=torch.int64),
        slot_last_step=torch.zeros(capacity, dtype=torch.int64),
        slot_last_time=torch.zeros(capacity, dtype=torch.float64),
        slot_score=torch.zeros(capacity, dtype=torch.float64),
        # popped from the end: slot 0 first, then 1, 2, ...
        free_list=torch.arange(capacity - 1, -1, -1, dtype=torch.int32),
        index=torch.full((index_size(capacity),), -1, dtype=torch.int32),
        sketch=torch.zeros((config.admission.sketch_depth, width), dtype=torch.int32),
        meta=meta,
        counters=torch.zeros(len(Counter), dtype=torch.int64),
    )


def decay_powers(decay: float) -> torch.Tensor:
    """``decay ** (2 ** b)`` for b = 0..62 by repeated squaring, float64.

    ``decay ** dt`` is the product of the entries at the set bits of ``dt`` taken in ascending bit order;
    both implementations multiply in that order, so decayed scores agree to the last bit.
    """
    out = []
    value = float(decay)
    for _ in range(63):
        out.append(value)
        value = value * value
    return torch.tensor(out, dtype=torch.float64)


@dataclass(frozen=True)
class RemapParams:
    """The scalar policy parameters the remap kernel takes, resolved from a :class:`DynamicTableConfig`."""

    policy: int
    min_count: int
    coin_threshold: int
    coin_key: int
    halve_every: int
    slot_offset: int
    fallback_offset: int = 0
    fallback_rows: int = 0

    @staticmethod
    def from_config(
        config: DynamicTableConfig, capacity: int, slot_offset: int = 0, fallback_rows: int = 0
    ) -> "RemapParams":
        """``capacity``: slots of this table or shard (it sizes the default sketch aging period);
        ``fallback_rows``: rows right after the slots (rows ``slot_offset + capacity ...``) that ids
        without a slot read."""
        from lightning_sparse.dynamic.hashing import coin_key

        return RemapParams(
            policy=POLICY_CODE[config.eviction],
            min_count=config.admission.min_count,
            coin_threshold=config.admission.coin_threshold(),
            coin_key=coin_key(config.admission.seed),
            halve_every=config.admission.resolved_halve_every(capacity),
            slot_offset=slot_offset,
            fallback_offset=slot_offset + capacity,
            fallback_rows=fallback_rows,
        )
