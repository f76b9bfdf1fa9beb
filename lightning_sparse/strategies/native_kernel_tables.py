"""Tables whose sparse optimizer fbgemm cannot fuse on the device, trained by lightning_sparse's own kernels.

fbgemm's CPU kernels fuse only SGD, Adagrad and row-wise Adagrad. Such tables are sharded table-wise with
fused SGD at ``lr = 2^20`` and a :class:`~lightning_sparse.optim.tbe_tap.TBEGradientTap` per TBE, which
recovers the deduplicated row gradients after backward, restores the rows and applies our kernel
(``cuda_ops/sparse_optimizers.cpp``, or its PyTorch twin). :class:`NativeKernelOptimizer` exposes them as one
TorchRec ``KeyedOptimizer``: per-table param groups (the lr is settable and checkpointed) and state as
``ShardedTensor`` placed on the table's rank, so torch.distributed.checkpoint saves and reshards it like
fbgemm's own optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import KeyedOptimizer

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, SparseOptimizerKind
from lightning_sparse.optim.fbgemm_kinds import FBGEMM_KINDS
from lightning_sparse.optim.kernels import init_state_for
from lightning_sparse.optim.tbe_tap import GRADIENT_SCALE, TBEGradientTap, find_tbes

# Sharding types our kernels run under: each table whole on one rank, so its state is one local tensor.
NATIVE_KERNEL_SHARDING = (ShardingType.AUTO, ShardingType.TABLE_WISE)
_HYPERPARAMETERS = ("lr", "eps", "weight_decay", "beta1", "beta2", "decay")


def needs_native_kernel(config: SparseOptimizerConfig, device_type: str) -> bool:
    """True when fbgemm has no fused kernel for ``config`` on ``device_type``.

    Row-wise Adam without a first moment counts as missing everywhere: fbgemm's PARTIAL_ROWWISE_ADAM always
    keeps a per-element first moment, which would silently cost ``d`` more floats per row.
    """
    if config.kind is SparseOptimizerKind.ROWWISE_ADAM and not config.first_moment:
        return True
    return config.kind not in FBGEMM_KINDS.get(device_type, {})


class NativeKernelOptimizer(KeyedOptimizer):
    """The sparse optimizer of every table trained by our kernels, keyed by the tables' parameter FQNs.

    ``step()`` (after backward) applies each table's rule to the rows of the batch; ``param_groups`` hold
    one group per table with its hyper-parameters, read at every step.
    """

    def __init__(
        self,
        dmp: DistributedModelParallel,
        configs: dict[str, SparseOptimizerConfig],
        parameters: dict[str, nn.Parameter],
        owners: dict[str, int],
        rank: int,
    ) -> None:
        taps = []
        for tbe in find_tbes(dmp):
            if set(tbe.table_names) <= set(configs):
                taps.append(TBEGradientTap(tbe, [configs[name] for name in tbe.table_names]))
        self._taps = taps
        local = {name: (tap, index) for tap in taps for index, name in enumerate(tap.tbe.table_names)}
        fqn_of = {table: fqn for fqn in parameters for table in configs if fqn.endswith(f".{table}.weight")}
        params: dict[str, Any] = {}
        state: dict[Any, Any] = {}
        groups = []
        self._table_of_group: list[str] = []
        for table in sorted(configs):  # the same order on every rank
            param = parameters[fqn_of[table]]
            params[fqn_of[table]] = param
            config = configs[table]
            if table in local:
                tap, index = local[table]
                tensors = tap.states[index]
            else:  # another rank owns this table: same shapes, no local data
                tensors = init_state_for(config, torch.empty(table_shape(dmp, table), device="meta"))
            state[param] = {
                f"{table}.{key}": _on_rank(tensor, owners[table], keep_local=table in local, rank=rank)
                for key, tensor in tensors.items()
            }
            groups.append({"params": [param], **{k: getattr(config, k) for k in _HYPERPARAMETERS}})
            self._table_of_group.append(table)
        super().__init__(params, state, groups)

    def step(self, closure: Any = None) -> None:
        for group, table in zip(self.param_groups, self._table_of_group):
            for tap in self._taps:
                if table in tap.tbe.table_names:
                    index = tap.tbe.table_names.index(table)
                    tap.configs[index] = dataclasses.replace(tap.configs[index], **{k: group[k] for k in _HYPERPARAMETERS})
        for tap in self._taps:
            tap.step()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Nothing to clear: gradients never accumulate in the tables (fbgemm consumes them in backward)."""


def table_shape(dmp: DistributedModelParallel, table: str) -> tuple[int, int]:
    for module_plan in dmp.plan.plan.values():
        if table in module_plan:
            size = module_plan[table].sharding_spec.shards[0].shard_sizes
            return int(size[0]), int(size[1])
    raise KeyError(table)


def table_owners(dmp: DistributedModelParallel, tables: list[str]) -> dict[str, int]:
    """The rank holding each (table-wise sharded) table, from the sharding plan."""
    owners = {}
    for module_plan in dmp.plan.plan.values():
        for table in tables:
            if table in module_plan:
                ranks = module_plan[table].ranks
                if module_plan[table].sharding_type != ShardingType.TABLE_WISE.value or not ranks or len(ranks) != 1:
                    raise ValueError(f"table {table!r} must be sharded table_wise to use lightning_sparse kernels")
                owners[table] = ranks[0]
    return owners


def _on_rank(tensor: torch.Tensor, owner: int, keep_local: bool, rank: int) -> ShardedTensor:
    """``tensor`` as a ShardedTensor of one shard, the whole tensor, placed on ``owner`` (no collective)."""
    device = "cpu" if tensor.device.type == "meta" else str(tensor.device)
    metadata = ShardMetadata(
        shard_offsets=[0] * tensor.dim(), shard_sizes=list(tensor.shape), placement=f"rank:{owner}/{device}"
    )
    global_metadata = ShardedTensorMetadata(
        shards_metadata=[metadata],
        size=tensor.shape,
        tensor_properties=TensorProperties(dtype=tensor.dtype, layout=torch.strided, requires_grad=False),
    )
    local = [Shard(tensor=tensor, metadata=metadata)] if keep_local and owner == rank else []
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, global_metadata)


def fused_sgd_scale() -> dict[str, float]:
    """Fused-SGD kwargs that turn a TBE into a gradient source for :class:`TBEGradientTap`."""
    return {"lr": GRADIENT_SCALE}
