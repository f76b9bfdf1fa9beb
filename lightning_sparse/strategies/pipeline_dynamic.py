"""Dynamic tables under a training pipeline: ids remapped when a batch enters the pipeline, rows recycled late.

Without a pipeline, a batch's raw ids are remapped to rows (admitting, evicting, expiring) at the step that
trains it, and the rows handed to new ids are re-initialised right then (``recycle_rows``), before its lookup.
A pipeline distributes a batch's ids before that step, so here:

- **Remap when the batch enters the pipeline** (:meth:`PipelineRemaps.remap`, on the main thread, batches in
  order, each at the step that will train it): the hash tables see the same ids at the same steps in the same
  order as without a pipeline, so every admission/eviction decision is the one ``none`` makes.
- **Recycle at the batch's lookup, not at its remap.** An eviction by batch ``j`` may take the row of an id
  that an earlier in-flight batch ``k < j`` has mapped. Re-initialising it at ``j``'s remap would change
  the row under ``k``. So a batch's new rows are re-initialised just before its own lookup: for
  ``sparse_dist`` in its ``training_step`` (after the update of ``j - 1``, as in ``none``, hence bit-identical);
  for ``hybrid``/``semi_sync`` on the worker, just before the lookup of ``j``. There, the updates of the
  in-flight batches ``k < j`` still follow and would write the evicted id's gradient into the row the new
  id now owns: after each update the rows recycled by later batches are written again
  (:meth:`PipelineRemaps.reapply`), i.e. an evicted id's in-flight update is discarded, exactly as if the
  eviction came after it. No in-flight lookup ever reads a row another id's update has touched.
- **Drains rewind.** A checkpoint must hold the state after the trained batches only (the loader resumes
  after them and the batches read ahead are read again). Each remap keeps a copy of the hash tables taken
  just before it, and each recycle the rows it overwrote; a drain puts back the rows of untrained batches
  (latest first) and the hash tables as they were before the oldest untrained batch's remap; those batches
  are remapped again, with the same results, when they enter the pipeline again.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.distributed.sharded_dynamic import DynamicTables, _local_pieces

# (a local tensor, the rows of it that were overwritten, their values before)
RowsBefore = list[tuple[Tensor, Tensor, Tensor]]


class Remapped:
    """One batch after its remap: the batch the model sees, the rows it assigned (all ranks'), its step, the
    hash tables before the remap, and (once recycled) the values its recycle overwrote."""

    def __init__(self, batch: Any, assigned: dict[str, Tensor], step: int, hash_before: dict[str, Tensor]) -> None:
        self.batch = batch
        self.assigned = {table: rows for table, rows in assigned.items() if rows.numel()}
        self.step = step
        self.hash_before = hash_before
        self.rows_before: Optional[RowsBefore] = None  # set by recycle: the batch's new rows are live


class PipelineRemaps:
    """The remap/recycle/rewind steps of :mod:`pipeline_dynamic` over a model's :class:`DynamicTables`."""

    def __init__(self, dynamic: DynamicTables) -> None:
        self.dynamic = dynamic

    def remap(self, batch: Any, step: int) -> Remapped:
        """Main thread, batches in order (a collective for sharded hash tables): the batch with rows for ids."""
        hash_before = {key: value.clone() for key, value in self.dynamic.state_dict().items()}
        assigned: dict[str, Tensor] = {}

        def one(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
            remapped, rows = self.dynamic.remap_for_training(kjt, step)
            assigned.update(rows)
            return remapped

        return Remapped(apply_to_collection(batch, KeyedJaggedTensor, one), assigned, step, hash_before)

    def recycle(self, entry: Remapped) -> None:
        """Just before the batch's lookup: its new rows re-initialised (weights and optimizer state)."""
        entry.rows_before = self._read_rows(entry.assigned)
        self.dynamic.recycle_rows(entry.assigned, entry.step)

    def reapply(self, later: list[Remapped]) -> None:
        """After the update of an in-flight batch: rows recycled by the later batches ``later`` (in order) are
        written again, undoing what that update wrote into them for the ids they evicted."""
        for entry in later:
            if entry.assigned:
                entry.rows_before = self._read_rows(entry.assigned)
                self.dynamic.recycle_rows(entry.assigned, entry.step)

    def rewind(self, untrained: list[Remapped]) -> None:
        """At a drain (nothing runs on the tables): the untrained batches' recycled rows put back, latest first,
        and the hash tables as before the first one's remap."""
        with torch.no_grad():
            for entry in reversed(untrained):
                for tensor, rows, values in entry.rows_before or []:
                    tensor.data[rows] = values
                entry.rows_before = None
        if untrained:
            self.dynamic.load_state_dict(untrained[0].hash_before)

    @torch.no_grad()
    def _read_rows(self, assigned: dict[str, Tensor]) -> RowsBefore:
        """This rank's pieces of the assigned rows (weights, per-row optimizer state), as recycle_rows writes them."""
        saved: RowsBefore = []
        for table, rows in assigned.items():
            capacity = self.dynamic.configs[table].capacity
            tensors = [self.dynamic._weights[table]] + [
                state
                for state in self.dynamic._row_states.get(table, [])
                if state.dim() > 0 and state.size(0) == capacity
            ]
            for tensor in tensors:
                for piece, (row0, _) in _local_pieces(tensor):
                    inside = rows[(rows >= row0) & (rows < row0 + piece.size(0))] - row0
                    if inside.numel():
                        local = inside.to(piece.device)
                        saved.append((piece, local, piece[local].clone()))
        return saved
