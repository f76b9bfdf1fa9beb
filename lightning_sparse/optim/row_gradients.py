"""Exact row gradients of the tables that lightning_sparse's kernels train, taken from TorchRec's lookups.

A table on the ``native`` route is sharded like any fused table, but its fbgemm TBE only looks rows up: a
forward hook on the TBE detaches its output, and the output's gradient comes back here in backward. fbgemm's
own backward never runs for such a TBE, so its weights are untouched by the step (it is built with fused SGD
at lr 0 as a second guard). Backward only records each lookup (output gradient, indices, offsets, per-sample
weights); the optimizer's step takes a table's lookups (:meth:`LookupGradients.take`). One lookup goes
straight to the one-pass ``embedding_row_update``; several each get their exact float64 row gradients
(:meth:`LookupGradients.row_grads`, i.e. :func:`~lightning_sparse.optim.row_grads.embedding_row_grads`),
summed in float64 by :func:`merge_row_grads`. Both give the same bits.

A table on the ``data_parallel`` route keeps TorchRec's dense kernel and DDP's all-reduced gradient;
:class:`LookupRows` records which rows the batch read, so the update touches those rows only.

TorchRec keeps a sharded module's lookups in a plain list (``_lookups``), which ``named_modules`` does not
reach; :func:`find_lookup_kernels` walks it, the only place that reads TorchRec internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sparse.optim.row_grads import POOLING_MEAN, POOLING_NONE, POOLING_SUM, embedding_row_grads


def find_lookup_kernels(module: torch.nn.Module) -> list[Any]:
    """TorchRec's batched lookup kernels (fused and dense, bags and sequences) inside ``module``, each once."""
    from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbedding, BaseBatchedEmbeddingBag

    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if depth > 32 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (BaseBatchedEmbeddingBag, BaseBatchedEmbedding)):
            found[id(obj)] = obj
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, torch.nn.Module):
            for child in obj.children():
                visit(child, depth + 1)
            for name in ("_lookups", "_emb_modules"):
                if name in vars(obj):
                    visit(vars(obj)[name], depth + 1)

    visit(module, 0)
    return list(found.values())


@dataclass(frozen=True)
class TableInLookup:
    """Where one table's features sit in a lookup kernel's input and output."""

    name: str
    features: tuple[int, ...]  # feature numbers within the kernel's input
    column_offsets: tuple[int, ...]  # each feature's first column in the pooled output
    dim: int  # local columns of the table (its shard's width)


def tables_in_lookup(kernel: Any) -> tuple[list[TableInLookup], int, int]:
    """The tables of one TorchRec lookup kernel, its number of features and fbgemm pooling mode."""
    from torchrec.modules.embedding_configs import PoolingType

    config = kernel.config
    tables, feature, column = [], 0, 0
    for table in config.embedding_tables:
        n = table.num_features()
        dim = table.local_cols
        tables.append(
            TableInLookup(
                table.name, tuple(range(feature, feature + n)), tuple(column + i * dim for i in range(n)), dim
            )
        )
        feature += n
        column += n * dim
    pooling = {PoolingType.SUM: POOLING_SUM, PoolingType.MEAN: POOLING_MEAN}.get(config.pooling, POOLING_NONE)
    return tables, feature, pooling


class _RouteGradient(torch.autograd.Function):
    """Identity on a detached TBE output whose backward hands the output gradient to a capture."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, capture: "LookupGradients", inputs: tuple) -> Tensor:
        ctx.capture, ctx.inputs = capture, inputs
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        ctx.capture.accumulate(grad_output, *ctx.inputs)
        return None, None, None, None


def _lookup_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    names = ("indices", "offsets", "per_sample_weights")
    values = [args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names)]
    if kwargs.get("batch_size_per_feature_per_rank") is not None:
        raise ValueError(
            "lightning_sparse kernels do not support variable batch sizes per feature (TorchRec VBE); "
            "give every feature the same batch size, or use a kind fbgemm fuses."
        )
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class Lookup:
    """What one lookup's backward hands over: enough to compute the row gradients of any of its tables."""

    grad_output: Tensor  # float32, rows with a stride-1 last dimension
    indices: Tensor
    offsets: Tensor
    per_sample_weights: Optional[Tensor]


