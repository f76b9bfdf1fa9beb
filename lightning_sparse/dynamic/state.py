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


POLICY_CODE = {
    EvictionPolicy.LFU: 0,
    EvictionPolicy.LRU: 1,
    EvictionPolicy.FEATURE_SCORE: 2,
    EvictionPolicy.DISTANCE_LFU: 3,
}

#: Largest per-slot occurrence count: counts are int32 and saturate here.
MAX_COUNT = (1 << 31) - 1


class TableTensors(NamedTuple):
    """The state tensors, in the order the native ops take them. All of them are checkpointed.

    ``slot_*`` are indexed by local slot; a slot is live iff ``slot_count > 0`` (empty slots hold zeros).
    ``index`` is the open-addressing (linear probing, backward-shift deletion) map id -> slot, ``-1`` at
    an empty position; both implementations maintain it identically, so it is part of the exact state.

    Only what the configured policy reads is allocated (see :func:`allocate`); a tensor that the policy
    does not need is empty (0 entries) and the kernels neither read nor write it:

    - ``slot_last_time`` only with ``expiry.ttl_seconds`` (nothing else reads the wall clock);
    - ``slot_score`` only with ``eviction=feature_score``;
    - ``free_list`` only with expiry enabled: without expiry no slot is ever freed, so the free slots are
      always the top ``FREE_COUNT`` ones, popped lowest first, as the list would hold them
      (``free_list[k] = C - 1 - k``);
    - ``sketch`` has depth 0 when ``admission.resolved_depth(eviction)`` is 0 (by default with
      ``min_count=1`` and ``distance_lfu`` or ``lru`` eviction).

    Per slot: 8 (id) + 4 (count) + 4 (step) bytes, + 4 (score) with feature_score, + 8 (time) with
    ``ttl_seconds``, + 4 (free list) with expiry, + 8 to 16 (index) + ``16 * width / C`` (sketch, when on).
    """

    slot_ids: torch.Tensor  # int64[C]     raw id held by the slot
    slot_count: (
        torch.Tensor
    )  # int32[C]     occurrences since admission (+ the estimate at admission), saturating at MAX_COUNT
    slot_last_step: torch.Tensor  # int32[C]     step the id was last seen (steps are < 2**31)
    slot_last_time: torch.Tensor  # float64[C|0] wall time (s) the id was last seen
    slot_score: torch.Tensor  # float32[C|0] decayed score as of slot_last_step
    free_list: torch.Tensor  # int32[C|0]   stack of free slots
    index: torch.Tensor  # int32[H]     id -> slot, H = power of two >= 2C
    sketch: torch.Tensor  # int32[D, W]  count-min sketch of unadmitted ids (D may be 0)
    meta: torch.Tensor  # int64[3]     see Meta
    counters: torch.Tensor  # int64[8]     see Counter


#: dtype of each state tensor (the layout above); ``DynamicIdRemapper`` refuses a checkpoint in another.
STATE_DTYPES = {
    "slot_ids": torch.int64,
    "slot_count": torch.int32,
    "slot_last_step": torch.int32,
    "slot_last_time": torch.float64,
    "slot_score": torch.float32,
    "free_list": torch.int32,
    "index": torch.int32,
    "sketch": torch.int32,
    "meta": torch.int64,
    "counters": torch.int64,
}


def index_size(capacity: int) -> int:
    """Positions of the index: the power of two >= 2 * capacity (load factor <= 1/2, short probes)."""
    return 1 << max(1, (2 * capacity - 1).bit_length())


