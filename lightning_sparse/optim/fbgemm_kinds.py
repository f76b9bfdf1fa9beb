"""Maps :class:`SparseOptimizerConfig` to the fused optimizers that TorchRec/fbgemm run in the backward pass.

TorchRec turns an optimizer class attached with ``apply_optimizer_in_backward`` into an fbgemm
``EmbOptimType`` when it shards the table; this module picks that class and its keyword arguments, and
refuses kinds that fbgemm has no kernel for on the device (naming the ones it has).
"""

from __future__ import annotations

from typing import Any

import torchrec.optim as trec_optim
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from lightning_sparse.config import SparseOptimizerConfig, SparseOptimizerKind

# What fbgemm's fused TBE kernels implement, per device type.
FBGEMM_KINDS: dict[str, dict[SparseOptimizerKind, EmbOptimType]] = {
    "cpu": {
        SparseOptimizerKind.SGD: EmbOptimType.EXACT_SGD,
        SparseOptimizerKind.ADAGRAD: EmbOptimType.EXACT_ADAGRAD,
        SparseOptimizerKind.ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    },
    "cuda": {
        SparseOptimizerKind.SGD: EmbOptimType.EXACT_SGD,
        SparseOptimizerKind.ADAGRAD: EmbOptimType.EXACT_ADAGRAD,
        SparseOptimizerKind.ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        SparseOptimizerKind.ADAM: EmbOptimType.ADAM,
        SparseOptimizerKind.ROWWISE_ADAM: EmbOptimType.PARTIAL_ROWWISE_ADAM,  # with first_moment=True only
    },
}


def supported_kinds(device_type: str) -> list[SparseOptimizerKind]:
    """The sparse optimizer kinds that run fused on ``device_type`` ("cpu" or "cuda")."""
    return list(FBGEMM_KINDS.get(device_type, {}))


def fused_blocker(config: SparseOptimizerConfig, device_type: str, pooling: str = "sum", weighted: bool = False) -> str:
    """Why fbgemm cannot train a table with ``config`` exactly on ``device_type`` ("" when it can).

    Measured on fbgemm-gpu-cpu 1.8 (``tests/test_fbgemm_fused.py`` pins each): its CPU kernels ignore
    ``weight_decay`` in every ``weight_decay_mode``, and its CPU backward drops the 1/L factor of MEAN
    pooling when per-sample weights are given. fbgemm's own weight decay is never used (on GPU it is
    untested here), so any table with ``weight_decay > 0`` runs in our kernels. fbgemm's
    PARTIAL_ROWWISE_ADAM always keeps a per-element first moment, so ``rowwise_adam`` without one is ours.
    """
    if config.kind not in FBGEMM_KINDS.get(device_type, {}):
        return f"fbgemm has no fused {config.kind.value!r} kernel on {device_type}"
    if config.kind is SparseOptimizerKind.ROWWISE_ADAM and not config.first_moment:
        return "fbgemm's row-wise Adam always keeps a per-element first moment (first_moment: false asks for none)"
    if config.weight_decay != 0.0:
        return "fbgemm's fused kernels do not apply weight_decay (its CPU kernels ignore it)"
    if pooling == "mean" and weighted:
        return "fbgemm's backward drops the 1/L factor of MEAN pooling with per-sample weights"
    return ""


def fused_optimizer_for(config: SparseOptimizerConfig, device_type: str) -> tuple[type, dict[str, Any]]:
    """The optimizer class and kwargs to attach with ``apply_optimizer_in_backward`` for one table.

    TorchRec hands the kwargs to fbgemm's TBE constructor (``lr`` renamed ``learning_rate``), so every key
    must be one of its parameters (``tests/test_fbgemm_fused.py`` checks them against the installed
    signature). Weight decay is never passed: such tables take the native route (see :func:`fused_blocker`).
    """
    kinds = FBGEMM_KINDS.get(device_type)
    if kinds is None or config.kind not in kinds:
        allowed = ", ".join(k.value for k in supported_kinds(device_type)) or "none"
        raise ValueError(
            f"Sparse optimizer kind {config.kind.value!r} has no fused kernel on device type {device_type!r}. "
            f"Supported there: {allowed}. Choose one of them in SparseOptimizerConfig(kind=...)."
        )
    kind = config.kind
    if kind is SparseOptimizerKind.SGD:
        return trec_optim.SGD, {"lr": config.lr}
    if kind is SparseOptimizerKind.ADAGRAD:
        return trec_optim.Adagrad, {"lr": config.lr, "eps": config.eps}
    if kind is SparseOptimizerKind.ROWWISE_ADAGRAD:
        return trec_optim.RowWiseAdagrad, {"lr": config.lr, "eps": config.eps}
    moments = {"lr": config.lr, "eps": config.eps, "beta1": config.beta1, "beta2": config.beta2}
    if kind is SparseOptimizerKind.ADAM:
        return trec_optim.Adam, moments
    return trec_optim.PartialRowWiseAdam, moments
