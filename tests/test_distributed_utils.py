"""collective_device: tensors built for a collective live where the process group's backend moves them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_sparse.distributed.collectives import collective_device, collective_device_type


@pytest.mark.parametrize(
    "backend, device_type",
    [
        ("nccl", "cuda"),
        ("NCCL", "cuda"),
        ("gloo", "cpu"),
        ("cpu:gloo,cuda:nccl", "cpu"),
        ("cuda:nccl", "cuda"),
        ("xccl", "xpu"),
    ],
)
def test_device_type_of_each_backend(backend, device_type):
    assert collective_device_type(backend) == device_type


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown process group backend 'carrier_pigeon'.*gloo.*nccl"):
        collective_device_type("carrier_pigeon")


@pytest.fixture
def no_process_group(single_process_env):
    """In-process Trainers of earlier tests leave Lightning's world-of-one group behind; start without it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    yield


def test_without_a_process_group_the_cpu(no_process_group):
    assert collective_device() == torch.device("cpu")


@pytest.fixture
def gloo_world_of_one(tmp_path, no_process_group):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gloo_group_communicates_cpu_tensors(gloo_world_of_one):
    from lightning_sparse import SparseStrategy

    assert collective_device() == torch.device("cpu")
    assert SparseStrategy().all_reduce_bytes(12345) == 12345
