"""``sharding: auto`` from measured batches: each table gets the sharding type that sends the fewest bytes.

The strategy reads a few training batches at setup (``strategies/auto_sharding.py``), every rank counts its
:class:`~lightning_sparse.distributed.comm_hint.BatchStats` and the ranks gather them; :func:`choose_sharding`
turns them into the bytes per step of each alternative (:func:`~lightning_sparse.distributed.comm_hint.sharding_hint`,
the closed forms the communication report measures to the byte) and picks, per table, the cheapest type that
is valid for the table:

- ``table_wise``, ``row_wise`` and ``data_parallel`` for every static pooled table (``row_wise`` on every
  backend, ``distributed/row_wise.py``); ``data_parallel`` tables are replicated and trained on the
  ``data_parallel`` route, as when asked for by name;
- ``column_wise`` too when the table is on the fused route (lightning_sparse's kernels need whole rows) and its
  dimension splits into one shard per rank of a multiple of 4 columns; it is then planned as exactly that
  (``min_partition = dim / W``), the split the closed form counts.

Ties go to the first of ``table_wise, column_wise, row_wise, data_parallel``. On the closed forms ``row_wise``
never sends fewer bytes than ``table_wise`` for a table (every rank receives a partial sum per sample, where
``table_wise`` sends one pooled row per sample of the non-owners); it is picked when the cheaper types do not
fit in memory. Memory is TorchRec's planner's: the cheapest choice of every table is planned locally
(``EmbeddingShardingPlanner.plan``, weights and the fused optimizer's state as the planner counts them); if it
does not fit, the tables are decided largest first, each taking the cheapest type that still leaves a plan
with the undecided tables ``row_wise``. Rank 0 decides and broadcasts, so every rank shards alike.

Left to TorchRec's planner, as before (no batch read): dynamic tables (raw ids, remapped after the batch is
seen), cached tables (planned as their scratchpads), sequence tables (``EmbeddingCollection``: the closed forms
count pooled outputs), and every table when nothing was read (one process, or not fitting).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from lightning_sparse.config import ResolvedTable, ShardingType, TableConfig, TableRoute
from lightning_sparse.distributed.comm_hint import BatchStats, sharding_hint
from lightning_sparse.distributed.routes import EmbeddingTables
from lightning_sparse.optim.fbgemm_kinds import fused_optimizer_for

log = logging.getLogger(__name__)

# In the order that breaks ties.
AUTO_CANDIDATES = (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.ROW_WISE, ShardingType.DATA_PARALLEL)


@dataclass
class AutoShardingDecision:
    """What ``auto`` chose per table, from ``batches`` batches read per rank, and the bytes per step (all ranks)
    of every alternative; ``memory_bound`` names the tables whose cheapest type did not fit."""

    batches: int
    world_size: int
    bytes: dict[str, dict[str, float]] = field(default_factory=dict)
    candidates: dict[str, list[str]] = field(default_factory=dict)
    choice: dict[str, ShardingType] = field(default_factory=dict)
    memory_bound: list[str] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)

    def overrides(self, configs: Optional[dict[str, TableConfig]]) -> dict[str, TableConfig]:
        """``configs`` with each decided table's sharding set to its choice (other fields kept)."""
        merged = dict(configs or {})
        for name, sharding in self.choice.items():
            base = merged.get(name, TableConfig())
            merged[name] = TableConfig(sharding=sharding, optimizer=base.optimizer, dynamic=base.dynamic,
                                       pretrained=base.pretrained, cache=base.cache)  # fmt: skip
        return merged

    def column_widths(self) -> dict[str, int]:
        """The column shard width of each table given ``column_wise``: one shard per rank (``planner_constraints``)."""
        return dict(self.widths)

    def summary_rows(self) -> list[str]:
        """One row per decided table: the choice and the bytes per step of each alternative it had."""
        rows = []
        for name, sharding in sorted(self.choice.items()):
            alternatives = ", ".join(f"{t} {self.bytes[name][t] / 1024:,.1f}" for t in self.candidates[name])
            why = "cheapest that fits in memory" if name in self.memory_bound else "fewest bytes"
            label = f"auto sharding {name}"
            label = f"{label:<26}" if len(label) < 26 else label + " "
            rows.append(f"{label}{sharding.value} ({why}; KiB/step over {self.world_size} ranks, "
                        f"{self.batches} batches read: {alternatives})")  # fmt: skip
        return rows


