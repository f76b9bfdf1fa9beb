"""Exact per-row gradients of an embedding table from the gradient of an fbgemm TBE's output.

fbgemm's TBE fuses the optimizer into its backward and never exposes the gradient of its weights. A table
trained by our own kernels (:mod:`lightning_sparse.optim.kernels`) gets its row gradients from the
gradient of the TBE's output instead: :func:`embedding_row_grads` scatters it back onto the rows the
batch touched, exactly as the TBE's backward would, but summed in float64.

The compiled op ``torch.ops.lightning_sparse.embedding_row_grads`` (``cuda_ops/embedding_row_grads.cpp``
and ``.cu``) does this without copying one gradient row per occurrence; :func:`embedding_row_grads_reference`
is its PyTorch twin, which runs on any device and sums in the same order (ascending position in
``indices``, from 0.0), so on CPU both give the same bits.

Layout (fbgemm's): ``offsets`` has ``num_features * batch + 1`` entries, feature-major (bag ``b`` of feature
``f`` is ``indices[offsets[f*batch + b] : offsets[f*batch + b + 1]]``). Pooled (SUM / MEAN) outputs are
``[batch, total_dim]``, feature ``f`` in the columns ``column_offsets[k] : column_offsets[k] + dim``;
sequence (NONE) outputs are ``[len(indices), >= dim]``, one row per index.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_sparse import ops

POOLING_SUM, POOLING_MEAN, POOLING_NONE = 0, 1, 2  # fbgemm's PoolingMode values

_OP = "embedding_row_grads"


def _fail(message: str) -> None:
    raise ValueError(f"embedding_row_grads: {message}")


def _check(
    grad_output: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor],
    features: Tensor,
    column_offsets: Tensor,
    dim: int,
    num_features: int,
    pooling_mode: int,
) -> list[tuple[int, int]]:
    """The checks of ``check_args`` in embedding_row_grads_common.h; returns (feature, column) ascending."""
    if grad_output.dtype != torch.float32:
        _fail(f"grad_output must be float32, got {grad_output.dtype}")
    if grad_output.dim() != 2:
        _fail(f"grad_output must be 2-D, got shape {tuple(grad_output.shape)}")
    for name, t in (("indices", indices), ("offsets", offsets)):
        if t.dtype not in (torch.int64, torch.int32):
            _fail(f"{name} must be int64 or int32, got {t.dtype}")
        if t.dim() != 1:
            _fail(f"indices and offsets must be 1-D, got {name} of shape {tuple(t.shape)}")
        if t.device != grad_output.device:
            _fail(
                f"grad_output, indices and offsets must be on one device, got {grad_output.device} and {name} on {t.device}"
            )
    if pooling_mode not in (POOLING_SUM, POOLING_MEAN, POOLING_NONE):
        _fail(f"pooling_mode must be 0 (SUM), 1 (MEAN) or 2 (NONE), got {pooling_mode}")
    if num_features < 1:
        _fail(f"num_features must be >= 1, got {num_features}")
    if dim < 1:
        _fail(f"dim must be >= 1, got {dim}")
    if offsets.numel() < 1:
        _fail("offsets must hold num_features * batch + 1 entries, got none")
    if (offsets.numel() - 1) % num_features:
        _fail(
            f"offsets has {offsets.numel()} entries, not num_features ({num_features}) * batch + 1: "
            "a variable batch size per feature is not supported"
        )
    n = indices.numel()
    if per_sample_weights is not None:
        if per_sample_weights.dtype != torch.float32:
            _fail(f"per_sample_weights must be float32, got {per_sample_weights.dtype}")
        if per_sample_weights.dim() != 1 or per_sample_weights.numel() != n:
            _fail(f"per_sample_weights must have shape [{n}] (one per index), got {tuple(per_sample_weights.shape)}")
        if per_sample_weights.device != grad_output.device:
            _fail(f"per_sample_weights must be on {grad_output.device}, got {per_sample_weights.device}")
    if features.dtype != torch.int64 or column_offsets.dtype != torch.int64:
        _fail(f"features and column_offsets must be int64, got {features.dtype} and {column_offsets.dtype}")
    if features.dim() != 1 or column_offsets.shape != features.shape:
        _fail(
            f"features and column_offsets must be 1-D of one length, got shapes {tuple(features.shape)} and {tuple(column_offsets.shape)}"
        )
    batch = (offsets.numel() - 1) // num_features
    if pooling_mode == POOLING_NONE:
        if grad_output.shape[0] != n or grad_output.shape[1] < dim:
            _fail(
                f"grad_output of a sequence (NONE) lookup must have shape [{n}, >= {dim}] (one row per index), got {tuple(grad_output.shape)}"
            )
    elif grad_output.shape[0] != batch:
        _fail(
            f"grad_output must have one row per sample (batch {batch} = (offsets.numel() - 1) / num_features), got shape {tuple(grad_output.shape)}"
        )
    listed = sorted(zip(features.tolist(), column_offsets.tolist()))
    for k, (f, c) in enumerate(listed):
        if not 0 <= f < num_features:
            _fail(f"feature {f} out of range [0, {num_features})")
        if pooling_mode != POOLING_NONE and not (c >= 0 and c + dim <= grad_output.shape[1]):
            _fail(f"columns [{c}, {c + dim}) of feature {f} do not fit in grad_output of width {grad_output.shape[1]}")
        if k and listed[k - 1][0] == f:
            _fail(f"feature {f} is listed twice")
    return listed


def embedding_row_grads_reference(
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
    """PyTorch twin of the native op: ``(rows int64 [U] ascending, grads float64 [U, dim])`` on the input's device."""
    listed = _check(
        grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim, num_features, pooling_mode
    )
    device, n = grad_output.device, indices.numel()
    off = offsets.long()
    bags = off.numel() - 1
    if int(off[0]) < 0 or int(off[-1]) > n:
        _fail(f"offsets must lie in [0, {n}] (the number of indices), got first {int(off[0])} and last {int(off[-1])}")
    lengths = off[1:] - off[:-1]
    if bags and bool((lengths < 0).any()):
        i = int(torch.nonzero(lengths < 0)[0])
        _fail(
            f"offsets must be non-decreasing, but offsets[{i}] = {int(off[i])} > offsets[{i + 1}] = {int(off[i + 1])}"
        )
    batch = bags // num_features
    positions, sources, columns, scales = [], [], [], []
    for f, col in listed:  # ascending features: ascending positions
        feature_lengths = lengths[f * batch : (f + 1) * batch]
        start, end = int(off[f * batch]), int(off[(f + 1) * batch])
        pos = torch.arange(start, end, device=device)
        bag = torch.repeat_interleave(torch.arange(batch, device=device), feature_lengths, output_size=end - start)
        scale = (
            per_sample_weights[pos].double()
            if per_sample_weights is not None
            else torch.ones(end - start, dtype=torch.float64, device=device)
        )
        if pooling_mode == POOLING_MEAN:
            scale = scale / feature_lengths[bag].double()
        positions.append(pos)
        sources.append(pos if pooling_mode == POOLING_NONE else bag)
        columns.append(0 if pooling_mode == POOLING_NONE else col)
        scales.append(scale)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    pos = torch.cat(positions) if positions else empty
    rows = indices[pos].long()
    if rows.numel() and int(rows.min()) < 0:
        i = int(pos[torch.nonzero(rows < 0)[0]])
        _fail(f"negative row id {int(indices[i])} at indices[{i}]")
    # one gradient row per occurrence: the twin may materialise what the kernel avoids
    g = (
        torch.cat([grad_output[src, c : c + dim] for src, c in zip(sources, columns)])
        if sources
        else grad_output.new_empty(0, dim)
    )
    scale = torch.cat(scales) if scales else torch.empty(0, dtype=torch.float64, device=device)
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    grads = torch.zeros(unique.numel(), dim, dtype=torch.float64, device=device)
    grads.index_add_(0, inverse, scale.unsqueeze(1) * g.double())  # sequential on CPU: the kernels' order
    return unique, grads


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
    """Sorted unique rows read by ``features`` and their exact float64 gradient, from a TBE's output gradient.

    ``grads[u] = sum of scale_i * g_i`` over the occurrences ``i`` of ``rows[u]`` in the listed features,
    ``g_i`` the occurrence's slice of ``grad_output`` (its bag's columns of the feature; its own row under
    NONE), ``scale_i`` its per-sample weight (1 without) divided by its bag's length under MEAN.
    ``features`` / ``column_offsets`` are CPU int64 tensors (one entry per feature that reads the table).
    Uses the native op for the tensors' device when built, the PyTorch twin otherwise.
    """
    op = ops.native_op_for(_OP, grad_output.device)
    fn = op if op is not None else embedding_row_grads_reference
    rows, grads = fn(
        grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim, num_features, pooling_mode
    )
    return rows, grads
