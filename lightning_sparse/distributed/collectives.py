"""Where the tensors of a collective must live.

A process group's backend moves tensors of some device types only: nccl refuses CPU tensors ("No backend
type associated with device type cpu"), gloo takes CPU tensors. Code that builds a tensor just to
communicate it (a byte count, split sizes) asks :func:`collective_device` where to build it, so the same
line works under gloo on CPUs and under nccl on GPUs. Object collectives (``all_gather_object``) already
choose their device inside torch.distributed and need nothing from here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


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
        raise RuntimeError(f"process group backend needs {device_type!r} tensors, but torch has no '{device_type}' device module")
    return torch.device(device_type, module.current_device())
