"""Damaged, truncated, unfinished and old-format checkpoints are refused by name; saves and removals never
leave a directory that passes for a checkpoint. One process; the checkpoints come from a real training run."""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_worker, run_worker_expecting_failure

from lightning_sparse.distributed import checkpoint
from lightning_sparse.distributed.checkpoint_manifest import sibling

CorruptCheckpointError = checkpoint.CorruptCheckpointError
IncompleteCheckpointError = checkpoint.IncompleteCheckpointError


def q(value: object) -> str:
    """``value`` as a literal inside a ``match=`` pattern."""
    return re.escape(str(value))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A ModelCheckpoint folder of a 1-process run (2 epochs of 6 steps, save_top_k=1, save_last) whose
    process was SIGKILLed in its 4th save, the rewrite of last.ckpt, after its shard was written."""
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    run_worker_expecting_failure(
        "train.py", "--devices", 1, "--sharding", "table_wise", "--max-epochs", 2, "--ckpt-dir", folder, "--keep", 1,
        "--save-last", env={checkpoint.FAULT_ENV: "0:4"},
    )  # fmt: skip
    return folder


@pytest.fixture
def folder(run_folder, tmp_path) -> Path:
    """A private copy of the run's folder, to damage."""
    copy = tmp_path / "checkpoints"
    shutil.copytree(run_folder, copy, symlinks=True)
    return copy


def load(path: Path) -> dict:
    """The load path SparseStrategy.load_checkpoint takes, with no tensors requested."""
    return checkpoint.load_sharded(path, {}, {"state": {}}, {})


def test_a_save_cut_short_leaves_the_previous_checkpoint_and_no_impostor(run_folder):
    # ModelCheckpoint removed epoch=0.ckpt through SparseStrategy.remove_checkpoint when epoch=1.ckpt was saved.
    assert sorted(p.name for p in run_folder.iterdir()) == [".last.ckpt.partial", "epoch=1.ckpt", "last.ckpt"]
    assert load(run_folder / "last.ckpt")["global_step"] == 6  # the previous last.ckpt, intact
    partial = run_folder / ".last.ckpt.partial"
    assert {".metadata", "__0_0.distcp", "trainer_state.pt"} <= {p.name for p in partial.iterdir()}
    newest = run_folder / "epoch=1.ckpt"
    with pytest.raises(
        IncompleteCheckpointError,
        match=rf"'{q(partial)}' has no manifest.json, so nothing shows that it is complete.*"
        rf"The last complete checkpoint in '{q(run_folder)}' is '{q(newest)}' \(global_step 12\)",
    ):
        load(partial)


def test_a_new_save_replaces_the_previous_and_clears_what_a_cut_short_save_left(folder):
    """Publishing goes through .last.ckpt.partial and .last.ckpt.replaced; none of it is left behind."""
    last = folder / "last.ckpt"
    checkpoint.save_sharded(last, {"w": torch.arange(4.0)}, {"state": {}}, {}, {"global_step": 7}, is_global_zero=True)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1.ckpt", "last.ckpt"]
    state = {"w": torch.zeros(4)}
    assert checkpoint.load_sharded(last, state, {"state": {}}, {})["global_step"] == 7
    assert torch.equal(state["w"], torch.arange(4.0))
    assert json.loads((last / "manifest.json").read_text())["global_step"] == 7


@pytest.mark.parametrize("name", ["__0_0.distcp", "trainer_state.pt", ".metadata"])
def test_a_flipped_byte_is_refused_naming_the_file(folder, name):
    damaged = folder / "epoch=1.ckpt" / name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"Refusing to load checkpoint .*: '{q(damaged)}' is corrupted: its sha256 differs",
    ):
        load(folder / "epoch=1.ckpt")


def test_a_truncated_file_is_refused_naming_the_file(folder):
    shard = folder / "epoch=1.ckpt" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    with pytest.raises(
        CorruptCheckpointError, match=rf"'{q(shard)}' has {q(size // 2)} bytes, {q(size)} were written \(truncated"
    ):
        load(folder / "epoch=1.ckpt")


def test_a_missing_file_or_path_is_refused_naming_it(folder):
    state = folder / "epoch=1.ckpt" / "trainer_state.pt"
    state.unlink()
    with pytest.raises(IncompleteCheckpointError, match=rf"'{q(state)}' is missing \(listed in manifest.json\)"):
        load(folder / "epoch=1.ckpt")
    with pytest.raises(
        IncompleteCheckpointError,
        match=rf"there is no checkpoint at '{q(folder / 'epoch=9.ckpt')}'.*last complete .* is '{q(folder / 'last.ckpt')}'",
    ):
        load(folder / "epoch=9.ckpt")


