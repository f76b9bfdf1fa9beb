"""The manifest that makes a checkpoint directory complete, and the file operations around it.

A checkpoint directory counts as a checkpoint only when it holds ``manifest.json``: the size and sha256 of
every file in it, and a sha256 of the manifest's own content. The manifest is written last (to a temporary
name, fsynced, renamed), so a directory whose save was interrupted has none, and removal deletes it first,
so a half-removed directory has none either. Loading verifies every listed file against it.

Why sha256 (``hashlib``, no extra dependency): with the SHA extensions of current x86 and ARM CPUs it
hashes above 1 GB/s, so checksumming costs a fraction of writing (``benchmarks/checkpoint_overhead.py``).

Sibling directories next to a checkpoint ``<dir>/<name>`` (hidden, and without Lightning's ``.ckpt``
suffix, so ModelCheckpoint's search for ``last*.ckpt`` never sees them):

    .<name>.partial    the save being written; renamed to <name> once complete
    .<name>.replaced   the previous checkpoint while the new one is renamed in; deleted right after
    .<name>.removing   a checkpoint being deleted (renamed away first, so <name> vanishes at once)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from lightning_sparse.durable import fsync_dir

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lightning_sparse.checkpoint/1"
HASH = "sha256"
STAGING, REPLACED, REMOVING = "partial", "replaced", "removing"
_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class IncompleteCheckpointError(FileNotFoundError):
    """No checkpoint at the path, or one whose save (or removal) did not finish: no complete manifest,
    or a file the manifest lists is missing."""


class CorruptCheckpointError(ValueError):
    """A file of the checkpoint differs from what its manifest recorded (size or checksum), or the manifest
    itself is damaged."""


def sibling(path: Path, role: str) -> Path:
    return path.parent / f".{path.name}.{role}"


def file_entry(path: Path) -> dict[str, Any]:
    """Size and checksum of one file, read in chunks (shards can be many GB)."""
    digest = hashlib.new(HASH)
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, HASH: digest.hexdigest()}


def build_manifest(files: dict[str, dict[str, Any]], **info: Any) -> dict[str, Any]:
    body = {
        "format": MANIFEST_FORMAT,
        "hash": HASH,
        "saved_at": time.time(),
        **info,
        "files": dict(sorted(files.items())),
    }
    return {**body, "manifest_sha256": _self_checksum(body)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Writes the manifest atomically and durably: the directory is complete once this returns."""
    tmp = directory / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST_FILE)
    fsync_dir(directory)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The verified manifest of ``directory``; raises when it is missing or damaged (nothing else is read)."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise IncompleteCheckpointError(f"{str(directory)!r} has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
        body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
        intact = manifest["format"] == MANIFEST_FORMAT and manifest["manifest_sha256"] == _self_checksum(body)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{str(manifest_path)!r} is damaged: {error}") from error
    if not intact:
        raise CorruptCheckpointError(
            f"{str(manifest_path)!r} is damaged: its content does not match its own checksum (or it has format "
            f"{manifest.get('format')!r}, not {MANIFEST_FORMAT!r})"
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], names: Iterable[str]) -> list[tuple[type, str]]:
    """Problems of the named files (a share of the manifest's) as (error type, message); empty when intact."""
    problems: list[tuple[type, str]] = []
    for name in names:
        expected, file = manifest["files"][name], directory / name
        if not file.is_file():
            problems.append((IncompleteCheckpointError, f"{str(file)!r} is missing (listed in {MANIFEST_FILE})"))
            continue
        found = file_entry(file)
        if found["bytes"] != expected["bytes"]:
            problems.append(
                (
                    CorruptCheckpointError,
                    f"{str(file)!r} has {found['bytes']} bytes, {expected['bytes']} were written (truncated or overwritten)",
                )
            )
        elif found[HASH] != expected[HASH]:
            problems.append(
                (
                    CorruptCheckpointError,
                    f"{str(file)!r} is corrupted: its {HASH} differs from the one recorded at save",
                )
            )
    return problems


def last_complete_checkpoint(folder: Path, excluding: Optional[Path] = None) -> Optional[Path]:
    """The most recently saved directory in ``folder`` whose manifest is intact and whose files all exist
    with their recorded sizes (they are not re-hashed: this only suggests where to look)."""
    if not folder.is_dir():
        return None
    found: list[tuple[float, str, Path]] = []
    for entry in folder.iterdir():
        if entry.name.endswith(f".{REMOVING}") or (excluding is not None and entry == excluding):
            continue
        try:
            manifest = read_manifest(entry)
            if all((entry / name).stat().st_size == listed["bytes"] for name, listed in manifest["files"].items()):
                found.append((float(manifest["saved_at"]), entry.name, entry))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return max(found)[2] if found else None


def discard(path: Path) -> None:
    """Deletes a file, link or checkpoint directory; a directory loses its manifest first, so a deletion cut
    short never leaves something that passes for a checkpoint."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        (path / MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(path)


def remove(path: Path) -> None:
    """Removes a checkpoint: renamed to ``.<name>.removing`` (one atomic step), then deleted."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    trash = sibling(path, REMOVING)
    discard(trash)  # left over from a removal that was cut short
    os.rename(path, trash)
    fsync_dir(path.parent)
    discard(trash)


def publish(staging: Path, path: Path, between: Callable[[], None] = lambda: None) -> None:
    """Renames the complete ``staging`` directory to ``path``; a previous checkpoint there is deleted only
    after the new one is in place. Cut short between the two renames (where ``between`` runs), both stay
    complete: the previous under ``.<name>.replaced``, the new one under ``.<name>.partial``."""
    previous = sibling(path, REPLACED)
    if path.exists() or path.is_symlink():
        discard(previous)
        os.rename(path, previous)
        between()
        try:
            os.rename(staging, path)
        except OSError:
            os.rename(previous, path)
            raise
    else:
        os.rename(staging, path)
    fsync_dir(path.parent)
    try:
        discard(previous)  # also one left by a publish cut short earlier
    except OSError as error:  # the new checkpoint is in place; the replaced one stays under its hidden name
        log.warning("Could not delete the replaced checkpoint %s: %s", previous, error)


def recover(path: Path) -> None:
    """Resolves what a save to ``path`` cut short left behind, before the next save there: a complete
    ``.<name>.partial`` (its manifest was written) is published, finishing that save; an incomplete one is
    deleted; a complete ``.<name>.replaced`` goes back to ``path`` if nothing is there, else is deleted.
    So the newest complete checkpoint is never deleted before a newer one is complete."""
    staging, previous = sibling(path, STAGING), sibling(path, REPLACED)
    if _is_complete(staging):
        publish(staging, path)
    else:
        discard(staging)
    if previous.exists():
        if not (path.exists() or path.is_symlink()) and _is_complete(previous):
            os.rename(previous, path)
            fsync_dir(path.parent)
        else:
            discard(previous)


def _is_complete(directory: Path) -> bool:
    try:
        read_manifest(directory)
    except (OSError, ValueError):
        return False
    return True


def _self_checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
