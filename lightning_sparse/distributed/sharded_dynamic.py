"""Dynamic tables under SparseStrategy: raw ids -> rows before the sharded lookup, rows recycled in place.

Each dynamic table's hash table is placed per its ``DynamicTableConfig.placement``:

``sharded`` (default): one hash partition per row block of the table's shards, kept on the rank that
holds the block (``sharding.row_blocks``: one block for table_wise / column_wise / data_parallel tables,
one per rank for row_wise ones). A raw id belongs to partition ``shard_of(id, n_partitions)``; in every
step each rank sends its ids to the partitions' ranks (``all_to_all``), every partition remaps the ids it
received from all ranks as one batch, and the rows travel back the same way. The rows a partition hands
out lie in its own block, so under row-wise sharding the hash table sits next to the rows it lends; that
includes the fallback rows its unslotted ids read: every block reserves its share of the table's
``fallback_rows`` at its end (``DynamicTableConfig.block_fallback_rows``).

``replicated``: every rank keeps an identical replica. The ranks all-gather the raw ids, every replica
remaps the global batch with the same step and clock, and each rank keeps its own samples' rows.

Either way the policy sees the same batch a single process would (remapping depends on the distinct ids
and their counts, not on their order), so a table_wise table ends in the same state under both
placements. Rows handed to a new id are re-initialised, and their optimizer state zeroed, on whichever
ranks hold pieces of them; the assigned rows are shared with every rank for that. Which tensors those are
is bound once (:meth:`DynamicTables.bind_rows`): each table's weight under its parameter path, carried on its
``ResolvedTable``, and the per-row state the sparse optimizer keeps for that path.

Communication: ids and rows travel by ``torch.distributed.all_to_all_single`` (Lightning has no all-to-all) on
:func:`~lightning_sparse.distributed.collectives.collective_device`; everything else (the replicated tables'
ids, assigned rows, counters) is gathered as objects through the :class:`Collectives` handed in.

:class:`DynamicTables` is ``Stateful`` (``state_dict``/``load_state_dict`` of its hash tables, see the class).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.types import ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.distributed.collectives import Collectives, collective_device
from lightning_sparse.distributed.routes import EmbeddingTables, RowBlock, row_blocks
from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig, HashPlacement, shard_of
from lightning_sparse.dynamic.kjt import split_by_key, values_of, with_slots
from lightning_sparse.dynamic.table import initial_rows
from lightning_sparse.ops import native_op_for


def partition_key(index: int, count: int) -> str:
    """Name of hash partition ``index`` of ``count`` in state dicts and checkpoints (e.g. ``0_of_2``)."""
    return f"{index}_of_{count}"


class DynamicTables(nn.Module):
    """The hash tables of a model's dynamic tables (this rank's part of them) and the per-step remapping.

    Args:
        configs: table name -> its dynamic config.
        feature_to_table: every feature key of those tables -> table name.
        blocks: table name -> its row blocks under the sharding plan (needed for ``sharded`` placement).
        rank: this process's rank; it keeps the partitions of the blocks placed on it.
        param_paths: table name -> its weight's key in the model's state dict (``ResolvedTable.param_path``);
            needed by :meth:`bind_rows` only.
        collectives: rank, world size and object gathers (default: the default process group's).

    State (``Stateful``: ``state_dict``/``load_state_dict``, those of ``nn.Module``): ``remappers.<table>.*``
    for replicated tables, ``partitions.<table>.<i>_of_<n>.*`` for the partitions of sharded tables that this
    rank keeps; it round-trips exactly (``tests/test_stateful_components.py``).
    """

    def __init__(
        self,
        configs: dict[str, DynamicTableConfig],
        feature_to_table: dict[str, str],
        blocks: Optional[dict[str, list[RowBlock]]] = None,
        rank: int = 0,
        param_paths: Optional[dict[str, str]] = None,
        collectives: Optional[Collectives] = None,
    ) -> None:
        super().__init__()
        self.configs = dict(configs)
        self.feature_to_table = dict(feature_to_table)
        self.rank = rank
        self.param_paths = dict(param_paths or {})
        self.collectives = collectives or Collectives.of_process_group()
        self._weights: dict[str, Any] = {}
        self._row_states: dict[str, list[Any]] = {}
        self.remappers = nn.ModuleDict()
        self.partitions = nn.ModuleDict()
        self.partition_ranks: dict[str, list[int]] = {}
        for name, config in sorted(configs.items()):
            if config.placement is HashPlacement.REPLICATED:
                self.remappers[name] = DynamicIdRemapper(config)
                continue
            table_blocks = (blocks or {}).get(name) or [RowBlock(0, config.capacity, 0)]
            self.partition_ranks[name] = [block.rank for block in table_blocks]
            self.partitions[name] = nn.ModuleDict(
                {
                    partition_key(i, len(table_blocks)): DynamicIdRemapper(config, block.rows, block.row_offset)
                    for i, block in enumerate(table_blocks)
                    if block.rank == rank
                }
            )
        self._seed_of = {name: index for index, name in enumerate(sorted(configs))}

    def place_partitions(self, device: torch.device) -> None:
        """Moves the sharded tables' partitions to ``device`` (next to the rows they lend) when the native
        extension has kernels there; otherwise they stay on the host, where the CPU kernels run.
        Replicas always stay on the host."""
        if device.type != "cpu" and native_op_for("hash_remap", device) is not None:
            self.partitions.to(device)

    # ------------------------------------------------------------- remapping
    def remap_for_training(
        self, kjt: KeyedJaggedTensor, step: int
    ) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
        """This rank's batch with dynamic ids replaced by rows; also the rows assigned to new ids (global, all ranks')."""
        slots_by_key, assigned = self._remap_replicated(kjt, step)
        for table in self.partitions:
            keys = self._keys_of(kjt, table)
            if keys:
                slots, assigned[table] = self._remap_routed(table, values_of(kjt, keys), step, admit=True)
                slots_by_key.update(split_by_key(kjt, keys, slots))
        return with_slots(kjt, slots_by_key), assigned

    def remap_for_evaluation(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Looks ids up without admitting, expiring or counting anything (collective for sharded tables)."""
        slots_by_key = {}
        for table, remapper in self.remappers.items():
            keys = self._keys_of(kjt, table)
            if keys:
                slots_by_key.update(split_by_key(kjt, keys, remapper.lookup(values_of(kjt, keys))))
        for table in self.partitions:
            keys = self._keys_of(kjt, table)
            if keys:
                slots, _ = self._remap_routed(table, values_of(kjt, keys), step=0, admit=False)
                slots_by_key.update(split_by_key(kjt, keys, slots))
        return with_slots(kjt, slots_by_key)

    def _keys_of(self, kjt: KeyedJaggedTensor, table: str) -> list[str]:
        return [key for key in kjt.keys() if self.feature_to_table.get(key) == table]

    def _remap_replicated(
        self, kjt: KeyedJaggedTensor, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Replicated tables: every rank remaps the all-gathered batch and keeps its own samples' rows."""
        keys = [k for k in kjt.keys() if self.feature_to_table.get(k) in self.remappers]
        if not keys:
            return {}, {}
        gathered = self.collectives.all_gather_object(({key: values_of(kjt, [key]) for key in keys}, time.time()))
        now = gathered[0][1]  # one clock for every replica
        rank = self.collectives.rank
        slots_by_key, assigned = {}, {}
        for table, remapper in self.remappers.items():
            table_keys = [k for k in keys if self.feature_to_table[k] == table]
            if not table_keys:
                continue
            # the global batch of this table, feature by feature and rank by rank
            result = remapper.remap(torch.cat([part[0][key] for key in table_keys for part in gathered]), step, now)
            assigned[table] = result.assigned
            offset = 0
            for key in table_keys:
                counts = [int(part[0][key].numel()) for part in gathered]
                start = offset + sum(counts[:rank])
                slots_by_key[key] = result.slots[start : start + counts[rank]]
                offset += sum(counts)
            remapper.maybe_expire(step, now)
        return slots_by_key, assigned

    def _remap_routed(self, table: str, ids: torch.Tensor, step: int, admit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Sharded tables: ids travel to their partition's rank and rows come back (``all_to_all``).

        Returns the rows of ``ids`` (``-1``: no row) and, when admitting, the rows assigned in this step by
        every partition, in partition order (the same on every rank).
        """
        owners = self.partition_ranks[table]
        n_partitions = len(owners)
        world = self.collectives.world_size
        ids_device = ids.device
        if world > 1:
            ids = ids.to(collective_device())  # the backend's device: nccl refuses CPU tensors, gloo takes them
            destination = torch.tensor(owners, device=ids.device)[_partition_of(ids, n_partitions)]
            order = torch.argsort(destination, stable=True)
            send_counts = torch.bincount(destination, minlength=world)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts)
            send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
            received = ids.new_empty(sum(recv_splits))
            dist.all_to_all_single(received, ids[order].contiguous(), recv_splits, send_splits)
        else:
            received = ids
        partition = _partition_of(received, n_partitions)
        rows = torch.full(received.shape, -1, dtype=torch.int64, device=received.device)
        assigned_here: dict[int, torch.Tensor] = {}
        now = time.time()
        for index, owner in enumerate(owners):
            if owner != self.rank:
                continue
            remapper = self.partitions[table][partition_key(index, n_partitions)]
            mine = partition == index
            if admit:
                result = remapper.remap(received[mine], step, now)
                rows[mine] = result.slots.to(rows.device)
                assigned_here[index] = result.assigned.cpu()
                remapper.maybe_expire(step, now)
            else:
                rows[mine] = remapper.lookup(received[mine]).to(rows.device)
        if world > 1:
            returned = rows.new_empty(ids.shape)
            dist.all_to_all_single(returned, rows, send_splits, recv_splits)
            rows = torch.empty_like(returned)
            rows[order] = returned
        rows = rows.to(ids_device)
        if not admit:
            return rows, torch.zeros(0, dtype=torch.int64)
        by_partition: dict[int, torch.Tensor] = {}
        for part in self.collectives.all_gather_object(assigned_here):
            by_partition.update(part)
        assigned = [by_partition[i] for i in sorted(by_partition)]
        return rows, torch.cat(assigned) if assigned else torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------ recycled rows
    def bind_rows(self, model_state: Mapping[str, Any], row_states: Callable[[str], list[Any]]) -> None:
        """Binds the tensors :meth:`recycle_rows` writes: each table's weight, ``model_state[param path]`` (a
        ``state_dict(keep_vars=True)`` of the sharded model: local shards are views of the live weights), and
        ``row_states(param path)``, the sparse optimizer's state tensors of that parameter."""
        missing = sorted(set(self.configs) - set(self.param_paths))
        if missing:
            raise ValueError(
                f"DynamicTables has no parameter path for the dynamic table(s) {missing}: pass param_paths"
            )
        self._weights = {table: model_state[path] for table, path in self.param_paths.items()}
        self._row_states = {table: list(row_states(path)) for table, path in self.param_paths.items()}

    @torch.no_grad()
    def recycle_rows(self, assigned: dict[str, torch.Tensor], step: int) -> None:
        """Re-initialises the assigned rows held by this rank and zeroes their per-row optimizer state
        (in the tensors bound by :meth:`bind_rows`).

        The fresh values come from a generator seeded by (table, step), so every world size and every
        resumed run draws the same rows. They are written through ``.data``: under a pipeline, in-flight
        batches' autograd graphs hold the weights, and their saved-version check would refuse the write (what
        an in-flight update then writes into these rows is undone, see ``strategies/pipeline_dynamic.py``).
        """
        for table, rows in assigned.items():
            if rows.numel() == 0:
                continue
            config = self.configs[table]
            if table not in self._weights:
                raise RuntimeError(
                    f"DynamicTables.recycle_rows: table {table!r} has no bound weight; call bind_rows first"
                )
            weight = self._weights[table]
            generator = torch.Generator().manual_seed((step + 1) * 1_000_003 + self._seed_of[table])
            fresh = torch.empty(rows.numel(), weight.size(1))
            initial_rows(fresh, config, generator)
            for shard, (row0, col0) in _local_pieces(weight):
                inside = (rows >= row0) & (rows < row0 + shard.size(0))
                if bool(inside.any()):
                    shard.data[rows[inside] - row0] = fresh[inside][:, col0 : col0 + shard.size(1)].to(shard.dtype)
            for state in self._row_states.get(table, []):
                if state.dim() == 0 or state.size(0) != config.capacity:
                    continue  # not per-row (e.g. a global step counter)
                for shard, (row0, _) in _local_pieces(state):
                    inside = (rows >= row0) & (rows < row0 + shard.size(0))
                    if bool(inside.any()):
                        shard.data[rows[inside] - row0] = 0

    # ------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, dict[str, int]]:
        """Counters of the hash tables this rank keeps: whole replicas, or the sum of its partitions."""
        out = {name: remapper.metrics() for name, remapper in self.remappers.items()}
        for name, parts in self.partitions.items():
            out[name] = _sum_counters([remapper.metrics() for remapper in parts.values()])
        return out

    def global_metrics(self) -> dict[str, dict[str, int]]:
        """Counters of the whole tables: partitions summed over ranks. Collective: call it on every rank."""
        local = self.metrics()
        if not self.partitions or self.collectives.world_size == 1:
            return local
        sharded = {name: local[name] for name in self.partitions}
        gathered = self.collectives.all_gather_object(sharded)
        local.update({name: _sum_counters([part[name] for part in gathered]) for name in sharded})
        return local


def _sum_counters(counters: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counters:
        for name, value in one.items():
            total[name] = total.get(name, 0) + value
    return total


def _partition_of(ids: torch.Tensor, n_partitions: int) -> torch.Tensor:
    if n_partitions == 1:
        return torch.zeros(ids.shape, dtype=torch.int64, device=ids.device)
    return shard_of(ids, n_partitions)


def _local_pieces(tensor: Any) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(local tensor, (first row, first column)) of each piece of ``tensor`` this rank holds."""
    if isinstance(tensor, ShardedTensor):
        pieces = []
        for shard in tensor.local_shards():
            offsets = shard.metadata.shard_offsets
            pieces.append((shard.tensor, (offsets[0], offsets[1] if len(offsets) > 1 else 0)))
        return pieces
    return [(tensor, (0, 0))] if tensor.numel() else []


def dynamic_tables_of(tables: EmbeddingTables, plan: ShardingPlan, collectives: Collectives) -> Optional[DynamicTables]:
    """The hash tables of the model's dynamic tables (this rank's part of them), or None when none is dynamic."""
    dynamic = {name: table for name, table in tables.tables.items() if table.dynamic is not None}
    if not dynamic:
        return None
    configs = {name: table.dynamic for name, table in dynamic.items()}
    blocks = {name: row_blocks(plan, name, config.capacity) for name, config in configs.items()}
    features = {f: t for f, t in tables.features.items() if t in configs}
    paths = {name: table.param_path for name, table in dynamic.items()}
    return DynamicTables(configs, features, blocks, collectives.rank, paths, collectives)
