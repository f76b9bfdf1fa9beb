"""Row-wise sharding (DES: partial pooled sums aggregated) on CPU processes (gloo), against one unsharded
reference of the gradient rule every sharding type shares (the mean over ranks, see distributed/row_wise.py);
resharding of checkpoints between row_wise and the other types; dynamic tables with a hash partition per row
block; every kind in lightning_sparse's kernels on row_wise tables, and the error on column shards."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import WORKERS, assert_trees_equal, read_checkpoint, run_worker
from test_comm import assert_row_wise_step_bytes

from lightning_sparse.optim import init_state_for, sparse_update_for

sys.path.insert(0, str(WORKERS))
import sparse_kinds

ROUTE = "fused"  # sgd, adagrad, rowwise_adagrad: the kinds fbgemm fuses exactly on CPU


def reference(world_size: int, steps: int) -> tuple[dict[str, torch.Tensor], list[list[list[float]]]]:
    """One process replays the global batches: each table gets the mean over ranks of the gradients of each
    rank's mean loss, applied to the rows present. Returns the tables and predictions[rank][step]."""
    model = sparse_kinds.make_model(ROUTE)
    configs = {name: sparse_kinds.optimizer_config(ROUTE, name[2:]) for name, _, _ in sparse_kinds.tables(ROUTE)}
    weights = {name: model.ebc.embedding_bags[name].weight for name in configs}
    states = {name: init_state_for(configs[name], w.detach()) for name, w in weights.items()}
    predictions: list[list[list[float]]] = [[] for _ in range(world_size)]
    for step in range(steps):
        position = (step * world_size) % sparse_kinds.BATCHES_PER_EPOCH
        batches = [sparse_kinds.batch_at(ROUTE, position + rank) for rank in range(world_size)]
        model.zero_grad()
        outputs = [model(kjt) for kjt, _ in batches]
        for rank, output in enumerate(outputs):
            predictions[rank].append(output.detach().tolist())
        loss = sum(torch.nn.functional.mse_loss(out, target) for out, (_, target) in zip(outputs, batches)) / world_size
        loss.backward()
        lr = sparse_kinds.LR if step < sparse_kinds.LR_CHANGE_STEP else sparse_kinds.LR_LATER
        for name, weight in weights.items():
            rows = torch.unique(torch.cat([kjt[f"f_{name}"].values() for kjt, _ in batches]))
            configs[name].lr = lr
            sparse_update_for(configs[name], weight.data, states[name], rows, weight.grad[rows])
    return {name: w.detach() for name, w in weights.items()}, predictions


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise", "column_wise"])
def test_sharding_types_share_one_gradient_rule_and_match_the_reference(tmp_path, sharding, monkeypatch):
    """Forward outputs at every step and every row after training, on 2 gloo processes, for every kind fbgemm
    fuses on CPU, ids read from every row block; row_wise was refused on CPU before (TorchRec's sharder listed
    it for CUDA only)."""
    monkeypatch.setattr(sparse_kinds, "IDS_OVER_ALL_ROWS", True)
    counting = ["--count-communication"] if sharding == "row_wise" else []  # the byte counter must not change training
    result = run_worker("sparse_kinds.py", "--route", ROUTE, "--sharding", sharding, "--ids-over-all-rows", *counting,
                        "--ckpt-dir", tmp_path, result=tmp_path / "r.json")  # fmt: skip
    assert set(result["plan"].values()) == {sharding}, result["plan"]
    steps = 2 * sparse_kinds.BATCHES_PER_EPOCH // 2
    expected_tables, expected_predictions = reference(2, steps)
    got = torch.tensor(result["predictions"], dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(expected_predictions, dtype=torch.float64), atol=1e-6, rtol=0)
    tensors, _ = read_checkpoint(tmp_path / "epoch=1.ckpt")
    for name, _, _ in sparse_kinds.tables(ROUTE):
        weight = tensors[f"model.ebc.embedding_bags.{name}.weight"]
        torch.testing.assert_close(
            weight, expected_tables[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{sharding}/{name}: {m}"
        )
    if counting:
        assert_row_wise_step_bytes(result, steps)


def test_gradient_division_turned_off_is_refused():
    from torchrec.distributed import comm_ops

    from lightning_sparse.distributed.planning import sharders

    comm_ops.set_gradient_division(False)
    try:
        with pytest.raises(ValueError, match=r"set_gradient_division\(False\) was called.*mean over ranks"):
            sharders()
    finally:
        comm_ops.set_gradient_division(True)
    assert {"row_wise", "table_row_wise"} <= set(sharders()[0].sharding_types("cpu"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise"])
def test_every_kind_in_lightning_sparse_kernels_on_row_wise_matches_the_reference_and_resumes(
    tmp_path, monkeypatch, sharding
):
    """The kinds fbgemm does not fuse on CPU (and every kind with weight decay) run in lightning_sparse's
    kernels on each rank's block of rows; their state is sharded by row blocks like the weights. row_wise:
    trained from scratch against the reference, then resumed at epoch 1 bit for bit; table_row_wise: resumed
    from a table_wise checkpoint (the state resharded into row blocks), against the reference."""
    from test_sparse_kinds_strategy import reference_tables, trained_tables

    monkeypatch.setattr(sparse_kinds, "IDS_OVER_ALL_ROWS", True)
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--route", "native", "--ids-over-all-rows"]
    first_sharding = sharding if sharding == "row_wise" else "table_wise"
    run_worker("sparse_kinds.py", *args, "--sharding", first_sharding, "--ckpt-dir", first, result=tmp_path / "a.json")
    result = run_worker("sparse_kinds.py", *args, "--sharding", sharding, "--ckpt-dir", second,
                        "--ckpt-in", first / "epoch=0.ckpt", result=tmp_path / "b.json")  # fmt: skip
    assert set(result["plan"].values()) == {sharding} and set(result["routes"].values()) == {"native"}
    expected = reference_tables("native", 2, 2 * sparse_kinds.BATCHES_PER_EPOCH // 2)
    for name, weight in trained_tables("native", second / "epoch=1.ckpt").items():
        torch.testing.assert_close(
            weight, expected[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    if sharding == "row_wise":
        tensors_a, _ = read_checkpoint(first / "epoch=1.ckpt")
        tensors_b, _ = read_checkpoint(second / "epoch=1.ckpt")
        assert any(k.startswith("sparse_optimizer.state.native_kernels.") and "t_adam" in k for k in tensors_a)
        assert_trees_equal(tensors_a, tensors_b, "row_wise native-kernel weights and optimizer state")


def test_column_wise_with_a_kind_fbgemm_does_not_fuse_says_why(single_process_env):
    """lightning_sparse's kernels need whole rows on a rank: table_wise or row_wise, not column shards."""
    from test_strategy_errors import _data, _model, _trainer

    from lightning_sparse import SparseOptimizerConfig, SparseStrategy, TableConfig

    strategy = SparseStrategy(
        tables={"t_cat_0": TableConfig(sharding="column_wise", optimizer=SparseOptimizerConfig(kind="adam"))}
    )
    with pytest.raises(
        ValueError, match="'t_cat_0': fbgemm has no fused 'adam' kernel on cpu.*need whole rows.*not 'column_wise'"
    ):
        _trainer(strategy).fit(_model(), _data())


# t_cat_2 and t_cat_3 explicit: ``auto`` would decide them from the batches on 2 processes (data_parallel for
# some), by the planner on 1, and a data_parallel table does not resume into a sharded one
_REST = ["--table-sharding", "t_cat_2=table_wise", "--table-sharding", "t_cat_3=table_wise"]
ROW_WISE_MIX = ["--table-sharding", "t_cat_0=row_wise", "--table-sharding", "t_cat_1=table_row_wise", *_REST]
TABLE_WISE_MIX = ["--table-sharding", "t_cat_0=table_wise", "--table-sharding", "t_cat_1=column_wise", *_REST]


@pytest.mark.multiprocess
def test_checkpoints_reshard_between_row_wise_and_other_types(tmp_path):
    """A row_wise checkpoint (2 processes) loads into table_wise / column_wise on 1 process and back into
    row_wise on 2: weights and row-wise Adagrad state come out exactly as written."""
    first, one, back = tmp_path / "rw.ckpt", tmp_path / "tw.ckpt", tmp_path / "rw_again.ckpt"
    run_worker("train.py", "--devices", 2, *ROW_WISE_MIX, "--ckpt-out", first, result=tmp_path / "a.json")
    run_worker(
        "train.py", "--devices", 1, *TABLE_WISE_MIX, "--ckpt-in", first, "--ckpt-out", one, result=tmp_path / "b.json"
    )
    result = run_worker(
        "train.py", "--devices", 2, *ROW_WISE_MIX, "--ckpt-in", one, "--ckpt-out", back, result=tmp_path / "c.json"
    )
    assert result["plan"]["t_cat_0"][0] == "row_wise" and result["plan"]["t_cat_1"][0] == "table_row_wise"
    tensors = [read_checkpoint(path)[0] for path in (first, one, back)]
    assert any("t_cat_0" in k and "momentum1" in k for k in tensors[0])
    assert_trees_equal(tensors[0], tensors[1], "row_wise -> table_wise/column_wise on 1 process")
    assert_trees_equal(tensors[0], tensors[2], "-> row_wise on 2 processes again")


@pytest.mark.multiprocess
def test_row_wise_dynamic_table_keeps_one_hash_partition_per_row_block(tmp_path):
    common = [
        "--devices",
        2,
        "--table-sharding",
        "t_cat_3=row_wise",
        "--table-sharding",
        "t_cat_2=data_parallel",
        "--dynamic-capacity",
        128,
    ]
    result = run_worker(
        "train.py", *common, "--count-communication", "--ckpt-out", tmp_path / "c.ckpt", result=tmp_path / "r.json"
    )
    assert result["plan"]["t_cat_3"][0] == "row_wise"
    held = [
        sorted({k.split(".")[2] for k in keys if k.startswith("partitions.t_cat_3.")})
        for keys in result["hash_state_keys_per_rank"]
    ]
    assert held == [["0_of_2"], ["1_of_2"]]  # each rank keeps the partition of its own row block
    counters = result["dynamic_metrics"]["t_cat_3"]
    assert counters["capacity"] == 128 and counters["admitted"] > 0
    # the communication report names the id routing, the data_parallel table's collectives and the dense layers
    for per_step in result["comm_per_step"]:
        sent = {channel: bytes_sent for channel, (bytes_sent, _) in per_step.items()}
        assert (
            sent["dynamic/t_cat_3/ids"] > 0 and sent["data_parallel/t_cat_2/row_union"] == 50 * 4
        )  # int32 mask, 2 ranks
        assert sent["data_parallel/t_cat_2/grad_allreduce"] == 50 * 8 * 4  # the dense gradient, 2 (W - 1) / W of it
        assert sent["dense/ddp/grad_allreduce"] > 0 and sent["row_wise/t_cat_3/output_dist_backward"] > 0