def allocate(capacity: int, config: DynamicTableConfig) -> TableTensors:
    """Fresh state of an empty table of ``capacity`` slots (a shard's rows, or the whole table), with only
    the tensors ``config`` needs (see :class:`TableTensors`)."""
    if capacity < 1:
        raise ValueError(f"a dynamic table shard needs capacity >= 1, got {capacity}")
    width = config.admission.resolved_width(capacity)
    meta = torch.zeros(len(Meta), dtype=torch.int64)
    meta[Meta.FREE_COUNT] = capacity
    meta[Meta.LAST_SWEEP_STEP] = -1

    def per_slot(needed: bool, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(capacity if needed else 0, dtype=dtype)

    return TableTensors(
        slot_ids=torch.zeros(capacity, dtype=torch.int64),
        slot_count=torch.zeros(capacity, dtype=torch.int32),
        slot_last_step=torch.zeros(capacity, dtype=torch.int32),
        slot_last_time=per_slot(config.expiry.ttl_seconds is not None, torch.float64),
        slot_score=per_slot(config.eviction == EvictionPolicy.FEATURE_SCORE, torch.float32),
        # popped from the end: slot 0 first, then 1, 2, ...
        free_list=torch.arange(capacity - 1, -1, -1, dtype=torch.int32)
        if config.expiry.enabled
        else torch.zeros(0, dtype=torch.int32),
        index=torch.full((index_size(capacity),), -1, dtype=torch.int32),
        sketch=torch.zeros((config.admission.resolved_depth(config.eviction), width), dtype=torch.int32),
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


def upgrade_state(state_dict: dict, prefix: str, current: TableTensors, config: DynamicTableConfig) -> None:
    """Converts, in ``state_dict``, tensors of the earlier layout (every tensor kept, int64 counts and
    steps, float64 scores) to this one, or raises naming the tensor and the fix.

    Conversions: counts to int32 (saturating at ``MAX_COUNT``), steps to int32 (refused above
    ``2**31 - 1``), scores rounded to float32; a tensor this config does not keep (wall-clock stamps without
    ``ttl_seconds``, scores without ``feature_score``) is dropped; the free list is dropped when it holds
    the top slots in order (no slot was ever freed, as without expiry) and rebuilt so when missing. A
    sketch is never dropped or invented: its counts decide admissions.
    """
    key = {name: prefix + name for name in TableTensors._fields}
    capacity = current.slot_ids.numel()
    meta = state_dict.get(key["meta"])
    free = int(meta[Meta.FREE_COUNT]) if isinstance(meta, torch.Tensor) and meta.numel() > Meta.FREE_COUNT else None
    canonical = torch.arange(capacity - 1, -1, -1, dtype=torch.int32)
    for name, target in zip(TableTensors._fields, current):
        incoming = state_dict.get(key[name])
        if not isinstance(incoming, torch.Tensor) or (
            incoming.dtype == target.dtype and incoming.shape == target.shape
        ):
            continue
        where = f"dynamic table state '{key[name]}'"
        if name == "sketch":
            raise RuntimeError(
                f"{where}: the checkpoint has a {tuple(incoming.shape)} sketch, this config a {tuple(target.shape)} one; "
                f"set admission.sketch_depth={incoming.shape[0]} (and sketch_width={incoming.shape[-1]}) to load it"
            )
        if target.numel() == 0 and name in ("slot_last_time", "slot_score"):
            state_dict[key[name]] = target.new_zeros(0)  # not kept by this config's policy
            continue
        if name == "free_list":
            if target.numel() == 0:
                if free is None or not torch.equal(incoming[:free].to(torch.int32), canonical[:free]):
                    raise RuntimeError(
                        f"{where}: the checkpoint's table has slots freed by expiry, which this config (no expiry) "
                        "cannot keep track of; load it with the expiry settings it was written with"
                    )
                state_dict[key[name]] = target.new_zeros(0)
            elif incoming.numel() == 0:
                state_dict[key[name]] = canonical.clone()  # no slot was ever freed: the top ones are free
            else:
                state_dict[key[name]] = incoming.to(torch.int32)
            continue
        if incoming.numel() != target.numel():
            raise RuntimeError(
                f"{where}: the checkpoint has {incoming.numel()} entries, this table {target.numel()} "
                f"({'the checkpoint was written without expiry.ttl_seconds' if name == 'slot_last_time' else 'another capacity or policy'}); "
                "load it with the table settings it was written with"
            )
        if name == "slot_count":
            state_dict[key[name]] = incoming.to(torch.int64).clamp_max(MAX_COUNT).to(torch.int32)
        elif name == "slot_last_step":
            if incoming.numel() and int(incoming.max()) > MAX_COUNT:
                raise RuntimeError(f"{where}: steps above 2**31 - 1 cannot be stored as int32 (the current layout)")
            state_dict[key[name]] = incoming.to(torch.int32)
        else:
            state_dict[key[name]] = incoming.to(target.dtype)