def asked_auto(
    tables: EmbeddingTables, default_sharding: ShardingType, overrides: Optional[dict[str, TableConfig]]
) -> list[str]:
    """The tables whose sharding is ``auto`` (by override or default) and that the measured bytes decide."""
    names = []
    for name, table in tables.tables.items():
        override = (overrides or {}).get(name)
        sharding = (override.sharding if override is not None else None) or default_sharding
        pooled = isinstance(tables.modules[tables.weights[name][0]], EmbeddingBagCollection)
        if sharding is ShardingType.AUTO and table.dynamic is None and table.cache is None and pooled:
            names.append(name)
    return names


def candidates(table: ResolvedTable, world: int) -> list[ShardingType]:
    """The types ``auto`` may give ``table`` (see the module docstring), in tie-breaking order."""
    shard_dim = table.dim // world if world > 0 else 0
    column_wise = table.route is TableRoute.FUSED and world > 1 and table.dim % world == 0 and shard_dim % 4 == 0
    return [t for t in AUTO_CANDIDATES if t is not ShardingType.COLUMN_WISE or column_wise]


def decide(
    hint: dict[str, dict[str, float]],
    allowed: dict[str, list[ShardingType]],
    sizes: dict[str, int],
    fits: Callable[[dict[str, ShardingType]], bool],
) -> tuple[dict[str, ShardingType], list[str]]:
    """Per table of ``allowed``, the cheapest type by ``hint`` such that ``fits`` the whole assignment (tables
    not yet decided ``row_wise``), deciding the largest tables (``sizes``) first when the cheapest do not fit.
    Returns the choice and the tables that did not get their cheapest type."""
    ranked = {
        name: sorted(types, key=lambda t: (hint[name][t.value], AUTO_CANDIDATES.index(t)))
        for name, types in allowed.items()
    }
    cheapest = {name: types[0] for name, types in ranked.items()}
    if fits(cheapest):
        return cheapest, []
    decided: dict[str, ShardingType] = {}
    for name in sorted(ranked, key=lambda n: (-sizes[n], n)):
        rest = {other: ShardingType.ROW_WISE for other in ranked if other not in decided and other != name}
        fitting = [t for t in ranked[name] if fits({**decided, name: t, **rest})]
        if not fitting:
            raise ValueError(
                f"sharding 'auto': table {name!r} fits in no sharding type ({', '.join(t.value for t in ranked[name])}) "
                "with the other tables spread row_wise: the model does not fit in the ranks' memory as TorchRec's "
                "planner counts it. Use more processes, or set the tables' sharding explicitly."
            )
        decided[name] = fitting[0]
    return decided, [name for name in ranked if decided[name] is not cheapest[name]]


def choose_sharding(
    model: nn.Module,
    tables: EmbeddingTables,
    names: list[str],
    stats: list[BatchStats],
    batches: int,
    constraints: dict[str, ParameterConstraints],
    topology: Topology,
    sharders: list,
    process_group: Optional[dist.ProcessGroup],
    device_type: str,
) -> AutoShardingDecision:
    """The decision for the tables ``names`` from every rank's ``stats`` (rank 0 decides and broadcasts;
    ``process_group`` None: this process alone). ``constraints`` are the planner's for every table as resolved;
    the decided tables' are replaced by their single type."""
    decision = AutoShardingDecision(batches=batches, world_size=len(stats))
    if process_group is None or dist.get_rank(process_group) == 0:
        hint = sharding_hint(stats, {name: (tables.tables[name].rows, tables.tables[name].dim) for name in names})
        allowed = {name: candidates(tables.tables[name], len(stats)) for name in names if name in hint}
        sizes = {name: tables.tables[name].rows * tables.tables[name].dim for name in allowed}

        def fits(assignment: dict[str, ShardingType]) -> bool:
            return plan_fits(model, tables, assignment, constraints, topology, sharders, device_type)

        decision.choice, decision.memory_bound = decide(hint, allowed, sizes, fits)
        decision.bytes = {name: hint[name] for name in allowed}
        decision.candidates = {name: [t.value for t in types] for name, types in allowed.items()}
        decision.widths = {
            name: tables.tables[name].dim // len(stats)
            for name, t in decision.choice.items()
            if t is ShardingType.COLUMN_WISE
        }
    if process_group is not None and dist.get_world_size(process_group) > 1:
        shared = [decision]
        dist.broadcast_object_list(shared, src=dist.get_global_rank(process_group, 0), group=process_group)
        decision = shared[0]
    for row in decision.summary_rows():
        log.info("SparseStrategy %s", row)
    return decision


