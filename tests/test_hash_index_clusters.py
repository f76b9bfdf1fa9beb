"""The index updates by independent probe clusters (``cuda_ops/hash_table_common.h``), which the CUDA
kernels run one thread per cluster, against the serial order of the twin: run on the CPU by the op
``hash_index_update``, last cluster first, they must give the serial index position by position, and
the clusters they use must be exactly the probe clusters of the index before the erases and after the
inserts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from index_cases import (
    IndexCase,
    build_case,
    cluster_starts,
    crowded_batches,
    ids_with_homes,
    index_cases,
    serial_result,
)

from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig, EvictionPolicy
from lightning_sparse.dynamic.hashing import index_home
from lightning_sparse.ops import native_op

pytestmark = pytest.mark.skipif(native_op("hash_index_update") is None, reason="native extension not built")


def run_by_clusters(case: IndexCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = case.index.clone()
    erase_cluster, insert_cluster = native_op("hash_index_update")(
        index, case.slot_ids, case.erase_slots, case.insert_ids, case.insert_slots
    )
    return index, erase_cluster, insert_cluster


def assert_clusters_reproduce_the_serial_update(case: IndexCase) -> None:
    expected = serial_result(case)
    index, erase_cluster, insert_cluster = run_by_clusters(case)
    assert torch.equal(index, expected)
    mask = case.index.numel() - 1
    erase_homes = index_home(case.slot_ids[case.erase_slots], mask)
    assert torch.equal(erase_cluster, cluster_starts(case.index, erase_homes))
    assert torch.equal(insert_cluster, cluster_starts(expected, index_home(case.insert_ids, mask)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=index_cases())
def test_clusters_reproduce_the_serial_update(case):
    assert_clusters_reproduce_the_serial_update(case)


def test_cluster_wrapping_past_the_end_with_erases_and_inserts():
    """Ids homed on the last two positions of a 16-entry index fill a cluster that wraps to position 0
    and runs into one homed there; erases shift entries back across the end, inserts fill past it."""
    homes = [15, 15, 14, 0, 15, 1, 14, 0, 15, 15, 2, 0, 14, 15, 1, 15]
    case = build_case(16, homes, live=7, history=[1], erase=[4, 0, 2], inserts=5, slot_order=[3, 1, 7, 0, 6, 2, 5, 4])
    assert (case.index[[14, 15, 0, 1]] >= 0).all()  # the cluster does wrap
    assert_clusters_reproduce_the_serial_update(case)


def test_inserts_carried_past_the_end_join_the_cluster_at_the_start():
    """One id erased at 15 (its neighbour homed there shifts back), then an id homed at 3 is inserted
    before five homed at 14, which fill 14, 0, 1, 2 and, past the first, 4: positions 0 to 4 are reached
    only by keys carried past the end, so the plan must follow the carry around the index to put all six
    in one cluster (run apart, the five would take 3 if they went first)."""
    homes = [15, 15, 3, 14, 14, 14, 14, 14]
    case = build_case(16, homes, live=2, history=[], erase=[0], inserts=6, slot_order=list(range(8)))
    expected = serial_result(case)
    assert expected[[14, 15, 0, 1, 2, 3, 4]].tolist() == [2, 1, 3, 4, 5, 0, 6]  # slot 0 (homed at 3), then 2..6
    assert_clusters_reproduce_the_serial_update(case)


def test_clusters_split_a_half_full_index_into_many_groups():
    """At the table's load (at most one id per two positions) most operations have a cluster of their
    own: the CUDA kernels run that many threads."""
    g = torch.Generator().manual_seed(1)
    size, capacity = 1 << 14, 1 << 13
    homes = torch.randint(0, size, (size,), generator=g).tolist()
    erase = torch.randperm(capacity - 1000, generator=g)[:2000].tolist()
    slot_order = torch.randperm(capacity, generator=g).tolist()
    case = build_case(size, homes, live=capacity - 1000, history=[], erase=erase, inserts=3000, slot_order=slot_order)
    _, erase_cluster, insert_cluster = run_by_clusters(case)
    assert erase_cluster.unique().numel() > 0.6 * 2000
    assert insert_cluster.unique().numel() > 0.4 * 3000
    assert_clusters_reproduce_the_serial_update(case)


def test_case_ids_have_the_chosen_homes():
    homes = [0, 0, 0, 5, 1023, 1023, 512]
    ids = ids_with_homes(1024, homes)
    assert index_home(torch.tensor(ids), 1023).tolist() == homes and len(set(ids)) == len(ids)


def test_hash_index_update_rejects_bad_updates():
    case = build_case(16, list(range(16)), live=4, history=[], erase=[0], inserts=2, slot_order=list(range(8)))
    op = native_op("hash_index_update")
    with pytest.raises(RuntimeError, match="indexed"):
        op(case.index.clone(), case.slot_ids, torch.tensor([6]), case.insert_ids, case.insert_slots)
    with pytest.raises(RuntimeError, match="more entries"):
        op(case.index.clone(), case.slot_ids, case.erase_slots, torch.arange(100, 106), torch.arange(6) % 8)
    with pytest.raises(RuntimeError, match="erase_slots"):
        op(case.index.clone(), case.slot_ids, case.erase_slots.int(), case.insert_ids, case.insert_slots)


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_native_remap_equals_twin_with_crowded_wrapping_clusters(policy, monkeypatch):
    """The twin's remap and sweep (which call update_index) against the CPU kernel on ids crowded around
    the end of the index, with admission, eviction and expiry."""
    from lightning_sparse.dynamic import AdmissionConfig, ExpiryConfig

    config = DynamicTableConfig(
        capacity=512,
        eviction=policy,
        score_decay=0.8,
        admission=AdmissionConfig(min_count=1, probability=0.9, seed=3),
        expiry=ExpiryConfig(ttl_steps=2),
    )
    batches = crowded_batches(seed=2, capacity=512, steps=8, batch=3_000)
    states = []
    for native in ("1", "0"):
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", native)
        remapper = DynamicIdRemapper(config)
        out = []
        for step, ids in enumerate(batches):
            result = remapper.remap(ids, step, now=float(step))
            out += [result.slots, result.assigned]
            if step % 2:
                out.append(remapper.expire(step, now=float(step)))
        states.append((out, remapper.state_dict(), remapper.metrics()))
    (out_n, state_n, metrics_n), (out_t, state_t, metrics_t) = states
    assert all(torch.equal(a, b) for a, b in zip(out_n, out_t)) and len(out_n) == len(out_t)
    assert all(torch.equal(state_n[k], state_t[k]) for k in state_n)
    assert metrics_n == metrics_t and metrics_n["evicted"] > 0
    assert metrics_n["expired"] > 0 or policy == EvictionPolicy.LRU
