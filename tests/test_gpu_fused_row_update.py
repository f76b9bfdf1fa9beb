"""embedding_row_update's CUDA kernel: the same bits as its CPU kernel and as the two-step CUDA path
(embedding_row_grads -> .float() -> sparse_opt_<kind>), for every kind; the native-route step on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_fused_row_update import VARIANTS, assert_same_table, config_for, lookup, table

from lightning_sparse.ops import native_op_for
from lightning_sparse.optim.kernels import sparse_update_for
from lightning_sparse.optim.row_grads import POOLING_MEAN, POOLING_NONE, POOLING_SUM, embedding_row_grads
from lightning_sparse.optim.row_update import embedding_row_update_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not torch.cuda.is_available() or native_op_for("embedding_row_update", torch.device("cuda")) is None,
        reason="lightning_sparse._C built without CUDA kernels",
    ),
    pytest.mark.skipif(
        native_op_for("embedding_row_update", torch.device("cpu")) is None, reason="native extension not built"
    ),
]


def cuda_args(args: tuple) -> tuple:
    return tuple(a.cuda() if isinstance(a, torch.Tensor) and i < 4 else a for i, a in enumerate(args))


def cuda_table(kind, first_moment, per_row_step):
    weight, state = table(kind, first_moment, per_row_step)
    return weight.cuda(), {k: v.cuda() for k, v in state.items()}


def cpu(t):
    return t[0].cpu(), {k: v.cpu() for k, v in t[1].items()}


@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_MEAN, POOLING_NONE])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_fused_update_equals_cpu_and_two_step(kind, first_moment, per_row_step, mode, weighted):
    config = config_for(kind, first_moment, 0.02)
    args = lookup(11, mode=mode, weighted=weighted, features=(1, 2, 0), empty_bags=True)
    on_cpu = table(kind, first_moment, per_row_step)
    fused, two_step = cuda_table(kind, first_moment, per_row_step), cuda_table(kind, first_moment, per_row_step)
    for _ in range(2):
        embedding_row_update_for(config, *on_cpu, *args)
        embedding_row_update_for(config, *fused, *cuda_args(args))
        rows, grads = embedding_row_grads(*cuda_args(args))
        sparse_update_for(config, *two_step, rows, grads.float())
    assert_same_table(cpu(fused), cpu(two_step), "cuda fused vs cuda two-step")
    assert_same_table(cpu(fused), on_cpu, "cuda fused vs cpu fused")


def test_cuda_fused_update_errors_name_the_problem():
    args = cuda_args(lookup(7, mode=POOLING_SUM, weighted=False))
    weight, state = cuda_table("adagrad", False, False)
    op = torch.ops.lightning_sparse.embedding_row_update
    with pytest.raises(RuntimeError, match="unknown sparse optimizer kind 'adamw'"):
        op(*args, "adamw", weight, state["sum"], None, None, None, 0.1, 1e-8, 0.0, 0.9, 0.999, 0.95)
    with pytest.raises(RuntimeError, match="adagrad needs its state tensor 'sum'"):
        op(*args, "adagrad", weight, None, None, None, None, 0.1, 1e-8, 0.0, 0.9, 0.999, 0.95)
