"""Exact resume from a mid-epoch checkpoint on 2 processes, for both bundled data modules.

N steps straight == k steps (k inside an epoch, saved by ModelCheckpoint(every_n_train_steps)) + resume
to N: every table, the sparse and dense optimizer states, the scheduler and the loop counters are bit
identical. Before the data modules' loaders were stateful, the resumed run re-read the epoch's first
batches instead of the ones after k, and every weight differed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_trees_equal, read_checkpoint, run_worker

pytestmark = pytest.mark.multiprocess

# Adam everywhere (row state on the tables, dense Adam with a step scheduler), as in the report.
COMMON = [
    "--devices",
    2,
    "--sharding",
    "table_wise",
    "--optimizer",
    "adam",
    "--max-epochs",
    2,
    "--ckpt-every-n-steps",
    3,
]
COMPARED = ("optimizer_states", "lr_schedulers", "sparse_optimizer_hyperparameters", "global_step", "epoch", "loops")


def _criteo_lines(n: int) -> list[str]:
    lines = []
    for i in range(n):
        ints = [str((i * 7 + j) % 50) for j in range(13)]
        cats = [f"{(i * 2654435761 + j * 40503) & 0xFFFFFFFF:08x}" for j in range(26)]
        lines.append("\t".join([str((i // 3) % 2), *ints, *cats]))
    return lines


def _straight_then_resumed(tmp_path: Path, args: list, steps: int) -> tuple[Path, Path]:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run_worker(
        "train.py", *args, "--ckpt-dir", straight, "--ckpt-out", straight / "final.ckpt", result=tmp_path / "a.json"
    )
    assert a["global_step"] == steps
    ranks = a["train_batches_per_rank"]
    assert ranks[0] == ranks[1], f"ranks ran different numbers of batches per epoch: {ranks}"
    b = run_worker(
        "train.py", *args, "--ckpt-dir", resumed, "--ckpt-in", straight / "step=3.ckpt",
        "--ckpt-out", resumed / "final.ckpt", result=tmp_path / "b.json",
    )  # fmt: skip
    assert b["global_step"] == steps
    return straight, resumed


def _assert_identical(straight: Path, resumed: Path, name: str) -> None:
    tensors_a, state_a = read_checkpoint(straight / name)
    tensors_b, state_b = read_checkpoint(resumed / name)
    assert any(k.startswith("sparse_optimizer.state.") and k.endswith("exp_avg_sq") for k in tensors_a)
    assert_trees_equal(tensors_a, tensors_b, f"{name}: model and sparse optimizer")
    for key in COMPARED:
        assert_trees_equal(state_a[key], state_b[key], f"{name}: {key}")


def _loader_state(checkpoint: Path) -> dict:
    _, state = read_checkpoint(checkpoint)
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return loader


def test_synthetic_stream_resumes_mid_epoch_bit_identically(tmp_path):
    # 10 batches over 2 ranks: 5 steps per epoch, 10 in all; step 3 is inside epoch 0.
    straight, resumed = _straight_then_resumed(tmp_path, [*COMMON, "--batches", 10], steps=10)
    for name in ("step=6.ckpt", "step=9.ckpt", "final.ckpt"):
        _assert_identical(straight, resumed, name)
    # The position is in trainer_state.pt (written by rank 0 alone), with every rank's share.
    loader = _loader_state(straight / "step=3.ckpt")
    assert loader["world_size"] == 2 and [r["batches"] for r in loader["ranks"]] == [3, 3]


def test_criteo_reader_resumes_mid_epoch_bit_identically(tmp_path):
    """203 lines (2 malformed) in batches of 20: rank 0 holds 101 valid lines (6 batches, the last of 1 line),
    rank 1 100 (5 batches); each pass stops together after 5. One DataLoader worker per rank, so the
    position travels through torchdata's worker snapshots."""
    lines = _criteo_lines(203)
    lines[4], lines[9] = "1\t2\t3", lines[9].replace("\t", "\t" + "9" * 30, 1)  # field count; int64 overflow
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    args = [*COMMON, "--data", "criteo", "--criteo-train", path, "--batch-size", 20, "--num-workers", 1]
    straight, resumed = _straight_then_resumed(tmp_path, args, steps=10)
    for name in ("step=6.ckpt", "step=9.ckpt", "final.ckpt"):
        _assert_identical(straight, resumed, name)
    # The position is in trainer_state.pt (written by rank 0 alone), with every rank's share.
    loader = _loader_state(straight / "step=3.ckpt")
    assert loader["world_size"] == 2 and [r["batches"] for r in loader["ranks"]] == [3, 3]
