"""Real-time serving from a training run: delta exports, serving stores (LMDB, Redis), a predictor.

- :class:`DeltaExport` (a Lightning callback) writes the rows changed since the last export, by raw id, with
  tombstones, as versioned Parquet files next to the dense model (:mod:`.format` documents the layout).
- :func:`open_store` opens an LMDB (embedded) or Redis store; :func:`apply_pending` / :func:`follow` apply
  the versions of an export directory to it in order, each in one transaction (``lightning-sparse serve-apply``).
- :class:`Predictor` scores batches from a store and picks up new versions as they are applied.
"""

from lightning_sparse.serving.apply import apply_pending, follow, load_version
from lightning_sparse.serving.export import DeltaExport
from lightning_sparse.serving.format import (
    CorruptExportError,
    ExportError,
    IncompleteExportError,
    SchemaMismatchError,
)
from lightning_sparse.serving.predictor import Predictor
from lightning_sparse.serving.stores import (
    LMDBStore,
    RedisStore,
    ServingStore,
    StoreUnavailableError,
    VersionAlreadyAppliedError,
    VersionGapError,
    open_store,
)

__all__ = [
    "CorruptExportError",
    "DeltaExport",
    "ExportError",
    "IncompleteExportError",
    "LMDBStore",
    "Predictor",
    "RedisStore",
    "SchemaMismatchError",
    "ServingStore",
    "StoreUnavailableError",
    "VersionAlreadyAppliedError",
    "VersionGapError",
    "apply_pending",
    "follow",
    "load_version",
    "open_store",
]
