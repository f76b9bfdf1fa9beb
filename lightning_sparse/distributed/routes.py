"""Which tables a model has and how each is trained: the one place a table's route is decided.

``resolve_tables`` finds every TorchRec embedding collection in a model, merges the strategy's defaults with
per-table overrides, checks them for the device and decides each table's route (fused / native /
data_parallel, see :class:`~lightning_sparse.config.TableRoute`), carried on the :class:`ResolvedTable` with
its parameter path. ``row_blocks`` reads a table's row blocks from TorchRec's sharding plan. Nothing here
plans, shards or communicates (``distributed/planning.py`` does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.types import ShardingPlan

from lightning_sparse.config import (
    ResolvedTable,
    ShardingType,
    SparseOptimizerConfig,
    TableConfig,
    TableInitKind,
    TableRoute,
)
from lightning_sparse.optim.fbgemm_kinds import fused_blocker
from lightning_sparse.table_init import TableInit

# Sharding types the native route runs under: each table whole on one rank, or one block of whole rows per
# rank (row-wise), so a rank's state is one local tensor of the rows it holds.
NATIVE_ROUTE_SHARDING = (ShardingType.AUTO, ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)


EmbeddingModule = Union[EmbeddingBagCollection, EmbeddingCollection]


# Sharding types TorchRec can run with fused fbgemm kernels, per device type. ``auto`` chooses among these.
# row_wise / table_row_wise run on CPU through the sharders of ``distributed/row_wise.py``.
FUSED_SHARDING_TYPES: dict[str, list[ShardingType]] = {
    "cpu": [
        ShardingType.TABLE_WISE,
        ShardingType.COLUMN_WISE,
        ShardingType.ROW_WISE,
        ShardingType.TABLE_ROW_WISE,
        ShardingType.TABLE_COLUMN_WISE,
    ],
    "cuda": [
        ShardingType.TABLE_WISE,
        ShardingType.COLUMN_WISE,
        ShardingType.ROW_WISE,
        ShardingType.TABLE_ROW_WISE,
        ShardingType.TABLE_COLUMN_WISE,
    ],
}


def available_sharding_types(device_type: str) -> list[ShardingType]:
    """Sharding types a user may ask for on ``device_type`` (fused ones plus ``data_parallel``)."""
    return FUSED_SHARDING_TYPES[device_type] + [ShardingType.DATA_PARALLEL]


@dataclass
class EmbeddingTables:
    """The embedding modules of a model and the effective settings of each of their tables."""

    modules: dict[str, EmbeddingModule]
    tables: dict[str, ResolvedTable] = field(default_factory=dict)
    # table name -> (module fqn, the table's weight before sharding, on the host or on meta); released
    # once the shards are filled (see distributed/materialise.py)
    weights: dict[str, tuple[str, nn.Parameter]] = field(default_factory=dict)
    # feature key -> table name
    features: dict[str, str] = field(default_factory=dict)
    # cached table -> its full-size resolved table (rows N, initialisation), until its backing store is filled
    # (``cache/tables.py``: ``shrink_to_scratchpads`` puts it here, ``CachedTables.build`` takes it)
    cache_sources: dict[str, ResolvedTable] = field(default_factory=dict)


def find_embedding_modules(model: nn.Module) -> dict[str, EmbeddingModule]:
    """Every TorchRec EmbeddingBagCollection / EmbeddingCollection in ``model``, by fully qualified name."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            found[name] = module
    return found


def _table_configs(module: EmbeddingModule) -> list:
    if isinstance(module, EmbeddingBagCollection):
        return list(module.embedding_bag_configs())
    return list(module.embedding_configs())


def _table_weights(module: EmbeddingModule) -> dict[str, nn.Parameter]:
    container = module.embedding_bags if isinstance(module, EmbeddingBagCollection) else module.embeddings
    return {cfg.name: container[cfg.name].weight for cfg in _table_configs(module)}


