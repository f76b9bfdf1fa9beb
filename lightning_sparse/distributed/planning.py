"""Planning and sharding: TorchRec's planner with our constraints, DistributedModelParallel, and the
user's initial weights copied into the shards. Kept apart from the Lightning strategy so it can be used
(and tested) on a plain ``nn.Module``; the tables and their routes come from ``distributed/routes.py``.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig, TableRoute
from lightning_sparse.distributed.routes import FUSED_SHARDING_TYPES, EmbeddingTables, _state_key, resolve_tables
from lightning_sparse.optim.fbgemm_kinds import fused_optimizer_for

log = logging.getLogger(__name__)


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
) -> tuple[DistributedModelParallel, EmbeddingTables, ShardingPlan]:
    """Resolves every table (route included), plans, shards and wraps ``model``; the model's own initial
    table weights are copied into the shards. Every rank calls it (the plan is agreed collectively)."""
    tables = resolve_tables(model, device.type, default_sharding, default_optimizer, overrides)
    attach_fused_optimizers(tables, device.type)
    move_dense_modules(model, device, set(tables.modules))
    plan = plan_sharding(model, tables, device, process_group, local_world_size=local_world_size)
    log.info("SparseStrategy sharding plan:\n%s", plan)
    dmp = shard_model(model, plan, device, process_group, static_graph, find_unused_parameters, dense_process_group)
    copy_initial_weights(model, tables)
    return dmp, tables, plan


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