def plan_fits(
    model: nn.Module,
    tables: EmbeddingTables,
    assignment: dict[str, ShardingType],
    constraints: dict[str, ParameterConstraints],
    topology: Topology,
    sharders: list,
    device_type: str,
) -> bool:
    """Whether TorchRec's planner finds a plan of ``model`` on ``topology`` with the tables of ``assignment``
    sharded so (the others by ``constraints``), counting the optimizer state ``attach_fused_optimizers`` adds."""
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=_constraints(constraints, tables, assignment, topology.world_size)
    )
    with _planning_optimizers(tables, device_type):
        try:
            planner.plan(model, sharders)
        except PlannerError:
            return False
    return True


def _constraints(
    base: dict[str, ParameterConstraints], tables: EmbeddingTables, assignment: dict[str, ShardingType], world: int
) -> dict[str, ParameterConstraints]:
    """``base`` with each table of ``assignment`` constrained to its type (column_wise: one shard per rank)."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    out = dict(base)
    for name, sharding in assignment.items():
        dense = sharding is ShardingType.DATA_PARALLEL
        kernel = EmbeddingComputeKernel.DENSE.value if dense else EmbeddingComputeKernel.FUSED.value
        min_partition = tables.tables[name].dim // world if sharding is ShardingType.COLUMN_WISE else None
        out[name] = ParameterConstraints(
            sharding_types=[sharding.value], compute_kernels=[kernel], min_partition=min_partition
        )
    return out


@contextmanager
def _planning_optimizers(tables: EmbeddingTables, device_type: str) -> Iterator[None]:
    """Marks the tables' weights with the optimizer ``attach_fused_optimizers`` will attach (the attributes
    ``apply_optimizer_in_backward`` sets and the planner reads to count optimizer state), for trial plans
    made before the real tables are resolved; removed afterwards."""
    marked = []
    for name, table in tables.tables.items():
        weight = tables.weights[name][1]
        if hasattr(weight, "_optimizer_classes"):
            continue
        if table.route is TableRoute.FUSED:
            optimizer_class, kwargs = fused_optimizer_for(table.optimizer, device_type)
        else:
            optimizer_class, kwargs = trec_optim.SGD, {"lr": 0.0}
        weight._optimizer_classes, weight._optimizer_kwargs = [optimizer_class], [kwargs]  # type: ignore[attr-defined]
        marked.append(weight)
    try:
        yield
    finally:
        for weight in marked:
            del weight._optimizer_classes, weight._optimizer_kwargs


def check_resumed_choice(saved: Optional[dict[str, str]], tables: EmbeddingTables) -> None:
    """Refuses to resume a checkpoint in which ``auto`` made a table ``data_parallel`` into a run where it is
    sharded, or the other way round: the two keep the table's optimizer state apart (lightning_sparse's kernels
    against fbgemm's), so the state would not be found. ``saved``: the checkpoint's choice per table."""
    for name, sharding in (saved or {}).items():
        table = tables.tables.get(name)
        if table is None or (sharding == ShardingType.DATA_PARALLEL.value) == (
            table.sharding is ShardingType.DATA_PARALLEL
        ):
            continue
        raise ValueError(
            f"The checkpoint was written when sharding 'auto' gave table {name!r} {sharding!r}, from the batches it "
            f"read then; in this run it is {table.sharding.value!r} (auto decides from batches only when fitting on "
            "several processes). A data_parallel table's optimizer state is kept apart from a sharded one's, so it "
            f"cannot be resumed into the other: set tables: {{{name}: {{sharding: {sharding}}}}} for this run."
        )
