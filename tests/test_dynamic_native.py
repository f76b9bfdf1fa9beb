"""The native hash-table kernels against their pure-PyTorch twins: bit-identical outputs and state.

Batches and tables are large enough that the kernels' parallel loops really run on several threads.
"""

import pytest
import torch
from conftest import skewed_ids

from lightning_sparse.dynamic import (
    AdmissionConfig,
    DynamicIdRemapper,
    DynamicTableConfig,
    EvictionPolicy,
    ExpiryConfig,
)
from lightning_sparse.ops import native_op

pytestmark = pytest.mark.skipif(native_op("hash_remap") is None, reason="native extension not built")


def run(config, batches, native: bool, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1" if native else "0")
    remapper = DynamicIdRemapper(config)
    outputs = []
    for step, ids in enumerate(batches):
        result = remapper.remap(ids, step, now=0.5 * step)
        outputs += [result.slots, result.assigned, remapper.lookup(ids[:1000])]
        if step % 2 == 1:
            outputs.append(remapper.expire(step, now=0.5 * step))
    return remapper, outputs


def remap_on_both_paths(config, steps, monkeypatch, prepare=None) -> dict:
    """Runs ``steps`` ((ids, step) pairs) through a fresh remapper on the native and on the fallback path
    (``prepare(remapper)`` first, if given), asserts identical slots, assigned rows, state and counters,
    and returns the counters."""
    runs = []
    for native in (True, False):
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1" if native else "0")
        remapper = DynamicIdRemapper(config)
        if prepare is not None:
            prepare(remapper)
        out = [remapper.remap(batch, step, float(step)) for batch, step in steps]
        runs.append((remapper.state_dict(), out, remapper.metrics()))
    (sn, on, mn), (sf, of, mf) = runs
    assert mn == mf
    assert all(torch.equal(a.slots, b.slots) and torch.equal(a.assigned, b.assigned) for a, b in zip(on, of))
    assert all(torch.equal(sn[k], sf[k]) for k in sn)
    return mn


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_native_equals_fallback_large(policy, monkeypatch):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(7)
    batches = [skewed_ids(g, 50_000, 400_000, shift=20_000 * b) for b in range(4)]
    config = DynamicTableConfig(
        capacity=66_000,
        eviction=policy,
        score_decay=0.8,
        admission=AdmissionConfig(min_count=1, probability=0.9, seed=3, sketch_halve_every=150_000),
        expiry=ExpiryConfig(ttl_steps=1, ttl_seconds=0.75),
        fallback_rows=66_000 // 16,
    )
    native, out_n = run(config, batches, True, monkeypatch)
    fallback, out_f = run(config, batches, False, monkeypatch)
    assert len(out_n) == len(out_f)
    for a, b in zip(out_n, out_f):
        assert torch.equal(a, b)
    state_n, state_f = native.state_dict(), fallback.state_dict()
    assert state_n.keys() == state_f.keys()
    for key in state_n:
        assert torch.equal(state_n[key], state_f[key]), key
    rows = torch.cat(out_n)
    assert native.fallback_rows == 66_000 // 16 and bool((rows >= native.capacity).any())  # fallback rows read too
    metrics = native.metrics()
    assert metrics == fallback.metrics()
    assert metrics["evicted"] > 0 and metrics["rejected_admission"] > 0  # the test exercised churn
    assert metrics["expired"] > 0 or policy == EvictionPolicy.LRU  # LRU evicts the idle ids before they expire


def test_native_rejects_bad_state(monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1")
    remapper = DynamicIdRemapper(DynamicTableConfig(capacity=8, eviction="feature_score"))
    remapper.slot_score = remapper.slot_score.double()  # a float64 score buffer must be refused, not misread
    with pytest.raises(RuntimeError, match="slot_score"):
        remapper.remap(torch.tensor([1, 2]), 0, 0.0)
    remapper = DynamicIdRemapper(DynamicTableConfig(capacity=8, eviction="feature_score"))
    remapper.slot_score = remapper.slot_score[:0]  # feature_score without its scores
    with pytest.raises(RuntimeError, match="feature_score needs slot_score"):
        remapper.remap(torch.tensor([1, 2]), 0, 0.0)
    remapper = DynamicIdRemapper(DynamicTableConfig(capacity=8))  # no expiry: no free list to push on
    with pytest.raises(RuntimeError, match="no free list"):
        torch.ops.lightning_sparse.hash_expire(*remapper.tensors(), 5, 0.0, 1, 0.0)
    with pytest.raises(RuntimeError, match="step must be in"):
        torch.ops.lightning_sparse.hash_expire(*remapper.tensors(), 1 << 31, 0.0, 0, 0.0)


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_native_equals_fallback_few_victims_in_a_large_full_table(policy, monkeypatch):
    """Few eligible ids against a large full table: the kernel's sampled victim search must pick exactly the
    victims a full sort picks, ties (many equal counts) included."""
    g = torch.Generator().manual_seed(11)
    fill = torch.randint(0, 1 << 40, (60_000,), generator=g)
    fill = torch.cat([fill, fill[:20_000], fill[:5_000]])  # counts 1, 2 and 3: heavy ties
    newcomers = torch.randint(1 << 41, 1 << 42, (300,), generator=g).repeat_interleave(
        torch.tensor([1, 2, 3, 4]).repeat(75)
    )
    config = DynamicTableConfig(
        capacity=50_000, eviction=policy, score_decay=0.9, admission=AdmissionConfig(min_count=1)
    )
    counters = remap_on_both_paths(config, [(fill, 0)] + [(newcomers, step) for step in (1, 2, 5)], monkeypatch)
    assert counters["evicted"] > 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_native_equals_fallback_victim_buckets(policy, threads, monkeypatch):
    """The kernel buckets the victims' priorities by key range: ranges wider than its histogram (counts
    and steps spread over > 2**16, scores over many binades), every slot tied, and more candidates than
    evictable slots must all pick exactly the victims a full sort picks."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1 << 40, (3_000,), generator=g)
    heavy = ids[:3].repeat_interleave(torch.tensor([70_000, 300, 5]))  # counts 1 .. 70_001
    wide = torch.cat([ids, heavy])
    tied = torch.randint(1 << 41, 1 << 42, (5_000,), generator=g)  # more newcomers than slots, all count 1
    newcomers = torch.randint(1 << 43, 1 << 44, (900,), generator=g)
    newcomers = torch.cat([newcomers[:2].repeat(90_000), newcomers.repeat_interleave(torch.tensor([1, 3]).repeat(450))])
    config = DynamicTableConfig(
        capacity=2_048, eviction=policy, score_decay=0.7, admission=AdmissionConfig(min_count=1)
    )
    steps = [
        (wide, 0),
        (ids[1_000:2_500], 1),
        (newcomers, 100_000),
        (tied, 100_001),
        (tied.flip(0), 100_002),
        (wide, 250_000),
    ]
    counters = remap_on_both_paths(config, steps, monkeypatch)
    assert counters["evicted"] > 0 and counters["rejected_full"] > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_native_equals_fallback_decay_gaps_around_the_table(threads, monkeypatch):
    """FEATURE_SCORE victims whose gaps since their last step straddle the kernel's tabulated decay powers
    (gaps below 256 are looked up, longer ones multiplied out), mixed within each 64-slot word."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 1 << 40, (4_000,), generator=g)
    fill = torch.cat([ids, ids[::3], ids[::7]])  # scores 1, 2, 3 at step 0
    newcomers = torch.randint(1 << 41, 1 << 42, (600,), generator=g).repeat_interleave(
        torch.tensor([1, 2, 3]).repeat(200)
    )
    config = DynamicTableConfig(
        capacity=4_096, eviction=EvictionPolicy.FEATURE_SCORE, score_decay=0.995, admission=AdmissionConfig(min_count=1)
    )
    steps = [(fill, 0), (ids[::2], 1), (ids[::5], 200), (ids[1::4], 2)]
    steps += [(newcomers[i::4], s) for i, s in enumerate((255, 256, 257, 458))]
    counters = remap_on_both_paths(config, steps, monkeypatch)
    assert counters["evicted"] > 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", [EvictionPolicy.LFU, EvictionPolicy.FEATURE_SCORE, EvictionPolicy.DISTANCE_LFU])
def test_native_equals_fallback_when_the_victim_sample_misleads(policy, threads, monkeypatch):
    """The kernel estimates from an evenly spaced sample of slots how far the pairing reaches and first
    looks only at slots below a cut taken from it. Here the sampled slots (every 24th of 50k, the stride)
    rank low and rise steeply, the others sit above the cut yet below the strongest newcomers: the first
    cut must prove too short and the kernel still pick the victims of the full sort."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(17)
    capacity = 50_000
    fill = torch.randint(0, 1 << 40, (capacity,), generator=g).unique()[:capacity]
    strong = torch.randint(1 << 41, 1 << 42, (40,), generator=g).repeat_interleave(500)
    weak = torch.randint(1 << 43, 1 << 44, (960,), generator=g)
    config = DynamicTableConfig(
        capacity=capacity, eviction=policy, score_decay=0.9, admission=AdmissionConfig(min_count=1)
    )
    s = torch.arange(capacity)
    crafted = torch.where(s % 24 == 0, 1 + s // 24, torch.full_like(s, 1_000))

    def craft(remapper):
        remapper.remap(fill, 0, 0.0)
        live = remapper.slot_count > 0
        remapper.slot_count[live] = crafted[live].int()
        if remapper.slot_score.numel():
            remapper.slot_score[live] = crafted[live].float()

    counters = remap_on_both_paths(config, [(torch.cat([strong, weak]), 1)], monkeypatch, prepare=craft)
    assert counters["evicted"] >= 40
