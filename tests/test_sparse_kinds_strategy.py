"""Every sparse optimizer kind on every route inside SparseStrategy (fbgemm-fused, lightning_sparse kernels,
data_parallel), with non-default hyper-parameters and an lr change mid-run, against an unsharded reference
of the same math, on 1 and 2 processes; exact resume of every route's optimizer state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import WORKERS, assert_trees_equal, read_checkpoint, run_worker

from lightning_sparse.optim import init_state_for, sparse_update_for

sys.path.insert(0, str(WORKERS))
import sparse_kinds

pytestmark = pytest.mark.multiprocess


def reference_tables(route: str, world_size: int, steps: int) -> dict[str, torch.Tensor]:
    """Replays the stream on an unsharded model: at each step the tables get the mean over ranks of the
    gradients of each rank's mean loss (as DDP gives the dense part), applied to the rows present, once each."""
    model = sparse_kinds.make_model(route)
    configs = {name: sparse_kinds.optimizer_config(route, name[2:]) for name, _, _ in sparse_kinds.tables(route)}
    weights = {name: model.ebc.embedding_bags[name].weight for name in configs}
    states = {name: init_state_for(configs[name], w.detach()) for name, w in weights.items()}
    per_epoch = sparse_kinds.BATCHES_PER_EPOCH
    for step in range(steps):
        _, position = divmod(step * world_size, per_epoch)
        batches = [sparse_kinds.batch_at(route, position + rank) for rank in range(world_size)]
        model.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(model(kjt), target) for kjt, target in batches) / world_size
        loss.backward()
        lr = sparse_kinds.LR if step < sparse_kinds.LR_CHANGE_STEP else sparse_kinds.LR_LATER
        for name, weight in weights.items():
            rows = torch.unique(torch.cat([kjt[f"f_{name}"].values() for kjt, _ in batches]))
            config = configs[name]
            config.lr = lr
            sparse_update_for(config, weight.data, states[name], rows, weight.grad[rows])
    return {name: w.detach() for name, w in weights.items()}


def trained_tables(route: str, checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(checkpoint)
    return {name: tensors[f"model.ebc.embedding_bags.{name}.weight"] for name, _, _ in sparse_kinds.tables(route)}


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("route", sorted(sparse_kinds.ROUTES))
def test_every_kind_on_every_route_matches_unsharded_reference(tmp_path, route, devices):
    result = run_worker(
        "sparse_kinds.py", "--route", route, "--devices", devices, "--ckpt-dir", tmp_path, result=tmp_path / "r.json"
    )
    assert set(result["routes"].values()) == {route}, result["routes"]
    steps = 2 * sparse_kinds.BATCHES_PER_EPOCH // devices
    expected = reference_tables(route, devices, steps)
    for name, weight in trained_tables(route, tmp_path / "epoch=1.ckpt").items():
        assert not torch.equal(weight, sparse_kinds.make_model(route).ebc.embedding_bags[name].weight.detach()), name
        torch.testing.assert_close(
            weight, expected[name], atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{route}/{name}: {m}"
        )


@pytest.mark.parametrize("route", sorted(sparse_kinds.ROUTES))
def test_optimizer_state_resumes_exactly_on_two_processes(tmp_path, route):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_worker("sparse_kinds.py", "--route", route, "--ckpt-dir", straight, result=tmp_path / "a.json")
    run_worker(
        "sparse_kinds.py",
        "--route",
        route,
        "--ckpt-dir",
        resumed,
        "--ckpt-in",
        straight / "epoch=0.ckpt",
        result=tmp_path / "b.json",
    )
    tensors_a, state_a = read_checkpoint(straight / "epoch=1.ckpt")
    tensors_b, state_b = read_checkpoint(resumed / "epoch=1.ckpt")
    if route != "fused":
        assert [k for k in tensors_a if k.startswith("sparse_optimizer.state.native_kernels.")], sorted(tensors_a)
    assert_trees_equal(tensors_a, tensors_b, f"{route}: weights and sparse optimizer state")
    assert_trees_equal(
        state_a["sparse_optimizer_hyperparameters"], state_b["sparse_optimizer_hyperparameters"], "hyper-parameters"
    )
