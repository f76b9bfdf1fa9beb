"""The data loader of the bundled data modules: its position is part of the checkpoint, its ranks end every pass together.

It is torchdata's :class:`~torchdata.stateful_dataloader.StatefulDataLoader`, which saves where a pass stands
(sampler position, each worker's dataset state) and restores it; Lightning checkpoints any train loader that
has ``state_dict``/``load_state_dict`` (``FitLoop.on_save_checkpoint`` stores it under
``loops.fit_loop.state_dict.combined_loader``, and a resumed fit loads it before its first ``iter()``).
Three things are added here, each because the plain loader would make a resumed or distributed run wrong:

1. **The state is taken at the batches the trainer consumed, not at those it fetched.** Lightning fetches one
   batch ahead of the step for a loader without a length (to know which batch is the last), so the plain
   loader's state counts a batch no step has seen and the resumed run would skip it. This loader keeps its
   state after each of the last few batches and reports the one after the batches the fit loop counts as
   ready (:func:`fit_progress`); when the fit loop counts the epoch as over (its last batch reached, or its
   ``limit_train_batches``), the state says so and the next pass starts from the beginning.
2. **The state is per rank.** Only rank 0 writes the trainer state of a SparseStrategy checkpoint, but
   ranks stand at different places (a Criteo rank reads other lines than its neighbour, and skips other
   malformed ones): ``state_dict`` gathers every rank's state and ``load_state_dict`` restores this rank's.
   A mid-pass position only means something for the world size and worker count that wrote it; another
   one is refused with an error (an end-of-pass state loads anywhere).
3. **Ranks agree on the number of batches** of a dataset without a length (``IterableDataset``): every
   step runs collectives, so a rank holding one more batch than the others would wait for them forever.
   Before handing out a batch the ranks all-reduce whether each has one; the pass ends for every rank as
   soon as one of them is out of data, and the others' surplus batches are dropped ("stop together").
   A map-style dataset split by a ``DistributedSampler`` has equal counts by construction.

Communication: ``data/`` sits below ``distributed/`` and is used without a Trainer too (a loader in a script,
a dataset in a worker process), so it uses the default process group: :func:`process_rank_world` (Lightning's
``_distributed_is_initialized``) for rank and world size, one ``torch.distributed.all_reduce`` per batch for the
agreement (Lightning's ``DDPStrategy.reduce`` would add a barrier before it, a second collective per batch), and
``torch.distributed.all_gather_object`` for the positions. The data modules take rank and world size from their
Trainer.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

# States kept per pass: the one after the batch the trainer is on, plus Lightning's prefetched batch, the
# batches a SparseStrategy pipeline reads ahead (``hybrid`` with staleness S: S + 1) and slack.
_KEPT_STATES = 16


class Consumed(NamedTuple):
    """How far the trainer has got in the current pass: batches consumed, and whether the pass is over for it."""

    batches: int
    pass_over: bool


def fit_progress(trainer: "pl.Trainer") -> Callable[[], Consumed]:
    """The train loader's ``consumed`` callback: the fit loop's count of batches handed to ``training_step``.

    ``batch_progress.current.ready`` counts this epoch's batches fetched for a step (restored on resume);
    the epoch is over for the fit loop when it reached ``num_training_batches`` (the loader's length or
    ``limit_train_batches``) or the fetcher marked the last batch.
    """

    def consumed() -> Consumed:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        ready = progress.current.ready
        return Consumed(ready, bool(progress.is_last_batch) or ready >= trainer.num_training_batches)

    return consumed


def process_rank_world() -> tuple[int, int]:
    """This process's rank and world size in the default process group; ``(0, 1)`` without one."""
    if _distributed_is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reader_of(rank: Optional[int], world_size: Optional[int], max_workers: int) -> tuple[int, int, int]:
    """This DataLoader worker's reader among all ranks' workers: ``(reader, readers, worker)``, reader
    ``rank * workers + worker`` of ``world * workers``. ``rank``/``world_size`` None: the default process group's."""
    rank, world = (rank, world_size) if rank is not None and world_size is not None else process_rank_world()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if worker >= max_workers:
        raise ValueError(f"DataLoader worker {worker} exceeds max_workers={max_workers}")
    return rank * workers + worker, world * workers, worker


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a MIN all-reduce; on one process, ``flag`` itself)."""
    if process_rank_world()[1] == 1:
        return flag
    on_gpu = dist.get_backend() == "nccl"  # nccl refuses CPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _gather(obj: Any) -> list[Any]:
    world = process_rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _StatefulIterator(Protocol):
    """A ``StatefulDataLoader`` iterator: its position is its ``state_dict``."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...


