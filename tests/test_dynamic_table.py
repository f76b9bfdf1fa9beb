"""DynamicIdRemapper: config validation, exact checkpoints, KJT remapping, sharding helpers, row re-init."""

import io

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.dynamic import (
    AdmissionConfig,
    DynamicIdRemapper,
    DynamicTableConfig,
    ExpiryConfig,
    RowInitConfig,
    remap_kjt,
    shard_of,
    shard_rows,
)
from lightning_sparse.dynamic.hashing import shard_of_int
from lightning_sparse.ops import native_op

PATHS = ["fallback"] + (["native"] if native_op("hash_remap") is not None else [])


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def stream(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(-40, 40, (60,), generator=g) * 1_000_003 + step // 3


def config(**kw) -> DynamicTableConfig:
    base = dict(
        capacity=24,
        eviction="feature_score",  # keeps idle ids long enough to expire (distance_lfu evicts them first)
        admission=AdmissionConfig(min_count=2, probability=0.8, sketch_width=16, sketch_halve_every=50),
        expiry=ExpiryConfig(ttl_steps=3, sweep_every_steps=2),
    )
    base.update(kw)
    return DynamicTableConfig(**base)


# --- config errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DynamicTableConfig(capacity=0), r"DynamicTableConfig\.capacity must be >= 1"),
        (lambda: DynamicTableConfig(capacity=4, eviction="lfx"), r"eviction='lfx'.*'lfu', 'lru', 'feature_score'"),
        (
            lambda: DynamicTableConfig(capacity=4, score_decay=1.5),
            r"DynamicTableConfig\.score_decay must be in \(0, 1\]",
        ),
        (lambda: AdmissionConfig(probability=0.0), r"AdmissionConfig\.probability must be in \(0, 1\]"),
        (lambda: AdmissionConfig(min_count=0), r"AdmissionConfig\.min_count must be >= 1"),
        (lambda: AdmissionConfig(sketch_width=48), r"AdmissionConfig\.sketch_width must be a power of two.*32 or 64"),
        (lambda: ExpiryConfig(ttl_steps=0), r"ExpiryConfig\.ttl_steps must be >= 1"),
        (lambda: ExpiryConfig(ttl_seconds=-1.0), r"ExpiryConfig\.ttl_seconds must be a finite number > 0"),
        (lambda: RowInitConfig(kind="xavier"), r"RowInitConfig\.kind='xavier'.*'uniform', 'normal', 'zeros'"),
        (lambda: DynamicTableConfig(capacity=4, admission={"min_cnt": 2}), r"unknown option\(s\) \['min_cnt'\]"),
    ],
)
def test_bad_config_names_field_and_allowed_values(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_config_from_mappings():
    cfg = DynamicTableConfig(capacity=8, eviction="LRU", admission={"min_count": 3}, expiry={"ttl_seconds": 60})
    assert cfg.admission.min_count == 3 and cfg.expiry.ttl_seconds == 60.0 and cfg.eviction.value == "lru"


# --- checkpoints ---------------------------------------------------------------------------------


def drive(remapper: DynamicIdRemapper, steps: range) -> list[torch.Tensor]:
    out = []
    for step in steps:
        result = remapper.remap(stream(step), step, now=float(step))
        out += [result.slots, result.assigned]
        expired = remapper.maybe_expire(step, now=float(step))
        if expired is not None:
            out.append(expired)
    return out


def test_state_dict_round_trip_is_exact(path):
    original = DynamicIdRemapper(config())
    drive(original, range(0, 12))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = DynamicIdRemapper(config())
    restored.load_state_dict(torch.load(buffer))
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    # both continue identically, including admission coins, sketch aging and expiry schedule
    a, b = drive(original, range(12, 24)), drive(restored, range(12, 24))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert original.metrics() == restored.metrics()
    assert original.metrics()["expired"] > 0 and original.metrics()["admitted"] > 0


def test_checkpoint_restores_across_native_and_fallback(monkeypatch):
    if len(PATHS) < 2:
        pytest.skip("native extension not built")
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1")
    native = DynamicIdRemapper(config())
    drive(native, range(0, 10))
    fallback = DynamicIdRemapper(config())
    fallback.load_state_dict(native.state_dict())
    a = drive(native, range(10, 20))
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    b = drive(fallback, range(10, 20))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(v, fallback.state_dict()[k]) for k, v in native.state_dict().items())


