"""A rank SIGKILLed in the middle of rewriting ``last.ckpt`` (2 CPU processes): the previous checkpoint
survives complete, and resuming from it ends bit-identical to a run that was never killed."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_trees_equal, read_checkpoint, run_worker, run_worker_expecting_failure

from lightning_sparse.distributed import checkpoint

pytestmark = pytest.mark.multiprocess

COMMON = ["--devices", 2, "--sharding", "table_wise", "--max-epochs", 2]  # 3 steps per epoch
CORRUPT = "lightning_sparse.distributed.checkpoint_manifest.CorruptCheckpointError"
COMPARED = ("optimizer_states", "lr_schedulers", "sparse_optimizer_hyperparameters", "global_step", "epoch", "loops")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """epoch=0.ckpt (step 3) and epoch=1.ckpt (step 6) of a run that nobody interrupts."""
    folder = tmp_path_factory.mktemp("reference")
    run_worker("train.py", *COMMON, "--ckpt-dir", folder / "checkpoints", result=folder / "result.json")
    return folder / "checkpoints"


def test_rank_killed_while_last_ckpt_is_rewritten_then_exact_resume(reference, tmp_path):
    crashed, resumed = tmp_path / "crashed", tmp_path / "resumed"

    # Saves of each process: epoch=0.ckpt, last.ckpt, epoch=1.ckpt (epoch=0.ckpt removed), last.ckpt. Rank 1
    # SIGKILLs itself in the 4th, the rewrite of last.ckpt, after writing its shard and before the checkpoint
    # is published; Lightning then kills rank 0.
    run_worker_expecting_failure(
        "train.py", *COMMON, "--ckpt-dir", crashed, "--keep", 1, "--save-last", env={checkpoint.FAULT_ENV: "1:4"}
    )
    # Rank 0 either saw the peer vanish (gloo: connection reset) and deleted the unfinished .last.ckpt.partial,
    # or was killed first and left it; either way nothing unfinished is named like a checkpoint.
    last, partial = crashed / "last.ckpt", crashed / ".last.ckpt.partial"
    assert {p.name for p in crashed.iterdir()} - {partial.name} == {"epoch=1.ckpt", "last.ckpt"}
    assert not (partial / "manifest.json").exists()
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["global_step"] == 3 and manifest["world_size"] == 2
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt"]

    # The survivor is exactly the uninterrupted run's epoch-0 checkpoint (same step).
    tensors_survivor, state_survivor = read_checkpoint(last)
    tensors_reference, state_reference = read_checkpoint(reference / "epoch=0.ckpt")
    assert_trees_equal(tensors_survivor, tensors_reference, "model and sparse optimizer at step 3")
    for key in COMPARED:
        assert_trees_equal(state_survivor[key], state_reference[key], key)

    result = run_worker(
        "train.py",
        *COMMON,
        "--ckpt-dir",
        resumed,
        "--keep",
        1,
        "--save-last",
        "--ckpt-in",
        last,
        result=tmp_path / "b.json",
    )
    assert result["global_step"] == 6
    assert sorted(p.name for p in resumed.iterdir()) == ["epoch=1.ckpt", "last.ckpt"]
    tensors_resumed, state_resumed = read_checkpoint(resumed / "last.ckpt")
    tensors_reference, state_reference = read_checkpoint(reference / "epoch=1.ckpt")
    assert any("momentum1" in key for key in tensors_reference)
    assert_trees_equal(tensors_resumed, tensors_reference, "model and sparse optimizer at step 6")
    for key in COMPARED:
        assert_trees_equal(state_resumed[key], state_reference[key], key)


def test_corrupted_shard_is_refused_on_every_rank(reference, tmp_path):
    """The user's case: 4 KiB overwritten inside a .distcp file loaded with 'Restored all states' and rc=0.
    Ranks verify a share of the files each; rank 1 checks __0_0.distcp, and rank 0 must fail too."""
    ckpt = tmp_path / "epoch=0.ckpt"
    shutil.copytree(reference / "epoch=0.ckpt", ckpt)
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    assert data[middle : middle + 4096] != b"\xab" * 4096
    data[middle : middle + 4096] = b"\xab" * 4096
    shard.write_bytes(bytes(data))
    output = run_worker_expecting_failure("train.py", *COMMON, "--ckpt-in", ckpt, timeout=120)
    for rank in (0, 1):
        assert f"[rank{rank}]: {CORRUPT}: Refusing to load checkpoint '{ckpt}': '{shard}' is corrupted" in output
    assert "Restored all states" not in output
