"""Dynamic (hash-backed) embedding tables: raw int64 ids -> rows of a fixed-capacity table.

Admission (count-min frequency + deterministic coin), expiry (TTL in steps or seconds) and eviction
(LFU, LRU, Kraken-style decayed score) run in native kernels (``cuda_ops/hash_table.cpp``, and
``hash_table.cu`` for state on a GPU) or their pure-PyTorch twins (``reference.py``), with identical results
and exactly checkpointable state.
"""

from lightning_sparse.dynamic.config import (
    AdmissionConfig,
    DynamicTableConfig,
    EvictionPolicy,
    ExpiryConfig,
    HashPlacement,
    RowInit,
    RowInitConfig,
)
from lightning_sparse.dynamic.hashing import shard_of, shard_rows
from lightning_sparse.dynamic.kjt import remap_kjt
from lightning_sparse.dynamic.table import DynamicIdRemapper, RemapResult

__all__ = [
    "AdmissionConfig",
    "DynamicIdRemapper",
    "DynamicTableConfig",
    "EvictionPolicy",
    "ExpiryConfig",
    "HashPlacement",
    "RemapResult",
    "RowInit",
    "RowInitConfig",
    "remap_kjt",
    "shard_of",
    "shard_rows",
]
