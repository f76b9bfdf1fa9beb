"""Memory accounting: bytes of embedding weights, sparse optimizer state and dense optimizer state on this rank.

Kraken's claim (row-wise state for embeddings, full Adam only for the dense net cuts memory to about a
third) is only checkable if the bytes are counted the same way for every setup, so this module counts
*allocated tensors on this rank* and nothing else: local shards of sharded tables (ShardedTensor/DTensor),
plain ``nn.Embedding``/``nn.EmbeddingBag`` weights (TorchRec's unsharded collections use those), and every
tensor in the given optimizers' state, attributed to a table when it belongs to that table's weight.

Works for TorchRec ``DistributedModelParallel`` (its fused optimizer is picked up automatically), unsharded
``EmbeddingBagCollection``s and plain torch models, with any mix of torch optimizers, TorchRec
``KeyedOptimizer``s and :class:`~lightning_sparse.optim.SparseRowOptimizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["MemoryReport", "TableMemory", "memory_report", "tensor_bytes"]


@dataclass
class TableMemory:
    """One embedding table on this rank (``rows``/``dim``: the full table; bytes: local shards only)."""

    name: str
    rows: int
    dim: int
    weight_bytes: int = 0
    optimizer_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes


@dataclass
class MemoryReport:
    """Bytes on this rank, split into embedding tables (per table) and the dense rest."""

    tables: dict[str, TableMemory] = field(default_factory=dict)
    dense_weight_bytes: int = 0
    dense_optimizer_bytes: int = 0

    @property
    def embedding_weight_bytes(self) -> int:
        return sum(t.weight_bytes for t in self.tables.values())

    @property
    def sparse_optimizer_bytes(self) -> int:
        return sum(t.optimizer_bytes for t in self.tables.values())

    @property
    def weight_bytes(self) -> int:
        return self.embedding_weight_bytes + self.dense_weight_bytes

    @property
    def optimizer_bytes(self) -> int:
        return self.sparse_optimizer_bytes + self.dense_optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes

    def as_metrics(self, prefix: str = "memory/", per_table: bool = True) -> dict[str, float]:
        """Flat ``{name: float}`` for ``LightningModule.log_dict`` (bytes; per-table entries optional)."""
        metrics = {
            f"{prefix}embedding_weight_bytes": float(self.embedding_weight_bytes),
            f"{prefix}sparse_optimizer_bytes": float(self.sparse_optimizer_bytes),
            f"{prefix}dense_weight_bytes": float(self.dense_weight_bytes),
            f"{prefix}dense_optimizer_bytes": float(self.dense_optimizer_bytes),
            f"{prefix}total_bytes": float(self.total_bytes),
        }
        if per_table:
            for name, table in self.tables.items():
                metrics[f"{prefix}table/{name}/weight_bytes"] = float(table.weight_bytes)
                metrics[f"{prefix}table/{name}/optimizer_bytes"] = float(table.optimizer_bytes)
        return metrics


def tensor_bytes(t: Any) -> int:
    """Bytes this rank holds for ``t``: local shards of a ShardedTensor/DTensor, the tensor itself otherwise."""
    if t is None:
        return 0
    local_shards = getattr(t, "local_shards", None)
    if callable(local_shards):  # torch.distributed._shard.ShardedTensor
        return sum(tensor_bytes(s.tensor) for s in local_shards())
    to_local = getattr(t, "to_local", None)
    if callable(to_local):  # DTensor
        return tensor_bytes(to_local())
    if isinstance(t, Tensor):
        if t.is_meta:
            return 0
        return t.numel() * t.element_size()
    return 0


def _state_bytes(state: Any) -> int:
    if isinstance(state, Mapping):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return tensor_bytes(state)


def _table_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _find_tables(module: torch.nn.Module) -> tuple[dict[str, TableMemory], dict[str, Any]]:
    """Tables keyed by fqn without ``.weight``, and the weight object behind each state-dict key."""
    tables: dict[str, TableMemory] = {}
    weights: dict[str, Any] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        sharded = callable(getattr(value, "local_shards", None)) or callable(getattr(value, "to_local", None))
        if sharded and getattr(value, "dim", lambda: 0)() == 2:
            weights[key] = value
    collections = _embedding_collection_types()
    for path, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            weights[f"{path}.weight" if path else "weight"] = sub.weight
        elif isinstance(sub, collections):
            # every table of a (sharded) TorchRec collection, data-parallel ones too (plain replicated tensors);
            # tables already found under the module's own state-dict keys are not added twice
            known = {_storage_of(w) for w in weights.values()}
            for key, value in sub.state_dict(keep_vars=True).items():
                if getattr(value, "dim", lambda: 0)() == 2 and _storage_of(value) not in known:
                    weights[f"{path}.{key}" if path else key] = value
    for key, weight in weights.items():
        rows, dim = (int(s) for s in weight.shape)
        tables[_table_name(key)] = TableMemory(_table_name(key), rows, dim, weight_bytes=tensor_bytes(weight))
    return tables, weights


def _storage_of(t: Any) -> int:
    """Where a table's local data starts (its first local shard for sharded tensors), to recognise it twice."""
    local_shards = getattr(t, "local_shards", None)
    if callable(local_shards):
        shards = local_shards()
        return shards[0].tensor.data_ptr() if shards else id(t)
    return t.data_ptr() if isinstance(t, Tensor) and not t.is_meta else id(t)


