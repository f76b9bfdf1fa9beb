"""Fallback rows of dynamic tables: ids without a slot read (and train) a shared, hashed row instead of zero.

Issue 12 saw most of a real stream learn nothing from its ids: an id that was not admitted (or was
evicted) was dropped from its bag, i.e. read a zero row and got no update. ``test_*_reads_zero_*`` keeps
that reproduction (``fallback_rows=0``, still available); the others test the new default.
"""

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.dynamic import AdmissionConfig, DynamicIdRemapper, DynamicTableConfig, remap_kjt
from lightning_sparse.dynamic.hashing import fallback_row_int, fallback_rows_of
from lightning_sparse.ops import native_op

PATHS = ["twin"] + (["native"] if native_op("hash_remap") is not None else [])
NEWCOMER = 987_654_321_123  # seen once: min_count=3 keeps it out


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def one_step(fallback_rows):
    """One training step of a 32-row bag on a batch whose last sample holds only the unadmitted NEWCOMER.

    Returns (remapped kjt, pooled embedding of that sample before the step, weight before, weight after)."""
    config = DynamicTableConfig(capacity=32, admission=AdmissionConfig(min_count=3), fallback_rows=fallback_rows)
    remapper = DynamicIdRemapper(config)
    ids = torch.tensor([5, 5, 5, 6, 6, 6, NEWCOMER])
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.tensor([3, 3, 1]))
    out, results = remap_kjt(kjt, {"t": remapper}, {"f": "t"}, step=0, now=0.0)
    bag = nn.EmbeddingBag(32, 4, mode="sum")
    torch.manual_seed(0)
    nn.init.uniform_(bag.weight, -0.5, 0.5)
    before = bag.weight.detach().clone()
    jt = out["f"]
    pooled = bag(jt.values(), jt.offsets()[:-1])
    pooled[2].sum().backward()  # a loss on the newcomer's sample only
    with torch.no_grad():
        bag.weight -= 0.1 * bag.weight.grad
    return out, pooled[2].detach(), before, bag.weight.detach().clone(), results["t"]


def test_without_fallback_rows_an_unadmitted_id_reads_zero_and_learns_nothing(path):
    """What issue 12 measured: the id is dropped, its sample pools to zero and no row moves."""
    out, pooled, before, after, result = one_step(fallback_rows=0)
    assert out.lengths().tolist() == [3, 3, 0]
    assert torch.equal(pooled, torch.zeros(4))
    assert torch.equal(before, after)


def test_an_unadmitted_id_reads_its_fallback_row_and_trains_it(path):
    out, pooled, before, after, result = one_step(fallback_rows=4)
    row = fallback_row_int(NEWCOMER, 28, 4)  # slots 0..27, fallback rows 28..31
    assert 28 <= row < 32
    assert result.assigned.tolist() == [0, 1]  # 5 and 6 (3 occurrences each) were admitted
    assert out.lengths().tolist() == [3, 3, 1] and out.values().tolist() == [0, 0, 0, 1, 1, 1, row]
    assert torch.equal(pooled, before[row])
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert changed == [row]  # the fallback row trained, nothing else did


def test_evicted_and_unknown_ids_read_fallback_rows_in_training_and_evaluation(path):
    config = DynamicTableConfig(capacity=6, eviction="lfu", admission=AdmissionConfig(min_count=1), fallback_rows=2)
    remapper = DynamicIdRemapper(config)
    assert (remapper.capacity, remapper.fallback_rows) == (4, 2)
    remapper.remap(torch.tensor([1, 2, 3, 4]), 0, 0.0)
    heavy = torch.tensor([10, 11]).repeat_interleave(5)
    assert sorted(remapper.remap(heavy, 1, 1.0).assigned.tolist()) == [0, 1]  # ids 1 and 2 evicted
    ids = torch.tensor([1, 2, 3, 4, 10, 11, -7])
    expected = fallback_rows_of(ids, 4, 2)
    looked_up = remapper.lookup(ids)
    assert looked_up[2:6].tolist() == [2, 3, 0, 1]
    assert torch.equal(looked_up[[0, 1, 6]], expected[[0, 1, 6]]) and bool((expected >= 4).all())
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(7, dtype=torch.int32))
    evaluated, _ = remap_kjt(kjt, {"t": remapper}, {"f": "t"}, step=2, admit=False)
    assert torch.equal(evaluated.values(), looked_up)


def test_fallback_rows_hash_every_id_the_same_way_in_python_torch_and_kernels(path):
    ids = torch.tensor([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 123_456_789])
    expected = [fallback_row_int(i, 1000, 37) for i in ids.tolist()]
    assert fallback_rows_of(ids, 1000, 37).tolist() == expected
    remapper = DynamicIdRemapper(DynamicTableConfig(capacity=1037, fallback_rows=37), row_offset=0)
    assert remapper.lookup(ids).tolist() == expected
    assert len(set(fallback_row_int(i, 0, 37) for i in range(2000))) == 37  # every fallback row is used


def test_fallback_rows_default_and_errors():
    assert DynamicIdRemapper(DynamicTableConfig(capacity=1600)).fallback_rows == 0  # off by default (measured)
    config = DynamicTableConfig(capacity=100, fallback_rows=10)
    assert [DynamicIdRemapper.for_rank(config, r, 4).fallback_rows for r in range(4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"DynamicTableConfig\.fallback_rows=8 leaves no row"):
        DynamicTableConfig(capacity=8, fallback_rows=8)
    with pytest.raises(ValueError, match=r"DynamicTableConfig\.fallback_rows must be >= 0"):
        DynamicTableConfig(capacity=8, fallback_rows=-1)
    with pytest.raises(ValueError, match=r"row block of 1 rows .* no row for its hash table"):
        DynamicIdRemapper.for_rank(DynamicTableConfig(capacity=8, fallback_rows=7), 0, 8)


def test_fallback_rows_from_a_mapping_as_the_cli_and_yaml_give_it():
    from lightning_sparse.config import TableConfig

    assert TableConfig(dynamic={"capacity": 64, "fallback_rows": 8}).dynamic.fallback_rows == 8
    with pytest.raises(ValueError, match=r"fallback_rows=64 leaves no row for the hash table of capacity 64"):
        TableConfig(dynamic={"capacity": 64, "fallback_rows": 64})
