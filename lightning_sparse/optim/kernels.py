"""One entry point to the fused sparse row updates: state layout per kind, native kernel or PyTorch twin.

The strategy (for tables fbgemm cannot fuse on the device) and :class:`SparseRowOptimizer` both call
:func:`sparse_update` with the row ids and per-occurrence gradient rows of a batch; it picks the compiled
op ``torch.ops.lightning_sparse.sparse_opt_<kind>`` when the extension has it for the weight's device (CPU,
or CUDA when built with a CUDA toolkit) and the identical pure-PyTorch function of
:mod:`lightning_sparse.optim.reference` otherwise.

State per kind, for a table ``weight`` of shape ``[N, D]`` (float32 unless noted):

=================  ====================================================================================
kind               state
=================  ====================================================================================
sgd                (none)
adagrad            ``sum`` [N, D]
rowwise_adagrad    ``sum`` [N]
decayed_adagrad    ``sum`` [N, D], starts at ``initial_accumulator_value`` (default 0.01, as PERSIA)
rowwise_adam       ``exp_avg_sq`` [N]; ``exp_avg`` [N, D] with ``first_moment``; ``step`` int64 [1] or [N]
adam               ``exp_avg`` [N, D], ``exp_avg_sq`` [N, D], ``step`` int64 [1] or [N]
=================  ====================================================================================

``step`` is global ([1], default: torch.optim.SparseAdam's and fbgemm's semantics, no per-row memory) or
per row ([N] with ``per_row_step=True``: each row's bias correction counts only the steps it was present in).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_sparse import ops
from lightning_sparse.config import SparseOptimizerConfig, SparseOptimizerKind
from lightning_sparse.optim import reference

# PERSIA's default accumulator start for decayed Adagrad: its update divides by the accumulator *before*
# the current gradient, so a zero start would make the first step lr * g / sqrt(eps).
DECAYED_ADAGRAD_INITIAL_ACCUMULATOR = 0.01


def default_initial_accumulator(kind: SparseOptimizerKind) -> float:
    """The accumulator start used when none is given: 0.01 for decayed Adagrad, 0 otherwise."""
    return DECAYED_ADAGRAD_INITIAL_ACCUMULATOR if kind is SparseOptimizerKind.DECAYED_ADAGRAD else 0.0


def init_state(
    kind: "SparseOptimizerKind | str",
    weight: Tensor,
    *,
    first_moment: bool = False,
    per_row_step: bool = False,
    initial_accumulator_value: Optional[float] = None,
) -> dict[str, Tensor]:
    """Fresh optimizer state for one table (see the module docstring for the layout)."""
    kind = SparseOptimizerKind.parse(kind, "kind")
    if weight.dim() != 2:
        raise ValueError(f"sparse optimizers update 2-D embedding tables, got a tensor of shape {tuple(weight.shape)}")
    n, device = weight.shape[0], weight.device
    init = default_initial_accumulator(kind) if initial_accumulator_value is None else float(initial_accumulator_value)
    f32 = dict(dtype=torch.float32, device=device)
    if kind is SparseOptimizerKind.SGD:
        return {}
    if kind in (SparseOptimizerKind.ADAGRAD, SparseOptimizerKind.DECAYED_ADAGRAD):
        return {"sum": torch.full(tuple(weight.shape), init, **f32)}
    if kind is SparseOptimizerKind.ROWWISE_ADAGRAD:
        return {"sum": torch.full((n,), init, **f32)}
    step = torch.zeros(n if per_row_step else 1, dtype=torch.int64, device=device)
    if kind is SparseOptimizerKind.ROWWISE_ADAM:
        state = {"exp_avg_sq": torch.zeros(n, **f32), "step": step}
        if first_moment:
            state["exp_avg"] = torch.zeros(tuple(weight.shape), **f32)
        return state
    return {
        "exp_avg": torch.zeros(tuple(weight.shape), **f32),
        "exp_avg_sq": torch.zeros(tuple(weight.shape), **f32),
        "step": step,
    }


def kernel(kind: "SparseOptimizerKind | str", device: "torch.device | str" = "cpu") -> tuple[Callable[..., None], bool]:
    """The update function for ``kind`` on ``device`` and whether it is the native one.

    The native op when the extension has a kernel of it for that device (CPU; CUDA when built with a CUDA
    toolkit), the PyTorch twin otherwise, which runs on any device.
    """
    kind = SparseOptimizerKind.parse(kind, "kind")
    name = f"sparse_opt_{kind.value}"
    op = ops.native_op_for(name, torch.device(device))
    if op is not None:
        return op, True
    return getattr(reference, name), False


def sparse_update(
    kind: "SparseOptimizerKind | str",
    weight: Tensor,
    state: dict[str, Tensor],
    indices: Tensor,
    grad: Tensor,
    *,
    lr: float,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    decay: float = 0.95,
) -> None:
    """Applies one fused update to the rows ``indices`` (duplicates allowed) of ``weight`` in place.

    ``grad`` holds one gradient row per occurrence, shape ``[len(indices), D]``; duplicates are summed.
    """
    kind = SparseOptimizerKind.parse(kind, "kind")
    fn, _ = kernel(kind, weight.device)
    with torch.no_grad():
        _call_update(
            kind, fn, weight, state, indices, grad.to(torch.float32), lr, eps, weight_decay, beta1, beta2, decay
        )


def _call_update(
    kind: SparseOptimizerKind,
    fn: Callable[..., None],
    weight: Tensor,
    state: dict[str, Tensor],
    indices: Tensor,
    grad: Tensor,
    lr: float,
    eps: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    decay: float,
) -> None:
    """Calls a ``sparse_opt_<kind>`` function (native op or twin) with the kind's state tensors."""
    if kind is SparseOptimizerKind.SGD:
        fn(weight, indices, grad, lr, weight_decay)
    elif kind in (SparseOptimizerKind.ADAGRAD, SparseOptimizerKind.ROWWISE_ADAGRAD):
        fn(weight, state["sum"], indices, grad, lr, eps, weight_decay)
    elif kind is SparseOptimizerKind.DECAYED_ADAGRAD:
        fn(weight, state["sum"], indices, grad, lr, eps, weight_decay, decay)
    elif kind is SparseOptimizerKind.ROWWISE_ADAM:
        fn(
            weight,
            state.get("exp_avg"),
            state["exp_avg_sq"],
            state["step"],
            indices,
            grad,
            lr,
            eps,
            weight_decay,
            beta1,
            beta2,
        )
    else:
        fn(
            weight,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            indices,
            grad,
            lr,
            eps,
            weight_decay,
            beta1,
            beta2,
        )


def init_state_for(
    config: SparseOptimizerConfig,
    weight: Tensor,
    *,
    per_row_step: bool = False,
    initial_accumulator_value: Optional[float] = None,
) -> dict[str, Tensor]:
    """:func:`init_state` with the kind and ``first_moment`` of a typed config."""
    return init_state(
        config.kind,
        weight,
        first_moment=config.first_moment,
        per_row_step=per_row_step,
        initial_accumulator_value=initial_accumulator_value,
    )


def sparse_update_for(
    config: SparseOptimizerConfig, weight: Tensor, state: dict[str, Tensor], indices: Tensor, grad: Tensor
) -> None:
    """:func:`sparse_update` with the hyper-parameters of a typed config."""
    sparse_update(
        config.kind,
        weight,
        state,
        indices,
        grad,
        lr=config.lr,
        eps=config.eps,
        weight_decay=config.weight_decay,
        beta1=config.beta1,
        beta2=config.beta2,
        decay=config.decay,
    )
