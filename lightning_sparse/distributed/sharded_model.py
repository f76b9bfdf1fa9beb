"""A sharded model and the components that own its state, found again by any later Trainer.

:class:`ShardedModel` is what sharding a LightningModule produces, once: TorchRec's DistributedModelParallel,
the resolved tables, the dynamic tables' hash tables, the sparse optimizer and the cached tables' backing stores
(``cache/tables.py``). A second stage
(``trainer.validate`` after ``fit``) or a new Trainer given the same module must reuse it: the module's
embedding modules were replaced by TorchRec's sharded ones, which cannot be sharded again, and the hash tables
and our kernels' optimizer state live outside the module.

Nothing is written on the user's module. :func:`sharded_model_of` looks the record up in a module-level
``weakref.WeakKeyDictionary`` keyed by the module whose values are *weak* references to the record. The
record is held by the strategy that built or reused it, and Lightning keeps that strategy alive through the
module: ``LightningModule.trainer`` (set by every Trainer that runs the module, never cleared) -> Trainer ->
strategy -> record. So the record lives exactly as long as the module stays attached to a Trainer that used it,
and a module dropped by the user is freed with its shards (a strong registry would keep every sharded model
of the process alive, since the record reaches the module through the DMP). A module whose record is gone
(its Trainer detached by hand) is refused with a clear error rather than sharded twice.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan

from lightning_sparse.cache.tables import CachedTables
from lightning_sparse.config import TableRoute
from lightning_sparse.distributed.cached_tables import cached_tables_of
from lightning_sparse.distributed.collectives import Collectives, collective_device
from lightning_sparse.distributed.planning import table_owners
from lightning_sparse.distributed.routes import EmbeddingTables, embedding_parameters
from lightning_sparse.distributed.sharded_dynamic import DynamicTables, dynamic_tables_of
from lightning_sparse.optim.sparse_optimizer import SparseOptimizer

_RECORDS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[ShardedModel]]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class ShardedModel:
    """The sharded form of one LightningModule and the components that own its state."""

    dmp: DistributedModelParallel
    tables: EmbeddingTables
    optimizer: SparseOptimizer
    dynamic: Optional[DynamicTables]
    cache: Optional[CachedTables] = None

    @classmethod
    def build(
        cls,
        module: nn.Module,
        dmp: DistributedModelParallel,
        tables: EmbeddingTables,
        plan: ShardingPlan,
        device: torch.device,
        collectives: Collectives,
    ) -> "ShardedModel":
        """The components of a freshly sharded ``module``, remembered for later Trainers (see the module docstring)."""
        dynamic = dynamic_tables_of(tables, plan, collectives)
        if dynamic is not None:
            dynamic.place_partitions(device)
        native = [t.name for t in tables.tables.values() if t.route is TableRoute.NATIVE]
        optimizer = SparseOptimizer(
            dmp,
            tables.tables,
            embedding_parameters(module),
            table_owners(dmp, native),
            collectives.rank,
            partial(unite_rows, collectives),
            device,
            collectives.all_gather_object,
        )
        if dynamic is not None:
            dynamic.bind_rows(module.state_dict(keep_vars=True), optimizer.row_states)
        owners = table_owners(dmp, sorted(tables.cache_sources))
        cache = cached_tables_of(tables, owners, optimizer.native, collectives, device)
        record = cls(dmp, tables, optimizer, dynamic, cache)
        _RECORDS[module] = weakref.ref(record)
        return record


def sharded_model_of(module: nn.Module) -> Optional[ShardedModel]:
    """The record of ``module`` if it was sharded before (None for a module never sharded)."""
    ref = _RECORDS.get(module)
    record = ref() if ref is not None else None
    if record is None and embedding_parameters(module):
        raise RuntimeError(
            f"{type(module).__name__}'s embedding tables are already sharded, but no SparseStrategy holds their sharded "
            "model any more: the module was detached from the Trainer that sharded it (module.trainer set to None), "
            "or that Trainer's setup failed after sharding. TorchRec's sharded tables cannot be sharded again: keep "
            "the module attached to its Trainer, or build a new module (and load a checkpoint) for the new Trainer."
        )
    return record


def unite_rows(collectives: Collectives, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The rows any rank read of a data-parallel table of ``num_rows`` rows (one all-reduce of a mask)."""
    if collectives.world_size == 1:
        return rows
    mask = torch.zeros(num_rows, dtype=torch.int32, device=collective_device())
    mask[rows.to(mask.device)] = 1
    collectives.all_reduce(mask, "sum")
    return mask.nonzero().squeeze(1).to(rows.device)
