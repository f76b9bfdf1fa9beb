"""Sharded directory checkpoints: torch.distributed.checkpoint for tensors, one small file for the rest,
published atomically and verified on load.

Layout of a checkpoint directory::

    .metadata, __<rank>_<n>.distcp  DCP: the model state dict (ShardedTensors of the tables), the
                                    sparse optimizer state and the dynamic tables' hash tables; every
                                    rank writes its own shards, replicated tensors are written once
    trainer_state.pt                rank 0: everything else Lightning checkpoints (loops, dense optimizer,
                                    schedulers, callbacks, hyper-parameters); it is replicated
    manifest.json                   rank 0, written last: size and sha256 of every other file

Saving writes into ``.<name>.partial`` next to the target; every rank checksums the files it wrote
(``__<rank>_*.distcp``; rank 0 also ``.metadata`` and ``trainer_state.pt``), so a shared filesystem is
never asked for another node's freshly written files, and rank 0 gathers the sums, writes the manifest
and renames the directory into place. A previous checkpoint at the same path is deleted only after that
(see :mod:`checkpoint_manifest`). Only rank 0 creates, renames or deletes directories.

Loading verifies the manifest and the checksum of every file first (each rank hashes a share of the
files, so a shared filesystem reads the checkpoint once), reads ``trainer_state.pt`` and DCP's non-tensor
entries with ``torch.load(weights_only=True)``, and reads into the current (possibly differently sharded)
state dicts, so a checkpoint written by 2 processes loads into 1 (and vice versa).

What ``weights_only`` must allow was measured on real checkpoints (the CLI examples, every sparse
optimizer kind, ModelCheckpoint with a monitor and ``save_last``, EarlyStopping, StepLR, LambdaLR,
OneCycleLR, SequentialLR, ReduceLROnPlateau, bf16-mixed): only containers, numbers, strings and tensors,
which torch allows by default, so no extra globals are registered. A callback or data module storing
its own types registers them with ``torch.serialization.add_safe_globals``; the error says so.

Every function here is called on every rank. Ranks exchange their checksums, failures and verification
problems as objects through the :class:`~lightning_sparse.distributed.collectives.Collectives` they are given
(SparseStrategy passes Lightning's rank and world size; the default is the default process group's).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lightning_sparse.distributed.checkpoint_manifest import (
    MANIFEST_FILE,
    REPLACED,
    STAGING,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    build_manifest,
    discard,
    file_entry,
    last_complete_checkpoint,
    publish,
    read_manifest,
    recover,
    remove,
    sibling,
    verify_files,
    write_manifest,
)
from lightning_sparse.distributed.collectives import Collectives
from lightning_sparse.typed_config import checkpoint_safe_types

__all__ = [
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "adopt_checkpoint",
    "is_sharded_checkpoint",
    "load_sharded",
    "remove_sharded",
    "save_sharded",
]

TRAINER_STATE_FILE = "trainer_state.pt"
METADATA_FILE = ".metadata"
MODEL_KEY = "model"
SPARSE_OPTIMIZER_KEY = "sparse_optimizer"
DYNAMIC_TABLES_KEY = "dynamic_tables"
CACHED_TABLES_KEY = "cached_tables"
FAULT_ENV = "LIGHTNING_SPARSE_FAULT_KILL_AT_SAVE"
_T = TypeVar("_T")
_saves_started = 0


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; raised on every rank, naming the ranks and their errors."""


def is_sharded_checkpoint(path: "str | os.PathLike") -> bool:
    """Whether ``path`` is a complete checkpoint directory (intact manifest; files are not re-hashed)."""
    try:
        read_manifest(Path(path))
    except (OSError, ValueError):
        return False
    return True


