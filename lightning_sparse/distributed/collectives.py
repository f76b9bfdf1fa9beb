"""Where the tensors of a collective must live.

A process group's backend moves tensors of some device types only: nccl refuses CPU tensors ("No backend
type associated with device type cpu"), gloo takes CPU tensors. Code that builds a tensor just to
communicate it (a byte count, split sizes) asks :func:`collective_device` where to build it, so the same
line works under gloo on CPUs and under nccl on GPUs. Object collectives (``all_gather_object``) already
choose their device inside torch.distributed and need nothing from here.

:class:`Collectives` is what the components under the strategy communicate with (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized

_T = TypeVar("_T")
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def collective_device_type(backend: str) -> str:
    """The device type whose tensors ``backend`` communicates, preferring the CPU when it can.

    ``backend`` is what ``dist.get_backend`` returns: one name (``"nccl"``, ``"gloo"``) or ``device:backend``
    pairs (``"cpu:gloo,cuda:nccl"``). This is the rule torch.distributed applies to object collectives.
    """
    backend = backend.lower().strip()
    if ":" in backend:
        pairs = dict(part.strip().split(":", 1) for part in backend.split(",") if part.strip())
        if not pairs:
            raise ValueError(f"process group backend {backend!r} names no device:backend pair")
        return "cpu" if "cpu" in pairs else next(iter(pairs))
    devices = dist.Backend.backend_capability.get(backend)
    if not devices:
        known = ", ".join(sorted(dist.Backend.backend_capability))
        raise ValueError(f"unknown process group backend {backend!r}; torch.distributed knows: {known}")
    return "cpu" if "cpu" in devices else devices[0]


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device on which to build a tensor for a collective on ``group`` (default: the world group).

    CPU for gloo, this rank's current CUDA device for nccl (Lightning sets it to the rank's GPU). Without an
    initialised process group there is nothing to communicate with, and the CPU is returned.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    device_type = collective_device_type(str(dist.get_backend(group)))
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type, None)
    if module is None or not hasattr(module, "current_device"):
        raise RuntimeError(
            f"process group backend needs {device_type!r} tensors, but torch has no '{device_type}' device module"
        )
    return torch.device(device_type, module.current_device())


@dataclass(frozen=True)
class Collectives:
    """Rank, world size and the collectives that the components under :class:`SparseStrategy` use.

    Components below ``strategies/`` (dynamic tables, the sparse optimizer, checkpoint IO) take one of these
    instead of the strategy, which they must not import. The strategy hands them ``Collectives.of_strategy(self)``
    (Lightning's rank and world size); code using a component on its own (a test, a script) passes nothing and
    gets :meth:`of_process_group`: the default process group when one is initialised, else a world of one.

    The components do not hold the strategy itself because they outlive its Trainer (a later Trainer reuses the
    sharded model, see ``distributed/sharded_model.py``). :meth:`all_reduce` is one ``torch.distributed.all_reduce``:
    Lightning's ``DDPStrategy.reduce`` (``_sync_ddp``) runs a barrier before every reduction, a second collective
    in every step of a data-parallel table. Lightning's strategies gather tensors only, so objects are gathered
    with ``torch.distributed.all_gather_object``, which picks its own device. Tensors for :meth:`all_reduce` are
    built on :func:`collective_device`.
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of_strategy(cls, strategy: Any) -> "Collectives":
        """The rank and world size of a Lightning strategy (its ``global_rank`` and ``world_size``)."""
        return cls(int(strategy.global_rank), int(strategy.world_size))

    @classmethod
    def of_process_group(cls) -> "Collectives":
        """The default process group's rank and world size, or a world of one without a process group."""
        if not _distributed_is_initialized():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over all ranks in place (``sum``, ``min`` or ``max``) and returned."""
        if self.world_size == 1 or not _distributed_is_initialized():
            return tensor
        dist.all_reduce(tensor, op=_REDUCE_OPS[op])
        return tensor

    def all_gather_object(self, obj: _T) -> list[_T]:
        """Every rank's ``obj``, in rank order (a list of one in a world of one)."""
        if self.world_size == 1 or not _distributed_is_initialized():
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered
