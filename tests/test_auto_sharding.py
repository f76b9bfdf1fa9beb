"""``sharding: auto`` from measured batches (distributed/auto_sharding.py, strategies/auto_sharding.py): the choice
per table on 2 processes equals the planner hint's for the same batches and differs between a one-hot and a
pooling-20 feature; the epoch still sees every batch; memory bounds the choice as TorchRec's planner counts it;
a loader that cannot be read ahead is a clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import run_worker, run_worker_expecting_failure
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import Topology

from lightning_sparse import SparseStrategy
from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.distributed.auto_sharding import asked_auto, check_resumed_choice, choose_sharding
from lightning_sparse.distributed.comm_hint import BatchStats
from lightning_sparse.distributed.planning import planner_constraints, sharders
from lightning_sparse.distributed.routes import resolve_tables
from lightning_sparse.strategies.auto_sharding import read_training_batches


def test_auto_picks_the_fewest_bytes_per_table_on_two_processes(tmp_path):
    r = run_worker("auto_sharding.py", "--ckpt-out", tmp_path / "auto.ckpt", result=tmp_path / "r.json")
    # 100 x 8 tables, 64 samples per rank: one id per sample sends least table_wise (5,120 B/step against
    # data_parallel's 7,200: the dense all-reduce of the whole table); 20 ids per sample send 14,848 B table_wise
    assert r["choice"] == {"t_onehot": "table_wise", "t_pool20": "data_parallel"}
    assert r["choice"] == r["hint_choice"] and r["plan"] == r["choice"]  # the hint of the same batches, planned
    assert r["decision_bytes"] == r["hint"] and r["batches"] == 3
    assert r["routes"] == {"t_onehot": "fused", "t_pool20": "data_parallel"}
    assert r["saved_choice"] == r["choice"]  # checked when the checkpoint is resumed (check_resumed_choice)
    for rank in r["seen"]:  # every sample of both epochs, in the sampler's order: nothing taken by the read-ahead
        assert rank["seen"] == [rank["expected"][e][b * 64 : (b + 1) * 64] for e in (0, 1) for b in range(4)]
    assert "auto sharding t_onehot    table_wise (fewest bytes; KiB/step over 2 ranks, 3 batches read: table_wise 5.0, " \
        "column_wise 6.0, row_wise 9.5, data_parallel 7.0)" in r["printed"]  # fmt: skip
    assert "auto sharding t_pool20    data_parallel (fewest bytes" in r["printed"]
    # on one process nothing is read, TorchRec's planner shards t_pool20: its data_parallel state cannot be resumed
    out = run_worker_expecting_failure(
        "auto_sharding.py", "--devices", 1, "--ckpt-in", tmp_path / "auto.ckpt", "--ckpt-out", tmp_path / "one.ckpt"
    )
    assert (
        "sharding 'auto' gave table 't_pool20' 'data_parallel'" in out
        and "tables: {t_pool20: {sharding: data_parallel}}" in out
    )


class _Model(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        config = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])
        self.ebc = EmbeddingBagCollection(tables=[config], device=torch.device("meta"))


@pytest.mark.parametrize(
    "kind, spread", [("rowwise_adagrad", ShardingType.COLUMN_WISE), ("adam", ShardingType.ROW_WISE)]
)
def test_cheapest_type_that_does_not_fit_gives_way_to_the_next(kind, spread):
    """A 4,000,000 x 64 table (977 MiB) under 800 MiB per rank: table_wise sends the fewest bytes but no rank can
    hold the table, nor data_parallel's copy on each; column_wise (fused kinds; 32 columns a rank) sends fewer
    bytes than row_wise and fits, and row_wise (half the rows a rank) is what a native-route table (adam on
    CPU: lightning_sparse's kernels need whole rows) gets."""
    model = _Model(4_000_000, 64)
    tables = resolve_tables(model, "cpu", ShardingType.AUTO, SparseOptimizerConfig(kind=kind), None)
    stats = [BatchStats(1, {"t": 64}, {"t": 64}, {"t": 32}), BatchStats(1, {"t": 64}, {"t": 64}, {"t": 32})]

    def choose(memory: int):
        topology = Topology(world_size=2, compute_device="cpu", ddr_cap=memory)
        constraints = planner_constraints(tables, "cpu")
        return choose_sharding(model, tables, ["t"], stats, 1, constraints, topology, sharders(), None, "cpu")

    roomy = choose(64 * 1024**3)
    assert roomy.choice == {"t": ShardingType.TABLE_WISE} and roomy.memory_bound == []
    tight = choose(800 * 1024**2)
    assert tight.choice == {"t": spread} and tight.memory_bound == ["t"]
    # a column_wise choice is planned as the trial planned it: one 32-column shard per rank
    assert tight.column_widths() == ({"t": 32} if spread is ShardingType.COLUMN_WISE else {})
    assert planner_constraints(tables, "cpu", tight.column_widths())["t"].min_partition == tight.column_widths().get(
        "t"
    )
    assert (
        "column_wise" in tight.candidates["t"]
        if kind == "rowwise_adagrad"
        else "column_wise" not in tight.candidates["t"]
    )
    assert tight.bytes["t"]["table_wise"] < tight.bytes["t"]["column_wise"] < tight.bytes["t"]["row_wise"]
    assert f"{spread.value} (cheapest that fits in memory" in tight.summary_rows()[0]
    assert not hasattr(tables.weights["t"][1], "_optimizer_classes")  # the trial plans' marks are gone
    with pytest.raises(ValueError, match="table 't' fits in no sharding type"):
        choose(100 * 1024**2)


def test_which_tables_auto_decides():
    model = _Model(10, 8)
    tables = resolve_tables(model, "cpu", ShardingType.AUTO, SparseOptimizerConfig(), None)
    assert asked_auto(tables, ShardingType.AUTO, None) == ["t"]
    explicit = {"t": TableConfig(sharding="row_wise")}
    tables = resolve_tables(model, "cpu", ShardingType.AUTO, SparseOptimizerConfig(), explicit)
    assert asked_auto(tables, ShardingType.AUTO, explicit) == []


def test_resuming_a_data_parallel_choice_into_a_sharded_table_is_refused():
    model = _Model(10, 8)
    tables = resolve_tables(
        model, "cpu", ShardingType.AUTO, SparseOptimizerConfig(), {"t": TableConfig(sharding="table_wise")}
    )
    check_resumed_choice({"t": "row_wise"}, tables)  # sharded to sharded: the checkpoint reshards
    check_resumed_choice(None, tables)
    with pytest.raises(ValueError, match=r"sharding 'auto' gave table 't' 'data_parallel'.*in this run it is 'table_wise'.*"
                       r"set tables: \{t: \{sharding: data_parallel\}\} for this run"):  # fmt: skip
        check_resumed_choice({"t": "data_parallel"}, tables)


class _OneShot(IterableDataset):
    """A dataset that is its own iterator: a second pass finds it exhausted."""

    def __init__(self) -> None:
        self.left = iter(range(10))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.left)


