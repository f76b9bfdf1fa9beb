"""What one rank exports: the rows its shards changed since the last export, keyed by raw id, and tombstones.

Why an exact diff and not TorchRec's ``ModelDeltaTracker``: the tracker (torchrec 1.8,
``torchrec/distributed/model_tracker``) records the ids each sharded lookup *read*, as shard-local indices
after input distribution. For our dynamic tables those are slots whose raw id can change within an export
interval (a slot recycled to a new id), rows are also written outside lookups (a recycled row is
re-initialised, a checkpoint load rewrites every row), and it knows nothing of ids that left a table, so it
cannot give tombstones. Comparing each local shard with a copy taken at the last export finds exactly the
rows whose bits changed, whatever wrote them; the cost is one copy of the local shards in host memory and
one pass over them per export (``benchmarks/serving.py`` measures it as a share of step time).

Dynamic tables: a row is exported under the raw id its slot holds now; the hash partitions (on the ranks
that keep them) are gathered into one slot -> id map per table at every export, because a column-wise
shard's rank may not keep the partition of its rows. The rank keeping a partition tombstones the ids that
were live in it at the last export and are not now (expired or evicted; an id lives in one partition only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from lightning_sparse.serving.format import RowBatch, TableSchema


@dataclass
class Piece:
    """A block of a table this rank holds: ``tensor`` (a live view) covers rows ``row0..`` and columns ``col0..``."""

    table: str
    tensor: torch.Tensor
    row0: int
    col0: int


@dataclass
class SlotMap:
    """Raw id held by each slot of a dynamic table, and which slots are live."""

    ids: np.ndarray  # int64 [capacity]
    live: np.ndarray  # bool [capacity]


def local_pieces(strategy: Any) -> list[Piece]:
    """Every block of every table this rank holds (replicated, data-parallel tables: rank 0 holds the one block)."""
    module = strategy.lightning_module
    state = module.state_dict(keep_vars=True)
    pieces = []
    for name, table in sorted(strategy.embedding_tables.tables.items()):
        value = state[table.param_path]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                offsets = shard.metadata.shard_offsets
                pieces.append(Piece(name, shard.tensor, int(offsets[0]), int(offsets[1])))
        elif _rank() == 0:
            pieces.append(Piece(name, value, 0, 0))
    return pieces


def table_schemas(strategy: Any) -> dict[str, TableSchema]:
    return {
        name: TableSchema(int(t.dim), t.dynamic is not None)
        for name, t in sorted(strategy.embedding_tables.tables.items())
    }


def partitions(strategy: Any) -> dict[str, list[Any]]:
    """The hash-table remappers this rank keeps, per dynamic table (replicas: rank 0's only)."""
    dynamic = strategy.dynamic_tables
    if dynamic is None:
        return {}
    out: dict[str, list[Any]] = {name: list(parts.values()) for name, parts in dynamic.partitions.items()}
    for name, remapper in dynamic.remappers.items():
        out[name] = [remapper] if _rank() == 0 else []
    return out


def gather_slot_maps(kept: dict[str, list[Any]], capacities: dict[str, int]) -> dict[str, SlotMap]:
    """One slot -> raw id map per dynamic table, joined from every rank's partitions (collective)."""
    local = {
        name: [(int(r.row_offset), r.slot_ids.cpu().numpy().copy(), (r.slot_count > 0).cpu().numpy()) for r in parts]
        for name, parts in kept.items()
    }
    shares: list[Any] = [local]  # every rank's, filled by all_gather_object
    if _world() > 1:
        shares = [None] * _world()
        dist.all_gather_object(shares, local)
    maps = {name: SlotMap(np.zeros(c, np.int64), np.zeros(c, bool)) for name, c in capacities.items()}
    for share in shares:
        for name, parts in share.items():
            for offset, ids, live in parts:
                maps[name].ids[offset : offset + len(ids)] = ids
                maps[name].live[offset : offset + len(ids)] = live
    return maps


@dataclass
class ShardDiff:
    """This rank's state at the last export: a copy of each piece and of the live ids of its partitions."""

    copies: list[Optional[torch.Tensor]] = field(default_factory=list)
    slot_maps: dict[str, SlotMap] = field(default_factory=dict)
    partition_ids: dict[str, np.ndarray] = field(default_factory=dict)

    def changes(
        self, pieces: list[Piece], slot_maps: dict[str, SlotMap], kept: dict[str, list[Any]]
    ) -> tuple[list[RowBatch], list[RowBatch]]:
        """Rows changed since the last call (every live row at the first) and tombstones; remembers the state."""
        first = not self.copies
        if first:
            self.copies = [None] * len(pieces)
        batches = []
        for index, piece in enumerate(pieces):
            now = piece.tensor.detach()
            previous = self.copies[index]
            n = now.shape[0]
            if previous is None:
                changed = torch.ones(n, dtype=torch.bool)
                self.copies[index] = now.clone()
            else:
                changed = _bits(now).ne(_bits(previous)).any(dim=1).cpu()
            slot_map = slot_maps.get(piece.table)
            if slot_map is None:
                ids = np.arange(piece.row0, piece.row0 + n, dtype=np.int64)
                rows = changed.numpy()
            else:
                window = slice(piece.row0, piece.row0 + n)
                live, ids = slot_map.live[window], slot_map.ids[window]
                old = self.slot_maps.get(piece.table)
                moved = np.ones(n, bool) if old is None else ~old.live[window] | (old.ids[window] != ids)
                rows = live & (changed.numpy() | moved)
            selected = torch.from_numpy(np.flatnonzero(rows))
            values = now[selected.to(now.device)]
            if previous is not None and selected.numel():
                previous[selected.to(now.device)] = values
            batches.append(RowBatch(piece.table, ids[rows], piece.col0, values.cpu().float().numpy()))
        tombstones = []
        for name, parts in kept.items():
            live_now = np.concatenate(
                [r.slot_ids.cpu().numpy()[(r.slot_count > 0).cpu().numpy()] for r in parts] or [np.zeros(0, np.int64)]
            )
            before = self.partition_ids.get(name)
            if before is not None:
                tombstones.append(RowBatch(name, np.setdiff1d(before, live_now, assume_unique=True)))
            self.partition_ids[name] = live_now
        self.slot_maps = slot_maps
        return batches, tombstones


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (so -0.0 != 0.0 and NaN == NaN: a change is a change of bits)."""
    itype = {
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float64: torch.int64,
    }
    return tensor.view(itype[tensor.dtype]) if tensor.dtype in itype else tensor


def dense_state(strategy: Any) -> dict[str, torch.Tensor]:
    """The module's state without its embedding tables (replicated on every rank), on the host."""
    module = strategy.lightning_module
    tables = {t.param_path for t in strategy.embedding_tables.tables.values()}
    out = {}
    for key, value in module.state_dict().items():
        if key in tables:
            continue
        if isinstance(value, ShardedTensor):
            raise ValueError(
                f"DeltaExport: {key!r} is sharded but not an embedding table; it cannot be exported as dense state"
            )
        out[key] = value.detach().cpu().clone()
    return out


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