def test_distributed_checkpoint_round_trip(tmp_path, path):
    import torch.distributed.checkpoint as dcp

    original = DynamicIdRemapper(config())
    drive(original, range(0, 8))
    dcp.save({"table": original.state_dict()}, checkpoint_id=str(tmp_path))
    restored = DynamicIdRemapper(config())
    state = {"table": restored.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path))
    restored.load_state_dict(state["table"])
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_state_stays_on_host_in_its_dtypes():
    remapper = DynamicIdRemapper(config())
    model = torch.nn.ModuleDict({"t": remapper}).half().to(torch.float64)
    assert model["t"].slot_last_time.dtype == torch.float64 and model["t"].slot_ids.dtype == torch.int64


def test_dtype_casts_never_touch_state_and_host_moves_keep_working(path):
    """``.to(float16)`` / ``.half()`` must not cast the state (a float16 stamp or score would silently
    change the policy); ``.to("cpu")`` is a move to where it already is, and the table carries on exactly."""
    moved, untouched = DynamicIdRemapper(config()), DynamicIdRemapper(config())
    drive(moved, range(0, 6))
    drive(untouched, range(0, 6))
    dtypes = {name: buffer.dtype for name, buffer in moved.named_buffers()}
    model = torch.nn.ModuleDict({"t": moved})
    model.to(torch.float16).half().to("cpu").to("cpu", torch.float16).cpu().float().double()
    assert {name: buffer.dtype for name, buffer in moved.named_buffers()} == dtypes
    assert moved.device == torch.device("cpu") and moved.slot_score.dtype == torch.float32
    assert all(torch.equal(v, untouched.state_dict()[k]) for k, v in moved.state_dict().items())
    a, b = drive(moved, range(6, 14)), drive(untouched, range(6, 14))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(v, untouched.state_dict()[k]) for k, v in moved.state_dict().items())


# --- behaviour -----------------------------------------------------------------------------------


def test_lookup_changes_nothing(path):
    remapper = DynamicIdRemapper(config())
    drive(remapper, range(0, 6))
    before = {k: v.clone() for k, v in remapper.state_dict().items()}
    ids = torch.cat([remapper.slot_ids[remapper.slot_count > 0], torch.tensor([123456789])])
    slots = remapper.lookup(ids)
    assert slots[-1] == -1  # no fallback rows by default
    assert torch.equal(slots[:-1], (remapper.slot_count > 0).nonzero().flatten())
    assert all(torch.equal(before[k], v) for k, v in remapper.state_dict().items())


def test_admission_probability_is_a_function_of_id_seed_step(path):
    cfg = DynamicTableConfig(capacity=100_000, admission=AdmissionConfig(probability=0.25, seed=11))
    ids = torch.arange(20_000) * 7 - 70_000
    first = DynamicIdRemapper(cfg).remap(ids, 5, 0.0).slots >= 0
    again = DynamicIdRemapper(cfg).remap(ids, 5, 0.0).slots >= 0
    other_step = DynamicIdRemapper(cfg).remap(ids, 6, 0.0).slots >= 0
    assert torch.equal(first, again)
    assert abs(first.double().mean().item() - 0.25) < 0.02
    assert not torch.equal(first, other_step)


def test_ttl_seconds_and_maybe_expire_schedule(path):
    cfg = DynamicTableConfig(capacity=8, expiry=ExpiryConfig(ttl_seconds=10.0, sweep_every_steps=5))
    remapper = DynamicIdRemapper(cfg)
    remapper.remap(torch.tensor([1, 2]), step=0, now=100.0)
    remapper.remap(torch.tensor([2]), step=1, now=105.0)
    assert remapper.maybe_expire(step=1, now=111.0).tolist() == [0]  # first sweep; id 1 idle 11 s
    assert remapper.maybe_expire(step=3, now=200.0) is None  # next sweep not due before step 6
    assert remapper.maybe_expire(step=6, now=200.0).tolist() == [1]
    assert remapper.metrics()["expired"] == 2 and remapper.metrics()["live"] == 0
    # the free slots form a stack: the last sweep's slots are reused first, lowest first within a sweep
    assert remapper.remap(torch.tensor([9, 10, 11]), 7, 200.0).assigned.tolist() == [1, 0, 2]


