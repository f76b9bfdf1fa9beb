"""Checks shared by the serving tests: a store against the live tables of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "model.dlrm.sparse_arch.embedding_bag_collection.embedding_bags."
PARTITION = "dynamic_tables.partitions.t_cat_0.0_of_1."
STATIC = ("t_cat_1", "t_cat_2", "t_cat_3")


def live_tables(tensors: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(raw ids, rows) of every table in a checkpoint: all rows of static tables, the live slots of t_cat_0."""
    out = {}
    for table in STATIC:
        weight = tensors[f"{PREFIX}{table}.weight"].numpy()
        out[table] = (np.arange(weight.shape[0], dtype=np.int64), weight)
    live = (tensors[PARTITION + "slot_count"] > 0).numpy()
    weight = tensors[f"{PREFIX}t_cat_0.weight"].numpy()
    out["t_cat_0"] = (tensors[PARTITION + "slot_ids"].numpy()[live], weight[live])
    return out


def max_difference(store: Any, tables: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
    """max |store row - live row| over every live id; a live id the store lacks fails."""
    snapshot = store.lookup({name: ids for name, (ids, _) in tables.items()})
    worst = 0.0
    for name, (ids, rows) in tables.items():
        got, found = snapshot.rows[name]
        assert found.all(), f"{name}: ids {ids[~found].tolist()} are live but not in the store"
        worst = max(worst, float(np.abs(got - rows).max()) if len(ids) else 0.0)
    return worst


def checkpoint_tensors(path: Path, read_checkpoint: Any) -> dict[str, Any]:
    tensors, _ = read_checkpoint(path)
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
