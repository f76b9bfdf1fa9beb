"""Per-row version counters: the staleness a pipelined lookup actually saw, measured rather than assumed.

Every lookup kernel (fbgemm TBE) of a sharded table sees, in training, the rows the *global* batch reads of
its local shards (after TorchRec's input dist). Two counters per local row:

- ``due[r]``: how many earlier training lookups read row ``r`` (so, in a synchronous loop, how many updates
  row ``r`` would have received before this lookup);
- ``applied[r]``: how many of those updates had been applied when this lookup read it.

At a lookup, the staleness of row ``r`` is ``due[r] - applied[r]``: the number of earlier batches whose
update of ``r`` this lookup did not see. The largest over the looked-up rows is recorded, ``due`` is
advanced for them, and the rows wait in a FIFO until :meth:`RowVersions.applied` says that batch's row
update is done (lookups and updates both happen in batch order). A synchronous loop therefore always
measures 0; a pipeline with a staleness bound ``S`` must measure at most ``S`` (``tests/test_pipelines.py``).

Lookups made without gradients (validation, test, predict) are not counted: they update nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.optim.row_gradients import _lookup_inputs, find_lookup_kernels, tables_in_lookup


class _KernelVersions:
    """The counters of one lookup kernel's tables (local rows)."""

    def __init__(self, kernel: Any, owner: "RowVersions") -> None:
        self.owner = owner
        self.tables, self.num_features, _ = tables_in_lookup(kernel)
        rows = [w.shape[0] for w in kernel.emb_module.split_embedding_weights()]
        self.due = [torch.zeros(n, dtype=torch.int64) for n in rows]
        self.applied = [torch.zeros(n, dtype=torch.int64) for n in rows]
        self.in_flight: deque[list[Tensor]] = deque()
        self._handle = kernel.emb_module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or not self.owner.enabled:  # not a training lookup
            return
        with torch.no_grad():
            self._count(*_lookup_inputs(args, kwargs)[:2])

    def _count(self, indices: Tensor, offsets: Tensor) -> None:
        batch = (offsets.numel() - 1) // self.num_features
        read = []
        for i, table in enumerate(self.tables):
            begin, end = int(offsets[table.features[0] * batch]), int(offsets[(table.features[-1] + 1) * batch])
            rows = torch.unique(indices[begin:end].long().cpu())
            if rows.numel():
                stale = int((self.due[i][rows] - self.applied[i][rows]).max())
                self.owner.observe(stale)
                self.due[i][rows] += 1
            read.append(rows)
        self.in_flight.append(read)

    def applied_oldest(self) -> None:
        if self.in_flight:
            for counter, rows in zip(self.applied, self.in_flight.popleft()):
                counter[rows] += 1

    def forget_in_flight(self) -> None:
        """Lookups whose batches will never be updated (dropped by a drain) no longer count as due."""
        while self.in_flight:
            for counter, rows in zip(self.due, self.in_flight.pop()):
                counter[rows] -= 1

    def remove(self) -> None:
        self._handle.remove()


class RowVersions:
    """Version counters over every lookup kernel of a model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.enabled = True
        self.max_staleness = 0
        self._kernels = [_KernelVersions(kernel, self) for kernel in find_lookup_kernels(model)]

    def observe(self, staleness: int) -> None:
        self.max_staleness = max(self.max_staleness, staleness)

    def applied(self) -> None:
        """The oldest batch whose lookup is counted has had its rows updated."""
        for kernel in self._kernels:
            kernel.applied_oldest()

    def forget_in_flight(self) -> None:
        for kernel in self._kernels:
            kernel.forget_in_flight()

    def remove(self) -> None:
        for kernel in self._kernels:
            kernel.remove()
