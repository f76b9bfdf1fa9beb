"""Pure-PyTorch twins of the hash-table kernels in ``cuda_ops/hash_table.cpp``, with identical results.

The policy is defined per batch (one remap call), not per id occurrence, which is what lets the native
kernel run its lookups and counter updates in parallel and still be deterministic:

1. Occurrences are grouped by distinct id. An id that has a slot (a hit) adds its batch count ``c`` to
   ``slot_count`` (saturating at ``2**31 - 1``), its score becomes ``score * decay**(step - last_step) + c``
   (computed in float64, stored rounded to float32), its stamps become (step, now). Tensors the policy
   does not keep (empty ones, see ``state.TableTensors``) are neither read nor written.
2. Each distinct unadmitted id adds ``c`` to its count-min sketch counters; its estimate ``f`` (min over
   rows, after this batch's additions; ``c`` itself when the sketch has no rows) must reach ``min_count``
   and its admission coin
   ``hash(id, seed, step)`` must pass. Then, if ``sketch_adds >= halve_every``, all counters are halved
   and ``sketch_adds`` reset to 0.
3. Eligible ids are ordered by priority descending, then id ascending. Their priority is ``f`` (LFU,
   FEATURE_SCORE, DISTANCE_LFU) or ``step`` (LRU). They take free slots first, popped from the free stack: slot 0, 1,
   ... on an empty table; a sweep pushes its expired slots so that they pop lowest first, before any
   slot freed earlier.
4. The remaining eligible ids compete with the evictable slots (live, not hit nor assigned in this
   batch), ordered by priority ascending then slot ascending. Slot priority: ``slot_count`` (LFU),
   ``slot_last_step`` (LRU), ``score * decay**(step - last_step)`` (FEATURE_SCORE),
   ``count / (step - last_step + 1)`` (DISTANCE_LFU, one float64 division). The i-th remaining
   id evicts the i-th victim iff its priority is strictly greater; the first failure ends the pairing
   and every later one is rejected-when-full.
5. A new slot starts with ``count = f``, ``score = f``, stamps (step, now). Index updates: victims are
   erased in victim order, then new ids inserted in assignment order.

Decay powers multiply the bit table of :func:`state.decay_powers` in ascending bit order, and the score
update is one multiply then one add, so the float64 results are bit-identical to the C++.
"""

from __future__ import annotations

import torch

from lightning_sparse.dynamic.hashing import (
    coin_from_key,
    fallback_rows_of,
    index_home,
    index_home_int,
    sketch_columns,
)
from lightning_sparse.dynamic.state import MAX_COUNT, Counter, Meta, RemapParams, TableTensors

LFU, LRU, FEATURE_SCORE, DISTANCE_LFU = 0, 1, 2, 3


