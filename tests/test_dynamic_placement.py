"""Placement of dynamic tables' hash tables under the strategy: partitions routed by id hash, or replicas.

Single-process tests here (all partitions on rank 0); the routing over two ranks is tested by
``workers/dynamic_routing.py`` and the strategy runs by ``test_strategy_multiprocess.py``.
"""

import pytest
import torch
from conftest import run_worker
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from workers.partition_replay import replay_partitions

from lightning_sparse.distributed import checkpoint
from lightning_sparse.distributed.routes import RowBlock
from lightning_sparse.distributed.sharded_dynamic import DynamicTables
from lightning_sparse.dynamic import AdmissionConfig, DynamicIdRemapper, DynamicTableConfig, ExpiryConfig, shard_of

FEATURES = {"f_a": "t", "f_b": "t"}


def config(placement: str, capacity: int = 96) -> DynamicTableConfig:
    return DynamicTableConfig(
        capacity=capacity,
        admission=AdmissionConfig(min_count=2),
        expiry=ExpiryConfig(ttl_steps=3, sweep_every_steps=2),
        placement=placement,
        fallback_rows=capacity // 16,
    )


def batch(step: int, generator: torch.Generator) -> KeyedJaggedTensor:
    """Two features of one table, 16 samples, ids drifting through a space 4x the table."""
    lengths = torch.randint(0, 4, (32,), generator=generator)
    values = (torch.rand(int(lengths.sum()), generator=generator) ** 2 * 400).long() + 7 * step
    return KeyedJaggedTensor(keys=["f_a", "f_b"], values=values * 1_000_003, lengths=lengths)


def test_two_partitions_behave_as_two_independent_tables():
    blocks = [RowBlock(0, 48, 0), RowBlock(48, 48, 0)]
    tables = DynamicTables({"t": config("sharded")}, FEATURES, {"t": blocks}, rank=0)
    assert sorted(tables.partitions["t"]) == ["0_of_2", "1_of_2"]
    reference = [DynamicIdRemapper(config("sharded"), block.rows, block.row_offset) for block in blocks]
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        kjt = batch(step, g)
        out, assigned = tables.remap_for_training(kjt, step)
        expected, looked_up, expected_assigned = replay_partitions(reference, kjt.values(), step)
        assert torch.equal(out.values(), expected[expected >= 0])
        assert torch.equal(assigned["t"], expected_assigned)
        mine = shard_of(kjt.values(), 2) == 1
        assert bool(((expected[mine] >= 48) | (expected[mine] == -1)).all())  # rows of its own block
    for p, remapper in enumerate(reference):
        mine = tables.partitions["t"][f"{p}_of_2"]
        for name in ("slot_ids", "slot_count", "slot_last_step", "index", "sketch", "counters", "free_list"):
            assert torch.equal(getattr(mine, name), getattr(remapper, name)), name
    metrics = tables.global_metrics()["t"]
    assert metrics["capacity"] == 90 and metrics["fallback_rows"] == 6  # 96 // 16, 3 at the end of each block
    assert metrics["admitted"] == sum(r.metrics()["admitted"] for r in reference) > 0
    assert torch.equal(tables.remap_for_evaluation(kjt).values(), looked_up[looked_up >= 0])


def test_one_partition_equals_the_replica():
    sharded = DynamicTables({"t": config("sharded")}, FEATURES, {"t": [RowBlock(0, 96, 0)]}, rank=0)
    replicated = DynamicTables({"t": config("replicated")}, FEATURES, rank=0)
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        kjt = batch(step, g)
        a, assigned_a = sharded.remap_for_training(kjt, step)
        b, assigned_b = replicated.remap_for_training(kjt, step)
        assert torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
        assert torch.equal(assigned_a["t"], assigned_b["t"])
    state_a, state_b = sharded.state_dict(), replicated.state_dict()
    assert sorted(k.replace("partitions.t.0_of_1.", "") for k in state_a) == sorted(
        k.replace("remappers.t.", "") for k in state_b
    )
    for key, value in state_b.items():
        if not key.endswith("slot_last_time"):
            assert torch.equal(state_a[key.replace("remappers.t.", "partitions.t.0_of_1.")], value), key


def test_a_rank_without_partitions_keeps_no_state():
    tables = DynamicTables({"t": config("sharded")}, FEATURES, {"t": [RowBlock(0, 48, 0), RowBlock(48, 48, 1)]}, rank=1)
    assert list(tables.partitions["t"]) == ["1_of_2"]
    assert tables.partitions["t"]["1_of_2"].row_offset == 48


def test_checkpoint_with_other_partitions_is_refused_by_name(tmp_path):
    two = DynamicTables({"t": config("sharded")}, FEATURES, {"t": [RowBlock(0, 48, 0), RowBlock(48, 48, 0)]}, rank=0)
    checkpoint.save_sharded(tmp_path / "ckpt", {}, {"state": {}}, two.state_dict(), {}, is_global_zero=True)
    same = DynamicTables({"t": config("sharded")}, FEATURES, {"t": [RowBlock(0, 48, 0), RowBlock(48, 48, 0)]}, rank=0)
    two.remap_for_training(batch(0, torch.Generator().manual_seed(2)), 0)
    state = same.state_dict()
    checkpoint.load_sharded(tmp_path / "ckpt", {}, {"state": {}}, state)  # the same layout loads
    one = DynamicTables({"t": config("sharded")}, FEATURES, {"t": [RowBlock(0, 96, 0)]}, rank=0)
    with pytest.raises(
        ValueError,
        match=r"no state for the dynamic-table hash tables \['partitions.t.0_of_1'\].*"
        r"holds \['partitions.t.0_of_2', 'partitions.t.1_of_2'\].*same DynamicTableConfig.placement",
    ):
        checkpoint.load_sharded(tmp_path / "ckpt", {}, {"state": {}}, one.state_dict())


def test_placement_is_validated_by_name():
    with pytest.raises(
        ValueError,
        match=r"DynamicTableConfig.placement='everywhere' is not valid; allowed values: 'sharded', 'replicated'",
    ):
        DynamicTableConfig(capacity=8, placement="everywhere")


def test_routing_over_two_processes(tmp_path):
    result = run_worker("dynamic_routing.py", result=tmp_path / "r.json")
    assert result["checked_steps"] == 10
    assert result["keys_per_rank"] == [["0_of_2"], ["1_of_2"]]
    assert result["admitted"] > 0 and result["evicted"] > 0
