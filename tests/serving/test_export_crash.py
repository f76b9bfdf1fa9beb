"""A SIGKILL during export loses nothing (the next run finishes the version or starts a full snapshot after
the last complete one), and a corrupt, partial or mismatched export is a clear error with nothing applied."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, WORKERS, _worker_env, read_checkpoint
from replay import checkpoint_tensors, live_tables, max_difference

from lightning_sparse.serving import (
    CorruptExportError,
    DeltaExport,
    IncompleteExportError,
    apply_pending,
    load_version,
    open_store,
)
from lightning_sparse.serving.export import FAULT_ENV
from lightning_sparse.serving.format import (
    TableSchema,
    file_entry,
    partial_dir,
    read_current,
    read_manifest,
    sealed,
    version_dir,
    write_json_atomically,
)


def train(tmp: Path, exports: Path, run: int, fault: str = "") -> int:
    """One single-process run of 40 steps exporting every 5, in a process of its own (a forked child would
    inherit a process group an earlier test left in this one, and hang in its first collective)."""
    argv = ["--devices", "1", "--batches", "40", "--every-n-steps", "5", "--exports", str(exports),
            "--ckpt-out", str(tmp / f"run{run}.ckpt"), "--result", str(tmp / f"run{run}.json")]  # fmt: skip
    env = _worker_env()
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, str(WORKERS / "serving_fit.py"), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def crashed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("export_crash")
    exports, seen = tmp / "exports", {}
    assert train(tmp, exports, 1, fault="3:rank_file_written") == -9  # killed before version 3's manifest
    seen["after_first_kill"] = (read_current(exports)["version"], partial_dir(exports, 3).is_dir())
    assert train(tmp, exports, 2, fault="5:before_pointer") == -9  # killed after the rename, before current.json
    seen["after_second_kill"] = (read_current(exports)["version"], version_dir(exports, 5).is_dir())
    assert train(tmp, exports, 3) == 0
    return {"tmp": tmp, "exports": exports, "seen": seen}


def test_killed_exports_lose_nothing(crashed_runs, store_spec):
    exports, seen = crashed_runs["exports"], crashed_runs["seen"]
    assert seen == {"after_first_kill": (2, True), "after_second_kill": (4, True)}
    # run 2 deleted the half-written version 3 and wrote a full snapshot under that number; run 3 published
    # the complete version 5 that run 2 did not point to, then continued at 6 with a full snapshot
    fulls = [v for v in range(1, read_current(exports)["version"] + 1) if read_manifest(exports, v)["full"]]
    assert fulls == [1, 3, 6] and read_current(exports)["version"] == 13
    assert not list(exports.glob(".v*.partial"))
    with open_store(store_spec) as store:
        assert apply_pending(store, exports, until=2) == [1, 2]  # a store that followed run 1
        assert apply_pending(store, exports) == list(range(3, 14))
        live = live_tables(checkpoint_tensors(crashed_runs["tmp"] / "run3.ckpt", read_checkpoint))
        assert max_difference(store, live) == 0.0


def _copy(crashed_runs: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "exports"
    shutil.copytree(crashed_runs["exports"], copy)
    return copy


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing", "schema"])
def test_a_damaged_version_is_refused_and_nothing_of_it_applied(crashed_runs, tmp_path, damage):
    exports = _copy(crashed_runs, tmp_path)
    bad = version_dir(exports, 8) / "rank00000.parquet"  # a delta after the last full snapshot (6)
    if damage == "flipped":
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
        message = "rank00000.parquet' is corrupted: its sha256 differs"
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
        message = "rank00000.parquet' has 100 bytes"
    elif damage == "missing":
        bad.unlink()
        message = "rank00000.parquet' is missing"
    else:  # a file whose checksum matches its manifest but whose columns are another schema's
        pq.write_table(pa.table({"id": [1, 2], "embedding": [[0.5], [0.25]]}), bad)
        manifest = read_manifest(exports, 8)
        manifest["files"]["rank00000.parquet"].update(file_entry(bad))
        body = {k: v for k, v in manifest.items() if k not in ("format", "sha256")}
        write_json_atomically(version_dir(exports, 8) / "manifest.json", sealed(body))
        message = r"has columns \['id', 'embedding'\].*expected \['version', 'step', 'table', 'id', 'col', 'row'"
    with open_store(f"lmdb:{tmp_path / 'store'}") as store:
        with pytest.raises(CorruptExportError, match=message):
            apply_pending(store, exports)
        assert store.version() == 7  # an empty store starts at full snapshot 6; nothing of version 8 is applied


def test_a_damaged_pointer_or_a_missing_version_is_a_clear_error(crashed_runs, tmp_path):
    exports = _copy(crashed_runs, tmp_path)
    shutil.rmtree(version_dir(exports, 8))
    with pytest.raises(IncompleteExportError, match="version 8 is not in .*v00000008 is missing"):
        load_version(exports, 8)
    (exports / "current.json").write_text('{"version": 99')
    with pytest.raises(CorruptExportError, match="export pointer .*current.json' is damaged"):
        apply_pending(open_store(f"lmdb:{tmp_path / 'store'}"), exports)


def test_an_export_directory_of_another_model_is_refused(crashed_runs):
    export = DeltaExport(str(crashed_runs["exports"]))
    export._tables = {"t_cat_0": TableSchema(16, True)}  # what on_train_start reads from the strategy
    refusal = export._prepare_directory()
    assert (
        refusal.startswith("error:") and "holds versions of another model (tables t_cat_0 (width 8, dynamic)" in refusal
    )
    assert "this model has t_cat_0 (width 16, dynamic). Export into another directory." in refusal


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_steps": None, "every_seconds": None}, "needs every_n_steps or every_seconds"),
        ({"every_n_steps": 0}, "every_n_steps must be >= 1 or None, got 0"),
        ({"every_seconds": -1.0}, "every_seconds must be > 0 or None, got -1.0"),
        ({"quantize": "fp8"}, "quantize must be 'none' or 'int8', got 'fp8'"),
    ],
)
def test_bad_export_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeltaExport(str(tmp_path), **kwargs)


def test_a_dynamic_table_with_fallback_rows_is_refused_with_the_reason(tmp_path):
    """Fallback rows have no raw id: exporting them would serve zeros where training read the fallback row."""
    cmd = [sys.executable, str(WORKERS / "serving_fit.py"), "--devices", "1", "--batches", "4", "--every-n-steps", "2",
           "--exports", str(tmp_path / "exports"), "--fallback-rows", "4", "--result", str(tmp_path / "r.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "fallback rows cannot be exported yet ({'t_cat_0': 4})" in proc.stderr
    assert "set fallback_rows: 0" in proc.stderr
