"""Cached tables (``TableConfig.cache``) on the sharding side: shrunk to their scratchpads before planning, and
their :class:`~lightning_sparse.cache.tables.CachedTables` built with the sharded model.

A cached table is planned and sharded as its scratchpad of ``C`` rows (the native route's TBE and optimizer
state); its ``N`` rows live in a backing store on the rank holding the table (``cache/``). Both work the same
for tables built on the host and on ``meta``: the store is filled from the table's resolved initialisation
(``distributed/materialise.py``), which :func:`shrink_to_scratchpads` keeps aside at full size.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection

from lightning_sparse.cache.tables import CachedTables
from lightning_sparse.distributed.collectives import Collectives
from lightning_sparse.distributed.materialise import fill_piece
from lightning_sparse.distributed.routes import EmbeddingTables
from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer


def shrink_to_scratchpads(tables: EmbeddingTables) -> None:
    """Shrinks every cached table of the resolved ``tables`` to its scratchpad before planning.

    The module's table config and weight get ``min(cache.rows, N)`` rows (a ``meta`` weight stays on ``meta``);
    the resolved table's ``rows`` become the slots and ``cache_rows`` the table's ``N``. A full-size copy of the
    resolved table, carrying its initialisation, goes to ``tables.cache_sources`` for the backing store."""
    for name, table in tables.tables.items():
        if table.cache is None:
            continue
        fqn, weight = tables.weights[name]
        module = tables.modules[fqn]
        bags = isinstance(module, EmbeddingBagCollection)
        container = module.embedding_bags if bags else module.embeddings
        table_configs = getattr(module, "_embedding_bag_configs" if bags else "_embedding_configs")
        slots = min(table.cache.rows, table.rows)
        tables.cache_sources[name] = dataclasses.replace(table, cache_rows=table.rows)
        for i, config in enumerate(table_configs):
            if config.name == name:
                table_configs[i] = dataclasses.replace(config, num_embeddings=slots)
        layer = container[name]
        layer.weight = nn.Parameter(weight.detach()[:slots].clone())
        layer.num_embeddings = slots
        tables.weights[name] = (fqn, layer.weight)
        table.cache_rows, table.rows = table.rows, slots


def cached_tables_of(
    tables: EmbeddingTables,
    owners: Mapping[str, int],
    native: Optional[NativeKernelOptimizer],
    collectives: Collectives,
    device: torch.device,
) -> Optional[CachedTables]:
    """The cached tables of a freshly sharded model, None when it has none (called by ``ShardedModel.build``;
    ``owners``: the rank holding each cached table, which is table_wise)."""
    if not tables.cache_sources:
        return None
    assert native is not None, "cached tables run on the native route, so our kernels' optimizer exists"
    return CachedTables.build(
        tables, native, owners, collectives.rank, collectives.all_gather_object, fill_piece, device
    )