def _embedding_collection_types() -> tuple[type, ...]:
    try:
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    except ImportError:  # plain torch models
        return ()
    return (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)


def _match_table(fqn: str, tables: dict[str, TableMemory]) -> Optional[str]:
    """The table whose name equals ``fqn`` (minus ``.weight``), ends with it (module wrapped one level deeper),
    or ends it (a key prefixed by a named sub-optimizer of TorchRec's ``CombinedOptimizer``, e.g. ``fused.``)."""
    name = _table_name(fqn)
    if name in tables:
        return name
    matches = [t for t in tables if t.endswith("." + name) or name.endswith("." + t)]
    return matches[0] if len(matches) == 1 else None


def memory_report(module: torch.nn.Module, optimizers: Iterable[Optional[torch.optim.Optimizer]] = ()) -> MemoryReport:
    """Counts this rank's bytes of ``module`` and ``optimizers`` (dense, sparse and fused alike).

    Fused optimizers of ``DistributedModelParallel`` submodules (``.fused_optimizer``) are included
    automatically; tensors reachable from several optimizers are counted once.
    """
    tables, weights = _find_tables(module)
    report = MemoryReport(tables=tables)
    table_ids = {id(w): _table_name(k) for k, w in weights.items()}

    counted: set[int] = set()
    for name, p in module.named_parameters():
        if id(p) in counted:
            continue
        counted.add(id(p))
        if id(p) in table_ids:
            continue
        table = _match_table(name, tables)
        if table is not None:
            # a table exposed as a parameter (fbgemm's TableBatchedEmbeddingSlice): optimizer state keyed
            # by it (lightning_sparse's kernels, data-parallel tables) belongs to that table
            table_ids[id(p)] = table
            continue
        report.dense_weight_bytes += tensor_bytes(p)

    all_optimizers = [o for o in optimizers if o is not None]
    for sub in module.modules():
        fused = getattr(sub, "fused_optimizer", None)
        if isinstance(fused, torch.optim.Optimizer) and all(fused is not o for o in all_optimizers):
            all_optimizers.append(fused)

    seen_state: set[int] = set()
    for opt in all_optimizers:
        fqn_of = {}
        params = getattr(opt, "params", None)
        if isinstance(params, Mapping):  # TorchRec KeyedOptimizer: {fqn: param}
            fqn_of = {id(p): fqn for fqn, p in params.items()}
        for param, state in opt.state.items():
            if id(state) in seen_state:
                continue
            seen_state.add(id(state))
            nbytes = _state_bytes(state)
            table = table_ids.get(id(param))
            if table is None and id(param) in fqn_of:
                table = _match_table(fqn_of[id(param)], tables)
            if table is None:
                report.dense_optimizer_bytes += nbytes
            else:
                report.tables[table].optimizer_bytes += nbytes
    return report
