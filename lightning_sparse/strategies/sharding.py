"""Finding TorchRec embedding modules, resolving per-table settings, planning and DMP wrapping.

Kept apart from the Lightning strategy so it can be used (and tested) on a plain ``nn.Module``.
"""

from __future__ import annotations

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

from lightning_sparse.config import ResolvedTable, ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.optim.fbgemm_kinds import check_unfused_kind, fused_optimizer_for, supported_kinds
from lightning_sparse.strategies.native_kernel_tables import NATIVE_KERNEL_SHARDING, fused_sgd_scale, needs_native_kernel

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
    for table_name in result.weights:
        override = overrides.get(table_name, TableConfig())
        sharding = override.sharding or default_sharding
        if sharding is not ShardingType.AUTO and sharding not in allowed:
            raise ValueError(
                f"Table {table_name!r}: sharding {sharding.value!r} is not available on {device_type}; "
                f"allowed there: {', '.join(['auto'] + [s.value for s in allowed])}"
            )
        optimizer = override.optimizer or default_optimizer
        if sharding is ShardingType.DATA_PARALLEL:
            check_unfused_kind(optimizer)
        elif needs_native_kernel(optimizer, device_type):
            if sharding not in NATIVE_KERNEL_SHARDING:
                fused = ", ".join(k.value for k in supported_kinds(device_type))
                raise ValueError(
                    f"Table {table_name!r}: sparse optimizer {optimizer.kind.value!r} has no fbgemm kernel on "
                    f"{device_type} and runs in lightning_sparse kernels, which need sharding 'table_wise' (or "
                    f"'auto'), not {sharding.value!r}. Use table_wise, or a kind fbgemm fuses there: {fused}."
                )
            sharding = ShardingType.TABLE_WISE
        dynamic = override.dynamic
        if dynamic is not None and dynamic.capacity != result.weights[table_name][1].shape[0]:
            raise ValueError(
                f"Table {table_name!r}: dynamic.capacity={dynamic.capacity} must equal the table's rows "
                f"(num_embeddings={result.weights[table_name][1].shape[0]}); set one to the other."
            )
        result.tables[table_name] = ResolvedTable(name=table_name, sharding=sharding, optimizer=optimizer, dynamic=dynamic)
    return result


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
    """Attaches each fused table's optimizer so TorchRec builds the fbgemm kernel with it.

    Tables whose rule fbgemm lacks on the device get fused SGD at the gradient-tap scale instead (see
    ``native_kernel_tables``); TorchRec groups them into their own TBEs since their fused params differ.
    """
    for name, table in tables.tables.items():
        if table.sharding is ShardingType.DATA_PARALLEL:
            continue
        if needs_native_kernel(table.optimizer, device_type):
            optimizer_class, kwargs = trec_optim.SGD, fused_sgd_scale()
        else:
            optimizer_class, kwargs = fused_optimizer_for(table.optimizer, device_type)
        apply_optimizer_in_backward(optimizer_class, [tables.weights[name][1]], kwargs)


def native_kernel_configs(tables: EmbeddingTables, device_type: str) -> dict[str, SparseOptimizerConfig]:
    """The tables trained by lightning_sparse kernels, with their optimizer configs."""
    return {
        name: table.optimizer
        for name, table in tables.tables.items()
        if table.sharding is not ShardingType.DATA_PARALLEL and needs_native_kernel(table.optimizer, device_type)
    }


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