def _trainer_reading(loader) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit_loop._data_source = _DataLoaderSource(loader, "train_dataloader")  # what fit(model, loader) sets
    return trainer


@pytest.mark.parametrize(
    "loader", [DataLoader(_OneShot(), batch_size=2), (i for i in range(10))], ids=["dataset", "generator"]
)
def test_a_loader_that_cannot_be_read_ahead_is_refused(loader):
    with pytest.raises(ValueError, match=r"table\(s\) \['t'\] have sharding 'auto'.*cannot be read ahead: .*"
                       r"Set these tables' sharding explicitly \(e.g. tables: \{t: \{sharding: table_wise\}\}\), or "
                       r"auto_sharding_batches: 0"):  # fmt: skip
        read_training_batches(_trainer_reading(loader), 3, ["t"])


def test_read_ahead_takes_nothing_from_the_epoch_and_keeps_the_random_state():
    loader = DataLoader(list(range(20)), batch_size=4, shuffle=True)
    torch.manual_seed(7)
    read = read_training_batches(_trainer_reading(loader), 2, ["t"])
    after = [b.tolist() for b in loader]
    torch.manual_seed(7)
    without = [b.tolist() for b in loader]
    assert after == without and sorted(i for b in after for i in b) == list(
        range(20)
    )  # the same epoch as without reading
    assert [b.tolist() for b in read] == without[:2]


def test_auto_sharding_batches_must_be_a_count():
    with pytest.raises(ValueError, match=r"auto_sharding_batches=-1: give an integer >= 0 \(0: do not read ahead\)"):
        SparseStrategy(auto_sharding_batches=-1)
