"""The hash-table state keeps only what the configured policy reads (``state.TableTensors``), and a
checkpoint of the earlier layout (every tensor, int64 counts and steps, float64 scores) loads where the
conversion is exact or is refused naming the tensor and the fix."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig
from lightning_sparse.dynamic.state import TableTensors


def per_slot_bytes(config: DynamicTableConfig) -> dict[str, float]:
    remapper = DynamicIdRemapper(config)
    return {
        name: t.numel() * t.element_size() / remapper.capacity
        for name, t in zip(TableTensors._fields, remapper.tensors())
    }


@pytest.mark.parametrize(
    "overrides, kept",
    [
        ({}, set()),  # distance_lfu, min_count 1, no expiry
        ({"eviction": "feature_score"}, {"slot_score", "sketch"}),
        ({"eviction": "lfu", "admission": {"min_count": 2}}, {"sketch"}),
        ({"eviction": "lru", "expiry": {"ttl_steps": 5}}, {"free_list"}),
        ({"eviction": "lru", "expiry": {"ttl_seconds": 5.0}}, {"free_list", "slot_last_time"}),
    ],
)
def test_only_the_policys_tensors_are_allocated(overrides, kept):
    sizes = per_slot_bytes(DynamicTableConfig(capacity=1024, **overrides))
    assert (sizes["slot_ids"], sizes["slot_count"], sizes["slot_last_step"], sizes["index"]) == (8, 4, 4, 8)
    optional = {"slot_last_time": 8, "slot_score": 4, "free_list": 4, "sketch": 8}  # sketch: 4 rows of 512 int32
    for name, size in optional.items():
        assert sizes[name] == (size if name in kept else 0), name


def old_layout(remapper: DynamicIdRemapper, depth: int = 4, freed: bool = False) -> dict[str, torch.Tensor]:
    """A state dict as the earlier layout wrote it for ``remapper``'s table, after its remaps."""
    c = remapper.capacity
    state = {k: v.clone() for k, v in remapper.state_dict().items()}
    state["slot_count"] = state["slot_count"].long()
    state["slot_last_step"] = state["slot_last_step"].long()
    state["slot_last_time"] = torch.zeros(c, dtype=torch.float64)
    state["slot_score"] = (
        remapper.slot_score.double() if remapper.slot_score.numel() else torch.zeros(c, dtype=torch.float64)
    )
    free_list = torch.arange(c - 1, -1, -1, dtype=torch.int32)
    if freed:  # an expiry sweep freed slot 0 once: it sits on top of the stack
        free_list[int(remapper.meta[0]) - 1] = 0
    state["free_list"] = free_list
    if state["sketch"].shape[0] != depth:  # the earlier default: 4 rows, whatever min_count
        state["sketch"] = torch.zeros((depth, state["sketch"].shape[1]), dtype=torch.int32)
    return state


def test_old_layout_converts_exactly():
    config = DynamicTableConfig(capacity=64, admission={"sketch_depth": 4})
    source = DynamicIdRemapper(config)
    for step in range(5):
        source.remap(torch.arange(step * 10, step * 10 + 40), step, 0.0)
    target = DynamicIdRemapper(config)
    target.load_state_dict(old_layout(source))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    ids = torch.arange(0, 200)
    assert torch.equal(source.remap(ids, 9, 0.0).slots, target.remap(ids, 9, 0.0).slots)


def test_old_layout_is_refused_where_it_cannot_convert():
    source = DynamicIdRemapper(DynamicTableConfig(capacity=64))
    source.remap(torch.arange(10), 0, 0.0)
    with pytest.raises(RuntimeError, match=r"'sketch'.*set admission.sketch_depth=4"):
        DynamicIdRemapper(DynamicTableConfig(capacity=64)).load_state_dict(old_layout(source))
    with pytest.raises(RuntimeError, match=r"'free_list'.*freed by expiry.*expiry settings it was written with"):
        DynamicIdRemapper(DynamicTableConfig(capacity=64)).load_state_dict(old_layout(source, depth=0, freed=True))
    state = old_layout(source, depth=0)
    state["slot_last_step"][3] = 1 << 31
    with pytest.raises(RuntimeError, match=r"'slot_last_step'.*int32"):
        DynamicIdRemapper(DynamicTableConfig(capacity=64)).load_state_dict(state)
    timed = DynamicTableConfig(capacity=64, expiry={"ttl_seconds": 5.0})
    state = DynamicIdRemapper(DynamicTableConfig(capacity=64)).state_dict()  # current layout, no clock kept
    with pytest.raises(RuntimeError, match=r"'slot_last_time'.*without expiry.ttl_seconds"):
        DynamicIdRemapper(timed).load_state_dict(state)


def test_a_sharded_checkpoint_in_another_layout_is_named(tmp_path):
    """The strategy's checkpoint (DCP) loads in place, so it cannot convert: it names every tensor whose saved
    shape or dtype differs and the settings to resume with, instead of DCP's bare size mismatch."""
    import torch.distributed.checkpoint as dcp

    from lightning_sparse.distributed.checkpoint import (
        DYNAMIC_TABLES_KEY,
        _check_dynamic_tables_present,
    )

    source = DynamicIdRemapper(DynamicTableConfig(capacity=64, eviction="feature_score"))
    source.remap(torch.arange(10), 0, 0.0)
    saved = {f"remappers.t.{k}": v for k, v in old_layout(source).items()}
    dcp.save({DYNAMIC_TABLES_KEY: saved}, checkpoint_id=str(tmp_path))
    same = {f"remappers.t.{k}": v for k, v in DynamicIdRemapper(source.config).state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"remappers.t.slot_count \(saved torch.int64 \[64\], this run torch.int32 \[64\]\).*DynamicTableConfig it was written with",
    ):
        _check_dynamic_tables_present(tmp_path, same)
    dcp.save(
        {DYNAMIC_TABLES_KEY: {f"remappers.t.{k}": v for k, v in source.state_dict().items()}},
        checkpoint_id=str(tmp_path / "new"),
    )
    _check_dynamic_tables_present(tmp_path / "new", same)  # the same layout: nothing to say
    other = DynamicIdRemapper(DynamicTableConfig(capacity=64, eviction="distance_lfu"))
    with pytest.raises(
        ValueError, match=r"remappers.t.slot_score \(saved torch.float32 \[64\], this run torch.float32 \[0\]\)"
    ):
        _check_dynamic_tables_present(tmp_path / "new", {f"remappers.t.{k}": v for k, v in other.state_dict().items()})
