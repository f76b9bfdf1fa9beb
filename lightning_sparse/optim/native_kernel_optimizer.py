"""The optimizer of every table that lightning_sparse's kernels train: the ``native`` and ``data_parallel`` routes.

``native`` tables are sharded with fbgemm's TBE for the lookup only; :class:`~lightning_sparse.optim.row_gradients.
LookupGradients` records each lookup's output gradient and :meth:`step` applies the rule: a table looked up
once goes through :func:`~lightning_sparse.optim.row_update.embedding_row_update_for` (exact row gradients and
rule in one pass), a table looked up several times has its exact row gradients summed and goes through
:func:`~lightning_sparse.optim.kernels.sparse_update_for` (``cuda_ops/sparse_optimizers.cpp``/``.cu``, or the
PyTorch twin); both give the same bits. ``data_parallel`` tables keep TorchRec's dense kernel and DDP's averaged gradient; the rule
is applied to the rows the *global* batch read (each rank's rows, united with one all-reduce), so weight decay
and moment decay touch those rows only, as on the other routes.

One :class:`NativeKernelOptimizer` is a TorchRec ``KeyedOptimizer``: one param group per table (its
hyper-parameters, read at every step: ``lr`` and the rest can change mid-run and are checkpointed) and state
per table. A native table's state is a ``ShardedTensor`` of one shard placed on the rank that holds the table
(table-wise), or of one shard per row block (row-wise: each rank updates the rows of its block, from the row
gradients of its own lookup), so torch.distributed.checkpoint saves and reshards it like fbgemm's; a
data-parallel table's state is replicated (a plain tensor, written once).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties
from torchrec.optim.keyed import KeyedOptimizer

from lightning_sparse.config import ResolvedTable, TableRoute
from lightning_sparse.optim.kernels import init_state_for, sparse_update_for
from lightning_sparse.optim.row_gradients import LookupGradients, LookupRows, find_lookup_kernels, merge_row_grads
from lightning_sparse.optim.row_update import embedding_row_update_for

HYPERPARAMETERS = ("lr", "eps", "weight_decay", "beta1", "beta2", "decay")

# Unites the rows that every rank's batch read of a data-parallel table: (local rows, table rows) -> rows.
RowUnion = Callable[[Tensor, int], Tensor]


def attach_row_captures(
    module: nn.Module, tables: dict[str, ResolvedTable]
) -> tuple[list[LookupGradients], list[LookupRows]]:
    """Hooks every lookup kernel holding native or data-parallel tables; refuses kernels that mix routes."""
    gradients, rows = [], []
    for kernel in find_lookup_kernels(module):
        names = [t.name for t in kernel.config.embedding_tables]
        routes = {tables[n].route for n in names if n in tables}
        if TableRoute.NATIVE in routes:
            if routes != {TableRoute.NATIVE}:
                fused = sorted(n for n in names if tables[n].route is not TableRoute.NATIVE)
                raise ValueError(
                    f"fbgemm grouped the fused table(s) {fused} into one kernel with native-route tables "
                    f"{sorted(set(names) - set(fused))}: their fused params coincide (fused SGD at lr 0). "
                    "Give those tables a non-zero lr, or another optimizer kind."
                )
            gradients.append(LookupGradients(kernel))
        elif routes == {TableRoute.DATA_PARALLEL}:
            rows.append(LookupRows(kernel))
    return gradients, rows


class NativeKernelOptimizer(KeyedOptimizer):
    """Our kernels' optimizer over the native and data-parallel tables, keyed by the tables' parameter paths."""

    def __init__(
        self,
        tables: list[ResolvedTable],
        parameters: dict[str, nn.Parameter],
        gradients: list[LookupGradients],
        rows: list[LookupRows],
        owners: dict[str, int],
        rank: int,
        row_union: RowUnion,
        device: torch.device,
    ) -> None:
        self._tables = sorted(tables, key=lambda t: t.name)  # the same order on every rank
        self._row_union = row_union
        self._gradients = {t.name: g for g in gradients for t in g.tables}
        self._rows = {t.name: r for r in rows for t in r.tables}
        self._local_weight: dict[str, Tensor] = {}
        for capture in gradients:
            for table, weight in zip(capture.tables, capture.kernel.emb_module.split_embedding_weights()):
                self._local_weight[table.name] = weight
        params: dict[str, Any] = {}
        state: dict[Any, Any] = {}
        groups = []
        # table -> {state name: this rank's tensor}; the KeyedOptimizer's state holds the checkpointed form
        self._states: dict[str, dict[str, Tensor]] = {}
        for table in self._tables:
            param = parameters[table.param_path]
            params[table.param_path] = param
            if table.route is TableRoute.DATA_PARALLEL:
                self._local_weight[table.name] = param.detach()
                tensors = init_state_for(table.optimizer, self._local_weight[table.name])
                state[param] = {f"{table.name}.{key}": value for key, value in tensors.items()}
            else:
                local = self._local_weight.get(table.name)
                template = local if local is not None else torch.empty((table.rows, table.dim), device="meta")
                tensors = init_state_for(table.optimizer, template)
                owner = owners[table.name]
                if isinstance(owner, list):  # row-wise: each rank holds the state of its block of rows
                    state[param] = {
                        f"{table.name}.{key}": _row_sharded(key, value, owner, table.rows, device)
                        for key, value in tensors.items()
                    }
                else:
                    state[param] = {
                        f"{table.name}.{key}": _on_rank(value, owner, rank if local is not None else -1, device)
                        for key, value in tensors.items()
                    }
            self._states[table.name] = tensors
            groups.append({"params": [param], **{k: getattr(table.optimizer, k) for k in HYPERPARAMETERS}})
        super().__init__(params, state, groups)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """After backward: applies each table's rule, with its group's current hyper-parameters, to its rows."""
        for table, group in zip(self._tables, self.param_groups):
            config = dataclasses.replace(table.optimizer, **{k: group[k] for k in HYPERPARAMETERS})
            state = self._states[table.name]
            if table.route is TableRoute.DATA_PARALLEL:
                rows = self._row_union(self._rows[table.name].pop(table.name), table.rows)
                grad = group["params"][0].grad
                if rows.numel() == 0:
                    continue
                weight = self._local_weight[table.name]
                grads = grad[rows] if grad is not None else torch.zeros(rows.numel(), table.dim, device=weight.device)
                sparse_update_for(config, weight, state, rows.to(weight.device), grads)
            elif table.name in self._gradients:
                capture = self._gradients[table.name]
                lookups = capture.take(table.name)
                weight = self._local_weight[table.name]
                if len(lookups) == 1:  # the common case: row gradients and rule in one pass, same bits
                    embedding_row_update_for(config, weight, state, *capture.arguments(table.name, lookups[0]))
                elif lookups:
                    rows, grads = merge_row_grads([capture.row_grads(table.name, lookup) for lookup in lookups])
                    sparse_update_for(config, weight, state, rows, grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the data-parallel tables' dense gradients (native tables never hold one)."""
        for table, group in zip(self._tables, self.param_groups):
            if table.route is TableRoute.DATA_PARALLEL:
                group["params"][0].grad = None

    def table_tensors(self, name: str) -> tuple[Tensor, dict[str, Tensor]]:
        """A native table's local weight (the TBE's) and optimizer state tensors, which the step updates in place."""
        return self._local_weight[name], self._states[name]

    def tables(self) -> list[ResolvedTable]:
        return list(self._tables)