def resolve_tables(
    model: nn.Module,
    device_type: str,
    default_sharding: ShardingType,
    default_optimizer: SparseOptimizerConfig,
    overrides: Optional[dict[str, TableConfig]],
) -> EmbeddingTables:
    """Merges strategy defaults with per-table overrides and validates them for ``device_type``."""
    modules = find_embedding_modules(model)
    if not modules:
        raise ValueError(
            f"SparseStrategy found no TorchRec EmbeddingBagCollection or EmbeddingCollection in "
            f"{type(model).__name__}. Build the embedding tables with torchrec modules (see "
            "lightning_sparse.models.DLRMModule), or use strategy='ddp' for a model without embedding tables."
        )
    result = EmbeddingTables(modules=modules)
    for fqn, module in modules.items():
        for table_name, weight in _table_weights(module).items():
            if table_name in result.weights:
                raise ValueError(
                    f"Table name {table_name!r} is used in both {result.weights[table_name][0]!r} and {fqn!r}; "
                    "table names must be unique across the model (they key the per-table config and checkpoints)."
                )
            result.weights[table_name] = (fqn, weight)
        for cfg in _table_configs(module):
            result.features.update({feature: cfg.name for feature in cfg.feature_names})
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(result.weights))
    if unknown:
        raise ValueError(
            f"SparseStrategy(tables=...) names unknown table(s) {unknown}; the model's tables are {sorted(result.weights)}"
        )
    allowed = available_sharding_types(device_type)
    for fqn, module in modules.items():
        weighted = isinstance(module, EmbeddingBagCollection) and module.is_weighted()
        for cfg in _table_configs(module):
            pooling = cfg.pooling.name.lower() if isinstance(module, EmbeddingBagCollection) else "none"
            override = overrides.get(cfg.name, TableConfig())
            table = _resolve_table(
                cfg.name, override, device_type, allowed, default_sharding, default_optimizer, pooling, weighted
            )
            weight = result.weights[cfg.name][1]
            table.param_path, table.rows, table.dim = (
                _state_key(module, fqn, cfg.name),
                int(weight.shape[0]),
                int(weight.shape[1]),
            )
            table.init, table.initialiser = _initialisation(table, cfg, weight, override.pretrained)
            if table.dynamic is not None:
                if table.dynamic.capacity is None:  # read from the table: one number, one place
                    table.dynamic = dataclasses.replace(table.dynamic, capacity=table.rows)
                elif table.dynamic.capacity != table.rows:
                    raise ValueError(
                        f"Table {cfg.name!r}: dynamic.capacity={table.dynamic.capacity} must equal the table's rows "
                        f"(num_embeddings={table.rows}); leave capacity out (it is read from the table) or set one to the other."
                    )
            result.tables[cfg.name] = table
    return result


def _resolve_table(
    name: str,
    override: TableConfig,
    device_type: str,
    allowed: list[ShardingType],
    default_sharding: ShardingType,
    default_optimizer: SparseOptimizerConfig,
    pooling: str,
    weighted: bool,
) -> ResolvedTable:
    """One table's sharding, optimizer and route: the one place where the route is decided."""
    sharding = override.sharding or default_sharding
    if sharding is not ShardingType.AUTO and sharding not in allowed:
        raise ValueError(
            f"Table {name!r}: sharding {sharding.value!r} is not available on {device_type}; "
            f"allowed there: {', '.join(['auto'] + [s.value for s in allowed])}"
        )
    optimizer = override.optimizer or default_optimizer
    if override.cache is not None:
        return _resolve_cached(name, override, sharding, optimizer)
    if sharding is ShardingType.DATA_PARALLEL:
        route, reason = TableRoute.DATA_PARALLEL, "data_parallel sharding"
    else:
        reason = fused_blocker(optimizer, device_type, pooling, weighted)
        route = TableRoute.NATIVE if reason else TableRoute.FUSED
    if route is TableRoute.NATIVE:
        if sharding not in NATIVE_ROUTE_SHARDING:
            raise ValueError(
                f"Table {name!r}: {reason}, so it runs in lightning_sparse kernels, which need whole rows on a rank: "
                f"sharding 'table_wise', 'row_wise' or 'table_row_wise' (or 'auto'), not {sharding.value!r}. Use one of "
                f"those for this table, or an optimizer fbgemm fuses exactly there (kind sgd, adagrad or "
                f"rowwise_adagrad with weight_decay 0)."
            )
        if sharding is ShardingType.AUTO:
            sharding = ShardingType.TABLE_WISE
    return ResolvedTable(
        name=name, sharding=sharding, optimizer=optimizer, dynamic=override.dynamic, route=route, route_reason=reason
    )