def decay_pow(dt: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """``decay ** dt`` for int64 ``dt >= 0`` as a product of ``powers`` at the set bits, ascending."""
    out = torch.ones(dt.shape, dtype=torch.float64)
    if dt.numel() == 0:
        return out
    top = int(dt.max())
    bit = 0
    while bit < 63 and (top >> bit) > 0:
        on = ((dt >> bit) & 1).bool()
        out = torch.where(on, out * powers[bit], out)
        bit += 1
    return out


def lookup_local(keys: torch.Tensor, t: TableTensors) -> torch.Tensor:
    """Local slot of each id (int64), -1 when it has none: all probes of all ids advance together."""
    mask = t.index.numel() - 1
    result = torch.full(keys.shape, -1, dtype=torch.int64)
    active = torch.arange(keys.numel())
    pos = index_home(keys, mask)
    while active.numel():
        entry = t.index[pos].to(torch.int64)
        empty = entry < 0
        match = ~empty & (t.slot_ids[entry.clamp_min(0)] == keys[active])
        result[active[match]] = entry[match]
        more = ~empty & ~match
        active, pos = active[more], (pos[more] + 1) & mask
    return result


def _index_insert(index, slot_ids, key: int, slot: int, home: int, mask: int) -> None:
    pos = home
    while index[pos] >= 0:
        pos = (pos + 1) & mask
    index[pos] = slot


def _index_erase(index, slot_ids, homes_of, key: int, home: int, mask: int) -> None:
    """Linear-probing delete with backward shift (no tombstones), as in the C++."""
    pos = home
    while slot_ids[index[pos]] != key:
        pos = (pos + 1) & mask
    hole, probe = pos, pos
    while True:
        probe = (probe + 1) & mask
        entry = index[probe]
        if entry < 0:
            break
        want = homes_of(int(slot_ids[entry]))
        # the entry stays when its home lies cyclically in (hole, probe]
        stays = (hole < want <= probe) if hole <= probe else (want > hole or want <= probe)
        if not stays:
            index[hole] = entry
            hole = probe
    index[hole] = -1


def update_index(
    index: torch.Tensor,
    slot_ids: torch.Tensor,
    erase_slots: torch.Tensor,
    insert_ids: torch.Tensor,
    insert_slots: torch.Tensor,
) -> None:
    """Twin of ``hash_index_update``, serially: erases the entries of ``erase_slots`` (whose ``slot_ids``
    still hold their ids) in order, then indexes ``insert_ids[j] -> insert_slots[j]`` in order.

    These are the index mutations of a remap (victims, then the admitted ids in assignment order) and of
    a sweep (expired slots, nothing inserted); the native kernels run them by independent probe
    clusters with the same result.
    """
    mask = index.numel() - 1
    index_np, slot_ids_np = index.numpy(), slot_ids.numpy()

    def home_of(key: int) -> int:
        return index_home_int(key, mask)

    erase_ids = slot_ids[erase_slots.to(torch.int64)]
    for key, home in zip(erase_ids.tolist(), index_home(erase_ids, mask).tolist()):
        _index_erase(index_np, slot_ids_np, home_of, key, home, mask)
    insert_ids = insert_ids.to(torch.int64)
    for key, slot, home in zip(insert_ids.tolist(), insert_slots.tolist(), index_home(insert_ids, mask).tolist()):
        _index_insert(index_np, slot_ids_np, key, slot, home, mask)


def _clear_slots(t: TableTensors, slots: torch.Tensor) -> None:
    for tensor in (t.slot_ids, t.slot_count, t.slot_last_step, t.slot_last_time, t.slot_score):
        if tensor.numel():
            tensor[slots] = 0


def slot_priority(t: TableTensors, slots: torch.Tensor, policy: int, step: int, powers: torch.Tensor) -> torch.Tensor:
    """Eviction priority (float64) of live ``slots`` at ``step``: the lowest is evicted first."""
    if policy == LFU:
        return t.slot_count[slots].to(torch.float64)
    if policy == LRU:
        return t.slot_last_step[slots].to(torch.float64)
    dt = (step - t.slot_last_step[slots].to(torch.int64)).clamp_min(0)
    if policy == DISTANCE_LFU:
        return t.slot_count[slots].to(torch.float64) / (dt + 1).to(torch.float64)
    return t.slot_score[slots].to(torch.float64) * decay_pow(dt, powers)


def remap(
    ids: torch.Tensor, t: TableTensors, powers: torch.Tensor, step: int, now: float, p: RemapParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``hash_remap``: returns (slots of ``ids`` + offset, slots assigned in this call).

    An id left without a slot gets its fallback row (``p.fallback_rows > 0``) or -1."""
    flat = ids.reshape(-1).to(torch.int64)
    capacity = t.slot_ids.numel()
    if p.policy == FEATURE_SCORE and t.slot_score.numel() != capacity:
        raise RuntimeError("hash_remap: policy feature_score needs slot_score with one entry per slot")
    uniq, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    slot = lookup_local(uniq, t)
    hit = slot >= 0
    t.counters[Counter.LOOKUPS] += flat.numel()

    # 1. hits
    hs, hc = slot[hit], counts[hit]
    if hs.numel():
        if t.slot_score.numel():
            dt = (step - t.slot_last_step[hs].to(torch.int64)).clamp_min(0)
            decayed = t.slot_score[hs].to(torch.float64) * decay_pow(dt, powers)
            t.slot_score[hs] = (decayed + hc.to(torch.float64)).to(torch.float32)
        t.slot_count[hs] = (t.slot_count[hs].to(torch.int64) + hc).clamp_max(MAX_COUNT).to(torch.int32)
        t.slot_last_step[hs] = step
        if t.slot_last_time.numel():
            t.slot_last_time[hs] = now
        t.counters[Counter.HITS] += hc.sum()

    # 2. admission of misses
    miss_ids, miss_counts = uniq[~hit], counts[~hit]
    depth, width = t.sketch.shape
    columns = sketch_columns(miss_ids, depth, width)
    for row in range(depth):
        t.sketch[row].index_add_(0, columns[row], miss_counts.to(torch.int32))
    if depth == 0:
        estimate = miss_counts.clone()
    elif miss_ids.numel():
        estimate = torch.stack([t.sketch[row][columns[row]] for row in range(depth)]).amin(0).to(torch.int64)
    else:
        estimate = torch.zeros(0, dtype=torch.int64)
    t.meta[Meta.SKETCH_ADDS] += miss_counts.sum()
    eligible = estimate >= p.min_count
    if p.coin_threshold < (1 << 53):
        eligible &= coin_from_key(miss_ids, p.coin_key, step) < p.coin_threshold
    t.counters[Counter.REJECTED_ADMISSION] += (~eligible).sum()
    if int(t.meta[Meta.SKETCH_ADDS]) >= p.halve_every:
        t.sketch.bitwise_right_shift_(1)
        t.meta[Meta.SKETCH_ADDS] = 0
        t.counters[Counter.SKETCH_HALVINGS] += 1

    # 3. order the eligible ids, hand out free slots
    cand, cand_f = miss_ids[eligible], estimate[eligible]
    if p.policy == LRU:
        cand_prio = torch.full(cand.shape, float(step), dtype=torch.float64)
    else:
        cand_prio = cand_f.to(torch.float64)
    order = torch.sort(cand_prio, descending=True, stable=True).indices  # ties keep id-ascending order
    cand, cand_f, cand_prio = cand[order], cand_f[order], cand_prio[order]
    free = int(t.meta[Meta.FREE_COUNT])
    n_free = min(free, cand.numel())
    if t.free_list.numel():
        free_slots = t.free_list[free - n_free : free].flip(0).to(torch.int64)
    else:  # no expiry: the free slots are the top `free` ones, popped lowest first
        free_slots = torch.arange(capacity - free, capacity - free + n_free, dtype=torch.int64)
    t.meta[Meta.FREE_COUNT] = free - n_free

    # 4. compete for the slots of evictable ids
    victims = torch.zeros(0, dtype=torch.int64)
    rest = cand.numel() - n_free
    if rest > 0:
        touched = torch.zeros(capacity, dtype=torch.bool)
        touched[hs] = True
        evictable = ((t.slot_count > 0) & ~touched).nonzero().flatten()
        vprio = slot_priority(t, evictable, p.policy, step, powers)
        vorder = torch.sort(vprio, stable=True).indices[:rest]  # ties keep slot-ascending order
        k = vorder.numel()
        wins = int((cand_prio[n_free : n_free + k] > vprio[vorder]).sum())  # wins form a prefix
        victims = evictable[vorder[:wins]]
        t.counters[Counter.EVICTED] += wins
        t.counters[Counter.REJECTED_FULL] += rest - wins

    # 5. index updates (victims erased, then the new ids inserted), then the new ids' slots written
    assigned = torch.cat([free_slots, victims])
    new_ids, new_f = cand[: assigned.numel()], cand_f[: assigned.numel()]
    update_index(t.index, t.slot_ids, victims, new_ids, assigned)
    _clear_slots(t, victims)
    t.slot_ids[assigned] = new_ids
    t.slot_count[assigned] = new_f.to(torch.int32)
    t.slot_last_step[assigned] = step
    if t.slot_last_time.numel():
        t.slot_last_time[assigned] = now
    if t.slot_score.numel():
        t.slot_score[assigned] = new_f.to(torch.float32)
    t.counters[Counter.ADMITTED] += assigned.numel()

    slot[~hit] = lookup_local(miss_ids, t)
    rows = torch.where(slot >= 0, slot + p.slot_offset, fallback_rows_of(uniq, p.fallback_offset, p.fallback_rows))
    return rows[inverse].reshape(ids.shape), assigned + p.slot_offset


def lookup(
    ids: torch.Tensor, t: TableTensors, slot_offset: int, fallback_offset: int = 0, fallback_rows: int = 0
) -> torch.Tensor:
    """Twin of ``hash_lookup``: read-only remap (no admission, no counters); unknown ids get their
    fallback row, or -1 when ``fallback_rows`` is 0."""
    flat = ids.reshape(-1).to(torch.int64)
    slot = lookup_local(flat, t)
    rows = torch.where(slot >= 0, slot + slot_offset, fallback_rows_of(flat, fallback_offset, fallback_rows))
    return rows.reshape(ids.shape)


def expire(t: TableTensors, step: int, now: float, ttl_steps: int, ttl_seconds: float) -> torch.Tensor:
    """Twin of ``hash_expire``: frees live slots idle longer than a TTL (``<= 0`` disables it).

    Expired ids are erased from the index in ascending slot order; their slots are pushed on the free
    stack in descending order, so the next admissions reuse the lowest first. Returns the slots (local,
    ascending).
    """
    check_expire(t, ttl_steps, ttl_seconds)
    quiet = torch.zeros(t.slot_count.shape, dtype=torch.bool)
    if ttl_steps > 0:
        quiet |= (step - t.slot_last_step.to(torch.int64)) > ttl_steps
    if ttl_seconds > 0:
        quiet |= (now - t.slot_last_time) > ttl_seconds
    slots = ((t.slot_count > 0) & quiet).nonzero().flatten()
    update_index(t.index, t.slot_ids, slots, slots[:0], slots[:0])
    _clear_slots(t, slots)
    free = int(t.meta[Meta.FREE_COUNT])
    t.free_list[free : free + slots.numel()] = slots.flip(0).to(torch.int32)
    t.meta[Meta.FREE_COUNT] = free + slots.numel()
    t.meta[Meta.LAST_SWEEP_STEP] = step
    t.counters[Counter.EXPIRED] += slots.numel()
    return slots


def check_expire(t: TableTensors, ttl_steps: int, ttl_seconds: float) -> None:
    """A sweep needs the free list (kept only with expiry) and, for a TTL in seconds, the wall-clock stamps."""
    if (ttl_steps > 0 or ttl_seconds > 0) and t.free_list.numel() == 0:
        raise RuntimeError(
            "hash_expire: this table keeps no free list (its config has no expiry); set expiry.ttl_steps or ttl_seconds"
        )
    if ttl_seconds > 0 and t.slot_last_time.numel() == 0:
        raise RuntimeError("hash_expire: this table keeps no wall-clock stamps (its config has no expiry.ttl_seconds)")
