"""The CUDA kernels of embedding_row_grads and of the six sparse optimizers against the CPU kernels on the
same inputs, and the PyTorch twins on CUDA tensors. Skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.config import SparseOptimizerKind as K
from lightning_sparse.ops import native_op_for
from lightning_sparse.optim import init_state, kernels, reference
from lightning_sparse.optim.row_grads import (
    POOLING_MEAN,
    POOLING_NONE,
    POOLING_SUM,
    embedding_row_grads,
    embedding_row_grads_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or native_op_for("embedding_row_grads", torch.device("cuda")) is None,
    reason="lightning_sparse._C built without CUDA kernels",
)
needs_cpu_kernels = pytest.mark.skipif(
    native_op_for("embedding_row_grads", torch.device("cpu")) is None, reason="native extension not built"
)
HP = dict(lr=0.05, eps=1e-6, weight_decay=0.01, beta1=0.9, beta2=0.99, decay=0.9)


def row_grads_case(
    seed: int, mode: int, weighted: bool, index_dtype=torch.int64, num_features=3, batch=64, num_rows=500, dim=16
):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (num_features * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(index_dtype)
    n = int(offsets[-1])
    indices = torch.randint(0, num_rows, (n,), generator=g).to(index_dtype)
    width = dim * (num_features + 1)
    grad_output = torch.randn(n if mode == POOLING_NONE else batch, width, generator=g)
    weights = torch.rand(n, generator=g) * 2e3 - 1e3 if weighted else None
    features, columns = torch.tensor([2, 0]), torch.tensor([3 * dim, 5])
    return [grad_output, indices, offsets, weights, features, columns, dim, num_features, mode]


def to_cuda(args: list) -> list:
    return [a.cuda() if isinstance(a, torch.Tensor) and i < 4 else a for i, a in enumerate(args)]


@needs_cuda_kernels
@needs_cpu_kernels
@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_MEAN, POOLING_NONE])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cuda_row_grads_equal_cpu_kernel(mode, weighted, index_dtype):
    """Same order, same roundings (no FMA): the same bits; the twin on CUDA within 1e-6 (atomic sums)."""
    args = row_grads_case(1, mode, weighted, index_dtype)
    rows_cpu, grads_cpu = torch.ops.lightning_sparse.embedding_row_grads(*args)
    rows_gpu, grads_gpu = torch.ops.lightning_sparse.embedding_row_grads(*to_cuda(args))
    assert rows_gpu.is_cuda and grads_gpu.is_cuda and grads_gpu.dtype == torch.float64
    assert torch.equal(rows_gpu.cpu(), rows_cpu)
    torch.testing.assert_close(grads_gpu.cpu(), grads_cpu, rtol=1e-6, atol=1e-12)
    assert torch.equal(grads_gpu.cpu(), grads_cpu), "expected the CPU kernel's bits"
    rows_twin, grads_twin = embedding_row_grads_reference(*to_cuda(args))
    assert rows_twin.is_cuda and torch.equal(rows_twin.cpu(), rows_cpu)
    torch.testing.assert_close(grads_twin.cpu().float(), grads_cpu.float(), rtol=1e-6, atol=1e-6)
    rows_d, grads_d = embedding_row_grads(*to_cuda(args))  # the dispatcher picks the CUDA op
    assert torch.equal(grads_d, grads_gpu) and torch.equal(rows_d, rows_gpu)


@needs_cuda_kernels
def test_cuda_row_grads_errors_name_the_problem():
    args = to_cuda(row_grads_case(2, POOLING_SUM, False))
    bad = list(args)
    bad[1] = args[1].clone()
    bad[1][int(args[2][2 * 64])] = -1  # first id of feature 2
    with pytest.raises(RuntimeError, match="negative row id"):
        torch.ops.lightning_sparse.embedding_row_grads(*bad)
    bad = list(args)
    bad[0] = args[0].double()
    with pytest.raises(RuntimeError, match="grad_output must be float32"):
        torch.ops.lightning_sparse.embedding_row_grads(*bad)


def call(fn, kind, w, state, idx, grad):
    if kind is K.SGD:
        fn(w, idx, grad, HP["lr"], HP["weight_decay"])
    elif kind in (K.ADAGRAD, K.ROWWISE_ADAGRAD):
        fn(w, state["sum"], idx, grad, HP["lr"], HP["eps"], HP["weight_decay"])
    elif kind is K.DECAYED_ADAGRAD:
        fn(w, state["sum"], idx, grad, HP["lr"], HP["eps"], HP["weight_decay"], HP["decay"])
    else:
        fn(
            w,
            state.get("exp_avg"),
            state["exp_avg_sq"],
            state["step"],
            idx,
            grad,
            HP["lr"],
            HP["eps"],
            HP["weight_decay"],
            HP["beta1"],
            HP["beta2"],
        )


def run_updates(fn, kind, device, first_moment, per_row_step, sorted_unique):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(400, 13, generator=g).to(device)
    state = init_state(kind, w, first_moment=first_moment, per_row_step=per_row_step)
    for _ in range(5):
        idx = torch.randint(0, 400, (600,), generator=g)  # duplicates
        if sorted_unique:
            idx = torch.unique(idx)
        grad = torch.randn(idx.numel(), 13, generator=g)
        with torch.no_grad():
            call(fn, kind, w, state, idx.to(device), grad.to(device))
    return w.cpu(), {name: t.cpu() for name, t in state.items()}


VARIANTS = [(K.SGD, False, False), (K.ADAGRAD, False, False), (K.ROWWISE_ADAGRAD, False, False), (K.DECAYED_ADAGRAD, False, False),
            (K.ROWWISE_ADAM, False, False), (K.ROWWISE_ADAM, True, True), (K.ADAM, False, False), (K.ADAM, False, True)]  # fmt: skip


@needs_cuda_kernels
@needs_cpu_kernels
@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
@pytest.mark.parametrize("sorted_unique", [False, True])
def test_cuda_optimizer_kernels_equal_cpu_kernels(kind, first_moment, per_row_step, sorted_unique):
    op = getattr(torch.ops.lightning_sparse, f"sparse_opt_{kind.value}")
    fn, native = kernels.kernel(kind, torch.device("cuda"))
    assert native
    w_cpu, s_cpu = run_updates(op, kind, "cpu", first_moment, per_row_step, sorted_unique)
    w_gpu, s_gpu = run_updates(fn, kind, "cuda", first_moment, per_row_step, sorted_unique)
    torch.testing.assert_close(w_gpu, w_cpu, rtol=1e-6, atol=1e-6)
    assert s_gpu.keys() == s_cpu.keys()
    for name in s_cpu:
        torch.testing.assert_close(s_gpu[name], s_cpu[name], rtol=1e-6, atol=1e-6)
    w_twin, s_twin = run_updates(
        getattr(reference, f"sparse_opt_{kind.value}"), kind, "cuda", first_moment, per_row_step, sorted_unique
    )
    torch.testing.assert_close(w_twin, w_cpu, rtol=1e-5, atol=1e-5)
    for name in s_cpu:
        torch.testing.assert_close(s_twin[name], s_cpu[name], rtol=1e-5, atol=1e-5)


@needs_cuda_kernels
def test_cuda_optimizer_errors_name_the_problem():
    w = torch.zeros(4, 2, device="cuda")
    state = init_state(K.ADAGRAD, w)
    op = torch.ops.lightning_sparse.sparse_opt_adagrad
    with pytest.raises(RuntimeError, match="row index 4 out of range"):
        op(w, state["sum"], torch.tensor([1, 4], device="cuda"), torch.ones(2, 2, device="cuda"), 0.1, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        op(w, state["sum"], torch.tensor([1], device="cuda"), torch.ones(1, 3, device="cuda"), 0.1, 1e-8, 0.0)