def test_init_and_reset_rows(path):
    remapper = DynamicIdRemapper(config(init=RowInitConfig(kind="uniform", scale=0.5)))
    weight = torch.zeros(24, 4)
    momentum = torch.ones(24)
    result = remapper.remap(stream(0).repeat(2), 0, 0.0)
    assert result.assigned.numel() > 0
    remapper.init_rows(weight, result.assigned, generator=torch.Generator().manual_seed(0))
    DynamicIdRemapper.reset_rows([momentum], result.assigned)
    touched = torch.zeros(24, dtype=torch.bool)
    touched[result.assigned] = True
    assert (weight[touched].abs() <= 0.5).all() and (weight[touched] != 0).all()
    assert (weight[~touched] == 0).all()
    assert (momentum[touched] == 0).all() and (momentum[~touched] == 1).all()


# --- KeyedJaggedTensor ---------------------------------------------------------------------------


def test_remap_kjt_drops_unadmitted_ids_and_shares_tables(path):
    config = DynamicTableConfig(capacity=10, admission=AdmissionConfig(min_count=2), fallback_rows=0)
    remappers = {"t": DynamicIdRemapper(config)}
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c"],
        values=torch.tensor([5, 5, 7, 5, 8, 9, 100, 101]),
        lengths=torch.tensor([2, 1, 1, 2, 1, 1], dtype=torch.int32),
        weights=torch.arange(8, dtype=torch.float32),
    )
    out, results = remap_kjt(kjt, remappers, {"a": "t", "b": "t"}, step=0, now=0.0)
    # id 5 appears 3 times across features a and b in one call: admitted; 7, 8, 9 seen once: dropped
    assert results["t"].assigned.tolist() == [0]
    assert out.keys() == ["a", "b", "c"]
    assert out.lengths().tolist() == [2, 0, 1, 0, 1, 1] and out.lengths().dtype == torch.int32
    assert out.values().tolist() == [0, 0, 0, 100, 101]
    assert out.weights().tolist() == [0.0, 1.0, 3.0, 6.0, 7.0]
    # evaluation: look up only, nothing admitted (8 would have reached min_count otherwise)
    evaluated, _ = remap_kjt(kjt, remappers, {"a": "t", "b": "t"}, step=1, admit=False)
    assert evaluated.lengths().tolist() == [2, 0, 1, 0, 1, 1]
    assert remappers["t"].metrics()["admitted"] == 1


def test_remap_kjt_unknown_table():
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(KeyError, match="no remapper"):
        remap_kjt(kjt, {}, {"a": "t"}, step=0)


# --- sharding ------------------------------------------------------------------------------------


def test_shard_routing_lands_in_the_owner_rows(path):
    world = 3
    cfg = DynamicTableConfig(capacity=30, fallback_rows=3)
    shards = [DynamicIdRemapper.for_rank(cfg, r, world) for r in range(world)]
    ids = torch.arange(-200, 200) * 977
    owner = shard_of(ids, world)
    assert owner.tolist() == [shard_of_int(i, world) for i in ids.tolist()]
    assert sorted(set(owner.tolist())) == [0, 1, 2]
    for rank, (offset, rows) in enumerate(shard_rows(30, world)):
        shard = shards[rank]
        assert shard.fallback_rows == 1 and shard.capacity == rows - 1  # each block keeps its own fallback row
        slots = shard.remap(ids[owner == rank], 0, 0.0).slots
        admitted = slots[slots < offset + shard.capacity]
        assert admitted.unique().numel() == rows - 1
        assert ((slots >= offset) & (slots < offset + rows)).all()  # fallback rows too: in the owner's block
        assert bool((slots == offset + rows - 1).any())
    with pytest.raises(ValueError, match="multiple of world_size"):
        DynamicIdRemapper.for_rank(DynamicTableConfig(capacity=5), 3, 4)


def test_bad_ids_and_step():
    remapper = DynamicIdRemapper(DynamicTableConfig(capacity=4))
    with pytest.raises(TypeError, match="int64 or int32"):
        remapper.remap(torch.tensor([1.0]), 0)
    with pytest.raises(ValueError, match=r"step must be in \[0, 2147483647\]"):
        remapper.remap(torch.tensor([1]), -1)
    with pytest.raises(ValueError, match=r"step must be in \[0, 2147483647\]"):
        remapper.remap(torch.tensor([1]), 1 << 31)
