"""Serving stores: one interface (:class:`ServingStore`), LMDB embedded (default) and Redis."""

from __future__ import annotations

from lightning_sparse.serving.stores.base import (
    ServingStore,
    Snapshot,
    StoreMeta,
    StoreUnavailableError,
    TableUpdate,
    VersionAlreadyAppliedError,
    VersionGapError,
    VersionUpdate,
)
from lightning_sparse.serving.stores.lmdb_store import LMDBStore
from lightning_sparse.serving.stores.redis_store import RedisStore


def open_store(spec: str) -> ServingStore:
    """``lmdb:PATH`` (embedded, created if missing) or ``redis://HOST:PORT[/DB]``."""
    if spec.startswith("lmdb:"):
        return LMDBStore(spec[len("lmdb:") :])
    if spec.startswith("redis://"):
        return RedisStore(spec)
    raise ValueError(f"unknown store {spec!r}: use lmdb:PATH (embedded) or redis://HOST:PORT[/DB]")


__all__ = [
    "LMDBStore",
    "RedisStore",
    "ServingStore",
    "Snapshot",
    "StoreMeta",
    "StoreUnavailableError",
    "TableUpdate",
    "VersionAlreadyAppliedError",
    "VersionGapError",
    "VersionUpdate",
    "open_store",
]
