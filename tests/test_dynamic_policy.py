"""Property-based tests: the dynamic table (native and fallback) against a plain-Python dict model.

``DictModel`` follows the per-batch rules documented in ``lightning_sparse/dynamic/reference.py`` one
id at a time, with Python ints, floats, dicts and lists; it knows nothing about the index or tensors.
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sparse.dynamic import (
    AdmissionConfig,
    DynamicIdRemapper,
    DynamicTableConfig,
    EvictionPolicy,
    ExpiryConfig,
)
from lightning_sparse.dynamic.hashing import GOLDEN, MASK64, SALT_SKETCH, coin_key, fallback_row_int, mix64_int
from lightning_sparse.dynamic.state import Meta
from lightning_sparse.ops import native_op


@dataclass
class Entry:
    id: int
    count: int
    last_step: int
    last_time: float
    score: float


def f32(x: float) -> float:
    """``x`` rounded to float32 (the stored score)."""
    return float(np.float32(x))


class DictModel:
    def __init__(self, config: DynamicTableConfig) -> None:
        self.cfg = config
        self.fallback_rows = config.block_fallback_rows(config.capacity, config.capacity)
        self.capacity = config.capacity - self.fallback_rows  # slots; the fallback rows follow them
        self.by_id: dict[int, int] = {}
        self.slots: dict[int, Entry] = {}
        self.free = list(range(self.capacity - 1, -1, -1))  # stack, top at the end
        adm = config.admission
        self.depth, self.width = adm.resolved_depth(config.eviction), adm.resolved_width(self.capacity)
        self.sketch = [[0] * self.width for _ in range(self.depth)]
        self.adds = 0
        self.halve_every = adm.resolved_halve_every(self.capacity)
        self.powers = []
        value = config.score_decay
        for _ in range(63):
            self.powers.append(value)
            value = value * value
        self.counters = Tally()

    def decay(self, dt: int) -> float:
        out = 1.0
        for bit in range(63):
            if (dt >> bit) == 0:
                break
            if (dt >> bit) & 1:
                out = out * self.powers[bit]
        return out

    def priority(self, slot: int, step: int) -> float:
        e = self.slots[slot]
        if self.cfg.eviction == EvictionPolicy.LFU:
            return float(e.count)
        if self.cfg.eviction == EvictionPolicy.LRU:
            return float(e.last_step)
        if self.cfg.eviction == EvictionPolicy.DISTANCE_LFU:
            return float(e.count) / float(max(step - e.last_step, 0) + 1)
        return e.score * self.decay(max(step - e.last_step, 0))

    def columns(self, raw: int) -> list[int]:
        return [mix64_int(raw + SALT_SKETCH * (r + 1)) & (self.width - 1) for r in range(self.depth)]

    def coin_passes(self, raw: int, step: int) -> bool:
        threshold = self.cfg.admission.coin_threshold()
        if threshold >= 1 << 53:
            return True
        coin = mix64_int(mix64_int(raw + coin_key(self.cfg.admission.seed)) ^ ((step * GOLDEN) & MASK64)) >> 11
        return coin < threshold

    def remap(self, ids: list[int], step: int, now: float) -> tuple[list[int], list[int]]:
        tally = Tally(ids)
        self.counters["lookups"] += len(ids)
        hit_slots = set()
        for raw in sorted(tally):
            if raw in self.by_id:
                s = self.by_id[raw]
                e, c = self.slots[s], tally[raw]
                e.score = f32(e.score * self.decay(max(step - e.last_step, 0)) + float(c))  # stored as float32
                e.count = min(e.count + c, 2**31 - 1)
                e.last_step, e.last_time = step, now
                hit_slots.add(s)
                self.counters["hits"] += c
        misses = [raw for raw in sorted(tally) if raw not in self.by_id]
        for raw in misses:
            for r, col in enumerate(self.columns(raw)):
                self.sketch[r][col] += tally[raw]
            self.adds += tally[raw]
        candidates = []
        for raw in misses:
            # no sketch (depth 0): the id's count in this batch
            est = min((self.sketch[r][col] for r, col in enumerate(self.columns(raw))), default=tally[raw])
            if est >= self.cfg.admission.min_count and self.coin_passes(raw, step):
                prio = float(step) if self.cfg.eviction == EvictionPolicy.LRU else float(est)
                candidates.append((prio, raw, est))
            else:
                self.counters["rejected_admission"] += 1
        if self.adds >= self.halve_every:
            self.sketch = [[v >> 1 for v in row] for row in self.sketch]
            self.adds = 0
            self.counters["sketch_halvings"] += 1
        candidates.sort(key=lambda c: (-c[0], c[1]))
        assigned = []
        queue = list(candidates)
        while queue and self.free:
            assigned.append((self.free.pop(), queue.pop(0)))
        if queue:
            evictable = sorted((self.priority(s, step), s) for s in self.slots if s not in hit_slots)
            for (vprio, victim), cand in zip(evictable, list(queue)):
                if not cand[0] > vprio:
                    break
                del self.by_id[self.slots.pop(victim).id]
                assigned.append((victim, queue.pop(0)))
                self.counters["evicted"] += 1
            self.counters["rejected_full"] += len(queue)
        for slot, (_, raw, est) in assigned:
            self.slots[slot] = Entry(raw, est, step, now, f32(float(est)))
            self.by_id[raw] = slot
        self.counters["admitted"] += len(assigned)
        rows = [self.by_id.get(raw, fallback_row_int(raw, self.capacity, self.fallback_rows)) for raw in ids]
        return rows, [slot for slot, _ in assigned]

    def expire(self, step: int, now: float) -> list[int]:
        exp = self.cfg.expiry
        gone = sorted(
            s
            for s, e in self.slots.items()
            if (exp.ttl_steps is not None and step - e.last_step > exp.ttl_steps)
            or (exp.ttl_seconds is not None and now - e.last_time > exp.ttl_seconds)
        )
        for s in gone:
            del self.by_id[self.slots.pop(s).id]
        self.free.extend(reversed(gone))
        self.counters["expired"] += len(gone)
        return gone


HAVE_NATIVE = native_op("hash_remap") is not None
PATHS = ["fallback"] + (["native"] if HAVE_NATIVE else [])

raw_ids = st.one_of(st.integers(-12, 12), st.sampled_from([-(2**63), 2**63 - 1, 2**40 + 3, -(2**35)]))


@st.composite
def scenarios(draw):
    capacity = draw(st.integers(1, 10))
    config = DynamicTableConfig(
        capacity=capacity,
        fallback_rows=draw(st.sampled_from([0] + ([1, capacity - 1] if capacity > 1 else []))),
        eviction=draw(st.sampled_from(list(EvictionPolicy))),
        score_decay=draw(st.sampled_from([1.0, 0.9, 0.5, 0.01])),
        admission=AdmissionConfig(
            min_count=draw(st.integers(1, 3)),
            probability=draw(st.sampled_from([1.0, 0.7, 0.3])),
            seed=draw(st.integers(0, 3)),
            sketch_depth=draw(st.sampled_from([None, 0, 1, 3])),
            sketch_width=draw(st.sampled_from([1, 2, 8, 64])),
            sketch_halve_every=draw(st.sampled_from([3, 20, 1000])),
        ),
        expiry=ExpiryConfig(
            ttl_steps=draw(st.sampled_from([None, 1, 3])), ttl_seconds=draw(st.sampled_from([None, 0.5, 2.0]))
        ),
    )
    ops = []
    step, now = 0, 0.0
    for _ in range(draw(st.integers(1, 12))):
        step += draw(st.integers(0, 3))
        now += draw(st.sampled_from([0.0, 0.25, 1.0]))
        if draw(st.integers(0, 4)) == 0:
            ops.append(("expire", step, now, None))
        else:
            ops.append(("remap", step, now, draw(st.lists(raw_ids, max_size=25))))
    return config, ops


def model_state(remapper: DynamicIdRemapper) -> dict:
    live = (remapper.slot_count > 0).nonzero().flatten().tolist()
    n_free, capacity = int(remapper.meta[Meta.FREE_COUNT]), remapper.capacity
    if remapper.config.expiry.enabled:
        free = remapper.free_list[:n_free].tolist()
    else:  # no free list is kept: the free slots are the top ones
        assert remapper.free_list.numel() == 0
        free = [capacity - 1 - k for k in range(n_free)]
    has_time, has_score = remapper.slot_last_time.numel() > 0, remapper.slot_score.numel() > 0
    assert has_time == (remapper.config.expiry.ttl_seconds is not None)
    assert has_score == (remapper.config.eviction == EvictionPolicy.FEATURE_SCORE)
    return {
        "slots": {
            s: (
                int(remapper.slot_ids[s]),
                int(remapper.slot_count[s]),
                int(remapper.slot_last_step[s]),
                float(remapper.slot_last_time[s]) if has_time else None,
                float(remapper.slot_score[s]) if has_score else None,
            )
            for s in live
        },
        "free": free,
        "sketch": remapper.sketch.tolist(),
    }


def dict_state(model: DictModel) -> dict:
    time = model.cfg.expiry.ttl_seconds is not None
    score = model.cfg.eviction == EvictionPolicy.FEATURE_SCORE
    return {
        "slots": {
            s: (e.id, e.count, e.last_step, e.last_time if time else None, e.score if score else None)
            for s, e in model.slots.items()
        },
        "free": list(model.free),
        "sketch": model.sketch,
    }


@pytest.mark.parametrize("path", PATHS)
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(scenario=scenarios())
def test_matches_dict_model(path, scenario, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1" if path == "native" else "0")
    config, ops = scenario
    remapper, model = DynamicIdRemapper(config), DictModel(config)
    for kind, step, now, ids in ops:
        if kind == "expire":
            assert remapper.expire(step, now).tolist() == model.expire(step, now)
        else:
            result = remapper.remap(torch.tensor(ids, dtype=torch.int64), step, now)
            slots, assigned = model.remap(ids, step, now)
            assert result.slots.tolist() == slots
            assert result.assigned.tolist() == assigned
        assert model_state(remapper) == dict_state(model)
    metrics = remapper.metrics()
    assert metrics["live"] == len(model.slots)
    for name in ("admitted", "evicted", "expired", "rejected_full", "rejected_admission", "lookups", "hits"):
        assert metrics[name] == model.counters[name], name
    # invariants: every live id is found at its slot, an unknown one reads its fallback row (or -1)
    live_ids = remapper.slot_ids[remapper.slot_count > 0]
    assert torch.equal(remapper.lookup(live_ids), (remapper.slot_count > 0).nonzero().flatten())
    assert len(set(live_ids.tolist())) == live_ids.numel() <= model.capacity
    unknown = [raw for raw in (-(2**62), 2**61 + 5) if raw not in model.by_id]
    expected = [fallback_row_int(raw, model.capacity, model.fallback_rows) for raw in unknown]
    assert remapper.lookup(torch.tensor(unknown, dtype=torch.int64)).tolist() == expected