class LookupGradients:
    """Turns the output gradient of one lookup kernel (all of whose tables are native) into row gradients."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.tables, self.num_features, self.pooling = tables_in_lookup(kernel)
        self._index = {
            t.name: (torch.tensor(t.features, dtype=torch.long), torch.tensor(t.column_offsets, dtype=torch.long))
            for t in self.tables
        }
        self.pending: dict[str, list[Lookup]] = {t.name: [] for t in self.tables}
        self._anchor = torch.zeros((), requires_grad=True)
        self._handle = kernel.emb_module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Tensor) -> Optional[Tensor]:
        if not torch.is_grad_enabled():
            return None
        indices, offsets, weights = _lookup_inputs(args, kwargs)
        if weights is not None and weights.requires_grad:
            raise ValueError(
                f"tables {[t.name for t in self.tables]}: per-sample weights that require gradients are not supported "
                "by lightning_sparse kernels; detach them or use a kind fbgemm fuses."
            )
        return _RouteGradient.apply(output.detach(), self._anchor, self, (indices, offsets, weights))

    @torch.no_grad()
    def accumulate(self, grad_output: Tensor, indices: Tensor, offsets: Tensor, weights: Optional[Tensor]) -> None:
        """Records one lookup for each of the kernel's tables (the row gradients wait for the step)."""
        lookup = Lookup(grad_output.float().contiguous(), indices, offsets, weights)
        for table in self.tables:
            self.pending[table.name].append(lookup)

    def take(self, table: str) -> list[Lookup]:
        """The lookups of ``table`` recorded since the last call."""
        taken = self.pending[table]
        self.pending[table] = []
        return taken

    def arguments(self, table: str, lookup: Lookup) -> tuple:
        """``embedding_row_grads``' arguments (from ``grad_output`` to ``pooling_mode``) for ``table`` in ``lookup``."""
        features, columns = self._index[table]
        dim = next(t.dim for t in self.tables if t.name == table)
        return (
            lookup.grad_output,
            lookup.indices,
            lookup.offsets,
            lookup.per_sample_weights,
            features,
            columns,
            dim,
            self.num_features,
            self.pooling,
        )

    def row_grads(self, table: str, lookup: Lookup) -> tuple[Tensor, Tensor]:
        """Sorted unique rows of ``table`` that ``lookup`` read and their float64 gradients."""
        return embedding_row_grads(*self.arguments(table, lookup))

    def remove(self) -> None:
        self._handle.remove()


class LookupRows:
    """Records which rows of each table a (data-parallel) lookup kernel read in the current step."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.tables, self.num_features, _ = tables_in_lookup(kernel)
        self.pending: dict[str, list[Tensor]] = {t.name: [] for t in self.tables}
        self._handle = kernel.emb_module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        indices, offsets, _ = _lookup_inputs(args, kwargs)
        batch = (offsets.numel() - 1) // self.num_features
        for table in self.tables:
            begin, end = int(offsets[table.features[0] * batch]), int(offsets[(table.features[-1] + 1) * batch])
            self.pending[table.name].append(torch.unique(indices[begin:end].long()))

    def pop(self, table: str) -> Tensor:
        rows = self.pending[table]
        self.pending[table] = []
        return torch.unique(torch.cat(rows)) if rows else torch.empty(0, dtype=torch.long)

    def remove(self) -> None:
        self._handle.remove()


def merge_row_grads(taken: list[tuple[Tensor, Tensor]]) -> Optional[tuple[Tensor, Tensor]]:
    """One (rows, float32 grads) from several lookups' float64 parts; summed in float64, rounded once."""
    if not taken:
        return None
    if len(taken) == 1:
        rows, grads = taken[0]
        return rows, grads.float()
    rows = torch.cat([r for r, _ in taken])
    grads = torch.cat([g for _, g in taken])
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), grads.shape[1], dtype=torch.float64, device=grads.device)
    summed.index_add_(0, inverse, grads)
    return unique, summed.float()
