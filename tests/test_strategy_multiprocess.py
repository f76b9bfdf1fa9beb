"""SparseStrategy on 2 CPU processes (gloo): every CPU sharding type, exact resume, resharding, stages."""

from __future__ import annotations

import pytest
from conftest import assert_trees_equal, read_checkpoint, run_worker

pytestmark = pytest.mark.multiprocess

MIXED = [
    "--table-sharding", "t_cat_0=table_wise",
    "--table-sharding", "t_cat_1=column_wise",
    "--table-sharding", "t_cat_2=data_parallel",
    "--table-sharding", "t_cat_3=table_column_wise",
]  # fmt: skip


def test_every_cpu_sharding_type_trains_on_two_processes(tmp_path):
    result = run_worker("train.py", "--devices", 2, *MIXED, result=tmp_path / "r.json")
    assert result["world_size"] == 2
    assert result["plan"] == {
        "t_cat_0": ["table_wise", "fused"],
        "t_cat_1": ["column_wise", "fused"],
        "t_cat_2": ["data_parallel", "dense"],
        "t_cat_3": ["table_column_wise", "fused"],
    }
    assert 0.0 < result["metrics"]["val/loss"] < 1.0
    assert 0.0 <= result["metrics"]["val/auc"] <= 1.0


def test_auto_plan_keeps_every_table_fused_or_on_the_data_parallel_route(tmp_path):
    """Left alone TorchRec's planner makes small tables data_parallel with dense kernels on the fused route; auto
    (distributed/auto_sharding.py) makes a table data_parallel only where that sends the fewest bytes for the
    batches it read, and trains it on the data_parallel route, as a table asked data_parallel by name."""
    result = run_worker("train.py", "--devices", 2, "--sharding", "auto", result=tmp_path / "r.json")
    choice = result["auto_sharding"]
    assert set(choice) == {f"t_cat_{i}" for i in range(4)}
    for table, (sharding, kernel) in result["plan"].items():
        assert sharding == choice[table]
        dp = sharding == "data_parallel"
        assert (kernel, result["routes"][table]) == (("dense", "data_parallel") if dp else ("fused", "fused"))


