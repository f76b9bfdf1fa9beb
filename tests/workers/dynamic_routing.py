"""A sharded hash table over 2 gloo ranks against two independent single-process tables.

The table's rows are split in two blocks as row-wise sharding would (one per rank). Each rank remaps
its own batches through ``DynamicTables`` (ids routed by hash with all_to_all); rank 0 replays the
global batches through two plain ``DynamicIdRemapper``s, one per partition, and checks every rank's
rows, the assigned rows, the evaluation lookups, the summed counters and a DCP save/load round trip.
"""

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from gloo_spawn import spawn_gloo
from partition_replay import replay_partitions
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.distributed import checkpoint
from lightning_sparse.distributed.routes import RowBlock
from lightning_sparse.distributed.sharded_dynamic import DynamicTables
from lightning_sparse.dynamic import AdmissionConfig, DynamicIdRemapper, DynamicTableConfig, ExpiryConfig, shard_of

WORLD_SIZE = 2
STEPS = 10
BLOCKS = [RowBlock(0, 40, 0), RowBlock(40, 40, 1)]
FEATURES = {"f_a": "t", "f_b": "t"}


def config() -> DynamicTableConfig:
    return DynamicTableConfig(
        capacity=80,
        admission=AdmissionConfig(min_count=2),
        expiry=ExpiryConfig(ttl_steps=3, sweep_every_steps=2),
        fallback_rows=4,
    )


def batch_of(rank: int, step: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 4, (24,), generator=g)
    values = ((torch.rand(int(lengths.sum()), generator=g) ** 2 * 300).long() + 5 * step) * 7919
    return KeyedJaggedTensor(keys=["f_a", "f_b"], values=values, lengths=lengths)


def make_tables(rank: int) -> DynamicTables:
    return DynamicTables({"t": config()}, FEATURES, {"t": BLOCKS}, rank=rank)


def worker(rank: int, out: str, ckpt_dir: str) -> None:
    tables = make_tables(rank)
    reference = [DynamicIdRemapper(config(), block.rows, block.row_offset) for block in BLOCKS] if rank == 0 else None
    checked = 0
    for step in range(STEPS):
        kjt = batch_of(rank, step)
        remapped, assigned = tables.remap_for_training(kjt, step)
        evaluated = tables.remap_for_evaluation(kjt)
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, (remapped.values(), remapped.lengths(), evaluated.values(), assigned["t"]))
        if rank == 0:
            checked += check_step(reference, step, gathered)
    metrics = tables.global_metrics()["t"]
    keys = [None] * WORLD_SIZE
    dist.all_gather_object(keys, sorted(tables.partitions["t"]))
    # DCP round trip: each rank writes and reads back only its own partition
    path = os.path.join(ckpt_dir, "ckpt")
    checkpoint.save_sharded(path, {}, {"state": {}}, tables.state_dict(), {}, is_global_zero=rank == 0)
    restored = make_tables(rank)
    state = restored.state_dict()
    checkpoint.load_sharded(path, {}, {"state": {}}, state)
    restored.load_state_dict(state)
    exact = all(torch.equal(a, b) for a, b in zip(tables.state_dict().values(), restored.state_dict().values()))
    flags = [None] * WORLD_SIZE
    dist.all_gather_object(flags, exact)
    if rank == 0:
        expected_admitted = sum(r.metrics()["admitted"] for r in reference)
        assert metrics["admitted"] == expected_admitted, (metrics, expected_admitted)
        # each 40-row block keeps its share of the 4 fallback rows, 2, at its end
        assert metrics["capacity"] == 76 and metrics["fallback_rows"] == 4, metrics
        assert all(flags), flags
        with open(out, "w") as f:
            json.dump({"checked_steps": checked, "keys_per_rank": keys, **metrics}, f)


def check_step(reference: list[DynamicIdRemapper], step: int, gathered: list) -> int:
    """Replays ``step``'s global batch (rank 0's ids, then rank 1's) through one table per partition."""
    batches = [batch_of(rank, step) for rank in range(WORLD_SIZE)]
    ids = torch.cat([b.values() for b in batches])
    expected, looked_up, expected_assigned = replay_partitions(reference, ids, step)
    start = 0
    for rank, b in enumerate(batches):
        values, lengths, evaluated, assigned = gathered[rank]
        mine = expected[start : start + b.values().numel()]
        mine_eval = looked_up[start : start + b.values().numel()]
        start += b.values().numel()
        assert torch.equal(values, mine[mine >= 0]), (step, rank)
        assert int(lengths.sum()) == int((mine >= 0).sum())
        assert torch.equal(evaluated, mine_eval[mine_eval >= 0]), (step, rank)
        assert torch.equal(assigned, expected_assigned), (step, rank)
    # partition 1 lends only rows of its own block
    part = shard_of(ids, len(BLOCKS))
    assert bool(((expected[part == 1] >= 40) | (expected[part == 1] < 0)).all())
    assert bool(((expected[part == 0] >= 0) & (expected[part == 0] < 40)).all())  # fallback rows are in the block too
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo(worker, WORLD_SIZE, args.result, tmp)
