"""Index states and updates with chosen home positions, for the tests of ``hash_index_update`` (the
cluster-parallel index updates of ``cuda_ops/hash_table_common.h``) on the CPU and on a GPU.

Ids are picked by their home position, so a case can crowd them into a few positions (long probe
clusters) and around the end of the index (clusters that wrap to position 0).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from lightning_sparse.dynamic.hashing import MASK64, MIX_M1, MIX_M2, SALT_INDEX, index_home, to_signed
from lightning_sparse.dynamic.reference import update_index


def _unshift(y: int, s: int) -> int:
    """The x with x ^ (x >> s) == y (64-bit)."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def unmix64(y: int) -> int:
    """Inverse of :func:`hashing.mix64_int` (splitmix64's finaliser is a bijection of 64-bit words)."""
    x = _unshift(y & MASK64, 31)
    x = (x * pow(MIX_M2, -1, 1 << 64)) & MASK64
    x = _unshift(x, 27)
    x = (x * pow(MIX_M1, -1, 1 << 64)) & MASK64
    return _unshift(x, 30)


def ids_with_homes(size: int, homes: list[int]) -> list[int]:
    """Distinct ids, the k-th homed at ``homes[k]`` in an index of ``size`` (a power of two) entries."""
    bits = size.bit_length() - 1
    used: Counter[int] = Counter()
    ids = []
    for home in homes:
        used[home] += 1
        ids.append(to_signed(unmix64((used[home] << bits) | home) - SALT_INDEX))
    return ids


@dataclass
class IndexCase:
    """An index (with its slots' ids) and one update: erase ``erase_slots``, then insert ``insert_ids``."""

    index: torch.Tensor  # int32[H]
    slot_ids: torch.Tensor  # int64[C]
    erase_slots: torch.Tensor  # int64
    insert_ids: torch.Tensor  # int64
    insert_slots: torch.Tensor  # int64

    def to(self, device: str) -> "IndexCase":
        return IndexCase(
            *(t.to(device) for t in (self.index, self.slot_ids, self.erase_slots, self.insert_ids, self.insert_slots))
        )


def build_case(
    size: int, homes: list[int], live: int, history: list[int], erase: list[int], inserts: int, slot_order: list[int]
) -> IndexCase:
    """A case over an index of ``size`` entries and ``size // 2`` slots.

    ``homes[k]``: home of the k-th id used (ids with the same home differ). The first ``live`` ids take
    slots ``slot_order[:live]``, inserted serially; then the entries at ``history`` (positions in that
    list) are erased, so the index shows the traces of earlier backward shifts. The update erases the
    survivors at positions ``erase`` (in that order) and inserts the next ``inserts`` ids into the slots
    freed or never used, in ``slot_order``'s order.
    """
    capacity = size // 2
    ids = ids_with_homes(size, homes)
    index = torch.full((size,), -1, dtype=torch.int32)
    slot_ids = torch.zeros(capacity, dtype=torch.int64)
    first = torch.tensor(slot_order[:live], dtype=torch.int64)
    slot_ids[first] = torch.tensor(ids[:live], dtype=torch.int64)
    update_index(index, slot_ids, first[:0], slot_ids[first], first)
    gone = first[torch.tensor(history, dtype=torch.int64)] if history else first[:0]
    update_index(index, slot_ids, gone, gone[:0], gone[:0])
    gone_set = set(gone.tolist())
    survivors = [s for s in slot_order[:live] if s not in gone_set]
    erase_slots = torch.tensor([survivors[k] for k in erase], dtype=torch.int64)
    held = set(survivors) - set(erase_slots.tolist())
    free = [s for s in slot_order if s not in held]
    insert_slots = torch.tensor(free[:inserts], dtype=torch.int64)
    insert_ids = torch.tensor(ids[live : live + inserts], dtype=torch.int64)
    return IndexCase(index, slot_ids, erase_slots, insert_ids, insert_slots)


@st.composite
def index_cases(draw) -> IndexCase:
    """Indexes of 8 to 256 entries whose ids' homes crowd into a window (possibly one position, possibly
    wrapping past the end), states left by earlier erases, then erases and inserts in random orders."""
    size = 1 << draw(st.integers(3, 8))
    capacity = size // 2
    start, width = draw(st.integers(0, size - 1)), draw(st.integers(1, size))
    homes = [(start + h) % size for h in draw(st.lists(st.integers(0, width - 1), min_size=size, max_size=size))]
    live = draw(st.integers(0, capacity))
    history = draw(st.lists(st.integers(0, max(live - 1, 0)), unique=True, max_size=live)) if live else []
    survivors = live - len(history)
    erase = draw(st.lists(st.integers(0, max(survivors - 1, 0)), unique=True, max_size=survivors)) if survivors else []
    inserts = draw(st.integers(0, capacity - survivors + len(erase)))
    slot_order = draw(st.permutations(range(capacity)))
    return build_case(size, homes, live, history, erase, inserts, list(slot_order))


def serial_result(case: IndexCase) -> torch.Tensor:
    """The index after the serial update (the twin's order)."""
    index = case.index.clone()
    update_index(index, case.slot_ids, case.erase_slots, case.insert_ids, case.insert_slots)
    return index


def cluster_starts(index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The empty position found walking back (cyclically) from each position: its probe cluster's name."""
    size, entries = index.numel(), index.tolist()
    out = []
    for p in positions.tolist():
        while entries[p] >= 0:
            p = (p - 1) % size
        out.append(p)
    return torch.tensor(out, dtype=torch.int64)


def crowded_ids(generator: torch.Generator, n: int, capacity: int, window: float) -> torch.Tensor:
    """``n`` distinct ids whose homes in the index of a ``capacity``-slot table lie within ``window`` (a
    fraction of the index) around its end: long clusters, several wrapping to position 0."""
    from lightning_sparse.dynamic.state import index_size

    size = index_size(capacity)
    reach = max(1, int(window * size / 2))
    found = torch.zeros(0, dtype=torch.int64)
    while found.numel() < n:
        ids = torch.randint(-(1 << 62), 1 << 62, (64 * n,), generator=generator)
        home = index_home(ids, size - 1)
        found = torch.cat([found, ids[(home < reach) | (home >= size - reach)]]).unique()
    return found[torch.randperm(found.numel(), generator=generator)[:n]]


def crowded_batches(seed: int, capacity: int, steps: int, batch: int, window: float = 0.25) -> list[torch.Tensor]:
    """Batches of crowded ids (:func:`crowded_ids`) whose popular ones move from step to step, so a
    table of ``capacity`` slots admits, evicts and expires ids inside long and wrapping clusters."""
    g = torch.Generator().manual_seed(seed)
    pool = crowded_ids(g, 3 * capacity, capacity, window=window)
    out = []
    for step in range(steps):
        rank = (torch.rand(batch, generator=g) ** 3 * pool.numel()).long()
        out.append(pool[(rank + step * capacity // 2) % pool.numel()])
    return out