def test_exact_resume_and_resharding(tmp_path):
    """N epochs straight == k epochs, stop, resume to N (2 processes); a 2-process checkpoint loads into 1."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--devices", 2, *MIXED, "--max-epochs", 2]
    run_worker("train.py", *common, "--ckpt-dir", straight, result=tmp_path / "a.json")
    result = run_worker(
        "train.py", *common, "--ckpt-dir", resumed, "--ckpt-in", straight / "epoch=0.ckpt", result=tmp_path / "b.json"
    )
    assert result["global_step"] == 6
    assert result["sparse_lr"] == pytest.approx(0.05 * 0.25)  # halved each epoch, restored in between

    tensors_a, state_a = read_checkpoint(straight / "epoch=1.ckpt")
    tensors_b, state_b = read_checkpoint(resumed / "epoch=1.ckpt")
    assert any(k.startswith("sparse_optimizer.state.") and "momentum1" in k for k in tensors_a)
    assert_trees_equal(tensors_a, tensors_b, "model and sparse optimizer")
    for key in ("optimizer_states", "lr_schedulers", "sparse_optimizer_hyperparameters", "global_step", "epoch"):
        assert_trees_equal(state_a[key], state_b[key], key)

    # Resharding: 2-process checkpoint -> 1 process. max_epochs is already reached, so fit only restores;
    # the checkpoint it then writes must hold exactly what it loaded.
    one = tmp_path / "one_process.ckpt"
    run_worker(
        "train.py", "--devices", 1, *MIXED, "--max-epochs", 1,
        "--ckpt-in", straight / "epoch=0.ckpt", "--ckpt-out", one, result=tmp_path / "c.json",
    )  # fmt: skip
    tensors_0, state_0 = read_checkpoint(straight / "epoch=0.ckpt")
    tensors_1, state_1 = read_checkpoint(one)
    assert_trees_equal(tensors_0, tensors_1, "2 -> 1 process resharded state")
    assert_trees_equal(state_0["optimizer_states"], state_1["optimizer_states"], "dense optimizer")


def test_validate_test_predict_from_checkpoint_on_two_processes(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    run_worker(
        "train.py", "--devices", 2, "--sharding", "table_wise", "--ckpt-dir", ckpt_dir, result=tmp_path / "a.json"
    )
    ckpt = ckpt_dir / "epoch=0.ckpt"
    tested = run_worker("train.py", "--devices", 2, "--stage", "test", "--ckpt-in", ckpt, result=tmp_path / "t.json")
    assert {"test/auc", "test/loss", "test/ne", "test/log_loss"} <= set(tested["metrics"])
    predicted = run_worker(
        "train.py", "--devices", 2, "--stage", "predict", "--ckpt-in", ckpt, result=tmp_path / "p.json"
    )
    probabilities = [p for batch in predicted["predictions"] for p in batch]
    assert len(probabilities) == 64  # rank 0's share: 1 of the 2 test batches of 64
    assert all(0.0 < p < 1.0 for p in probabilities)


def test_data_parallel_gradients_match_unsharded_reference(tmp_path):
    result = run_worker("data_parallel_grad.py", result=tmp_path / "r.json")
    assert result["max_abs_diff"] < 1e-6, result
    assert result["grad_norm"] > 0
    assert result["weight_diff"] == 0.0


def test_dynamic_table_on_two_processes_resumes_exactly(tmp_path):
    """Raw ids from a 1000-id space share 128 rows: admission, eviction, recycled rows and fallback rows
    (8 at the end of the table, read and trained by every id without a slot); the hash table
    (placement 'sharded', one partition for a table_wise table) lives on the rank holding the table.
    Resumed from a mid-epoch checkpoint (step 2 of 3 per epoch), 2 epochs end bit-identical."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "--devices",
        2,
        "--sharding",
        "table_wise",
        "--dynamic-capacity",
        128,
        "--dynamic-fallback-rows",
        8,
        "--max-epochs",
        2,
    ]
    common += ["--ckpt-every-n-steps", 2]
    result = run_worker(
        "train.py", *common, "--ckpt-dir", straight, "--ckpt-out", straight / "end.ckpt", result=tmp_path / "a.json"
    )
    assert result["train_batches_per_rank"] == [{"0": 3, "1": 3}] * 2  # so step 2 is mid-epoch
    counters = result["dynamic_metrics"]["t_cat_3"]
    assert counters["capacity"] == 120 and counters["fallback_rows"] == 8 and 0 < counters["live"] <= 120
    assert counters["admitted"] > 120 and counters["evicted"] > 0  # the table filled and recycled rows
    assert counters["rejected_admission"] > 0  # min_count=2 kept one-off ids out: they read fallback rows
    held = [
        [k for k in keys if k.startswith("partitions.t_cat_3.0_of_1.")] for keys in result["hash_state_keys_per_rank"]
    ]
    assert sorted(map(bool, held)) == [False, True]  # exactly one rank keeps the partition
    run_worker(
        "train.py", *common, "--ckpt-dir", resumed, "--ckpt-in", straight / "step=2.ckpt", "--ckpt-out", resumed / "end.ckpt",
        result=tmp_path / "b.json",
    )  # fmt: skip
    tensors_a, state_a = read_checkpoint(straight / "end.ckpt")
    tensors_b, state_b = read_checkpoint(resumed / "end.ckpt")
    assert any(k.startswith("dynamic_tables.partitions.t_cat_3.0_of_1.") for k in tensors_a)
    # Wall-clock stamps differ between two runs by nature; everything else must be identical.
    clock = "dynamic_tables.partitions.t_cat_3.0_of_1.slot_last_time"
    tensors_a.pop(clock), tensors_b.pop(clock)
    assert_trees_equal(tensors_a, tensors_b, "weights (fallback rows included), sparse optimizer state and hash tables")
    assert_trees_equal(state_a["optimizer_states"], state_b["optimizer_states"], "dense optimizer")


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_dynamic_hash_placements_train_identically(tmp_path, sharding):
    """Routed partitions and replicas see the same global batches (fallback rows included), so training ends
    in the same state."""
    common = [
        "--devices",
        2,
        "--sharding",
        sharding,
        "--dynamic-capacity",
        128,
        "--dynamic-fallback-rows",
        8,
        "--max-epochs",
        2,
    ]
    tensors = {}
    for placement in ("sharded", "replicated"):
        result = run_worker(
            "train.py",
            *common,
            "--dynamic-placement",
            placement,
            "--ckpt-out",
            tmp_path / placement,
            result=tmp_path / f"{placement}.json",
        )
        assert result["dynamic_metrics"]["t_cat_3"]["evicted"] > 0
        found, _ = read_checkpoint(tmp_path / placement)
        renamed = {}
        for key, value in found.items():
            key = key.replace("partitions.t_cat_3.0_of_1.", "").replace("remappers.t_cat_3.", "")
            if not key.endswith("slot_last_time"):
                renamed[key] = value
        tensors[placement] = renamed
    assert result["replicas_identical"]
    assert_trees_equal(tensors["sharded"], tensors["replicated"], "weights, optimizer states and hash tables")
