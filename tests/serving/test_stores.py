"""The two serving stores against the same rules: one transaction per version, in order, no torn reads,
clear errors for gaps, schema mismatches and unreachable servers; a process killed mid-apply loses nothing."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest

from lightning_sparse.serving import (
    SchemaMismatchError,
    StoreUnavailableError,
    VersionAlreadyAppliedError,
    VersionGapError,
    open_store,
)
from lightning_sparse.serving.format import TableSchema
from lightning_sparse.serving.stores import TableUpdate, VersionUpdate
from lightning_sparse.serving.stores.base import FAULT_ENV, ExportError

IDS = np.arange(-1000, 1000, dtype=np.int64) * 7919  # raw ids anywhere in int64, negative ones included
TABLES = {"items": TableSchema(4, True), "users": TableSchema(3, False)}


def version(
    v: int, full: bool = False, export_id: str = "e1", tables=TABLES, dead: np.ndarray = IDS[:0]
) -> VersionUpdate:
    """Version ``v``: every row of both tables holds the value ``v`` (so a reader can tell a torn read)."""
    updates = {}
    for name, schema in tables.items():
        ids = np.setdiff1d(IDS, dead) if name == "items" else np.arange(50, dtype=np.int64)
        updates[name] = TableUpdate(
            ids=ids,
            rows=np.full((len(ids), schema.dim), float(v), np.float32),
            deletes=dead if name == "items" else IDS[:0],
        )
    return VersionUpdate(v, 10 * v, full, export_id, time.time(), dict(tables), f"dense {v}".encode(), updates)


def test_versions_apply_in_order_with_tombstones(store_spec):
    with open_store(store_spec) as store:
        assert store.meta() is None and store.version() == 0
        with pytest.raises(VersionGapError, match="is empty and version 1 is a delta"):
            store.apply(version(1))
        store.apply(version(1, full=True))
        store.apply(version(2, dead=IDS[:10]))
        snapshot = store.lookup({"items": IDS, "users": np.array([0, 49, 50])})
        rows, found = snapshot.rows["items"]
        assert snapshot.version == 2 and found.tolist() == [False] * 10 + [True] * (len(IDS) - 10)
        assert (rows[10:] == 2.0).all() and (rows[:10] == 0.0).all()
        assert snapshot.rows["users"][1].tolist() == [True, True, False]
        assert store.dense() == (2, b"dense 2")
        with pytest.raises(VersionGapError, match="is at version 2; applying delta 4 would skip versions 3..3"):
            store.apply(version(4))
        with pytest.raises(VersionAlreadyAppliedError):
            store.apply(version(2))
        other = {"items": TableSchema(8, True), "users": TableSchema(3, False)}
        with pytest.raises(SchemaMismatchError, match="table 'items' has width 8 in version 3, 4 in the store"):
            store.apply(version(3, tables=other))
        with pytest.raises(ExportError, match="holds versions of export 'e1'"):
            store.apply(version(3, export_id="e2"))
        store.apply(version(5, full=True))  # a full snapshot replaces everything: the dead ids come back
        assert store.lookup({"items": IDS}).rows["items"][1].all() and store.version() == 5


def test_unreachable_redis_is_a_clear_error(redis_url):
    with pytest.raises(
        StoreUnavailableError, match=r"cannot reach the Redis store redis://127.0.0.1:1 .*Start redis-server"
    ):
        open_store("redis://127.0.0.1:1")
    with pytest.raises(ValueError, match="use lmdb:PATH"):
        open_store("memcached://x")


def test_unwritable_lmdb_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailableError, match="cannot open the LMDB store"):
        open_store(f"lmdb:{blocker / 'store'}")


def _reader(spec: str, writer_done, ready, out) -> None:
    """10,000 or more lookups of 64 ids each, until the writer is done; counts torn snapshots."""
    lookups = torn = 0
    seen = set()
    rng = np.random.default_rng(0)
    with open_store(spec) as store:
        ready.set()
        while lookups < 10_000 or not writer_done.is_set():
            snapshot = store.lookup({"items": rng.choice(IDS, 64), "users": rng.integers(0, 50, 8)})
            lookups += 1
            if snapshot.version:
                seen.add(snapshot.version)
                for rows, found in snapshot.rows.values():
                    torn += int(not found.all() or (rows != float(snapshot.version)).any())
    out.put({"lookups": lookups, "torn": torn, "versions": len(seen)})


def test_a_reader_never_sees_a_torn_version(store_spec):
    context = multiprocessing.get_context("fork")
    done, ready, out = context.Event(), context.Event(), context.Queue()
    with open_store(store_spec) as store:
        store.apply(version(1, full=True))
    # a process of its own (LMDB refuses an environment opened twice in one process, forked ones included)
    reader = context.Process(target=_reader, args=(store_spec, done, ready, out))
    reader.start()
    assert ready.wait(60)
    with open_store(store_spec) as store:
        for v in range(2, 22):  # 20 applies while the reader reads
            store.apply(version(v))
            time.sleep(0.02)
        done.set()
        report = out.get(timeout=120)
        reader.join(30)
    assert report["lookups"] >= 10_000 and report["torn"] == 0
    assert report["versions"] >= 5, report  # the reads really overlapped the applies


def _apply_killed(spec: str) -> None:
    os.environ[FAULT_ENV] = "3"
    with open_store(spec) as store:
        store.apply(version(3))


def test_a_process_killed_mid_apply_leaves_the_previous_version(store_spec):
    with open_store(store_spec) as store:
        store.apply(version(1, full=True))
        store.apply(version(2))
    child = multiprocessing.get_context("fork").Process(target=_apply_killed, args=(store_spec,))
    child.start()
    child.join(60)
    assert child.exitcode == -9  # SIGKILL inside the transaction, halfway through the rows
    with open_store(store_spec) as store:
        snapshot = store.lookup({"items": IDS})
        assert snapshot.version == 2 and (snapshot.rows["items"][0] == 2.0).all()
        store.apply(version(3))  # the next run applies the version
        assert store.version() == 3 and (store.lookup({"items": IDS}).rows["items"][0] == 3.0).all()
