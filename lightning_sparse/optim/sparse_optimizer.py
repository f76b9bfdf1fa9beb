"""The optimizer of every embedding table, with its hyper-parameters: one ``Stateful`` component.

:class:`SparseOptimizer` holds one TorchRec ``CombinedOptimizer`` over fbgemm's fused optimizers (``fused``: the
tables TorchRec sharded with a fused kernel, updated inside backward) and our kernels' optimizer
(``native_kernels``: the native and data-parallel tables, stepped after backward, see
:mod:`~lightning_sparse.optim.native_kernel_optimizer`). It owns what the strategy used to keep for it: the
per-table hyper-parameters (read, set, pushed into fbgemm's kernels), the step of our kernels, and its
checkpoint state.

State (``state_dict``/``load_state_dict``, so it can be handed to ``torch.distributed.checkpoint`` as it is):
``optimizer``, the CombinedOptimizer's state dict (per-row state as ShardedTensors or replicated tensors, which
DCP saves and reshards), and ``hyperparameters``, every table's hyper-parameters as ``(parameter path,
{name: value})`` pairs. Param groups differ per rank (each holds its own shards' kernels), so :meth:`state_dict`
gathers the hyper-parameters from all ranks (a collective) and keys them by table, independent of the
sharding; :meth:`load_state_dict` applies to each local group the values saved for its parameter. They are a
tuple, one object to DCP, because DCP's loader re-reads a nested dict of plain values as one entry when a rank
lacks some of the checkpoint's keys (as every rank lacks the fused state of the tables it does not hold). It
round-trips exactly through DCP on 2 ranks mid-epoch (``tests/test_stateful_components.py``).

Nothing here imports ``distributed/`` or ``strategies/``: the caller passes the sharded model's parameters, the
table owners and a function gathering objects from all ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from lightning_sparse.config import ResolvedTable, TableRoute
from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer, RowUnion, attach_row_captures

# Every rank's object, in rank order: (obj) -> [obj of rank 0, obj of rank 1, ...].
GatherObjects = Callable[[Any], list[Any]]
FUSED, NATIVE_KERNELS = "fused", "native_kernels"


class SparseOptimizer:
    """The sparse optimizer of a sharded model: built once per model, reused by every later Trainer.

    Args:
        model: the sharded model (DistributedModelParallel); its ``fused_optimizer`` is fbgemm's.
        tables: every table of the model, resolved (route and parameter path decided in ``routes.py``).
        parameters: the sharded model's embedding parameters by path (``routes.embedding_parameters``).
        owners: rank holding each native-route table (table-wise sharded).
        rank: this process's rank.
        row_union: unites the rows every rank read of a data-parallel table (one all-reduce).
        device: where our kernels' state of a table not held on this rank is described (meta tensors).
        gather_objects: every rank's object (used by :meth:`state_dict` for the hyper-parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        tables: Mapping[str, ResolvedTable],
        parameters: Mapping[str, nn.Parameter],
        owners: Mapping[str, int],
        rank: int,
        row_union: RowUnion,
        device: torch.device,
        gather_objects: GatherObjects,
    ) -> None:
        self.fused: KeyedOptimizer = model.fused_optimizer
        self._gather_objects = gather_objects
        self._native_params = {id(parameters[t.param_path]) for t in tables.values() if t.route is TableRoute.NATIVE}
        optimizers: list[Union[KeyedOptimizer, tuple[str, KeyedOptimizer]]] = [(FUSED, self.fused)]
        ours = [t for t in tables.values() if t.route is not TableRoute.FUSED]
        if ours:
            gradients, rows = attach_row_captures(model, dict(tables))
            kernels = NativeKernelOptimizer(
                ours, dict(parameters), gradients, rows, dict(owners), rank, row_union, device
            )
            optimizers.append((NATIVE_KERNELS, kernels))
        self.combined = CombinedOptimizer(optimizers)

    # ------------------------------------------------------------ hyper-parameters
    def param_groups(self) -> list[dict[str, Any]]:
        """The param groups that hold the tables' hyper-parameters (lr, eps, ...), one or more per table.

        The fused groups of native-route tables are left out: their fbgemm kernel only looks rows up (lr 0);
        the table's real hyper-parameters live in our kernels' optimizer group.
        """
        groups = []
        for name, sub in self.combined.optimizers:
            for group in sub.param_groups:
                if name == NATIVE_KERNELS or not any(id(p) in self._native_params for p in group["params"]):
                    groups.append(group)
        return groups

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of every table (applied from the next step)."""
        if lr < 0:
            raise ValueError(f"sparse learning rate must be >= 0, got {lr}")
        for group in self.param_groups():
            group["lr"] = lr
        self.push_learning_rates()

    def push_learning_rates(self) -> None:
        """fbgemm kernels read the learning rate from their own field; TorchRec copies it there on zero_grad()."""
        self.fused.zero_grad()

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        """Every table's hyper-parameters keyed by parameter path, gathered from all ranks (a collective)."""
        key_of = {id(param): key for key, param in self.combined.params.items()}
        local = {
            key_of[id(param)]: {k: v for k, v in group.items() if k != "params"}
            for group in self.combined.param_groups
            for param in group["params"]
        }
        merged: dict[str, dict[str, Any]] = {}
        for part in self._gather_objects(local):
            merged.update(part or {})
        return merged

    def apply_hyperparameters(self, hyperparameters: Mapping[str, Mapping[str, Any]]) -> None:
        """Sets each local group's hyper-parameters to those saved for (the first of) its parameters."""
        key_of = {id(param): key for key, param in self.combined.params.items()}
        for group in self.combined.param_groups:
            for param in group["params"]:
                saved = hyperparameters.get(key_of[id(param)])
                if saved is not None:
                    group.update({k: v for k, v in saved.items() if k in group})
                    break
        self.push_learning_rates()

    # --------------------------------------------------------------------- step
    def step_kernels(self) -> None:
        """After backward: steps our kernels' optimizer (fbgemm's fused optimizers already ran inside backward)."""
        for name, keyed in self.combined.optimizers:
            if name != FUSED:
                keyed.step()
                keyed.zero_grad()

    def row_states(self, param_path: str) -> list[Tensor]:
        """The state tensors the optimizer keeps for the parameter at ``param_path`` (its table's weight)."""
        states: list[Tensor] = []
        for _, sub in self.combined.optimizers:
            param = sub.params.get(param_path)
            if param is not None:
                states.extend(v for v in sub.state.get(param, {}).values() if hasattr(v, "dim"))
        return states

    @property
    def native(self) -> Optional[NativeKernelOptimizer]:
        """Our kernels' optimizer (native and data-parallel tables), None when every table is fused."""
        return dict(self.combined.optimizers).get(NATIVE_KERNELS)

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """``optimizer`` (tensors, per rank) and ``hyperparameters`` (every table's, from all ranks: a collective)."""
        return {
            "optimizer": self.combined.state_dict(),
            "hyperparameters": tuple(sorted(self.hyperparameters().items())),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads the optimizer state (tensors copied in place), then the saved hyper-parameters, if any."""
        self.combined.load_state_dict(state_dict["optimizer"])
        hyperparameters = state_dict.get("hyperparameters")  # pairs, or a dict (as the strategy's checkpoint keeps it)
        if hyperparameters:
            self.apply_hyperparameters(dict(hyperparameters))
        else:
            self.push_learning_rates()