def save_sharded(
    path: "str | os.PathLike",
    model_state: dict[str, Any],
    sparse_optimizer_state: dict[str, Any],
    dynamic_tables_state: dict[str, Any],
    trainer_state: dict[str, Any],
    is_global_zero: bool,
    collectives: Optional[Collectives] = None,
    cached_tables_state: Optional[dict[str, Any]] = None,
) -> None:
    """Called on every rank. Replaces any previous checkpoint at ``path`` once the new one is complete."""
    global _saves_started
    _saves_started += 1
    path = Path(path)
    staging = sibling(path, STAGING)
    collectives = collectives or Collectives.of_process_group()
    rank = collectives.rank

    def prepare() -> None:
        if is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            recover(path)  # what a save cut short left behind
            staging.mkdir()

    def write_and_checksum() -> dict[str, dict[str, Any]]:
        if is_global_zero:
            _write_durably(trainer_state, staging / TRAINER_STATE_FILE)
        _fault_injection_point(rank, "written")
        return {file.name: file_entry(file) for file in _files_written_by(staging, rank, is_global_zero)}

    def commit(shares: list[dict[str, dict[str, Any]]]) -> None:
        if not is_global_zero:
            return
        files = {name: entry for share in shares for name, entry in share.items()}
        _check_metadata_covered(staging, files)
        info = {
            "world_size": len(shares),
            "global_step": trainer_state.get("global_step"),
            "epoch": trainer_state.get("epoch"),
        }
        write_manifest(staging, build_manifest(files, **info))
        publish(staging, path, between=lambda: _fault_injection_point(rank, "swapping"))

    untouched = "the previous checkpoint at that path, if any, is untouched"
    try:
        _on_every_rank(collectives, f"preparing {str(staging)!r}", path, untouched, prepare)
        try:
            dcp.save(
                _tensors(model_state, sparse_optimizer_state, dynamic_tables_state, cached_tables_state),
                storage_writer=dcp.FileSystemWriter(str(staging)),
            )
        except dcp.CheckpointException as error:  # raised on every rank
            raise CheckpointSaveError(
                f"Saving checkpoint {str(path)!r} failed while writing the shards ({_free_space(path.parent)}); "
                f"{untouched}. torch.distributed.checkpoint said: {error}"
            ) from error
        shares = _on_every_rank(collectives, "writing and checksumming the files", path, untouched, write_and_checksum)
        _on_every_rank(
            collectives,
            "publishing it",
            path,
            f"a previous checkpoint is at that path or, complete, in {str(sibling(path, REPLACED))!r}",
            lambda: commit(shares),
        )
    except BaseException:
        if is_global_zero and not is_sharded_checkpoint(staging):  # a complete one is kept: the next save publishes it
            try:
                discard(staging)
            except OSError:
                pass
        raise


