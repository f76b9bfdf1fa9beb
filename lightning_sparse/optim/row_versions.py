"""Per-row version counters: the staleness a pipelined lookup actually saw, measured rather than assumed.

Every lookup kernel (fbgemm TBE) of a sharded table sees, in training, the rows the *global* batch reads of
its local shards (after TorchRec's input dist). Think of two versions per local row: ``due[r]``, how many
earlier training lookups read row ``r`` (in a synchronous loop, how many updates it would have received
before this lookup), and ``applied[r]``, how many of those updates had been applied when it is read again.
The staleness of ``r`` at a lookup is ``due[r] - applied[r]``, the number of earlier batches whose update of
``r`` this lookup did not see. Only the difference matters, so one counter per row is kept:
``pending[r] = due[r] - applied[r]``, the number of batches that read ``r`` and are not updated yet.

At a lookup, the largest ``pending`` over the rows read is recorded, then ``pending`` of each row read is
raised by one; the lookup's indices wait in a FIFO until :meth:`RowVersions.applied` says that batch's row
update is done, which lowers them again (lookups and updates both happen in batch order). A row read several
times by one batch counts once: the new values are gathered before they are written back, so duplicate
writes carry the same value (no sort, no ``unique``; a lookup costs one gather and one scatter of its ids).
A synchronous loop therefore always measures 0; a pipeline with a staleness bound ``S`` must measure at
most ``S`` (``tests/test_pipelines.py``).

Lookups made without gradients (validation, test, predict) are not counted: they update nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.optim.row_gradients import _lookup_inputs, find_lookup_kernels, tables_in_lookup


class _KernelVersions:
    """The ``pending`` counters of one lookup kernel's tables (local rows)."""

    def __init__(self, kernel: Any, owner: "RowVersions") -> None:
        self.owner = owner
        self.tables, self.num_features, _ = tables_in_lookup(kernel)
        weights = kernel.emb_module.split_embedding_weights()
        self.pending = [torch.zeros(w.shape[0], dtype=torch.int32, device=w.device) for w in weights]
        self.in_flight: deque[list[Tensor]] = deque()
        self._handle = kernel.emb_module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or not self.owner.enabled:  # not a training lookup
            return
        with torch.no_grad():
            self._count(*_lookup_inputs(args, kwargs)[:2])

    def _count(self, indices: Tensor, offsets: Tensor) -> None:
        batch = (offsets.numel() - 1) // self.num_features
        ends = offsets[
            [t.features[0] * batch for t in self.tables] + [(self.tables[-1].features[-1] + 1) * batch]
        ].tolist()
        read = []
        for i in range(len(self.tables)):
            rows = indices[ends[i] : ends[i + 1]].to(torch.int64)
            if rows.numel():
                seen = self.pending[i][rows]
                self.owner.observe(int(seen.max()))
                self.pending[i][rows] = seen + 1
            read.append(rows)
        self.in_flight.append(read)

    def _lower(self, read: list[Tensor]) -> None:
        for counter, rows in zip(self.pending, read):
            if rows.numel():
                counter[rows] = counter[rows] - 1

    def applied_oldest(self) -> None:
        if self.in_flight:
            self._lower(self.in_flight.popleft())

    def forget_in_flight(self) -> None:
        """Lookups whose batches will never be updated (dropped by a drain) no longer count."""
        while self.in_flight:
            self._lower(self.in_flight.pop())

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
