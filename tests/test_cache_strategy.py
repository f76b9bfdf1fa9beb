"""Cached tables under SparseStrategy: every sparse optimizer kind trains bit-identically to the same table not
cached (its twin in the same run, see tests/workers/cached_tables.py), on 1 and 2 processes, with validation
and mid-epoch checkpoints; a 2-process run resumed mid-epoch ends bit-identical to the straight run; the
``cache/<table>/...`` metrics; the checkpoint layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORKERS, assert_trees_equal, read_checkpoint, run_worker, run_worker_expecting_failure

sys.path.insert(0, str(WORKERS))
import cached_tables

pytestmark = pytest.mark.multiprocess
CACHE_KEY = "cached_tables"
STATE_KEY = "sparse_optimizer.state.native_kernels.ebc.embedding_bags"


def compare_twins(checkpoint: Path, kinds: list[str]) -> dict[str, torch.Tensor]:
    """Asserts each cached table (backing store) equals its uncached twin, weight and state; returns the tensors."""
    tensors, _ = read_checkpoint(checkpoint)
    for kind in kinds:
        cached, plain = f"t_{kind}", f"t_{kind}_plain"
        twin = tensors[f"model.ebc.embedding_bags.{plain}.weight"]
        assert tensors[f"{CACHE_KEY}.{cached}.weight"].shape == (cached_tables.ROWS, 4)
        assert torch.equal(tensors[f"{CACHE_KEY}.{cached}.weight"], twin), f"{kind}: weights differ"
        assert not torch.equal(twin, cached_tables.TinyModule([kind]).ebc.embedding_bags[cached].weight), (
            f"{kind}: untrained"
        )
        prefix = f"{STATE_KEY}.{plain}.weight.{plain}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                mine = tensors[
                    f"{STATE_KEY}.{cached}.weight.{cached}.step" if name == "step" else f"{CACHE_KEY}.{cached}.{name}"
                ]
                assert torch.equal(mine, value), f"{kind}: optimizer state {name} differs"
    return tensors


def test_every_kind_cached_trains_bit_identically_to_uncached_on_one_process(tmp_path):
    result = run_worker(
        "cached_tables.py", "--devices", 1, "--lookahead", 1, "--ckpt-dir", tmp_path, result=tmp_path / "r.json"
    )
    assert result["global_step"] == 8
    assert all(result["routes"][f"t_{kind}"] == "native" for kind in cached_tables.KINDS)
    for name in ("step=3", "step=6", "last"):
        compare_twins(tmp_path / f"{name}.ckpt", cached_tables.KINDS)
    metrics = result["metrics"]
    hit_rate, rows_in = metrics["cache/t_adam/hit_rate"], metrics["cache/t_adam/rows_in"]
    assert len(hit_rate) == 8 and hit_rate[0] == 0.0 and hit_rate[1:] == [1.0] * 7  # step 0 is cold; then all hits
    assert sum(rows_in) > 40  # more rows than slots were copied in: rows were evicted
    assert (
        metrics["cache/t_adam/bytes_moved"][0] == rows_in[0] * 4 * 3 * 4
    )  # weight, exp_avg, exp_avg_sq: 4 floats each
    files = json.loads((tmp_path / "r.json.rank0").read_text())  # memory-mapped on CPU, one file per tensor
    assert files[str(tmp_path / "t_adam.rank0.weight.bin")] == cached_tables.ROWS * 4 * 4
    assert (
        str(tmp_path / "t_adam.rank0.exp_avg_sq.bin") in files
        and str(tmp_path / "t_rowwise_adagrad.rank0.sum.bin") in files
    )
    assert not list(tmp_path.glob("*.bin"))  # deleted when the stores were closed (at the process's end, too)
    assert "cache/t_adam/rows_back" in metrics
    tensors, _ = read_checkpoint(tmp_path / "last.ckpt")
    assert tensors["model.ebc.embedding_bags.t_adam.weight"].shape == (40, 4)  # the scratchpad, not read back


def test_two_processes_cached_and_resumed_mid_epoch_are_bit_identical(tmp_path):
    kinds = "adam,rowwise_adagrad"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # no validation: an evaluation batch moves rows in the scratchpads too, and a run resumed from a checkpoint
    # written before a validation does not run that validation again
    args = ("--kinds", kinds, "--devices", 2, "--cache", 50, "--lookahead", 1, "--no-val")
    metrics = run_worker("cached_tables.py", *args, "--ckpt-dir", straight, result=tmp_path / "a.json")["metrics"]
    # 4 steps a pass on 2 processes: the first step of each pass waits for its rows, the others all hit
    hit_rate = metrics["cache/t_adam/hit_rate"]
    assert hit_rate[0] < 1 and hit_rate[4] < 1 and hit_rate[1:4] == hit_rate[5:] == [1.0] * 3, hit_rate
    assert sum(metrics["cache/t_adam/rows_back"][3:]) > 0, "rows should be evicted after the checkpoint"
    # only the rank holding a table keeps its backing store
    files = [name for rank in (0, 1) for name in json.loads((tmp_path / f"a.json.rank{rank}").read_text())]
    assert sorted(Path(f).name.split(".rank")[0] + ".weight" for f in files if f.endswith(".weight.bin")) == [
        "t_adam.weight",
        "t_rowwise_adagrad.weight",
    ]
    after = run_worker(
        "cached_tables.py",
        *args,
        "--ckpt-dir",
        resumed,
        "--ckpt-in",
        straight / "step=3.ckpt",
        result=tmp_path / "b.json",
    )["metrics"]
    a = compare_twins(straight / "last.ckpt", kinds.split(","))
    b = compare_twins(resumed / "last.ckpt", kinds.split(","))
    # the planner is in the checkpoint: the resumed run places every row in the same slot, so even the
    # scratchpads (TBE weights and per-row optimizer state) and the planners agree bit for bit
    assert any(key.endswith("planner.score") for key in a) and "cached_tables.progress" in a
    assert_trees_equal(a, b, "straight vs resumed at step 3 (mid-epoch)")
    for key in ("hit_rate", "rows_in", "rows_back"):  # the steps after the checkpoint copy the same rows
        assert after[f"cache/t_adam/{key}"] == metrics[f"cache/t_adam/{key}"][3:], key


def test_a_window_larger_than_the_scratchpad_stops_training_naming_the_batch_and_its_rows(tmp_path):
    out = run_worker_expecting_failure(
        "cached_tables.py", "--kinds", "adam", "--cache", 12, "--lookahead", 1, "--ckpt-dir", tmp_path
    )
    assert "WorkingSetTooLarge: cached table 't_adam': batch 1 needs" in out, out[-3000:]
    assert "distinct rows, more than the scratchpad's 12 slots. Raise TableConfig.cache.rows to at least" in out
    assert "(batch 1 is batch 1 of this pass over the train loader, planned before the pass's step 0)" in out
