"""PipelineRemaps (strategies/pipeline_dynamic.py) in one process: under a pipeline, a row that a later batch's
admission took from an evicted id ends as the new id's fresh row even when an older in-flight batch's update
writes into it afterwards, and a drain puts back the evicted id's row as that update left it."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.distributed.sharded_dynamic import DynamicTables
from lightning_sparse.dynamic import AdmissionConfig, DynamicTableConfig
from lightning_sparse.strategies.pipeline_dynamic import PipelineRemaps


def _tables() -> tuple[DynamicTables, torch.Tensor, torch.Tensor]:
    config = DynamicTableConfig(capacity=2, admission=AdmissionConfig(min_count=1), eviction="lru")
    tables = DynamicTables({"t": config}, {"f": "t"}, rank=0, param_paths={"t": "w"})
    weight, state = torch.arange(8.0).reshape(2, 4), torch.ones(2)
    tables.bind_rows({"w": weight}, lambda path: [state])
    return tables, weight, state


def _batch(*ids: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["f"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int32))


def test_an_evicted_ids_late_update_is_discarded_and_a_drain_puts_it_back():
    tables, weight, state = _tables()
    remaps = PipelineRemaps(tables)
    first = remaps.remap(_batch(10, 11), step=0)  # fills both rows
    remaps.recycle(first)
    later = remaps.remap(_batch(12), step=1)  # full: evicts id 10 or 11
    (taken,) = later.assigned["t"].tolist()
    remaps.recycle(later)  # just before the later batch's lookup
    fresh = weight[taken].clone()
    weight[taken] += 100.0  # the first batch's update, still in flight, writes into the row it read
    state[taken] = 7.0
    after_update = (weight[taken].clone(), float(state[taken]))
    remaps.reapply([later])
    assert torch.equal(weight[taken], fresh) and float(state[taken]) == 0.0  # the new id's row, as recycled
    remaps.rewind([later])  # a drain before the later batch trained: as if it was never read
    assert torch.equal(weight[taken], after_update[0]) and float(state[taken]) == after_update[1]
    assert torch.equal(remaps.remap(_batch(12), step=1).assigned["t"], later.assigned["t"])  # hash tables rewound
