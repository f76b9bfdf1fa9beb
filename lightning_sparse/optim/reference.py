"""Pure-PyTorch twins of the native sparse optimizer kernels (``cuda_ops/sparse_optimizers.cpp`` and ``.cu``).

Same signatures and same math as ``torch.ops.lightning_sparse.sparse_opt_<kind>``, used when the extension
is not built (or ``LIGHTNING_SPARSE_NATIVE=0``). Like the kernels, each function sums the gradients of
duplicate row ids in order of appearance, adds the L2 weight decay ``weight_decay * w`` to that sum, and
updates only the unique rows in place. They run on the weight's device (CPU or CUDA); everything they
allocate is allocated there.

Adam-style kinds take ``step`` (int64): shape ``[1]`` is one global step per table, advanced once per call
(torch.optim.SparseAdam and fbgemm's GPU kernels); shape ``[N]`` holds one step per row, advanced for the
rows present (PERSIA's lazy semantics: a row first seen late gets the bias correction of its first step).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _check(weight: Tensor, indices: Tensor, grad: Tensor) -> None:
    if indices.device != weight.device or grad.device != weight.device:
        raise ValueError(
            f"weight, indices and grad must be on one device, got {weight.device}, {indices.device}, {grad.device}"
        )
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"weight must be a 2-D float32 tensor, got {tuple(weight.shape)} {weight.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if grad.dim() != 2 or grad.shape[0] != indices.shape[0] or grad.shape[1] != weight.shape[1]:
        raise ValueError(f"grad must have shape [{indices.shape[0]}, {weight.shape[1]}], got {tuple(grad.shape)}")
    if grad.dtype != torch.float32:
        raise ValueError(f"grad must be float32, got {grad.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= weight.shape[0]):
        raise IndexError(f"row index out of range [0, {weight.shape[0]})")


def unique_rows(weight: Tensor, indices: Tensor, grad: Tensor, weight_decay: float) -> tuple[Tensor, Tensor]:
    """Sorted unique rows and their summed gradient (+ L2 decay), summing duplicates in order of appearance."""
    _check(weight, indices, grad)
    rows, inverse = torch.unique(indices.long(), sorted=True, return_inverse=True)
    summed = torch.zeros(rows.numel(), weight.shape[1], dtype=torch.float32, device=weight.device)
    summed.index_add_(0, inverse, grad)  # sequential on CPU: the kernel's order (on CUDA: atomics, any order)
    if weight_decay != 0.0:
        summed = summed + weight_decay * weight[rows]
    return rows, summed


def _bias_corrections(step: Tensor, rows: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """Advances ``step`` like the kernel and returns 1 - beta^t per unique row, shape [U, 1]."""
    if step.dim() != 1 or step.dtype != torch.int64:
        raise ValueError("step must be a 1-D int64 tensor")
    if step.numel() == 1:
        step += 1
        t = step.double().expand(rows.numel())
    else:
        step[rows] += 1
        t = step[rows].double()
    betas = torch.tensor([beta1, beta2], dtype=torch.float64, device=step.device)
    bc1 = (1.0 - torch.pow(betas[0], t)).float().unsqueeze(1)
    bc2 = (1.0 - torch.pow(betas[1], t)).float().unsqueeze(1)
    return bc1, bc2


def sparse_opt_sgd(weight: Tensor, indices: Tensor, grad: Tensor, lr: float, weight_decay: float) -> None:
    """``w -= lr * g``."""
    rows, g = unique_rows(weight, indices, grad, weight_decay)
    weight[rows] = weight[rows] - lr * g


def sparse_opt_adagrad(
    weight: Tensor, sum: Tensor, indices: Tensor, grad: Tensor, lr: float, eps: float, weight_decay: float
) -> None:
    """``sum += g^2; w -= lr * g / (sqrt(sum) + eps)`` element-wise (torch.optim.Adagrad)."""
    rows, g = unique_rows(weight, indices, grad, weight_decay)
    s = sum[rows] + g * g
    sum[rows] = s
    weight[rows] = weight[rows] - lr * g / (s.sqrt() + eps)


def sparse_opt_rowwise_adagrad(
    weight: Tensor, sum: Tensor, indices: Tensor, grad: Tensor, lr: float, eps: float, weight_decay: float
) -> None:
    """``sum += mean(g^2)`` (one scalar per row); ``w -= lr * g / (sqrt(sum) + eps)`` (fbgemm's rule)."""
    rows, g = unique_rows(weight, indices, grad, weight_decay)
    s = sum[rows] + (g.double() * g.double()).mean(dim=1).float()
    sum[rows] = s
    weight[rows] = weight[rows] - (lr / (s.sqrt() + eps)).unsqueeze(1) * g


def sparse_opt_decayed_adagrad(
    weight: Tensor,
    sum: Tensor,
    indices: Tensor,
    grad: Tensor,
    lr: float,
    eps: float,
    weight_decay: float,
    decay: float,
) -> None:
    """PERSIA: ``w -= lr * g / sqrt(acc + eps)`` with the accumulator *before* this step; then ``acc = acc*decay + g^2``."""
    rows, g = unique_rows(weight, indices, grad, weight_decay)
    previous = sum[rows]
    weight[rows] = weight[rows] - lr * g / (previous + eps).sqrt()
    sum[rows] = previous * decay + g * g


def sparse_opt_rowwise_adam(
    weight: Tensor,
    exp_avg: Optional[Tensor],
    exp_avg_sq: Tensor,
    step: Tensor,
    indices: Tensor,
    grad: Tensor,
    lr: float,
    eps: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
) -> None:
    """One second moment per row, ``v = b2*v + (1-b2)*mean(g^2)``; first moment per element if ``exp_avg`` is given."""
    rows, g = unique_rows(weight, indices, grad, weight_decay)
    bc1, bc2 = _bias_corrections(step, rows, beta1, beta2)
    v = beta2 * exp_avg_sq[rows] + (1.0 - beta2) * (g.double() * g.double()).mean(dim=1).float()
    exp_avg_sq[rows] = v
    denom = (v.unsqueeze(1) / bc2).sqrt() + eps
    if exp_avg is not None and exp_avg.numel():
        m = beta1 * exp_avg[rows] + (1.0 - beta1) * g
        exp_avg[rows] = m
        weight[rows] = weight[rows] - lr * (m / bc1) / denom
    else:
        weight[rows] = weight[rows] - lr * g / denom


def sparse_opt_adam(
    weight: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    indices: Tensor,
    grad: Tensor,
    lr: float,
    eps: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
) -> None:
    """Element-wise Adam on the rows present (torch.optim.SparseAdam with a global step)."""
    rows, g = unique_rows(weight, indices, grad, weight_decay)
    bc1, bc2 = _bias_corrections(step, rows, beta1, beta2)
    m = beta1 * exp_avg[rows] + (1.0 - beta1) * g
    v = beta2 * exp_avg_sq[rows] + (1.0 - beta2) * g * g
    exp_avg[rows] = m
    exp_avg_sq[rows] = v
    weight[rows] = weight[rows] - lr * (m / bc1) / ((v / bc2).sqrt() + eps)