def _initialisation(
    table: ResolvedTable, cfg, weight: nn.Parameter, pretrained: Optional[str]
) -> tuple[TableInitKind, object]:
    """Where ``table``'s initial values come from (see :class:`TableInitKind`), decided once."""
    if pretrained is not None:
        if table.dynamic is not None:
            raise ValueError(
                f"Table {table.name!r}: pretrained={pretrained!r} cannot be used with a dynamic table: its rows are "
                "slots handed to ids at run time, so a file's row i has no id to belong to. Drop one of the two."
            )
        check_pretrained(table.name, pretrained, (table.rows, table.dim), weight.dtype)
        return TableInitKind.PRETRAINED, str(pretrained)
    if weight.device.type != "meta":
        return TableInitKind.COPY, weight
    if isinstance(cfg.init_fn, TableInit):
        return TableInitKind.REPLAY, cfg.init_fn
    return TableInitKind.INIT_FN, cfg.init_fn


def check_pretrained(table_name: str, path: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Checks a pretrained-rows file against its table (reads only the ``.npy`` header)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Table {table_name!r}: pretrained file {path!r} does not exist (TableConfig.pretrained)"
        )
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise ValueError(f"Table {table_name!r}: pretrained file {path!r} is not a .npy array file: {error}") from None
    expected_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    if tuple(array.shape) != shape or array.dtype != expected_dtype:
        raise ValueError(
            f"Table {table_name!r}: pretrained file {path!r} holds an array of shape {tuple(array.shape)} and dtype "
            f"{array.dtype}; the table needs shape {shape} (num_embeddings x embedding_dim) and dtype {expected_dtype}. "
            f"Save the rows as numpy.save(path, rows.astype(numpy.{expected_dtype}))."
        )


def _resolve_cached(
    name: str, override: TableConfig, sharding: ShardingType, optimizer: SparseOptimizerConfig
) -> ResolvedTable:
    """A cached table runs on the native route: our kernels update scratchpad rows given slot ids, which
    fbgemm's fused backward (rows = ids) and a replicated data-parallel table cannot do."""
    blocker = ""
    if override.dynamic is not None:
        blocker = "it is also dynamic (its ids are remapped by a hash table; cache a static table)"
    elif sharding not in (ShardingType.AUTO, ShardingType.TABLE_WISE):
        blocker = (
            f"its sharding is {sharding.value!r}; a cached table must be whole on one rank: 'table_wise' or 'auto'"
        )
    if blocker:
        raise ValueError(
            f"Table {name!r}: a cache option on a table kind that cannot take it: {blocker}. Remove "
            "TableConfig.cache from this table, or change what is named."
        )
    return ResolvedTable(
        name=name,
        sharding=ShardingType.TABLE_WISE,
        optimizer=optimizer,
        route=TableRoute.NATIVE,
        route_reason="cached table: lightning_sparse kernels update its scratchpad slots",
        cache=override.cache,
    )


def _state_key(module: EmbeddingModule, fqn: str, table_name: str) -> str:
    container = "embedding_bags" if isinstance(module, EmbeddingBagCollection) else "embeddings"
    return f"{fqn}.{container}.{table_name}.weight" if fqn else f"{container}.{table_name}.weight"


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[row_offset, row_offset + rows)`` of a table as the plan shards them, and the rank keeping
    the hash partition of those rows (the rank of the block's first column shard)."""

    row_offset: int
    rows: int
    rank: int


def row_blocks(plan: ShardingPlan, table_name: str, rows: int) -> list[RowBlock]:
    """The non-empty row blocks of ``table_name`` (of ``rows`` rows) under ``plan``, by ascending first row.

    table_wise and column_wise tables have one block (all rows), row_wise ones a block per rank;
    data_parallel tables (every rank holds every row) have one block, kept by rank 0.
    """
    shardings = [module_plan[table_name] for module_plan in plan.plan.values() if table_name in module_plan]
    if len(shardings) != 1:
        raise ValueError(f"the sharding plan has {len(shardings)} entries for table {table_name!r}, expected 1")
    spec = shardings[0].sharding_spec
    if spec is None:
        return [RowBlock(0, rows, 0)]
    first_column: dict[int, tuple[int, int, int]] = {}  # row offset -> (column offset, rows, rank)
    for shard in spec.shards:
        row0, col0 = shard.shard_offsets[0], shard.shard_offsets[1]
        candidate = (col0, shard.shard_sizes[0], shard.placement.rank())
        if row0 not in first_column or candidate < first_column[row0]:
            first_column[row0] = candidate
    return [RowBlock(row0, n, rank) for row0, (_, n, rank) in sorted(first_column.items()) if n > 0]


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The embedding-table parameters of a sharded model (fused and data-parallel), by FQN."""
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    params = {}
    for fqn, module in model.named_modules():
        if isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
            for name, param in module.named_parameters():
                params[f"{fqn}.{name}" if fqn else name] = param
    return params
