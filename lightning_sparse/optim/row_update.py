"""A native table's update straight from one lookup's output gradient: row gradients and rule in one pass.

The two-step path of the ``native`` route computes each lookup's exact row gradients
(:func:`~lightning_sparse.optim.row_grads.embedding_row_grads`, float64 ``[U, D]``), rounds them to float32
and applies the kind's rule (``sparse_opt_<kind>``). When a table was looked up once in the step, the
native op ``embedding_row_update`` (``cuda_ops/embedding_row_grads.cpp``) does both per unique row: it sums
the row's float64 gradient in the same order, rounds it once and runs the same per-row update
(``cuda_ops/sparse_optimizers_cpu.h``), so weights and state get the same bits without the float64 buffer,
its cast and a second pass over the rows. :func:`embedding_row_update_reference` is its PyTorch twin (the
two twins of the two steps, chained); without the native op for a device, the two steps run as before.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_sparse import ops
from lightning_sparse.config import SparseOptimizerConfig, SparseOptimizerKind
from lightning_sparse.optim import reference
from lightning_sparse.optim.kernels import _call_update, sparse_update_for
from lightning_sparse.optim.row_grads import embedding_row_grads, embedding_row_grads_reference

_OP = "embedding_row_update"


def embedding_row_update_reference(
    grad_output: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor],
    features: Tensor,
    column_offsets: Tensor,
    dim: int,
    num_features: int,
    pooling_mode: int,
    kind: str,
    weight: Tensor,
    sum: Optional[Tensor],
    exp_avg: Optional[Tensor],
    exp_avg_sq: Optional[Tensor],
    step: Optional[Tensor],
    lr: float,
    eps: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    decay: float,
) -> None:
    """PyTorch twin of the native op (same arguments): the row-grads twin, ``.float()``, the rule's twin."""
    parsed = SparseOptimizerKind.parse(kind, "kind")
    rows, grads = embedding_row_grads_reference(
        grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim, num_features, pooling_mode
    )
    state = {
        k: v
        for k, v in (("sum", sum), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("step", step))
        if v is not None
    }
    fn = getattr(reference, f"sparse_opt_{parsed.value}")
    with torch.no_grad():
        _call_update(parsed, fn, weight, state, rows, grads.float(), lr, eps, weight_decay, beta1, beta2, decay)


def embedding_row_update_for(
    config: SparseOptimizerConfig,
    weight: Tensor,
    state: dict[str, Tensor],
    grad_output: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor],
    features: Tensor,
    column_offsets: Tensor,
    dim: int,
    num_features: int,
    pooling_mode: int,
) -> None:
    """Applies ``config``'s rule to the rows one lookup read, from that lookup's output gradient, in place.

    The same bits as :func:`embedding_row_grads` -> ``.float()`` -> :func:`sparse_update_for`: the native
    op when the extension has it for the weight's device, those two steps otherwise.
    """
    op = ops.native_op_for(_OP, weight.device)
    with torch.no_grad():
        if op is None:
            rows, grads = embedding_row_grads(
                grad_output,
                indices,
                offsets,
                per_sample_weights,
                features,
                column_offsets,
                dim,
                num_features,
                pooling_mode,
            )
            sparse_update_for(config, weight, state, rows, grads.float())
            return
        op(
            grad_output,
            indices,
            offsets,
            per_sample_weights,
            features,
            column_offsets,
            dim,
            num_features,
            pooling_mode,
            SparseOptimizerKind.parse(config.kind, "kind").value,
            weight,
            state.get("sum"),
            state.get("exp_avg"),
            state.get("exp_avg_sq"),
            state.get("step"),
            config.lr,
            config.eps,
            config.weight_decay,
            config.beta1,
            config.beta2,
            config.decay,
        )
