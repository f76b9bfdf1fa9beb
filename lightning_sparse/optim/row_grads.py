"""Exact per-row gradients of an embedding lookup, assembled from the gradient of its output.

``embedding_row_grads`` turns the output gradient of an fbgemm TBE (pooled ``[B, total_D]`` or, for
sequence tables, ``[N, D]``) into the summed gradient of every row the lookup read, in float64: row ``r``
gets ``sum_i scale_i * g_i`` over the occurrences ``i`` of ``r``, with ``scale_i`` the per-sample weight
(1 without) times ``1/L`` under MEAN pooling. This is the PyTorch twin; the native op of the same name
(``cuda_ops/embedding_row_grads.cpp``) is used when built.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_sparse import ops

POOLING_SUM, POOLING_MEAN, POOLING_NONE = 0, 1, 2


def embedding_row_grads(
    grad_output: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor],
    features: Tensor,
    column_offsets: Tensor,
    dim: int,
    num_features: int,
    pooling_mode: int,
) -> tuple[Tensor, Tensor]:
    """Sorted unique rows read by ``features`` and their float64 gradient sums (see the module docstring)."""
    op = ops.native_op_for("embedding_row_grads", grad_output.device)
    if op is not None:
        return op(grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim, num_features, pooling_mode)
    return embedding_row_grads_twin(
        grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim, num_features, pooling_mode
    )


def embedding_row_grads_twin(
    grad_output: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor],
    features: Tensor,
    column_offsets: Tensor,
    dim: int,
    num_features: int,
    pooling_mode: int,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`embedding_row_grads`."""
    if grad_output.dtype != torch.float32:
        raise ValueError(f"embedding_row_grads: grad_output must be float32, got {grad_output.dtype}")
    bags = offsets.numel() - 1
    if num_features <= 0 or bags % num_features != 0:
        raise ValueError(
            f"embedding_row_grads: {bags} bags do not split into {num_features} features of one batch size "
            "(variable batch sizes per feature are not supported)"
        )
    batch = bags // num_features
    device = grad_output.device
    offsets = offsets.long()
    all_rows, all_grads = [], []
    for feature, column in zip(features.tolist(), column_offsets.tolist()):
        begin, end = int(offsets[feature * batch]), int(offsets[(feature + 1) * batch])
        rows = indices[begin:end].long()
        if pooling_mode == POOLING_NONE:
            g = grad_output[begin:end, :dim].double()
        else:
            lengths = offsets[feature * batch + 1 : (feature + 1) * batch + 1] - offsets[feature * batch : (feature + 1) * batch]
            bag = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
            g = grad_output[bag, column : column + dim].double()
            if pooling_mode == POOLING_MEAN:
                g = g / lengths[bag].double().unsqueeze(1)
        if per_sample_weights is not None:
            g = g * per_sample_weights[begin:end].double().unsqueeze(1)
        all_rows.append(rows)
        all_grads.append(g)
    rows = torch.cat(all_rows) if all_rows else torch.empty(0, dtype=torch.long, device=device)
    grads = torch.cat(all_grads) if all_grads else torch.empty(0, dim, dtype=torch.float64, device=device)
    if rows.numel() and int(rows.min()) < 0:
        raise ValueError("embedding_row_grads: negative row index")
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), dim, dtype=torch.float64, device=device)
    summed.index_add_(0, inverse, grads)
    return unique, summed
