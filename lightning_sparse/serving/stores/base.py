"""The serving-store interface: versions applied whole and in order, batch lookups by raw id at one version.

A store holds, per table, one float32 row per raw id, plus the dense model and a small record of what it
holds (:class:`StoreMeta`: version, export id, tables). Both backends apply a version in one transaction,
so a reader sees the old version or the new one, never a mix, and every lookup returns the version its rows
belong to. :func:`check_can_apply` is the one place the order rules live:

- an empty store takes only a full snapshot;
- a delta applies only on top of the version before it (a gap is an error naming the missing versions);
- a full snapshot replaces everything, so it applies on top of any older version;
- a version of another export directory (another export id) or with other tables or widths is refused.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lightning_sparse.serving.format import ExportError, SchemaMismatchError, TableSchema


class StoreUnavailableError(ConnectionError):
    """The store cannot be reached or opened (Redis server down, LMDB path not writable)."""


class VersionGapError(ExportError):
    """Applying this version would skip versions (or start an empty store from a delta)."""


class VersionAlreadyAppliedError(ExportError):
    """The store already holds this version or a newer one."""


@dataclass
class TableUpdate:
    """One table's part of a version: whole rows, pieces of rows (column-wise shards), deleted ids."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    patches: list[tuple[np.ndarray, int, np.ndarray]] = field(default_factory=list)  # (ids, first column, rows)
    deletes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class VersionUpdate:
    """Everything a store writes for one version, read and verified before any write starts."""

    version: int
    step: int
    full: bool
    export_id: str
    time: float
    tables: dict[str, TableSchema]
    dense: bytes
    updates: dict[str, TableUpdate]


@dataclass
class StoreMeta:
    version: int
    step: int
    export_id: str
    time: float
    tables: dict[str, TableSchema]

    def to_json(self) -> bytes:
        tables = {n: {"dim": t.dim, "dynamic": t.dynamic} for n, t in self.tables.items()}
        return json.dumps({**self.__dict__, "tables": tables}, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes | str) -> "StoreMeta":
        raw = json.loads(data)
        raw["tables"] = {n: TableSchema(int(t["dim"]), bool(t["dynamic"])) for n, t in raw["tables"].items()}
        return StoreMeta(**raw)

    @staticmethod
    def of(update: VersionUpdate) -> "StoreMeta":
        return StoreMeta(update.version, update.step, update.export_id, update.time, dict(update.tables))


@dataclass
class Snapshot:
    """Rows read at one version: per table, float32 rows [n, dim] (zeros where missing) and a found mask."""

    version: int
    rows: dict[str, tuple[np.ndarray, np.ndarray]]


def check_can_apply(meta: Optional[StoreMeta], update: VersionUpdate, store: str) -> None:
    """Raises when ``update`` must not be applied on top of what the store holds (see the module docstring)."""
    if meta is None:
        if not update.full:
            raise VersionGapError(
                f"{store} is empty and version {update.version} is a delta: an empty store starts from a full "
                "snapshot (serve-apply picks the newest one)"
            )
        return
    if meta.tables != update.tables:
        raise SchemaMismatchError(f"{store}: {schema_difference(meta.tables, update.tables, update.version)}")
    if meta.export_id != update.export_id:
        raise ExportError(
            f"{store} holds versions of export {meta.export_id!r} (up to {meta.version}); version {update.version} "
            f"belongs to export {update.export_id!r}. Use a fresh store for another export directory."
        )
    if update.version <= meta.version:
        raise VersionAlreadyAppliedError(
            f"{store} is at version {meta.version}; version {update.version} is already applied"
        )
    if not update.full and update.version != meta.version + 1:
        raise VersionGapError(
            f"{store} is at version {meta.version}; applying delta {update.version} would skip versions "
            f"{meta.version + 1}..{update.version - 1}. Apply them first, or a newer full snapshot."
        )


def schema_difference(have: dict[str, TableSchema], new: dict[str, TableSchema], version: int) -> str:
    problems = []
    for name in sorted(set(have) | set(new)):
        if name not in new:
            problems.append(f"table {name!r} is missing from version {version}")
        elif name not in have:
            problems.append(f"version {version} has table {name!r}, which the store does not")
        elif have[name].dim != new[name].dim:
            problems.append(
                f"table {name!r} has width {new[name].dim} in version {version}, {have[name].dim} in the store"
            )
        elif have[name].dynamic != new[name].dynamic:
            problems.append(
                f"table {name!r} is {'dynamic' if new[name].dynamic else 'static'} in version {version} but not in the store"
            )
    return "schema mismatch (another model's export?): " + "; ".join(problems)


def patched(existing: Optional[bytes], col: int, piece: np.ndarray, dim: int, table: str, raw_id: int) -> bytes:
    """A stored row with columns ``[col, col + len(piece))`` replaced (a column-wise shard's piece)."""
    if existing is None:
        raise ExportError(
            f"table {table!r} id {raw_id}: the version has only columns {col}..{col + len(piece) - 1} of a row the "
            "store does not hold (corrupt or out-of-order export)"
        )
    row = np.frombuffer(existing, np.float32).copy()
    row[col : col + len(piece)] = piece
    return row.tobytes()


class ServingStore(ABC):
    """A key-value store of embedding rows by raw id, versioned as a whole. See the module docstring."""

    name: str

    @abstractmethod
    def meta(self) -> Optional[StoreMeta]:
        """What the store holds now, or None when it is empty."""

    @abstractmethod
    def apply(self, update: VersionUpdate) -> None:
        """Applies one version in one transaction, after :func:`check_can_apply` inside it."""

    @abstractmethod
    def lookup(self, ids: dict[str, np.ndarray]) -> Snapshot:
        """Rows of the given raw ids per table, all read at one version (one read transaction)."""

    @abstractmethod
    def dense(self) -> tuple[int, bytes]:
        """The dense model's bytes and the version they belong to (read together)."""

    def version(self) -> int:
        meta = self.meta()
        return meta.version if meta else 0

    def close(self) -> None:  # noqa: B027 - a no-op default: a store without a connection has nothing to close
        pass

    def __enter__(self) -> "ServingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rows_from(values: list, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, dim] float32 with zeros where missing, found mask) from the stored bytes (None: missing)."""
    found = np.fromiter((v is not None for v in values), bool, len(values))
    rows = np.zeros((len(values), dim), np.float32)
    if dim and found.any():
        rows[found] = np.frombuffer(b"".join(v for v in values if v is not None), np.float32).reshape(-1, dim)
    return rows, found


def row_key(table: str, raw_id: int) -> bytes:
    """LMDB key of a row; Redis keeps one hash per table keyed by the 8-byte id."""
    return table.encode() + b"\x00" + id_bytes(raw_id)


def id_bytes(raw_id: int) -> bytes:
    return int(raw_id).to_bytes(8, "big", signed=True)


FAULT_ENV = "LIGHTNING_SPARSE_FAULT_KILL_AT_APPLY"


def fault_point(version: int) -> None:
    """Crash tests: ``LIGHTNING_SPARSE_FAULT_KILL_AT_APPLY=<version>`` SIGKILLs the applying process halfway
    through that version's writes, inside the transaction (before it commits)."""
    import os
    import signal

    if os.environ.get(FAULT_ENV) == str(version):
        os.kill(os.getpid(), signal.SIGKILL)
