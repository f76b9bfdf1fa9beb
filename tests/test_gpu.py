"""The strategy on CUDA (nccl, fbgemm CUDA kernels, row_wise sharding). Skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_trees_equal, read_checkpoint, run_worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_TABLES = [
    "--table-sharding", "t_cat_0=row_wise",
    "--table-sharding", "t_cat_1=table_row_wise",
    "--table-sharding", "t_cat_2=column_wise",
    "--table-sharding", "t_cat_3=table_wise",
]  # fmt: skip


def _devices() -> int:
    return min(2, torch.cuda.device_count())


def test_gpu_sharding_types_train_with_fused_cuda_kernels(tmp_path):
    result = run_worker("train.py", "--accelerator", "gpu", "--devices", _devices(), *GPU_TABLES, result=tmp_path / "r.json")
    assert {kernel for _, kernel in result["plan"].values()} <= {"fused", "fused_uvm", "fused_uvm_caching"}
    assert result["plan"]["t_cat_0"][0] == "row_wise"
    assert 0.0 < result["metrics"]["val/loss"] < 1.0


def test_gpu_exact_resume(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--accelerator", "gpu", "--devices", _devices(), *GPU_TABLES, "--max-epochs", 2]
    run_worker("train.py", *common, "--ckpt-dir", straight, result=tmp_path / "a.json")
    run_worker("train.py", *common, "--ckpt-dir", resumed, "--ckpt-in", straight / "epoch=0.ckpt", result=tmp_path / "b.json")
    tensors_a, state_a = read_checkpoint(straight / "epoch=1.ckpt")
    tensors_b, state_b = read_checkpoint(resumed / "epoch=1.ckpt")
    assert_trees_equal(tensors_a, tensors_b, "model and sparse optimizer")
    assert_trees_equal(state_a["optimizer_states"], state_b["optimizer_states"], "dense optimizer")


@pytest.mark.parametrize("kind", ["adam", "rowwise_adam"])
def test_gpu_only_fused_optimizer_kinds(tmp_path, kind):
    result = run_worker(
        "train.py", "--accelerator", "gpu", "--devices", 1, "--sharding", "table_wise", "--optimizer", kind, result=tmp_path / "r.json"
    )
    assert result["metrics"]["val/loss"] < 1.0