def load_sharded(
    path: "str | os.PathLike",
    model_state: dict[str, Any],
    sparse_optimizer_state: dict[str, Any],
    dynamic_tables_state: dict[str, Any],
    collectives: Optional[Collectives] = None,
    cached_tables_state: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Verifies the checkpoint, loads tensors in place into the given (current) state dicts; returns the
    trainer state. Called on every rank."""
    path = Path(path)
    verify_checkpoint(path, collectives)
    _check_dynamic_tables_present(path, dynamic_tables_state)
    dcp.load(
        _tensors(model_state, sparse_optimizer_state, dynamic_tables_state, cached_tables_state),
        storage_reader=dcp.FileSystemReader(str(path)),
        planner=_WeightsOnlyLoadPlanner(),
    )
    return _read_trainer_state(path / TRAINER_STATE_FILE)


def remove_sharded(path: "str | os.PathLike") -> None:
    """Removes a checkpoint so that no half-removed directory is ever taken for one. Rank 0 only."""
    remove(Path(path))


def verify_checkpoint(path: Path, collectives: Optional[Collectives] = None) -> dict[str, Any]:
    """Checks the manifest and every file's size and checksum; raises naming every bad file. Collective:
    each rank hashes every ``world_size``-th file and all ranks raise the same error."""
    collectives = collectives or Collectives.of_process_group()
    problems: list[tuple[type, str]]
    manifest: dict[str, Any] = {}
    try:
        manifest = _complete_manifest(path)
        problems = verify_files(path, manifest, sorted(manifest["files"])[collectives.rank :: collectives.world_size])
    except (IncompleteCheckpointError, CorruptCheckpointError) as error:
        problems = [(type(error), str(error))]
    except OSError as error:
        problems = [(IncompleteCheckpointError, f"{str(path)!r} cannot be read: {error}")]
    found: list[tuple[type, str]] = []
    for share in collectives.all_gather_object(problems):
        found.extend(problem for problem in share if problem not in found)
    if found:
        kind = (
            CorruptCheckpointError if any(k is CorruptCheckpointError for k, _ in found) else IncompleteCheckpointError
        )
        raise kind(
            f"Refusing to load checkpoint {str(path)!r}: "
            + "; ".join(message for _, message in found)
            + ". "
            + _last_complete_hint(path)
        )
    return manifest


def adopt_checkpoint(path: "str | os.PathLike") -> None:
    """Writes a manifest for a checkpoint directory that has none (one saved before checkpoints carried
    manifests). Only for a directory you know to be complete: its files are taken as they are."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists():
        raise FileExistsError(f"{str(path)!r} already has a {MANIFEST_FILE}")
    missing = [name for name in (METADATA_FILE, TRAINER_STATE_FILE) if not (path / name).is_file()]
    if missing:
        raise IncompleteCheckpointError(f"{str(path)!r} is not a SparseStrategy checkpoint: it lacks {missing}")
    files = {file.name: file_entry(file) for file in sorted(path.iterdir()) if file.is_file()}
    _check_metadata_covered(path, files)
    write_manifest(path, build_manifest(files, world_size=None, adopted=True))


# ------------------------------------------------------------------------------------------- internals
def _complete_manifest(path: Path) -> dict[str, Any]:
    if path.is_file():
        raise IncompleteCheckpointError(
            f"{str(path)!r} is not a SparseStrategy checkpoint: expected a directory holding '{METADATA_FILE}' "
            f"(torch.distributed.checkpoint), '{TRAINER_STATE_FILE}' and '{MANIFEST_FILE}'. Checkpoints saved by "
            "SparseStrategy are directories; a single-file .ckpt from another strategy cannot hold sharded tables"
        )
    if not path.is_dir():
        raise IncompleteCheckpointError(f"there is no checkpoint at {str(path)!r}")
    if not (path / MANIFEST_FILE).is_file():
        if (path / METADATA_FILE).is_file():
            raise IncompleteCheckpointError(
                f"{str(path)!r} has no {MANIFEST_FILE}, so nothing shows that it is complete: its save or removal "
                "was cut short, or it was written before checkpoints carried manifests. If you know it is complete, "
                "adopt it once with lightning_sparse.distributed.checkpoint.adopt_checkpoint(path)"
            )
        raise IncompleteCheckpointError(
            f"{str(path)!r} has no {MANIFEST_FILE}: its save did not finish, or it is not a checkpoint"
        )
    manifest = read_manifest(path)
    unlisted = [name for name in (METADATA_FILE, TRAINER_STATE_FILE) if name not in manifest["files"]]
    if unlisted:
        raise CorruptCheckpointError(f"{str(path / MANIFEST_FILE)!r} does not list {unlisted}")
    return manifest


def _last_complete_hint(path: Path) -> str:
    last = last_complete_checkpoint(path.parent, excluding=path)
    if last is None:
        return f"There is no complete checkpoint in {str(path.parent)!r}."
    manifest = read_manifest(last)
    return f"The last complete checkpoint in {str(path.parent)!r} is {str(last)!r} (global_step {manifest.get('global_step')})."


def read_trainer_state(path: "str | os.PathLike") -> Optional[dict[str, Any]]:
    """The trainer state of checkpoint directory ``path`` without loading its tensors (None if it has none)."""
    file = Path(path) / TRAINER_STATE_FILE
    return _read_trainer_state(file) if file.is_file() else None


def _read_trainer_state(file: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(checkpoint_safe_types()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{str(file)!r} holds an object that torch.load(weights_only=True) does not allow; SparseStrategy never "
            "unpickles arbitrary code. If a callback or data module of yours stores its own type there and you trust "
            f"this checkpoint, allow the type with torch.serialization.add_safe_globals([...]). torch said: {error}"
        ) from error


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but a non-tensor entry (optimizer hyper-parameters) must pass
    ``torch.load(weights_only=True)`` first: DCP itself unpickles them without restriction. Once that
    restricted load has succeeded, DCP's own load can only rebuild the same plain objects."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        try:
            with torch.serialization.safe_globals(checkpoint_safe_types()):
                torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(
                f"checkpoint entry {read_item.dest_index.fqn!r} holds an object that weights-only loading does "
                f"not allow: {error}"
            ) from error
        value.seek(0)
        super().load_bytes(read_item, value)


def _files_written_by(staging: Path, rank: int, is_global_zero: bool) -> list[Path]:
    files = sorted(staging.glob(f"__{rank}_*.distcp"))
    if is_global_zero:
        files += [staging / METADATA_FILE, staging / TRAINER_STATE_FILE]
    return files


def _check_metadata_covered(directory: Path, files: dict[str, Any]) -> None:
    """Every file DCP's ``.metadata`` refers to must have been checksummed (guards the shard naming)."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    referenced = {info.relative_path for info in (metadata.storage_data or {}).values()}
    unhashed = sorted(referenced - files.keys())
    if unhashed:
        raise RuntimeError(
            f"torch.distributed.checkpoint's metadata refers to {unhashed}, which no rank checksummed: "
            "expected every rank's shards to be named __<rank>_<n>.distcp"
        )


def _free_space(folder: Path) -> str:
    """Free space where the checkpoint goes: a full disk shows up in torch's errors only as a short write."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {str(folder)!r}"
    except OSError:
        return "free space unknown"


def _write_durably(obj: Any, file: Path) -> None:
    with open(file, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _on_every_rank(
    collectives: Collectives, phase: str, path: Path, consequence: str, work: Callable[[], _T]
) -> list[_T]:
    """Runs ``work`` on this rank and gathers results; if it failed anywhere, every rank raises the same
    error (a rank raising alone would leave the others waiting in the next collective)."""
    result: Any = None
    local: Optional[BaseException] = None
    try:
        result = work()
    except Exception as error:  # reported to every rank below
        local = error
    gathered = collectives.all_gather_object((result, None if local is None else f"{type(local).__name__}: {local}"))
    failures = [f"rank {rank}: {error}" for rank, (_, error) in enumerate(gathered) if error]
    if failures:
        raise CheckpointSaveError(
            f"Saving checkpoint {str(path)!r} failed while {phase} ({'; '.join(failures)}; {_free_space(path.parent)}); {consequence}."
        ) from local
    return [value for value, _ in gathered]


def _fault_injection_point(rank: int, point: str) -> None:
    """Test hook. ``LIGHTNING_SPARSE_FAULT_KILL_AT_SAVE=<rank>:<n>[:swapping]`` SIGKILLs that rank in the
    n-th save of its process: after its shards are written, before the checkpoint is published (default,
    point ``written``), or, on rank 0, between renaming the previous checkpoint away and the new one in
    (``swapping``). A real kill (no exception, no cleanup), as an OOM killer or a preempted node deals it."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) >= 2 and spec[:2] == [str(rank), str(_saves_started)] and (spec[2:] or ["written"])[0] == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _tensors(
    model_state: dict,
    sparse_optimizer_state: dict,
    dynamic_tables_state: dict,
    cached_tables_state: Optional[dict] = None,
) -> dict[str, Any]:
    parts = {MODEL_KEY: model_state}
    sparse_state = _stateful_only(sparse_optimizer_state)
    if sparse_state["state"]:  # sgd everywhere keeps none; DCP would then ask for a key it never wrote
        parts[SPARSE_OPTIMIZER_KEY] = sparse_state
    if dynamic_tables_state:
        parts[DYNAMIC_TABLES_KEY] = dynamic_tables_state
    if cached_tables_state:  # the cached tables' backing stores (cache/tables.py)
        parts[CACHED_TABLES_KEY] = cached_tables_state
    return parts


def _check_dynamic_tables_present(path: Path, dynamic_tables_state: dict[str, Any]) -> None:
    """Names the hash-table state this run needs and the checkpoint lacks, instead of DCP's bare missing key.

    The usual cause is a sharded hash table whose partitions (one per row block of the table) do not
    match the checkpoint's: a row_wise table resumed on a different number of ranks, or a changed
    ``placement``.
    """
    if not dynamic_tables_state:
        return
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = set(metadata)
    missing = sorted(key for key in dynamic_tables_state if f"{DYNAMIC_TABLES_KEY}.{key}" not in saved)
    if not missing:
        _check_dynamic_tables_layout(path, dynamic_tables_state, metadata)
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


def _check_dynamic_tables_layout(path: Path, dynamic_tables_state: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Names the hash-state tensors whose saved shape or dtype differs from this run's, instead of DCP's bare
    size mismatch. A table keeps only the tensors its policy reads (``lightning_sparse/dynamic/state.py``),
    so a changed eviction, expiry or sketch setting changes them, as does the layout before int32 counts."""
    changed = []
    for key, tensor in dynamic_tables_state.items():
        saved = metadata.get(f"{DYNAMIC_TABLES_KEY}.{key}")
        size, properties = getattr(saved, "size", None), getattr(saved, "properties", None)
        if not isinstance(tensor, torch.Tensor) or size is None or properties is None:
            continue
        if tuple(size) != tuple(tensor.shape) or properties.dtype != tensor.dtype:
            changed.append(
                f"{key} (saved {properties.dtype} {list(size)}, this run {tensor.dtype} {list(tensor.shape)})"
            )
    if changed:
        raise ValueError(
            f"Checkpoint {str(path)!r} holds dynamic-table hash state in another layout than this run's: "
            f"{'; '.join(changed)}. A table keeps only the tensors its policy reads: resume with the "
            "DynamicTableConfig it was written with (eviction, expiry, admission.min_count and sketch_depth). "
            "A checkpoint written before int32 counts and steps (int64 slot_count) cannot be resumed through "
            "the sharded checkpoint; DynamicIdRemapper.load_state_dict converts such a table's state dict."
        )


def _stateful_only(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state without parameters whose state is empty (fused SGD has none).

    DCP writes no entry for an empty dict but then asks for one on load; the tensors are shared with the
    full state dict, so loading in place still fills it.
    """
    return {**optimizer_state, "state": {key: value for key, value in optimizer_state["state"].items() if value}}