def test_a_damaged_manifest_is_refused(folder):
    manifest = folder / "epoch=1.ckpt" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"global_step": 12', '"global_step": 13'))
    with pytest.raises(
        CorruptCheckpointError, match=rf"'{q(manifest)}' is damaged: its content does not match its own checksum"
    ):
        load(folder / "epoch=1.ckpt")


def test_a_directory_without_manifest_is_refused_until_adopted(folder):
    """Old-format checkpoints (saved before manifests) look exactly like a half-removed or unfinished one,
    so they are refused too; adopt_checkpoint is the explicit way to vouch for one."""
    old = folder / "epoch=1.ckpt"
    (old / "manifest.json").unlink()
    with pytest.raises(
        IncompleteCheckpointError,
        match=rf"'{q(old)}' has no manifest.json.*adopt_checkpoint\(path\).*last complete checkpoint in '{q(folder)}' is '{q(folder / 'last.ckpt')}'",
    ):
        load(old)
    checkpoint.adopt_checkpoint(old)
    assert load(old)["global_step"] == 12


def test_removal_never_leaves_a_checkpoint_behind(folder):
    epoch = folder / "epoch=1.ckpt"
    # The one intermediate state of a removal: renamed away, not yet deleted. It is no longer at its path
    # and is never offered as the last complete checkpoint.
    os.rename(epoch, sibling(epoch, "removing"))
    with pytest.raises(
        IncompleteCheckpointError, match=rf"no checkpoint at '{q(epoch)}'.*is '{q(folder / 'last.ckpt')}'"
    ):
        load(epoch)
    shutil.copytree(sibling(epoch, "removing"), epoch)
    checkpoint.remove_sharded(epoch)  # also clears the leftover of the earlier removal
    checkpoint.remove_sharded(folder / "last.ckpt")
    assert [p.name for p in folder.iterdir()] == [".last.ckpt.partial"]
    with pytest.raises(IncompleteCheckpointError, match=rf"There is no complete checkpoint in '{q(folder)}'"):
        load(epoch)


class UserRecord:
    """A type a user's callback might put into its state."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_trainer_state_is_read_weights_only(tmp_path):
    path = tmp_path / "custom.ckpt"
    state = {"global_step": 1, "callbacks": {"MyCallback": {"record": UserRecord(3)}}}
    checkpoint.save_sharded(path, {}, {"state": {}}, {}, state, is_global_zero=True)
    with pytest.raises(
        pickle.UnpicklingError, match=rf"'{q(path / 'trainer_state.pt')}' holds an object .*add_safe_globals"
    ):
        load(path)
    with torch.serialization.safe_globals([UserRecord]):
        assert load(path)["callbacks"]["MyCallback"]["record"].value == 3


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """A write that fails part-way (here: the process's file size limit, as a full disk would) leaves the
    previous checkpoint complete and no unfinished directory."""
    path = tmp_path / "last.ckpt"
    checkpoint.save_sharded(path, {"w": torch.ones(8)}, {"state": {}}, {}, {"global_step": 1}, is_global_zero=True)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))
    try:
        with pytest.raises(
            checkpoint.CheckpointSaveError,
            match=rf"Saving checkpoint '{q(path)}' failed while writing .* MiB free in '{q(tmp_path)}'\); the previous checkpoint at that path, if any, is untouched",
        ):
            checkpoint.save_sharded(
                path, {"w": torch.ones(1 << 18)}, {"state": {}}, {}, {"global_step": 2}, is_global_zero=True
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    state = {"w": torch.zeros(8)}
    assert checkpoint.load_sharded(path, state, {"state": {}}, {})["global_step"] == 1
    assert torch.equal(state["w"], torch.ones(8))


def test_killed_between_the_renames_both_checkpoints_stay_complete(tmp_path):
    """The one moment the path is empty: the previous checkpoint renamed away, the new one not yet in."""
    path = tmp_path / "last.ckpt"
    run_worker_expecting_failure(
        "checkpoint_saves.py", "--path", path, "--saves", 2, env={checkpoint.FAULT_ENV: "0:2:swapping"}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.partial", ".last.ckpt.replaced"]
    assert load(tmp_path / ".last.ckpt.replaced")["global_step"] == 1
    newest = tmp_path / ".last.ckpt.partial"
    with pytest.raises(
        IncompleteCheckpointError, match=rf"no checkpoint at '{q(path)}'.*is '{q(newest)}' \(global_step 2\)"
    ):
        load(path)
    # The next save to that path first finishes the interrupted one (publishes the complete .partial), then
    # replaces it; nothing else is left.
    run_worker("checkpoint_saves.py", "--path", path, "--saves", 1, result=tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "r.json"]
    assert load(path)["global_step"] == 1
