"""A ``torch.optim.Optimizer`` that applies the fused sparse row kernels to embedding tables.

For tables trained outside fbgemm's fused backward (unsharded ``nn.EmbeddingBag(sparse=True)``, or kinds
fbgemm lacks on the device): the sparse COO gradient of an embedding lookup is exactly the kernel input
(row ids with duplicates + one gradient row per occurrence), so it is passed through uncoalesced and only
the rows present are touched. State is created eagerly (its memory is known before the first step and a
checkpoint can be loaded into a fresh optimizer) and round-trips through ``state_dict`` exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from lightning_sparse.config import SparseOptimizerConfig, SparseOptimizerKind
from lightning_sparse.optim.kernels import init_state, sparse_update_for

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SparseOptimizerConfig))


class SparseRowOptimizer(torch.optim.Optimizer):
    """Sparse embedding optimizer of any :class:`SparseOptimizerKind`, driven by a typed config.

    Args:
        params: 2-D embedding weights (or param groups; a group may override any config field).
        config: the update rule and hyper-parameters (default: ``SparseOptimizerConfig()``).
        per_row_step: Adam kinds keep one step count per row instead of one per table (lazy bias correction).
        initial_accumulator_value: start of the Adagrad accumulators (default 0.01 for decayed Adagrad, else 0).
        **overrides: any :class:`SparseOptimizerConfig` field, e.g. ``lr=0.1, kind="adam"``.
    """

    def __init__(
        self,
        params: Union[Iterable[Tensor], Iterable[dict[str, Any]]],
        config: Optional[SparseOptimizerConfig] = None,
        *,
        per_row_step: bool = False,
        initial_accumulator_value: Optional[float] = None,
        **overrides: Any,
    ) -> None:
        config = dataclasses.replace(
            config or SparseOptimizerConfig(), **_check_fields(overrides, "SparseRowOptimizer")
        )
        defaults = {name: getattr(config, name) for name in _CONFIG_FIELDS}
        defaults["kind"] = config.kind.value
        defaults["per_row_step"] = per_row_step
        defaults["initial_accumulator_value"] = initial_accumulator_value
        super().__init__(params, defaults)

    @staticmethod
    def group_config(group: dict[str, Any]) -> SparseOptimizerConfig:
        """The typed config of one param group (validates overridden fields)."""
        return SparseOptimizerConfig(**{name: group[name] for name in _CONFIG_FIELDS})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_fields(
            {k: v for k, v in param_group.items() if k not in ("params", "per_row_step", "initial_accumulator_value")},
            "param group",
        )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        config = self.group_config(group)  # raises a clear error on a bad kind or value
        group["kind"] = config.kind.value
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(
                    f"SparseRowOptimizer updates 2-D embedding weights, got a parameter of shape {tuple(p.shape)}"
                )
            if p.dtype != torch.float32:
                raise ValueError(f"SparseRowOptimizer needs float32 embedding weights, got {p.dtype}")
            self.state[p] = init_state(
                config.kind,
                p.detach(),
                first_moment=config.first_moment,
                per_row_step=group["per_row_step"],
                initial_accumulator_value=group["initial_accumulator_value"],
            )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Updates the rows present in each parameter's sparse gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            config = self.group_config(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                indices, values = sparse_rows(p.grad)
                sparse_update_for(config, p.data, self.state[p], indices, values)
        return loss


def sparse_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Row ids (duplicates kept) and per-occurrence gradient rows of a sparse embedding gradient."""
    if not grad.is_sparse:
        raise ValueError(
            "SparseRowOptimizer needs sparse gradients: build the table with nn.EmbeddingBag(..., sparse=True) "
            "or nn.Embedding(..., sparse=True) (or F.embedding_bag(..., sparse=True))."
        )
    if grad.sparse_dim() != 1 or grad.dense_dim() != 1:
        raise ValueError(
            f"expected a row-sparse gradient (sparse_dim=1, dense_dim=1), got {grad.sparse_dim()}/{grad.dense_dim()}"
        )
    return grad._indices()[0], grad._values()


def _check_fields(values: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {unknown}; allowed: {sorted(_CONFIG_FIELDS)}")
    return values


__all__ = ["SparseRowOptimizer", "SparseOptimizerKind", "sparse_rows"]
