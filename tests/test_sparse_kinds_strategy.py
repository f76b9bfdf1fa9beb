"""Every sparse optimizer kind inside SparseStrategy (fbgemm-fused or lightning_sparse kernels) against an
unsharded reference of the same math, on 1 and 2 processes; exact resume of the optimizer state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import WORKERS, assert_trees_equal, read_checkpoint, run_worker
from lightning_sparse.config import SparseOptimizerKind
from lightning_sparse.optim import init_state_for, sparse_update_for

sys.path.insert(0, str(WORKERS))
import sparse_kinds  # noqa: E402

pytestmark = pytest.mark.multiprocess
ALL_KINDS = [kind.value for kind in SparseOptimizerKind]
NATIVE_ON_CPU = ["decayed_adagrad", "rowwise_adam", "adam"]


def reference_tables(kind: str, world_size: int, steps: int) -> dict[str, torch.Tensor]:
    """Replays the stream on an unsharded model: at each step the tables get the mean over ranks of the
    gradients of each rank's mean loss (as DDP gives the dense part), applied to the rows present, once each."""
    model = sparse_kinds.make_model()
    config = sparse_kinds.optimizer_config(kind)
    weights = {name: model.ebc.embedding_bags[name].weight for name, _, _ in sparse_kinds.TABLES}
    states = {name: init_state_for(config, w.detach()) for name, w in weights.items()}
    per_epoch = sparse_kinds.BATCHES_PER_EPOCH
    for step in range(steps):
        epoch, position = divmod(step * world_size, per_epoch)
        batches = [sparse_kinds.batch_at(position + rank) for rank in range(world_size)]
        model.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(model(kjt), target) for kjt, target in batches) / world_size
        loss.backward()
        for name, weight in weights.items():
            rows = torch.unique(torch.cat([kjt[f"f_{name}"].values() for kjt, _ in batches]))
            sparse_update_for(config, weight.data, states[name], rows, weight.grad[rows])
    return {name: w.detach() for name, w in weights.items()}


def trained_tables(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(checkpoint)
    return {name: tensors[f"model.ebc.embedding_bags.{name}.weight"] for name, _, _ in sparse_kinds.TABLES}


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_kind_matches_unsharded_reference(tmp_path, kind, devices):
    run_worker("sparse_kinds.py", "--kind", kind, "--devices", devices, "--ckpt-dir", tmp_path, result=tmp_path / "r.json")
    steps = 2 * sparse_kinds.BATCHES_PER_EPOCH // devices
    expected = reference_tables(kind, devices, steps)
    for name, weight in trained_tables(tmp_path / "epoch=1.ckpt").items():
        torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{kind}/{name}: {m}")


@pytest.mark.parametrize("kind", NATIVE_ON_CPU)
def test_native_kernel_state_resumes_exactly_on_two_processes(tmp_path, kind):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_worker("sparse_kinds.py", "--kind", kind, "--ckpt-dir", straight, result=tmp_path / "a.json")
    run_worker("sparse_kinds.py", "--kind", kind, "--ckpt-dir", resumed, "--ckpt-in", straight / "epoch=0.ckpt", result=tmp_path / "b.json")
    tensors_a, state_a = read_checkpoint(straight / "epoch=1.ckpt")
    tensors_b, state_b = read_checkpoint(resumed / "epoch=1.ckpt")
    native_state = [k for k in tensors_a if k.startswith("sparse_optimizer.state.native_kernels.")]
    assert native_state, sorted(tensors_a)
    assert_trees_equal(tensors_a, tensors_b, f"{kind}: weights and sparse optimizer state")
    assert_trees_equal(state_a["sparse_optimizer_hyperparameters"], state_b["sparse_optimizer_hyperparameters"], "hyper-parameters")
