"""The server store: Redis. Each table is one hash (field: the raw id as 8 big-endian bytes, value: float32
row bytes) under a key prefix; ``<prefix>:meta`` and ``<prefix>:dense`` hold the version record and the
dense model.

A version is applied as one ``MULTI``/``EXEC`` transaction under ``WATCH <prefix>:meta``: Redis runs the
queued commands as one unit, so no client sees part of them, and a client that dies before ``EXEC`` leaves
nothing (redis-py sends the queued commands only at ``EXEC``). A lookup reads the version and every row in
one ``MULTI``/``EXEC`` too, so it sees one version. Two appliers at once: the second's ``EXEC`` fails on
the watched key and it re-checks the order rules.
"""

from __future__ import annotations

from typing import Optional, cast
from urllib.parse import urlparse

import numpy as np
import redis

from lightning_sparse.serving.stores.base import (
    ServingStore,
    Snapshot,
    StoreMeta,
    StoreUnavailableError,
    VersionUpdate,
    check_can_apply,
    fault_point,
    id_bytes,
    patched,
    rows_from,
)

_CHUNK = 10_000  # fields per HSET / HDEL command inside the transaction


class RedisStore(ServingStore):
    """Rows in the Redis server at ``url`` (``redis://HOST:PORT[/DB]``), under ``prefix``."""

    def __init__(self, url: str, prefix: str = "lightning_sparse", timeout: float = 5.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "redis" or not parsed.hostname:
            raise ValueError(f"a Redis store is given as redis://HOST:PORT[/DB], got {url!r}")
        self.url, self.prefix = url, prefix
        self.name = f"Redis store {url} (prefix {prefix!r})"
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            self.client.ping()
        except redis.RedisError as error:
            raise StoreUnavailableError(
                f"cannot reach the {self.name}: {error}. Start redis-server there, or fix --store"
            ) from error
        self._meta_key, self._dense_key = f"{prefix}:meta", f"{prefix}:dense"

    def _rows_key(self, table: str) -> str:
        return f"{self.prefix}:rows:{table}"

    def _call(self, what: str, fn):  # wraps any client call
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailableError(
                f"lost the {self.name} while {what}: {error}; nothing half-applied stays"
            ) from error

    def meta(self) -> Optional[StoreMeta]:
        data = self._call("reading its version", lambda: self.client.get(self._meta_key))
        return StoreMeta.from_json(data) if data is not None else None

    def apply(self, update: VersionUpdate) -> None:
        self._call(
            f"applying version {update.version}",
            lambda: self.client.transaction(lambda pipe: self._apply(pipe, update), self._meta_key),
        )

    def _apply(self, pipe: "redis.client.Pipeline", update: VersionUpdate) -> None:
        data = pipe.get(self._meta_key)  # immediate mode: the key is watched
        check_can_apply(StoreMeta.from_json(data) if data is not None else None, update, self.name)
        patches: dict[tuple[str, int], bytes] = {}
        for table, change in update.updates.items():  # read what column pieces patch, before MULTI
            dim = update.tables[table].dim
            for ids, col, rows in change.patches:
                # bytes, as the client does not decode responses (redis-py's types also allow str)
                current = cast(
                    "list[Optional[bytes]]",
                    pipe.hmget(self._rows_key(table), [id_bytes(i) for i in ids.tolist()]) if len(ids) else [],
                )
                for raw_id, piece, existing in zip(ids.tolist(), rows, current):
                    existing = patches.get((table, raw_id), existing)
                    patches[(table, raw_id)] = patched(existing, col, piece, dim, table, raw_id)
        pipe.multi()
        if update.full:
            pipe.delete(*[self._rows_key(t) for t in update.tables])
        for table, change in update.updates.items():
            key = self._rows_key(table)
            deletes = [id_bytes(i) for i in change.deletes.tolist()]
            for start in range(0, len(deletes), _CHUNK):
                pipe.hdel(key, *deletes[start : start + _CHUNK])
            fields = {id_bytes(i): r.tobytes() for i, r in zip(change.ids.tolist(), change.rows)}
            fields.update({id_bytes(i): row for (t, i), row in patches.items() if t == table})
            items = list(fields.items())
            for start in range(0, len(items), _CHUNK):
                pipe.hset(key, mapping=dict(items[start : start + _CHUNK]))
                if start <= len(items) // 2 < start + _CHUNK:
                    fault_point(update.version)
        pipe.set(self._dense_key, update.dense)
        pipe.set(self._meta_key, StoreMeta.of(update).to_json())

    def lookup(self, ids: dict[str, np.ndarray]) -> Snapshot:
        tables = list(ids)
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self._meta_key)
        for table in tables:
            fields = [id_bytes(i) for i in np.asarray(ids[table], np.int64).tolist()]
            if fields:
                pipe.hmget(self._rows_key(table), fields)
        replies = self._call("looking rows up", pipe.execute)
        meta = StoreMeta.from_json(replies[0]) if replies[0] is not None else None
        out, reply = {}, iter(replies[1:])
        for table in tables:
            wanted = ids[table]
            dim = meta.tables[table].dim if meta is not None and table in meta.tables else 0
            values = next(reply) if len(wanted) else []
            out[table] = rows_from(list(values) if dim else [None] * len(wanted), dim)
        return Snapshot(meta.version if meta else 0, out)

    def dense(self) -> tuple[int, bytes]:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self._meta_key)
        pipe.get(self._dense_key)
        data, dense = self._call("reading the dense model", pipe.execute)
        if data is None:
            raise StoreUnavailableError(
                f"the {self.name} is empty: apply an export first (lightning-sparse serve-apply)"
            )
        return StoreMeta.from_json(data).version, dense

    def close(self) -> None:
        self.client.close()
