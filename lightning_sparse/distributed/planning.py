"""Planning and sharding: TorchRec's planner with our constraints, DistributedModelParallel, and each
rank's shards filled with the tables' initial values (``distributed/materialise.py``). Kept apart from the Lightning strategy so it can be used
(and tested) on a plain ``nn.Module``; the tables and their routes come from ``distributed/routes.py``.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig, TableRoute
from lightning_sparse.distributed.cached_tables import shrink_to_scratchpads
from lightning_sparse.distributed.materialise import materialise_shards
from lightning_sparse.distributed.routes import (
    FUSED_SHARDING_TYPES,
    EmbeddingTables,
    RowBlock,
    resolve_tables,
    row_blocks,
)
from lightning_sparse.distributed.row_wise import ROW_WISE_TYPES, row_wise_sharders
from lightning_sparse.optim.fbgemm_kinds import fused_optimizer_for

log = logging.getLogger(__name__)


# What ``auto`` lets TorchRec's planner choose from for the tables that measured batches do not decide
# (``distributed/auto_sharding.py``: dynamic, cached and sequence tables, and every table when no batch is read).
# On CPU not the row-wise types: the planner's cost model is made for GPUs and picks row_wise for tables of 50
# rows there, which would also pin a dynamic table's checkpoint to its number of ranks.
AUTO_SHARDING_TYPES: dict[str, list[ShardingType]] = {
    "cpu": [t for t in FUSED_SHARDING_TYPES["cpu"] if t not in ROW_WISE_TYPES],
    "cuda": FUSED_SHARDING_TYPES["cuda"],
}


def planner_constraints(
    tables: EmbeddingTables, device_type: str, column_widths: Optional[dict[str, int]] = None
) -> dict[str, ParameterConstraints]:
    """Constraints that keep every table on fused kernels unless it asked for ``data_parallel``.

    Left alone, TorchRec's planner puts small tables in ``data_parallel`` with dense (unfused) kernels.
    ``column_widths``: the column shard width of the ``column_wise`` tables ``auto`` chose (one shard per rank,
    what its byte counts and memory trials assumed; TorchRec's default splits in 128-wide shards).
    """
    constraints = {}
    for name, table in tables.tables.items():
        if table.sharding is ShardingType.DATA_PARALLEL:
            types, kernels = [ShardingType.DATA_PARALLEL], [EmbeddingComputeKernel.DENSE.value]
        elif table.sharding is ShardingType.AUTO:
            types, kernels = AUTO_SHARDING_TYPES[device_type], [EmbeddingComputeKernel.FUSED.value]
        else:
            types, kernels = [table.sharding], [EmbeddingComputeKernel.FUSED.value]
        width = (column_widths or {}).get(name)
        constraints[name] = ParameterConstraints(
            sharding_types=[t.value for t in types], compute_kernels=kernels, min_partition=width
        )
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
    """TorchRec's sharders with row_wise / table_row_wise on every device type (see ``distributed/row_wise.py``)."""
    return row_wise_sharders()


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


def planning_topology(world_size: int, device_type: str, local_world_size: Optional[int] = None) -> Topology:
    """The ranks and devices TorchRec's planner plans for (its default memory per device); ``auto``'s trial
    plans (``distributed/auto_sharding.py``) use the same."""
    return Topology(world_size=world_size, compute_device=device_type, local_world_size=local_world_size or world_size)


def plan_sharding(
    model: nn.Module,
    tables: EmbeddingTables,
    device: torch.device,
    process_group: dist.ProcessGroup,
    local_world_size: Optional[int] = None,
    column_widths: Optional[dict[str, int]] = None,
) -> ShardingPlan:
    """A sharding plan agreed by all ranks (rank 0 plans, the plan is broadcast)."""
    topology = planning_topology(dist.get_world_size(process_group), device.type, local_world_size)
    constraints = planner_constraints(tables, device.type, column_widths)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders(), process_group)


def shard_model(
    model: nn.Module,
    plan: ShardingPlan,
    device: torch.device,
    process_group: dist.ProcessGroup,
    static_graph: bool = False,
    find_unused_parameters: bool = False,
    dense_process_group: Optional[dist.ProcessGroup] = None,
) -> DistributedModelParallel:
    """Wraps ``model`` in DistributedModelParallel: sharded fused tables, dense modules under DDP (on
    ``dense_process_group`` when given: the tables' collectives may then run on another thread)."""
    wrapper = _DenseGroupWrapper(static_graph=static_graph, find_unused_parameters=find_unused_parameters)
    wrapper.dense_process_group = dense_process_group
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(process_group),
        device=device,
        plan=plan,
        sharders=sharders(),
        data_parallel_wrapper=wrapper,
    )


class _DenseGroupWrapper(DefaultDataParallelWrapper):
    """TorchRec's DDP wrapper, on a process group other than the tables' when asked (pipeline ``hybrid``)."""

    dense_process_group: Optional[dist.ProcessGroup] = None

    def _ddp_wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device, ignore: set) -> None:
        if self.dense_process_group is not None:
            env = ShardingEnv.from_process_group(self.dense_process_group)
        super()._ddp_wrap(dmp, env, device, ignore)


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
    dense_process_group: Optional[dist.ProcessGroup] = None,
    column_widths: Optional[dict[str, int]] = None,
) -> tuple[DistributedModelParallel, EmbeddingTables, ShardingPlan]:
    """Resolves every table (route and initialisation included), plans, shards and wraps ``model``, then
    fills the local shards with the tables' initial values: copied from tables built on the host, or, for
    tables built on ``meta``, generated (or read from a pretrained file) for the local shards only. A cached
    table is planned and sharded as its scratchpad (its full initialisation is kept for its backing store).
    Every rank calls it (the plan is agreed collectively)."""
    tables = resolve_tables(model, device.type, default_sharding, default_optimizer, overrides)
    shrink_to_scratchpads(tables)  # cached tables: TorchRec plans and shards their scratchpads
    attach_fused_optimizers(tables, device.type)
    move_dense_modules(model, device, set(tables.modules))
    plan = plan_sharding(
        model, tables, device, process_group, local_world_size=local_world_size, column_widths=column_widths
    )
    log.info("SparseStrategy sharding plan:\n%s", plan)
    dmp = shard_model(model, plan, device, process_group, static_graph, find_unused_parameters, dense_process_group)
    materialise_shards(model, tables)
    return dmp, tables, plan


def table_owners(dmp: DistributedModelParallel, tables: list[str]) -> dict[str, Union[int, list[RowBlock]]]:
    """Where each of ``tables`` lives under the DMP's plan: the rank holding it (table-wise), or its row blocks
    (row-wise: one block of rows per rank, see ``distributed/row_wise.py``)."""
    owners: dict[str, Union[int, list[RowBlock]]] = {}
    for module_plan in dmp.plan.plan.values():
        for table in tables:
            if table not in module_plan:
                continue
            sharding, ranks = module_plan[table].sharding_type, module_plan[table].ranks
            if sharding in {t.value for t in ROW_WISE_TYPES}:
                spec = module_plan[table].sharding_spec
                rows = sum(shard.shard_sizes[0] for shard in spec.shards)
                owners[table] = row_blocks(dmp.plan, table, rows)
            elif sharding != ShardingType.TABLE_WISE.value or not ranks or len(ranks) != 1:
                raise ValueError(
                    f"table {table!r} must be sharded table_wise or row_wise to use lightning_sparse kernels"
                )
            else:
                owners[table] = ranks[0]
    return owners
