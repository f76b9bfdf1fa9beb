"""The embedded store: LMDB, a memory-mapped B+tree in one directory, with nothing to start.

LMDB gives what versioned serving needs: one writer transaction at a time, readers that see a consistent
snapshot (the last committed transaction) without blocking the writer, and a commit that is atomic and
durable (copy-on-write pages, meta page written last), so a process killed mid-apply leaves the previous
version. Keys: ``meta`` and ``dense`` in the ``meta`` database, ``<table>\\0<id as 8 big-endian bytes>`` in
``rows`` (float32 row bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lmdb
import numpy as np

from lightning_sparse.serving.stores.base import (
    ServingStore,
    Snapshot,
    StoreMeta,
    StoreUnavailableError,
    VersionUpdate,
    check_can_apply,
    fault_point,
    patched,
    row_key,
    rows_from,
)

DEFAULT_MAP_SIZE = 1 << 36  # 64 GiB of address space; the file grows with the data


class LMDBStore(ServingStore):
    """Rows in an LMDB environment at ``path`` (a directory, created if missing)."""

    def __init__(self, path: str, map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False) -> None:
        self.path = Path(path)
        self.name = f"LMDB store {str(self.path)!r}"
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=2, readonly=readonly, lock=True)
            self._meta_db = self.env.open_db(b"meta", create=not readonly)
            self._rows_db = self.env.open_db(b"rows", create=not readonly)
        except (lmdb.Error, OSError) as error:
            raise StoreUnavailableError(
                f"cannot open the {self.name}: {error}. Give a directory this process can create and write "
                "(--store lmdb:PATH)"
            ) from error

    def meta(self) -> Optional[StoreMeta]:
        with self.env.begin(db=self._meta_db) as txn:
            data = txn.get(b"meta")
        return StoreMeta.from_json(data) if data is not None else None

    def apply(self, update: VersionUpdate) -> None:
        with self.env.begin(write=True) as txn:  # aborted (nothing written) if anything below raises
            data = txn.get(b"meta", db=self._meta_db)
            check_can_apply(StoreMeta.from_json(data) if data is not None else None, update, self.name)
            if update.full:
                self._clear_tables(txn, list(update.tables))
            for table, change in update.updates.items():
                for raw_id in change.deletes.tolist():
                    txn.delete(row_key(table, raw_id), db=self._rows_db)
                items = [(row_key(table, i), r.tobytes()) for i, r in zip(change.ids.tolist(), change.rows)]
                cursor = txn.cursor(db=self._rows_db)
                cursor.putmulti(items[: len(items) // 2])
                fault_point(update.version)
                cursor.putmulti(items[len(items) // 2 :])
                dim = update.tables[table].dim
                for ids, col, rows in change.patches:
                    for raw_id, piece in zip(ids.tolist(), rows):
                        key = row_key(table, raw_id)
                        txn.put(
                            key,
                            patched(txn.get(key, db=self._rows_db), col, piece, dim, table, raw_id),
                            db=self._rows_db,
                        )
            txn.put(b"dense", update.dense, db=self._meta_db)
            txn.put(b"meta", StoreMeta.of(update).to_json(), db=self._meta_db)

    def _clear_tables(self, txn: lmdb.Transaction, tables: list[str]) -> None:
        cursor = txn.cursor(db=self._rows_db)
        for table in tables:
            prefix = table.encode() + b"\x00"
            if cursor.set_range(prefix):
                while bytes(cursor.key()).startswith(prefix):
                    if not cursor.delete():
                        break

    def lookup(self, ids: dict[str, np.ndarray]) -> Snapshot:
        with self.env.begin() as txn:  # one snapshot for the version and every row
            data = txn.get(b"meta", db=self._meta_db)
            meta = StoreMeta.from_json(data) if data is not None else None
            out = {}
            cursor = txn.cursor(db=self._rows_db)
            for table, wanted in ids.items():
                dim = meta.tables[table].dim if meta is not None and table in meta.tables else 0
                keys = [row_key(table, raw_id) for raw_id in np.asarray(wanted, np.int64).tolist()] if dim else []
                out[table] = rows_from([cursor.get(key) for key in keys] if dim else [None] * len(wanted), dim)
        return Snapshot(meta.version if meta else 0, out)

    def dense(self) -> tuple[int, bytes]:
        with self.env.begin(db=self._meta_db) as txn:
            data, dense = txn.get(b"meta"), txn.get(b"dense")
        if data is None or dense is None:
            raise StoreUnavailableError(
                f"the {self.name} is empty: apply an export first (lightning-sparse serve-apply)"
            )
        return StoreMeta.from_json(data).version, bytes(dense)

    def close(self) -> None:
        self.env.close()
