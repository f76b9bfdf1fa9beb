"""Finding TorchRec embedding modules, resolving per-table settings, planning and DMP wrapping.

Kept apart from the Lightning strategy so it can be used (and tested) on a plain ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
import torchrec.optim as trec_optim
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lightning_sparse.config import ResolvedTable, ShardingType, SparseOptimizerConfig, TableConfig, TableRoute
from lightning_sparse.optim.fbgemm_kinds import fused_blocker, fused_optimizer_for

log = logging.getLogger(__name__)

# Sharding types the native route runs under: each table whole on one rank, so its state is one local tensor.
NATIVE_ROUTE_SHARDING = (ShardingType.AUTO, ShardingType.TABLE_WISE)

EmbeddingModule = Union[EmbeddingBagCollection, EmbeddingCollection]

# Sharding types TorchRec can run with fused fbgemm kernels, per device type. ``auto`` chooses among these.
FUSED_SHARDING_TYPES: dict[str, list[ShardingType]] = {
    "cpu": [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.TABLE_COLUMN_WISE],
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
    # table name -> (module fqn, the table's weight before sharding); the weights are released once
    # copied into the shards (see copy_initial_weights)
    weights: dict[str, tuple[str, nn.Parameter]] = field(default_factory=dict)
    # feature key -> table name
    features: dict[str, str] = field(default_factory=dict)


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
        raise ValueError(f"SparseStrategy(tables=...) names unknown table(s) {unknown}; the model's tables are {sorted(result.weights)}")
    allowed = available_sharding_types(device_type)
    for fqn, module in modules.items():
        weighted = isinstance(module, EmbeddingBagCollection) and module.is_weighted()
        for cfg in _table_configs(module):
            pooling = cfg.pooling.name.lower() if isinstance(module, EmbeddingBagCollection) else "none"
            table = _resolve_table(cfg.name, overrides.get(cfg.name, TableConfig()), device_type, allowed,
                                   default_sharding, default_optimizer, pooling, weighted)
            weight = result.weights[cfg.name][1]
            table.param_path, table.rows, table.dim = _state_key(module, fqn, cfg.name), int(weight.shape[0]), int(weight.shape[1])
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
    if sharding is ShardingType.DATA_PARALLEL:
        route, reason = TableRoute.DATA_PARALLEL, "data_parallel sharding"
    else:
        reason = fused_blocker(optimizer, device_type, pooling, weighted)
        route = TableRoute.NATIVE if reason else TableRoute.FUSED
    if route is TableRoute.NATIVE:
        if sharding not in NATIVE_ROUTE_SHARDING:
            raise ValueError(
                f"Table {name!r}: {reason}, so it runs in lightning_sparse kernels, which need sharding 'table_wise' "
                f"(or 'auto'), not {sharding.value!r}. Use table_wise for this table, or an optimizer fbgemm fuses "
                f"exactly there (kind sgd, adagrad or rowwise_adagrad with weight_decay 0)."
            )
        sharding = ShardingType.TABLE_WISE
    return ResolvedTable(name=name, sharding=sharding, optimizer=optimizer, dynamic=override.dynamic, route=route, route_reason=reason)


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


def dynamic_tables_of(tables: EmbeddingTables, plan: ShardingPlan, rank: int) -> Optional["DynamicTables"]:
    """The hash tables of the model's dynamic tables (this rank's part of them), or None when none is dynamic."""
    from lightning_sparse.strategies.dynamic_tables import DynamicTables

    configs = {name: table.dynamic for name, table in tables.tables.items() if table.dynamic is not None}
    if not configs:
        return None
    blocks = {name: row_blocks(plan, name, config.capacity) for name, config in configs.items()}
    return DynamicTables(configs, {f: t for f, t in tables.features.items() if t in configs}, blocks, rank)


def planner_constraints(tables: EmbeddingTables, device_type: str) -> dict[str, ParameterConstraints]:
    """Constraints that keep every table on fused kernels unless it asked for ``data_parallel``.

    Left alone, TorchRec's planner puts small tables in ``data_parallel`` with dense (unfused) kernels.
    """
    constraints = {}
    for name, table in tables.tables.items():
        if table.sharding is ShardingType.DATA_PARALLEL:
            types, kernels = [ShardingType.DATA_PARALLEL], [EmbeddingComputeKernel.DENSE.value]
        elif table.sharding is ShardingType.AUTO:
            types, kernels = FUSED_SHARDING_TYPES[device_type], [EmbeddingComputeKernel.FUSED.value]
        else:
            types, kernels = [table.sharding], [EmbeddingComputeKernel.FUSED.value]
        constraints[name] = ParameterConstraints(sharding_types=[t.value for t in types], compute_kernels=kernels)
    return constraints


def attach_fused_optimizers(tables: EmbeddingTables, device_type: str) -> None:
    """Attaches each sharded table's optimizer so TorchRec builds the fbgemm kernel with it.

    Native-route tables get fused SGD at lr 0: their TBE only looks rows up (its backward never runs, see
    ``optim/row_gradients.py``), and lr 0 keeps its weights unchanged should it ever run.
    """
    for name, table in tables.tables.items():
        if table.route is TableRoute.DATA_PARALLEL:
            continue
        if table.route is TableRoute.NATIVE:
            optimizer_class, kwargs = trec_optim.SGD, {"lr": 0.0}
        else:
            optimizer_class, kwargs = fused_optimizer_for(table.optimizer, device_type)
        apply_optimizer_in_backward(optimizer_class, [tables.weights[name][1]], kwargs)


def sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def move_dense_modules(model: nn.Module, device: torch.device, embedding_fqns: set[str], prefix: str = "") -> None:
    """Moves everything but the embedding modules to ``device``; DMP places each table shard itself
    (moving whole tables first would put every full table on every device)."""
    model._apply(lambda t: t.to(device), recurse=False)
    for name, child in model.named_children():
        fqn = f"{prefix}{name}"
        if fqn in embedding_fqns:
            continue
        if any(e.startswith(fqn + ".") for e in embedding_fqns):
            move_dense_modules(child, device, embedding_fqns, prefix=fqn + ".")
        else:
            child.to(device)


def plan_sharding(
    model: nn.Module,
    tables: EmbeddingTables,
    device: torch.device,
    process_group: dist.ProcessGroup,
    local_world_size: Optional[int] = None,
) -> ShardingPlan:
    """A sharding plan agreed by all ranks (rank 0 plans, the plan is broadcast)."""
    world_size = dist.get_world_size(process_group)
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=local_world_size or world_size,
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=planner_constraints(tables, device.type))
    return planner.collective_plan(model, sharders(), process_group)


def shard_model(
    model: nn.Module,
    plan: ShardingPlan,
    device: torch.device,
    process_group: dist.ProcessGroup,
    static_graph: bool = False,
    find_unused_parameters: bool = False,
) -> DistributedModelParallel:
    """Wraps ``model`` in DistributedModelParallel: sharded fused tables, dense modules under DDP."""
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(process_group),
        device=device,
        plan=plan,
        sharders=sharders(),
        data_parallel_wrapper=DefaultDataParallelWrapper(
            static_graph=static_graph, find_unused_parameters=find_unused_parameters
        ),
    )


def shard_tables(
    model: nn.Module,
    device: torch.device,
    process_group: dist.ProcessGroup,
    default_sharding: ShardingType,
    default_optimizer: SparseOptimizerConfig,
    overrides: Optional[dict[str, TableConfig]] = None,
    local_world_size: Optional[int] = None,
    static_graph: bool = False,
    find_unused_parameters: bool = False,
) -> tuple[DistributedModelParallel, EmbeddingTables, ShardingPlan]:
    """Resolves every table (route included), plans, shards and wraps ``model``; the model's own initial
    table weights are copied into the shards. Every rank calls it (the plan is agreed collectively)."""
    tables = resolve_tables(model, device.type, default_sharding, default_optimizer, overrides)
    attach_fused_optimizers(tables, device.type)
    move_dense_modules(model, device, set(tables.modules))
    plan = plan_sharding(model, tables, device, process_group, local_world_size=local_world_size)
    log.info("SparseStrategy sharding plan:\n%s", plan)
    dmp = shard_model(model, plan, device, process_group, static_graph, find_unused_parameters)
    copy_initial_weights(model, tables)
    return dmp, tables, plan


def _state_key(module: EmbeddingModule, fqn: str, table_name: str) -> str:
    container = "embedding_bags" if isinstance(module, EmbeddingBagCollection) else "embeddings"
    return f"{fqn}.{container}.{table_name}.weight" if fqn else f"{container}.{table_name}.weight"


def copy_initial_weights(model: nn.Module, tables: EmbeddingTables) -> None:
    """Copies the tables' weights from before sharding into the local shards, then releases them.

    DistributedModelParallel allocates fresh shards and re-initialises them; without this the user's
    initialisation (or pre-trained rows) would be silently replaced.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for table_name, (fqn, weight) in tables.weights.items():
            target = state[_state_key(tables.modules[fqn], fqn, table_name)]
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(weight[row : row + rows, col : col + cols])
            else:
                target.copy_(weight)
    tables.weights.clear()


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


def table_owners(dmp: DistributedModelParallel, tables: list[str]) -> dict[str, int]:
    """The rank holding each of ``tables`` (table-wise sharded) under the DMP's plan."""
    owners = {}
    for module_plan in dmp.plan.plan.values():
        for table in tables:
            if table in module_plan:
                ranks = module_plan[table].ranks
                if module_plan[table].sharding_type != ShardingType.TABLE_WISE.value or not ranks or len(ranks) != 1:
                    raise ValueError(f"table {table!r} must be sharded table_wise to use lightning_sparse kernels")
                owners[table] = ranks[0]
    return owners
