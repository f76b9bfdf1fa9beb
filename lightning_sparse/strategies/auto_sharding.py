"""Reads the first training batches at setup for ``sharding: auto`` (``distributed/auto_sharding.py`` decides).

The tables are planned in ``SparseStrategy.setup``, before the fit loop has asked for its train loader, so the
batches are read from a loader of their own: the same source the fit loop will use (the LightningModule's or
data module's ``train_dataloader``, or the loader passed to ``fit``; it is called once more), prepared as
Lightning prepares it (a ``DistributedSampler`` injected where Lightning would), and iterated by a fresh
iterator for ``auto_sharding_batches`` batches, under :func:`~lightning.pytorch.utilities.seed.isolate_rng` so
that the random state (the samplers' shuffling seed among it) is what it would have been without the read.
The user's epoch then iterates the loader from its start: it sees every batch, in the order it would have.
The look-ahead loader of pipelines and caches (``cache/prefetch.py``) is no help here: it reads inside the
epoch, after the plan is made.

A loader that cannot be iterated twice (an iterator, or a dataset that is its own iterator, such as a
generator-backed ``IterableDataset``) is refused with an error saying to set the sharding explicitly: reading
it ahead would take those batches from the epoch. Nothing is read on one process (nothing travels), nor
outside ``fit``: TorchRec's planner chooses from the tables' sizes there, as with ``auto_sharding_batches: 0``.

A checkpoint keeps the choice (``SparseStrategy.save_checkpoint``); :func:`check_resumed_auto_sharding` refuses to
resume a ``data_parallel`` choice into a sharded table or the reverse, whose optimizer states are kept apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional, cast

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.seed import isolate_rng
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.distributed.auto_sharding import (
    AutoShardingDecision,
    asked_auto,
    check_resumed_choice,
    choose_sharding,
)
from lightning_sparse.distributed.checkpoint import read_trainer_state
from lightning_sparse.distributed.comm_hint import BatchStats
from lightning_sparse.distributed.planning import planner_constraints, planning_topology, sharders
from lightning_sparse.distributed.routes import EmbeddingTables, resolve_tables


def measured_auto_sharding(
    trainer: Trainer,
    module: LightningModule,
    device_type: str,
    process_group: dist.ProcessGroup,
    default_sharding: ShardingType,
    default_optimizer: SparseOptimizerConfig,
    overrides: dict[str, TableConfig],
    batches: int,
    local_world_size: Optional[int] = None,
) -> Optional[AutoShardingDecision]:
    """The sharding of ``module``'s ``auto`` tables from ``batches`` training batches per rank, or None when
    there is nothing to decide from batches (see the module docstring). Every rank calls it."""
    world = dist.get_world_size(process_group)
    if batches == 0 or world < 2 or trainer.state.fn != TrainerFn.FITTING:
        return None
    tables = resolve_tables(module, device_type, default_sharding, default_optimizer, overrides)
    names = asked_auto(tables, default_sharding, overrides)
    if not names:
        return None
    rank = dist.get_rank(process_group)
    rows = {name: tables.tables[name].rows for name in names}
    stats = BatchStats()
    read = read_training_batches(trainer, batches, names)
    for batch in read:
        apply_to_collection(
            batch, KeyedJaggedTensor, lambda kjt: stats.add(kjt, dict(tables.features), rows, rank, world)
        )
        stats.steps += 1
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, stats, group=process_group)
    return choose_sharding(
        module, tables, names, gathered, len(read), planner_constraints(tables, device_type),
        planning_topology(world, device_type, local_world_size), sharders(), process_group, device_type,
    )  # fmt: skip


def checked_batches(value: Any) -> int:
    """``SparseStrategy.auto_sharding_batches``, refused unless a count >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"SparseStrategy.auto_sharding_batches={value!r}: give an integer >= 0 (0: do not read ahead)")
    return value


def check_resumed_auto_sharding(checkpoint_path: Any, key: str, tables: EmbeddingTables) -> None:
    """Before a checkpoint's tensors are read: refuses a ``data_parallel`` table that ``auto`` chose (saved under
    ``key`` in its trainer state) where this run shards it, or the reverse (``check_resumed_choice``)."""
    try:
        saved = read_trainer_state(checkpoint_path) or {}
    except Exception:  # a damaged file: load_sharded verifies the checkpoint and names what is wrong
        saved = {}
    check_resumed_choice(saved.get(key), tables)


def read_training_batches(trainer: Trainer, batches: int, tables: list[str]) -> list[Any]:
    """Up to ``batches`` batches from each of the fit's train loaders, read by a fresh iterator (see the module
    docstring); ``tables`` name the ``auto`` tables in the error for a loader that cannot be read ahead."""
    source = trainer.fit_loop._data_source
    if not source.is_defined():
        return []
    loaders = _request_dataloader(source)
    combined = loaders if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders, "max_size_cycle")
    read: list[Any] = []
    for loader in combined.flattened:
        reason = not_restartable(loader)
        if reason:
            raise ValueError(
                f"SparseStrategy: table(s) {tables} have sharding 'auto', which reads the first {batches} training "
                f"batches at setup to measure the bytes each sharding type would send, but the train loader cannot "
                f"be read ahead: {reason}, so the batches read would be missing from the epoch. Set these tables' "
                "sharding explicitly (e.g. tables: {" + f"{tables[0]}: " + "{sharding: table_wise}}), or "
                "auto_sharding_batches: 0 to let TorchRec's planner choose from the table sizes alone."
            )
        loader = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
        with isolate_rng():
            iterator = iter(cast(Iterable[Any], loader))  # Lightning types the prepared loader as object
            for _ in range(batches):
                try:
                    read.append(next(iterator))
                except StopIteration:
                    break
            del iterator  # stops a multi-process loader's workers now
    return read


def not_restartable(loader: Any) -> str:
    """Why iterating ``loader`` a second time would not start it over ('' when it would, as far as can be told)."""
    if isinstance(loader, Iterator):
        return f"it is an iterator ({type(loader).__name__}), which a second pass cannot restart"
    dataset = getattr(loader, "dataset", None) if isinstance(loader, DataLoader) else None
    if dataset is not None and hasattr(type(dataset), "__next__"):
        return f"its dataset {type(dataset).__name__} is its own iterator, which a second pass cannot restart"
    return ""
