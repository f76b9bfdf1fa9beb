"""Reading export versions into store updates, and following an export directory (``serve-apply``).

Everything of a version is read and checked before the store's transaction opens: the manifest, the size
and sha256 of every file, the Parquet schema, that every row fits its table's width and that every table
is one the manifest names. A corrupt or partial version is an error naming the file, and nothing of it is
applied; the store stays at the version before.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from lightning_sparse.serving.format import (
    DENSE_FILE,
    CorruptExportError,
    IncompleteExportError,
    read_current,
    read_manifest,
    read_row_file,
    tables_of,
    verify_version,
    version_dir,
)
from lightning_sparse.serving.stores.base import ServingStore, TableUpdate, VersionGapError, VersionUpdate


def load_version(root: Path, version: int) -> VersionUpdate:
    """Version ``version`` of the export directory ``root``, verified, as one :class:`VersionUpdate`."""
    root = Path(root)
    manifest = read_manifest(root, version)
    verify_version(root, manifest)
    tables = tables_of(manifest)
    directory = version_dir(root, version)
    pieces: dict[str, dict[int, list[tuple[np.ndarray, np.ndarray]]]] = {name: {} for name in tables}
    deletes: dict[str, list[np.ndarray]] = {name: [] for name in tables}
    for name in sorted(manifest["files"]):
        if name == DENSE_FILE:
            continue
        for table, records in read_row_file(directory / name, version).items():
            if table not in tables:
                raise CorruptExportError(
                    f"{str(directory / name)!r} has rows of table {table!r}, which its manifest does not list"
                )
            deletes[table].append(records.tombstones)
            for col, (ids, rows) in records.pieces.items():
                if rows.size and col + rows.shape[1] > tables[table].dim:
                    raise CorruptExportError(
                        f"{str(directory / name)!r}: table {table!r} has rows of width {rows.shape[1]} at column {col}, "
                        f"beyond its width {tables[table].dim}"
                    )
                pieces[table].setdefault(col, []).append((ids, rows))
    updates = {name: _join(pieces[name], deletes[name], tables[name].dim) for name in tables}
    dense = (directory / DENSE_FILE).read_bytes()
    return VersionUpdate(
        version, int(manifest["step"]), bool(manifest["full"]), manifest["export_id"], float(manifest["time"]),
        tables, dense, updates,
    )  # fmt: skip


def _join(by_col: dict[int, list[tuple[np.ndarray, np.ndarray]]], deletes: list[np.ndarray], dim: int) -> TableUpdate:
    """Whole rows where the pieces of all columns are present; the rest as patches of stored rows."""
    update = TableUpdate(deletes=np.concatenate(deletes) if deletes else np.zeros(0, np.int64))
    cols = {
        col: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        for col, parts in by_col.items()
    }
    if not cols:
        update.rows = np.zeros((0, dim), np.float32)
        return update
    common = functools.reduce(np.intersect1d, [ids for ids, _ in cols.values()])
    covered = sum(rows.shape[1] for _, rows in cols.values())
    whole = common if covered == dim else np.zeros(0, np.int64)
    update.ids = np.asarray(whole, np.int64)
    update.rows = np.zeros((len(whole), dim), np.float32)
    for col, (ids, rows) in sorted(cols.items()):
        order = np.argsort(ids, kind="stable")
        position = order[np.searchsorted(ids, whole, sorter=order)] if len(whole) else np.zeros(0, np.int64)
        update.rows[:, col : col + rows.shape[1]] = rows[position]
        rest = ~np.isin(ids, whole)
        if rest.any():
            update.patches.append((ids[rest], col, rows[rest]))
    return update


def pending_versions(store: ServingStore, root: Path, until: Optional[int] = None) -> list[int]:
    """The versions to apply, in order, to bring ``store`` to the directory's current version (or ``until``)."""
    current = read_current(Path(root))
    if current is None:
        return []
    latest, meta = int(current["version"]), store.meta()
    latest = min(latest, until) if until is not None else latest
    have = meta.version if meta is not None and meta.export_id == current["export_id"] else 0
    if meta is not None and meta.export_id != current["export_id"]:
        return [_newest_full(root, latest, 0, store)]  # the store's apply names the mismatch
    if have >= latest:
        return []
    if all(version_dir(root, v).is_dir() for v in range(have + 1, latest + 1)) and have > 0:
        return list(range(have + 1, latest + 1))
    start = _newest_full(root, latest, have, store)
    return list(range(start, latest + 1))


def _newest_full(root: Path, latest: int, above: int, store: ServingStore) -> int:
    for version in range(latest, above, -1):
        try:
            if read_manifest(root, version)["full"]:
                return version
        except IncompleteExportError:
            break
    raise VersionGapError(
        f"{store.name} is at version {above} and {str(root)!r} has no full snapshot after it from which to reach "
        f"version {latest} (versions {above + 1}..{latest} are incomplete or deleted)"
    )


def apply_pending(
    store: ServingStore,
    root: Path,
    on_applied: Optional[Callable[[VersionUpdate], None]] = None,
    until: Optional[int] = None,
) -> list[int]:
    """Applies every pending version (up to ``until``) in order; returns them. Stops at the first error."""
    applied = []
    for version in pending_versions(store, root, until):
        update = load_version(Path(root), version)
        store.apply(update)
        applied.append(version)
        if on_applied is not None:
            on_applied(update)
    return applied


def follow(
    store: ServingStore,
    root: Path,
    poll_seconds: float = 1.0,
    once: bool = False,
    on_applied: Optional[Callable[[VersionUpdate], None]] = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Applies new versions as they appear in ``root`` (every ``poll_seconds``); ``once``: a single pass.
    Returns the store's version at the end."""
    while True:
        apply_pending(store, root, on_applied)
        if once or stop():
            return store.version()
        time.sleep(poll_seconds)
