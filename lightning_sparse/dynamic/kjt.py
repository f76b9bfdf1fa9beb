"""Remapping the raw ids of a TorchRec ``KeyedJaggedTensor`` to the rows of dynamic tables.

With ``DynamicTableConfig.fallback_rows > 0``, an id without a slot of its own (not admitted yet, rejected
when full, evicted or expired, or unknown at evaluation) reads its table's *fallback row*
``hash(id) % fallback_rows`` (rows at the end of each row block): a shared row that trains like any
other, so such ids still learn what plain hashing would teach them. The fallback rows are never lent to an id, so they are never
re-initialised; under row-wise sharding each block keeps its own, next to the hash partition whose ids
read them, so unknown ids do not all land on one rank.

With ``fallback_rows=0`` (the default) the remapper returns ``-1`` for such ids and they are *dropped* from the KJT (the
lengths shrink): for sum pooling that is exactly "reads a zero row, gets no update"; for mean pooling the
mean is over the slotted ids; per-position (sequence) features lose the dropped positions.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.dynamic.table import DynamicIdRemapper, RemapResult


def remap_kjt(
    kjt: KeyedJaggedTensor,
    remappers: Mapping[str, DynamicIdRemapper],
    feature_to_table: Mapping[str, str],
    step: int,
    now: Optional[float] = None,
    admit: bool = True,
) -> tuple[KeyedJaggedTensor, dict[str, RemapResult]]:
    """Replaces the values of the features in ``feature_to_table`` by table rows (dropping rows ``-1``).

    Features mapping to the same table are remapped in one call (one admission decision per id and step,
    whichever feature it came from). Features not in ``feature_to_table`` pass through unchanged.

    Args:
        kjt: the batch's sparse features (raw ids).
        remappers: table name -> its remapper.
        feature_to_table: feature key -> table name, for the features of dynamic tables.
        step: training step (stamps, admission coin, decay).
        now: wall time in seconds (default: the clock).
        admit: ``True`` in training (:meth:`DynamicIdRemapper.remap`); ``False`` for evaluation, which
            only looks ids up (:meth:`DynamicIdRemapper.lookup`) and changes no state.

    Returns:
        The remapped KJT and, per table, its :class:`RemapResult` (in training the caller re-initialises
        the ``assigned`` rows and resets their optimizer state before the embedding lookup). With
        ``admit=False`` the results' ``assigned`` are empty.
    """
    unknown = sorted(set(feature_to_table.values()) - set(remappers))
    if unknown:
        raise KeyError(f"feature_to_table names table(s) {unknown} that have no remapper; tables: {sorted(remappers)}")
    if kjt.variable_stride_per_key():
        raise ValueError("remap_kjt does not support KeyedJaggedTensors with a variable stride per key")
    by_table: dict[str, list[str]] = {}
    for key in kjt.keys():
        if key in feature_to_table:
            by_table.setdefault(feature_to_table[key], []).append(key)

    slots_by_key: dict[str, torch.Tensor] = {}
    results: dict[str, RemapResult] = {}
    for table, table_keys in by_table.items():
        raw = values_of(kjt, table_keys)
        remapper = remappers[table]
        if admit:
            result = remapper.remap(raw, step, now)
        else:
            slots = remapper.lookup(raw)
            result = RemapResult(slots, torch.zeros(0, dtype=torch.int64, device=slots.device))
        results[table] = result
        slots_by_key.update(split_by_key(kjt, table_keys, result.slots))
    return with_slots(kjt, slots_by_key), results


def values_of(kjt: KeyedJaggedTensor, keys: list[str]) -> torch.Tensor:
    """The values of ``keys`` (in that order) concatenated: e.g. one table's ids of the batch."""
    starts = _key_starts(kjt.length_per_key())
    position = {key: k for k, key in enumerate(kjt.keys())}
    values = kjt.values()
    pieces = [values[starts[position[key]] : starts[position[key] + 1]] for key in keys]
    return torch.cat(pieces) if pieces else values.new_zeros(0)


def split_by_key(kjt: KeyedJaggedTensor, keys: list[str], per_value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cuts ``per_value`` (one entry per value of ``values_of(kjt, keys)``) back into one tensor per key."""
    length_per_key = dict(zip(kjt.keys(), kjt.length_per_key()))
    return dict(zip(keys, per_value.split([length_per_key[key] for key in keys])))


def _key_starts(length_per_key: list[int]) -> list[int]:
    """Offsets of each key's values in a KJT's ``values()`` (one more entry than keys)."""
    starts = [0]
    for n in length_per_key:
        starts.append(starts[-1] + n)
    return starts


def with_slots(kjt: KeyedJaggedTensor, slots_by_key: Mapping[str, torch.Tensor]) -> KeyedJaggedTensor:
    """``kjt`` with the values of the given keys replaced by table rows; rows ``-1`` are dropped.

    ``slots_by_key[key]`` holds one row per value of ``key``, in order. Other keys pass through unchanged.
    """
    keys = kjt.keys()
    lengths = kjt.lengths()
    values = kjt.values()
    weights = kjt.weights_or_none()
    stride = kjt.stride()
    starts = _key_starts(kjt.length_per_key())
    new_values = values.clone()
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    for k, key in enumerate(keys):
        if key in slots_by_key:
            slots = slots_by_key[key].to(values.device)
            new_values[starts[k] : starts[k + 1]] = slots.to(values.dtype)
            keep[starts[k] : starts[k + 1]] = slots >= 0

    if bool(keep.all()):
        return KeyedJaggedTensor(keys=keys, values=new_values, weights=weights, lengths=lengths, stride=stride)
    # lengths are (key, sample)-major; count the kept values of each bag
    bag_of_value = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    kept_bags = bag_of_value[keep]
    new_lengths = torch.zeros_like(lengths).index_add_(0, kept_bags, torch.ones_like(kept_bags, dtype=lengths.dtype))
    return KeyedJaggedTensor(
        keys=keys,
        values=new_values[keep],
        weights=None if weights is None else weights[keep],
        lengths=new_lengths,
        stride=stride,
    )
