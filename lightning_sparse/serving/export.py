"""``DeltaExport``: a Lightning callback that writes the rows changed during training as versioned exports.

Every ``every_n_steps`` steps and/or ``every_seconds`` seconds (rank 0's clock decides, so all ranks agree),
every rank writes the rows its shards changed since the previous export, keyed by raw id, with tombstones
for ids that left a dynamic table (:mod:`~lightning_sparse.serving.collect`); rank 0 writes the dense model.
The first export of a run is a full snapshot; the last one is taken when training ends. The version is
published only when every rank has finished (see :mod:`~lightning_sparse.serving.format` for the protocol):
a crash mid-export leaves the previous version current and readable, and the next run deletes what was
left half-written and continues with a full snapshot.

The export directory itself is this component's state (``current.json``: the last version and the export
id), so it needs nothing from the training checkpoint: a resumed run reads it and continues the numbering.

YAML (``lightning-sparse fit``)::

    trainer:
      callbacks:
        - class_path: lightning_sparse.serving.DeltaExport
          init_args: {directory: outputs/serving/exports, every_n_steps: 50, every_seconds: null, quantize: none}
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_sparse.durable import fsync_dir
from lightning_sparse.serving import collect
from lightning_sparse.serving.format import (
    CURRENT_FILE,
    DENSE_FILE,
    MANIFEST_FILE,
    PARTIAL_SUFFIX,
    ExportError,
    SchemaMismatchError,
    file_entry,
    partial_dir,
    rank_file,
    read_current,
    read_manifest,
    read_sealed,
    sealed,
    tables_of,
    version_dir,
    write_json_atomically,
    write_row_file,
)

FAULT_ENV = "LIGHTNING_SPARSE_FAULT_KILL_AT_EXPORT"  # "<version>:<point>[:<rank>]", see _fault_point


class DeltaExport(Callback):
    """Exports changed embedding rows and the dense model during ``fit`` under ``SparseStrategy``.

    Args:
        directory: the export directory (shared by all ranks; created if missing).
        every_n_steps: export after every this many training steps (None: not by steps).
        every_seconds: export when this many seconds passed since the last export (None: not by time).
        quantize: ``none`` (float32 rows, exact) or ``int8`` (8-bit row-wise: uint8 codes, a scale and bias per row).
        export_on_train_end: also export when training ends (so the last steps reach serving).
    """

    def __init__(
        self,
        directory: str,
        every_n_steps: Optional[int] = 100,
        every_seconds: Optional[float] = None,
        quantize: Literal["none", "int8"] = "none",
        export_on_train_end: bool = True,
    ) -> None:
        if every_n_steps is None and every_seconds is None:
            raise ValueError("DeltaExport needs every_n_steps or every_seconds (or both); both are None")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"DeltaExport.every_n_steps must be >= 1 or None, got {every_n_steps}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"DeltaExport.every_seconds must be > 0 or None, got {every_seconds}")
        if quantize not in ("none", "int8"):
            raise ValueError(f"DeltaExport.quantize must be 'none' or 'int8', got {quantize!r}")
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.quantize = quantize
        self.export_on_train_end = export_on_train_end
        self.version = 0  # the last version published (or found in the directory at start)
        self.export_id = ""
        self.exported_steps: list[int] = []
        self.export_seconds: list[float] = []  # wall time of each export on this rank
        self._diff = collect.ShardDiff()
        self._pieces: Optional[list[collect.Piece]] = None
        self._last_time = 0.0
        self._last_step = -1

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        if not hasattr(strategy, "embedding_tables") or strategy.embedding_tables is None:
            raise ExportError(
                f"DeltaExport needs SparseStrategy (strategy: sparse), got {type(strategy).__name__}: it exports the "
                "strategy's sharded embedding tables"
            )
        with_fallback = {
            n: t.dynamic.fallback_rows
            for n, t in strategy.embedding_tables.tables.items()
            if t.dynamic and t.dynamic.fallback_rows
        }
        if with_fallback:
            raise ExportError(
                f"DeltaExport: dynamic tables with fallback rows cannot be exported yet ({with_fallback}): an id without a "
                "slot trains a shared fallback row, which has no raw id of its own, and a store serving rows by raw id "
                "would give such ids zeros instead; set fallback_rows: 0 on the tables you export"
            )
        self._diff = collect.ShardDiff()
        self._pieces = collect.local_pieces(strategy)
        self._tables = collect.table_schemas(strategy)
        self._capacities = {n: t.dynamic.capacity for n, t in strategy.embedding_tables.tables.items() if t.dynamic}
        start = self._prepare_directory() if trainer.is_global_zero else None
        shared: list[Any] = [start]  # rank 0's, filled by broadcast_object_list
        if _world() > 1:
            dist.broadcast_object_list(shared, src=0)
        if isinstance(shared[0], str) and shared[0].startswith("error:"):
            raise SchemaMismatchError(shared[0][len("error:") :])
        self.version, self.export_id = shared[0]
        self._last_time = time.time()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = self.every_n_steps is not None and step % self.every_n_steps == 0
        if self.every_seconds is not None:
            flag = torch.tensor(
                [int(due or time.time() - self._last_time >= self.every_seconds)], device=_collective_device()
            )
            if _world() > 1:
                dist.broadcast(flag, src=0)  # rank 0's clock decides for everyone
            due = bool(flag.item())
        if due and step != self._last_step:
            self.export(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_on_train_end and trainer.global_step != self._last_step:
            self.export(trainer)

    # ------------------------------------------------------------------ export
    def export(self, trainer: Trainer) -> int:
        """Writes and publishes the next version (collective: every rank calls it at the same step)."""
        if self._pieces is None:
            raise ExportError("DeltaExport.export(trainer) runs after the callback's setup (the trainer calls both)")
        started = time.time()
        strategy, rank, world = trainer.strategy, _rank(), _world()
        version, step = self.version + 1, trainer.global_step
        full = not self._diff.copies
        kept = collect.partitions(strategy)
        maps = collect.gather_slot_maps(kept, self._capacities) if self._capacities else {}
        batches, tombstones = self._diff.changes(self._pieces, maps, kept)
        staging = partial_dir(self.directory, version)
        staging.mkdir(parents=True, exist_ok=True)
        name = rank_file(rank)
        records = write_row_file(staging / name, version, step, batches, tombstones, self.quantize == "int8")
        entry = {**file_entry(staging / name), "records": records}
        _fault_point(version, "rank_file_written", rank)
        entries: list[Any] = [{name: entry}]  # every rank's, filled by all_gather_object
        if world > 1:
            entries = [None] * world
            dist.all_gather_object(entries, {name: entry})
        if rank == 0:
            files = {k: v for share in entries for k, v in share.items()}
            module = trainer.lightning_module
            dense = {
                "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
                "hparams": dict(module.hparams),
                "state_dict": collect.dense_state(strategy),
            }
            buffer = io.BytesIO()
            torch.save(dense, buffer)
            with open(staging / DENSE_FILE, "wb") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            files[DENSE_FILE] = file_entry(staging / DENSE_FILE)
            manifest = sealed(
                {
                    "version": version, "step": step, "full": full, "world_size": world, "time": started,
                    "export_id": self.export_id, "model": dense["class_path"], "quantize": self.quantize,
                    "tables": {n: {"dim": t.dim, "dynamic": t.dynamic} for n, t in self._tables.items()},
                    "files": files,
                }
            )  # fmt: skip
            write_json_atomically(staging / MANIFEST_FILE, manifest)
            os.rename(staging, version_dir(self.directory, version))
            fsync_dir(self.directory)
            _fault_point(version, "before_pointer", rank)
            _publish(self.directory, version, self.export_id)
        self.version, self._last_step, self._last_time = version, step, time.time()
        self.exported_steps.append(step)
        self.export_seconds.append(time.time() - started)
        return version

    def _prepare_directory(self) -> Any:
        """Rank 0: finishes or deletes what a crashed export left; returns (last version, export id)."""
        root = self.directory
        root.mkdir(parents=True, exist_ok=True)
        current = read_current(root)
        version = int(current["version"]) if current else 0
        export_id = current["export_id"] if current else uuid.uuid4().hex
        # renamed into place but not yet pointed to (killed between the rename and current.json): finish it
        while version_dir(root, version + 1).is_dir():
            try:
                read_sealed(version_dir(root, version + 1) / MANIFEST_FILE, "manifest")
            except ExportError:
                shutil.rmtree(version_dir(root, version + 1))
                break
            version += 1
            _publish(root, version, export_id)
        for leftover in root.glob(f".v*{PARTIAL_SUFFIX}"):
            shutil.rmtree(leftover, ignore_errors=True)
        if version:
            previous = tables_of(read_manifest(root, version))
            if previous != self._tables:
                return (
                    f"error:export directory {str(root)!r} holds versions of another model (tables {_describe(previous)}); "
                    f"this model has {_describe(self._tables)}. Export into another directory."
                )
        return version, export_id


def _publish(root: Path, version: int, export_id: str) -> None:
    write_json_atomically(root / CURRENT_FILE, sealed({"version": version, "export_id": export_id}))


def _describe(tables: dict[str, Any]) -> str:
    return ", ".join(f"{name} (width {t.dim}{', dynamic' if t.dynamic else ''})" for name, t in sorted(tables.items()))


def _fault_point(version: int, point: str, rank: int) -> None:
    """Fault injection for the crash tests: ``LIGHTNING_SPARSE_FAULT_KILL_AT_EXPORT=<version>:<point>[:<rank>]``
    SIGKILLs the rank (default 0) at that point of that version's export."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == version and parts[1] == point and int(parts[2] if len(parts) > 2 else 0) == rank:
        os.kill(os.getpid(), signal.SIGKILL)


def _collective_device() -> torch.device:
    """nccl only takes tensors on the current GPU; gloo takes host tensors."""
    if _world() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