def _on_rank(tensor: Tensor, owner: int, rank: int, device: torch.device) -> ShardedTensor:
    """``tensor`` as a ShardedTensor of one shard, the whole tensor, placed on ``owner`` (no collective)."""
    device = str(device) if tensor.device.type == "meta" else str(tensor.device)
    metadata = ShardMetadata(
        shard_offsets=[0] * tensor.dim(), shard_sizes=list(tensor.shape), placement=f"rank:{owner}/{device}"
    )
    global_metadata = ShardedTensorMetadata(
        shards_metadata=[metadata],
        size=tensor.shape,
        tensor_properties=TensorProperties(dtype=tensor.dtype, layout=torch.strided, requires_grad=False),
    )
    local = [Shard(tensor=tensor, metadata=metadata)] if owner == rank else []
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, global_metadata)


def _row_sharded(
    key: str, tensor: Tensor, blocks: list[Any], rows: int, device: torch.device
) -> Union[Tensor, ShardedTensor]:
    """This rank's state of a row-wise table as a ShardedTensor with one shard per row block (the weight's
    layout, so checkpoints reshard like fbgemm's). A state without rows (the global ``step`` of Adam kinds,
    one per table and the same on every rank, as every rank updates its block in every step) stays a plain
    tensor: torch.distributed.checkpoint keeps it once and loads it on every rank."""
    import torch.distributed as dist

    if key == "step" and tensor.numel() == 1:
        return tensor
    rank = dist.get_rank() if dist.is_initialized() else 0
    tail = list(tensor.shape[1:])
    shards, local = [], []
    for block in blocks:
        metadata = ShardMetadata(
            shard_offsets=[block.row_offset] + [0] * len(tail),
            shard_sizes=[block.rows] + tail,
            placement=f"rank:{block.rank}/{tensor.device if tensor.device.type != 'meta' else device}",
        )
        shards.append(metadata)
        if block.rank == rank:
            local.append(Shard(tensor=tensor, metadata=metadata))
    global_metadata = ShardedTensorMetadata(
        shards_metadata=shards,
        size=torch.Size([rows] + tail),
        tensor_properties=TensorProperties(dtype=tensor.dtype, layout=torch.strided, requires_grad=False),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, global_metadata)
