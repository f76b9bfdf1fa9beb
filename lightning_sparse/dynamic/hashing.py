"""The 64-bit hashes that decide index positions, sketch counters, admission coins and id shards.

Each is defined on unsigned 64-bit integers (splitmix64's finaliser ``mix64``) and implemented three
times with identical results: here on int64 tensors (wrapping two's-complement arithmetic, logical
shifts emulated by masking), here on Python ints (the readable definition the tests use), and in
``cuda_ops/hash_table.cpp`` (whose GPU copy is ``hash_table.cu``). Every use adds its own salt first, so that e.g. the ids routed to one shard
do not all share the low bits that pick their position in that shard's index.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
MIX_M1 = 0xBF58476D1CE4E5B9
MIX_M2 = 0x94D049BB133111EB
GOLDEN = 0x9E3779B97F4A7C15
SALT_INDEX = 0x9E3779B97F4A7C15
SALT_SHARD = 0xD6E8FEB86659FD93
SALT_SKETCH = 0xA0761D6478BD642F
SALT_COIN = 0xE7037ED1A0B428DB
SALT_FALLBACK = 0x8EBC6AF09C88C6E3


def to_signed(x: int) -> int:
    """The int64 with the same bits as the unsigned 64-bit ``x``."""
    x &= MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def mix64_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (taken modulo 2**64); returns an unsigned value."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX_M1) & MASK64
    x = ((x ^ (x >> 27)) * MIX_M2) & MASK64
    return x ^ (x >> 31)


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on the bits of an int64 tensor; the result is int64 bits of the uint64 value."""
    x = (x ^ _lshr(x, 30)) * to_signed(MIX_M1)
    x = (x ^ _lshr(x, 27)) * to_signed(MIX_M2)
    return x ^ _lshr(x, 31)


def index_home(ids: torch.Tensor, mask: int) -> torch.Tensor:
    """Home position of ``ids`` in an open-addressing index of ``mask + 1`` (a power of two) entries."""
    return mix64(ids + to_signed(SALT_INDEX)) & mask


def index_home_int(raw_id: int, mask: int) -> int:
    """Python-int twin of :func:`index_home`."""
    return mix64_int(raw_id + SALT_INDEX) & mask


def sketch_columns(ids: torch.Tensor, depth: int, width: int) -> torch.Tensor:
    """Counter column of each id in each of the ``depth`` sketch rows: shape ``(depth, len(ids))``."""
    rows = [mix64(ids + to_signed(SALT_SKETCH * (r + 1))) & (width - 1) for r in range(depth)]
    return torch.stack(rows) if rows else ids.new_empty((0, ids.numel()))


def coin_key(seed: int) -> int:
    """Per-seed salt of the admission coin, as int64."""
    return to_signed(mix64_int((seed & MASK64) ^ SALT_COIN))


def coin_from_key(ids: torch.Tensor, key: int, step: int) -> torch.Tensor:
    """53-bit uniform integer per id, a pure function of (id, coin key, step)."""
    step_salt = to_signed((step & MASK64) * GOLDEN)
    return _lshr(mix64(mix64(ids + key) ^ step_salt), 11)


def admission_coin(ids: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """The admission coin of ``ids`` at ``step``: admitted when below ``AdmissionConfig.coin_threshold``."""
    return coin_from_key(ids, coin_key(seed), step)


def fallback_rows_of(ids: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """Fallback row of each id: ``offset + hash(id) % rows`` (``-1`` everywhere when ``rows`` is 0)."""
    ids = ids.to(torch.int64)
    if rows <= 0:
        return torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
    return _lshr(mix64(ids + to_signed(SALT_FALLBACK)), 33) % rows + offset


def fallback_row_int(raw_id: int, offset: int, rows: int) -> int:
    """Python-int twin of :func:`fallback_rows_of`."""
    return offset + (mix64_int(raw_id + SALT_FALLBACK) >> 33) % rows if rows > 0 else -1


def shard_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank that owns each raw id: a salted hash modulo ``world_size``.

    Rank ``r`` keeps these ids in its own hash table and lends them slots inside its row-wise block of
    the table, ``shard_rows(capacity, world_size)[r]``, so a remapped slot is always in the rows that
    TorchRec's row-wise sharding places on the rank that owns the raw id.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ids = ids.to(torch.int64)
    return _lshr(mix64(ids + to_signed(SALT_SHARD)), 33) % world_size


def shard_of_int(raw_id: int, world_size: int) -> int:
    """Python-int twin of :func:`shard_of` (for tests and small tools)."""
    return (mix64_int(raw_id + SALT_SHARD) >> 33) % world_size


def shard_rows(capacity: int, world_size: int) -> list[tuple[int, int]]:
    """``(row_offset, rows)`` of each rank's block of a ``capacity``-row table under row-wise sharding.

    Matches TorchRec's row-wise layout (``torchrec.distributed.sharding_plan``): every block has
    ``ceil(capacity / world_size)`` rows except the trailing ones, which may be shorter or empty.
    """
    if capacity < 1 or world_size < 1:
        raise ValueError(f"capacity and world_size must be >= 1, got {capacity} and {world_size}")
    block = -(-capacity // world_size)
    out = []
    for rank in range(world_size):
        start = min(rank * block, capacity)
        out.append((start, min(block, capacity - start)))
    return out
