"""The CUDA hash-table kernels' index updates, which run one thread per probe cluster
(``cuda_ops/hash_table.cu``), against the CPU kernel: the same index position by position, the same
slots, state and counters, for every eviction policy, with ids crowded into long clusters that wrap past
the end of the index. Skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from index_cases import IndexCase, build_case, cluster_starts, crowded_batches, index_cases, serial_result

from lightning_sparse.dynamic import (
    AdmissionConfig,
    DynamicIdRemapper,
    DynamicTableConfig,
    EvictionPolicy,
    ExpiryConfig,
)
from lightning_sparse.dynamic.hashing import index_home
from lightning_sparse.ops import native_op_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and native_op_for("hash_index_update", torch.device("cuda")) is None,
        reason="lightning_sparse._C built without CUDA kernels",
    ),
]


def update(case: IndexCase, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hash_index_update on ``device``; the index and the clusters of the erases and inserts, on the host."""
    on = case.to(device)
    clusters = native_op_for("hash_index_update", torch.device(device))(
        on.index, on.slot_ids, on.erase_slots, on.insert_ids, on.insert_slots
    )
    return on.index.cpu(), clusters[0].cpu(), clusters[1].cpu()


def assert_cuda_update_equals_cpu(case: IndexCase) -> None:
    gpu, cpu = update(case, "cuda"), update(case, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(gpu, cpu))
    assert torch.equal(gpu[0], serial_result(case))
    mask = case.index.numel() - 1
    assert torch.equal(gpu[2], cluster_starts(gpu[0], index_home(case.insert_ids, mask)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=index_cases())
def test_cuda_index_update_equals_cpu_and_serial(case):
    assert_cuda_update_equals_cpu(case)


@pytest.mark.parametrize(
    "size, spread",
    [(1 << 11, 64), (1 << 16, 30_000), (1 << 16, 1 << 16)],
    ids=["one-cluster", "long-clusters", "uniform"],
)
def test_cuda_index_update_equals_cpu_on_larger_indexes(size, spread):
    """Ids homed within `spread` positions around the end of the index, 85% of the slots live, then a
    fifth of them erased and more inserted: one cluster of ~1000 entries around the end (one thread
    does it all), long clusters at load ~0.93 where the ids are homed, or thousands of short ones."""
    g = torch.Generator().manual_seed(spread)
    capacity = size // 2
    homes = ((torch.randint(0, spread, (size,), generator=g) - spread // 2) % size).tolist()
    live = int(0.85 * capacity)
    erase = torch.randperm(live, generator=g)[: live // 5].tolist()
    slot_order = torch.randperm(capacity, generator=g).tolist()
    case = build_case(size, homes, live=live, history=[], erase=erase, inserts=live // 4, slot_order=slot_order)
    assert_cuda_update_equals_cpu(case)


def _config(policy: EvictionPolicy, capacity: int) -> DynamicTableConfig:
    return DynamicTableConfig(
        capacity=capacity,
        eviction=policy,
        score_decay=0.8,
        admission=AdmissionConfig(min_count=1, probability=0.9, seed=3, sketch_halve_every=2 * capacity),
        expiry=ExpiryConfig(ttl_steps=2),
        fallback_rows=capacity // 16,  # unslotted ids read fallback rows: the same rows on both devices
    )


def _drive(remapper: DynamicIdRemapper, batches: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    out = []
    for step, ids in enumerate(batches):
        result = remapper.remap(ids.to(device), step, now=0.5 * step)
        out += [result.slots.cpu(), result.assigned.cpu(), remapper.lookup(ids[:300].to(device)).cpu()]
        if step % 2:
            out.append(remapper.expire(step, now=0.5 * step).cpu())
    return out


@pytest.mark.parametrize("policy", list(EvictionPolicy))
@pytest.mark.parametrize("capacity, batch, window", [(512, 1_500, 0.25), (20_000, 40_000, 0.4)])
def test_cuda_remap_and_expiry_equal_the_cpu_kernel_with_crowded_wrapping_clusters(
    policy, capacity, batch, window, monkeypatch
):
    """Slots, assigned rows, lookups, expired slots and every state tensor (the index position by
    position) bit-identical to the CPU kernel's, on ids homed in a `window` of the index around its end
    (twice as many as fit there: one cluster; or at load ~0.75 there: long clusters), with admission,
    eviction, sketch aging and expiry."""
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1")
    batches = crowded_batches(seed=4, capacity=capacity, steps=8, batch=batch, window=window)
    cpu, gpu = DynamicIdRemapper(_config(policy, capacity)), DynamicIdRemapper(_config(policy, capacity)).cuda()
    out_cpu, out_gpu = _drive(cpu, batches, "cpu"), _drive(gpu, batches, "cuda")
    assert len(out_cpu) == len(out_gpu) and all(torch.equal(a, b) for a, b in zip(out_cpu, out_gpu))
    for name, a, b in zip(cpu.tensors()._fields, cpu.tensors(), gpu.tensors()):
        assert torch.equal(a, b.cpu()), name
    metrics = gpu.metrics()
    assert metrics == cpu.metrics() and metrics["evicted"] > 0
    assert metrics["expired"] > 0 or policy == EvictionPolicy.LRU
