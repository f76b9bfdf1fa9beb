"""Sharded directory checkpoints: torch.distributed.checkpoint for tensors, one small file for the rest.

Layout of a checkpoint directory::

    .metadata, __<rank>_0.distcp   DCP: the model state dict (ShardedTensors of the tables), the
                                   sparse optimizer state and the dynamic tables' hash tables; every
                                   rank writes its own shards, replicated tensors are written once
    trainer_state.pt               rank 0: everything else Lightning checkpoints (loops, dense optimizer,
                                   schedulers, callbacks, hyper-parameters); it is replicated

Loading reads into the current (possibly differently sharded) state dicts, so a checkpoint written by
2 processes loads into 1 (and vice versa).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

TRAINER_STATE_FILE = "trainer_state.pt"
MODEL_KEY = "model"
SPARSE_OPTIMIZER_KEY = "sparse_optimizer"
DYNAMIC_TABLES_KEY = "dynamic_tables"


def is_sharded_checkpoint(path: "str | os.PathLike") -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAINER_STATE_FILE).is_file()


def save_sharded(
    path: "str | os.PathLike",
    model_state: dict[str, Any],
    sparse_optimizer_state: dict[str, Any],
    dynamic_tables_state: dict[str, Any],
    trainer_state: dict[str, Any],
    is_global_zero: bool,
) -> None:
    """Called on every rank. Replaces any previous checkpoint at ``path``."""
    path = Path(path)
    if is_global_zero:
        if path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)  # stale shards of a run with more ranks would otherwise linger
        path.mkdir(parents=True)
    _barrier()
    dcp.save(_tensors(model_state, sparse_optimizer_state, dynamic_tables_state), checkpoint_id=str(path))
    if is_global_zero:
        torch.save(trainer_state, path / TRAINER_STATE_FILE)
    _barrier()


def load_sharded(
    path: "str | os.PathLike",
    model_state: dict[str, Any],
    sparse_optimizer_state: dict[str, Any],
    dynamic_tables_state: dict[str, Any],
) -> dict[str, Any]:
    """Loads tensors in place into the given (current) state dicts; returns the trainer state."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a SparseStrategy checkpoint: expected a directory holding '.metadata' "
            f"(torch.distributed.checkpoint) and '{TRAINER_STATE_FILE}'. Checkpoints saved by SparseStrategy "
            "are directories; a single-file .ckpt from another strategy cannot hold sharded tables."
        )
    _check_dynamic_tables_present(path, dynamic_tables_state)
    dcp.load(_tensors(model_state, sparse_optimizer_state, dynamic_tables_state), checkpoint_id=str(path))
    return torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)


def _tensors(model_state: dict, sparse_optimizer_state: dict, dynamic_tables_state: dict) -> dict[str, Any]:
    parts = {MODEL_KEY: model_state}
    sparse_state = _stateful_only(sparse_optimizer_state)
    if sparse_state["state"]:  # sgd everywhere keeps none; DCP would then ask for a key it never wrote
        parts[SPARSE_OPTIMIZER_KEY] = sparse_state
    if dynamic_tables_state:
        parts[DYNAMIC_TABLES_KEY] = dynamic_tables_state
    return parts


def _check_dynamic_tables_present(path: Path, dynamic_tables_state: dict[str, Any]) -> None:
    """Names the hash-table state this run needs and the checkpoint lacks, instead of DCP's bare missing key.

    The usual cause is a sharded hash table whose partitions (one per row block of the table) do not
    match the checkpoint's: a row_wise table resumed on a different number of ranks, or a changed
    ``placement``.
    """
    if not dynamic_tables_state:
        return
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    missing = sorted(key for key in dynamic_tables_state if f"{DYNAMIC_TABLES_KEY}.{key}" not in saved)
    if not missing:
        return
    prefix = f"{DYNAMIC_TABLES_KEY}."
    held = sorted({".".join(key[len(prefix) :].split(".")[:-1]) for key in saved if key.startswith(prefix)})
    wanted = sorted({".".join(key.split(".")[:-1]) for key in missing})
    raise ValueError(
        f"Checkpoint {str(path)!r} has no state for the dynamic-table hash tables {wanted} of this run; it holds "
        f"{held or 'none'}. A table with placement 'sharded' keeps one hash partition per row block of its "
        "shards ('partitions.<table>.<i>_of_<n>'), one with placement 'replicated' a single 'remappers.<table>'. "
        "Resume with the same DynamicTableConfig.placement and, for row_wise tables, the same number of ranks."
    )


def _stateful_only(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state without parameters whose state is empty (fused SGD has none).

    DCP writes no entry for an empty dict but then asks for one on load; the tensors are shared with the
    full state dict, so loading in place still fills it.
    """
    return {**optimizer_state, "state": {key: value for key, value in optimizer_state["state"].items() if value}}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
