"""Dynamic tables under SparseStrategy: raw ids -> rows before the sharded lookup, rows recycled in place.

Every rank keeps an identical replica of each dynamic table's hash table (``DynamicIdRemapper``: a few
bytes per slot, against ``4 * dim`` bytes per embedding row). In training the ranks all-gather the raw
ids of the dynamic features, every replica remaps the global batch in rank order with the same step and
clock, and each rank keeps the rows of its own samples: the replicas stay identical without any other
communication, and the policy sees the whole batch, exactly as one process would. Rows handed to a new
id are re-initialised, and their optimizer state zeroed, in whichever rank's shard holds them. In
evaluation ids are only looked up, locally.

Why replicas instead of hash tables partitioned by id hash next to each row-wise shard: CPU TorchRec has
no row-wise sharding, the metadata is small next to the rows, and replicas keep the policy exact and the
checkpoint independent of the world size (resharding needs nothing).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig, remap_kjt
from lightning_sparse.dynamic.kjt import with_slots


class DynamicTables(nn.Module):
    """The hash tables of a model's dynamic tables, and the per-step remapping of its batches.

    Args:
        configs: table name -> its dynamic config.
        feature_to_table: every feature key of those tables -> table name.
    """

    def __init__(self, configs: dict[str, DynamicTableConfig], feature_to_table: dict[str, str]) -> None:
        super().__init__()
        self.remappers = nn.ModuleDict({name: DynamicIdRemapper(config) for name, config in sorted(configs.items())})
        self.feature_to_table = dict(feature_to_table)
        self._seed_of = {name: index for index, name in enumerate(sorted(configs))}

    def remap_for_training(self, kjt: KeyedJaggedTensor, step: int) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
        """This rank's batch with dynamic ids replaced by rows; also the rows assigned to new ids (global)."""
        keys = [k for k in kjt.keys() if k in self.feature_to_table]
        local = {key: kjt[key] for key in keys}
        payload = ({key: (jt.values(), jt.lengths()) for key, jt in local.items()}, time.time())
        gathered = _all_gather(payload)
        now = gathered[0][1]  # one clock for every replica
        rank = dist.get_rank() if _distributed() else 0
        global_kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.cat([part[0][key][0] for key in keys for part in gathered]),
            lengths=torch.cat([part[0][key][1] for key in keys for part in gathered]),
        )
        slots_by_key = {}
        assigned = {}
        for table in sorted({self.feature_to_table[k] for k in keys}):
            table_keys = [k for k in keys if self.feature_to_table[k] == table]
            _, results = remap_kjt(
                _select(global_kjt, table_keys), {table: self.remappers[table]}, self.feature_to_table, step, now
            )
            slots = results[table].slots
            assigned[table] = results[table].assigned
            # Slots come feature by feature, rank by rank: cut out this rank's values of each feature.
            offset = 0
            for key in table_keys:
                counts = [int(part[0][key][0].numel()) for part in gathered]
                start = offset + sum(counts[:rank])
                slots_by_key[key] = slots[start : start + counts[rank]]
                offset += sum(counts)
            self.remappers[table].maybe_expire(step, now)
        return with_slots(kjt, slots_by_key), assigned

    def remap_for_evaluation(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Looks ids up without admitting, expiring or counting anything."""
        out, _ = remap_kjt(kjt, dict(self.remappers.items()), self.feature_to_table, step=0, admit=False)
        return out

    @torch.no_grad()
    def recycle_rows(
        self, assigned: dict[str, torch.Tensor], weights: dict[str, Any], optimizer_states: dict[str, list[Any]], step: int
    ) -> None:
        """Re-initialises the assigned rows held by this rank and zeroes their per-row optimizer state.

        The fresh values come from a generator seeded by (table, step), so every world size and every
        resumed run draws the same rows.
        """
        for table, rows in assigned.items():
            if rows.numel() == 0:
                continue
            remapper = self.remappers[table]
            capacity = remapper.capacity
            weight = weights[table]
            full_dim = weight.size(1)
            generator = torch.Generator().manual_seed((step + 1) * 1_000_003 + self._seed_of[table])
            fresh = torch.empty(rows.numel(), full_dim)
            remapper.init_rows(fresh, torch.arange(rows.numel()), generator=generator)
            for shard, (row0, col0) in _local_pieces(weight):
                inside = (rows >= row0) & (rows < row0 + shard.size(0))
                if bool(inside.any()):
                    shard[rows[inside] - row0] = fresh[inside][:, col0 : col0 + shard.size(1)].to(shard.dtype)
            for state in optimizer_states.get(table, []):
                if state.dim() == 0 or state.size(0) != capacity:
                    continue  # not per-row (e.g. a global step counter)
                for shard, (row0, _) in _local_pieces(state):
                    inside = (rows >= row0) & (rows < row0 + shard.size(0))
                    if bool(inside.any()):
                        shard[rows[inside] - row0] = 0

    def metrics(self) -> dict[str, dict[str, int]]:
        return {name: remapper.metrics() for name, remapper in self.remappers.items()}


def _select(kjt: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    return kjt if kjt.keys() == keys else kjt.permute([kjt.keys().index(k) for k in keys])


def _local_pieces(tensor: Any) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(local tensor, (first row, first column)) of each piece of ``tensor`` this rank holds."""
    if isinstance(tensor, ShardedTensor):
        pieces = []
        for shard in tensor.local_shards():
            offsets = shard.metadata.shard_offsets
            pieces.append((shard.tensor, (offsets[0], offsets[1] if len(offsets) > 1 else 0)))
        return pieces
    return [(tensor, (0, 0))] if tensor.numel() else []


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