class _Pass(Iterator):
    """One pass over the loader: counts its batches and remembers the loader state after the last few."""

    def __init__(self, base: _StatefulIterator, start: int, lockstep: bool, kept: int = _KEPT_STATES) -> None:
        self.base = base
        self.kept = kept
        self.lockstep = lockstep
        self.batches = start  # batches handed out in this pass, counting those before a resume
        self.ended = False
        self.states: dict[int, Any] = {start: copy.deepcopy(base.state_dict())}

    def __next__(self) -> Any:
        if self.ended:
            raise StopIteration
        try:
            batch, have = next(self.base), True
        except StopIteration:
            batch, have = None, False
        if self.lockstep:
            have = all_ranks(have)
        if not have:
            self.ended = True
            raise StopIteration
        self.batches += 1
        self.states[self.batches] = copy.deepcopy(self.base.state_dict())
        self.states.pop(self.batches - self.kept, None)
        return batch


class ResumableLoader(StatefulDataLoader):
    """A :class:`StatefulDataLoader` whose checkpointed position is exact under Lightning on any number of ranks.

    Args:
        dataset: any dataset ``StatefulDataLoader`` takes; an ``IterableDataset`` should implement
            ``state_dict``/``load_state_dict`` (else torchdata replays it from the start to the position).
        consumed: how far the trainer has got in the current pass (``None``: it consumed every batch handed
            out, and the pass is over once the loader raised ``StopIteration``). The data modules pass
            :func:`fit_progress` to their train loader.
        **kwargs: ``StatefulDataLoader`` arguments (``batch_size``, ``sampler``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Any, *, consumed: Optional[Callable[[], Consumed]] = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.consumed = consumed
        self._pass: Optional[_Pass] = None
        self._resume_at = 0  # batches of the restored pass already consumed; 0 for a fresh pass
        self.read_ahead = 0  # batches a wrapper reads before the trainer gets them (the cache's look-ahead loader)

    @property
    def lockstep(self) -> bool:
        """Whether the ranks agree on every batch (datasets without a length; see the module docstring)."""
        return isinstance(self.dataset, IterableDataset)

    def __iter__(self) -> _Pass:
        start, self._resume_at = self._resume_at, 0
        self._pass = _Pass(super().__iter__(), start, self.lockstep, _KEPT_STATES + self.read_ahead)
        return self._pass

    def _local_state(self) -> dict[str, Any]:
        """This rank's position: ``loader`` is None at the start or the end of a pass (the next one is fresh)."""
        local: dict[str, Any] = {"batches": 0, "loader": None, "num_workers": self.num_workers}
        if self._pass is None:
            return local
        if self.consumed is None:
            batches, pass_over = self._pass.batches, self._pass.ended
        else:
            batches, pass_over = self.consumed()
        if pass_over:
            return local
        if batches not in self._pass.states:
            raise RuntimeError(
                f"The trainer has consumed {batches} batches of this pass, but the loader handed out "
                f"{self._pass.batches} and kept its state only after {sorted(self._pass.states)}: the checkpoint "
                "cannot hold an exact data position. Was the loader iterated outside the trainer?"
            )
        local.update(batches=batches, loader=self._pass.states[batches])
        return local

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position (a collective: Lightning calls it on all ranks when it saves a checkpoint)."""
        ranks = _gather(self._local_state())
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pass = None
        self._resume_at = 0
        ranks = state_dict.get("ranks") if state_dict else None
        if not ranks or all(r["loader"] is None for r in ranks):
            super().load_state_dict({})
            return
        rank, world = process_rank_world()
        if len(ranks) != world:
            raise ValueError(
                f"The checkpoint's data position was saved mid-epoch by {len(ranks)} processes; this run has "
                f"{world}. Each process reads its own share of the data, so the position cannot be carried over: "
                f"resume on {len(ranks)} processes, or from a checkpoint saved at the end of an epoch."
            )
        mine = ranks[rank]
        if mine["num_workers"] != self.num_workers:
            raise ValueError(
                f"The checkpoint's data position was saved with num_workers={mine['num_workers']}; this loader has "
                f"num_workers={self.num_workers}. Workers split the data between them: resume with "
                f"num_workers={mine['num_workers']}, or from a checkpoint saved at the end of an epoch."
            )
        super().load_state_dict(mine["loader"])
        self._resume_at = mine["batches"]
