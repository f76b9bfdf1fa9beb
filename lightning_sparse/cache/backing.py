"""Backing stores of cached tables: the full rows and their per-row optimizer state, outside the scratchpad.

:class:`BackingStore` holds named ``[N, ...]`` tensors, ``weight`` and each per-row state tensor of the
table's optimizer kind (``sum``, ``exp_avg``, ``exp_avg_sq``). Two kinds of memory, chosen by
:class:`~lightning_sparse.config.CacheBacking`:

- ``host``: ordinary tensors in host memory (pinned when CUDA is available, so copies to a GPU scratchpad
  run asynchronously): the GPU's scratchpad is small and fast, the host's memory large.
- ``mmap``: one file per tensor, mapped into memory (``numpy.memmap``): a table larger than RAM, paged in
  and out by the operating system. The file is allocated in full when it is created, so a full disk is an
  error at setup naming the file, the bytes it needs and the bytes free, never a crash mid-training. Each
  file is locked (``flock``) while in use, so a second run pointed at the same folder stops with an error
  instead of sharing rows, and deleted when the store is closed or the process ends (the checkpoint holds
  the table).

  A row (128 bytes at dim 32) is a small part of a 4 KiB page, and a page not in memory is read when it is
  touched: one fault at a time, each waiting for the disk. :meth:`BackingStore.read` and
  :meth:`BackingStore.write` therefore go through the rows in chunks of ``PREFETCH_ROWS`` (ascending) and,
  before touching a chunk, ask the kernel to start reading the pages of the next ``PREFETCH_DEPTH`` chunks
  (``posix_fadvise(POSIX_FADV_WILLNEED)``, which queues the reads and returns): many reads are in flight
  at once instead of one, and the pages ahead are bounded (a budget smaller than the file keeps them).

The tensors of both are plain torch tensors: the checkpoint writes and reads them in place.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

PAGE = mmap.PAGESIZE
PREFETCH_ROWS = 512  # rows a chunk of read/write on a memory-mapped store
PREFETCH_DEPTH = 2  # chunks whose pages are requested ahead of the one being copied


class BackingFileError(OSError):
    """A backing file could not be created (a full disk, a folder that cannot be written)."""


class BackingStore:
    """Named tensors of ``rows`` rows each; ``read``/``write`` move whole rows of all of them."""

    def __init__(
        self, tensors: dict[str, Tensor], files: Optional[list[Path]] = None, handles: Optional[list] = None
    ) -> None:
        self.tensors = tensors
        self.files = files or []
        self.rows = int(next(iter(tensors.values())).shape[0])
        # memory-mapped tensors: the file descriptor (the lock's handle) to ask for pages ahead with
        self._fds = [h.fileno() for h in handles] if handles and len(handles) == len(tensors) else []
        self._release = weakref.finalize(self, _release, list(self.files), handles or [])

    @property
    def row_bytes(self) -> int:
        """Bytes of one row across all tensors (weight and per-row state)."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    def read(self, rows: Tensor) -> dict[str, Tensor]:
        """The rows ``rows`` (ascending on a memory-mapped store, so its pages are asked for in order)."""
        if not self._fds:
            return {name: tensor.index_select(0, rows) for name, tensor in self.tensors.items()}
        out = {name: tensor.new_empty((rows.numel(), *tensor.shape[1:])) for name, tensor in self.tensors.items()}
        for start, end in self._chunks(rows):
            for name, tensor in self.tensors.items():
                torch.index_select(tensor, 0, rows[start:end], out=out[name][start:end])
        return out

    def write(self, rows: Tensor, values: dict[str, Tensor]) -> None:
        if not self._fds:
            for name, tensor in self.tensors.items():
                tensor.index_copy_(0, rows, values[name].to(tensor.device))
            return
        for start, end in self._chunks(rows):
            for name, tensor in self.tensors.items():
                tensor.index_copy_(0, rows[start:end], values[name][start:end])

    def _chunks(self, rows: Tensor):
        """``(start, end)`` of each chunk of ``rows``, after the pages of the chunks ``PREFETCH_DEPTH`` ahead were
        asked for (module docstring)."""
        bounds = list(range(0, rows.numel(), PREFETCH_ROWS)) + [rows.numel()]
        chunks = list(zip(bounds[:-1], bounds[1:]))
        for i in range(min(PREFETCH_DEPTH, len(chunks))):
            self.prefetch(rows[chunks[i][0] : chunks[i][1]])
        for i, (start, end) in enumerate(chunks):
            if i + PREFETCH_DEPTH < len(chunks):
                ahead = chunks[i + PREFETCH_DEPTH]
                self.prefetch(rows[ahead[0] : ahead[1]])
            yield start, end

    def prefetch(self, rows: Tensor) -> None:
        """Starts reading the file pages holding ``rows`` (``POSIX_FADV_WILLNEED``; nothing for host memory)."""
        self._advise(rows, os.POSIX_FADV_WILLNEED)

    def _advise(self, rows: Tensor, advice: int) -> None:
        """``posix_fadvise`` of the file pages holding ``rows``, one call a run of consecutive pages."""
        for fd, tensor in zip(self._fds, self.tensors.values()):
            row_bytes = tensor[0].numel() * tensor.element_size()
            first = rows * row_bytes // PAGE
            last = ((rows + 1) * row_bytes - 1) // PAGE
            pages = torch.unique(torch.cat([first, last]))
            if not pages.numel():
                continue
            breaks = (pages[1:] != pages[:-1] + 1).nonzero().squeeze(1) + 1
            starts = torch.cat([pages[:1], pages[breaks]]).tolist()
            ends = torch.cat([pages[breaks - 1], pages[-1:]]).tolist()
            for begin, end in zip(starts, ends):
                os.posix_fadvise(fd, begin * PAGE, (end - begin + 1) * PAGE, advice)

    def flush(self) -> None:
        """Pushes memory-mapped pages to their files (nothing for host memory)."""
        for tensor in self.tensors.values():
            array = getattr(tensor, "_lightning_sparse_memmap", None)
            if array is not None:
                array.flush()

    def close(self) -> None:
        """Releases the tensors and deletes the backing files (also done when the process ends)."""
        self.tensors = {}
        self._release()


def _release(files: list[Path], handles: list) -> None:
    for file in files:
        try:
            file.unlink()
        except FileNotFoundError:
            pass
    for handle in handles:
        handle.close()


def host_store(shapes: dict[str, tuple[int, ...]], pin: bool = False) -> BackingStore:
    """Zero-filled host tensors of the given shapes (float32)."""
    return BackingStore(
        {name: torch.zeros(shape, dtype=torch.float32, pin_memory=pin) for name, shape in shapes.items()}
    )


def mmap_store(shapes: dict[str, tuple[int, ...]], folder: Optional[str], prefix: str) -> BackingStore:
    """Zero-filled float32 tensors, each mapped from its own file ``<folder>/<prefix>.<name>.bin``.

    The space is checked against the disk's free space first, then allocated (``posix_fallocate``), so a
    disk too full for the table fails here with a :class:`BackingFileError`.
    """
    directory = Path(folder) if folder else Path(tempfile.gettempdir()) / "lightning_sparse_cache"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BackingFileError(f"cannot create the cache folder {str(directory)!r}: {error}") from error
    need = {name: int(np.prod(shape)) * 4 for name, shape in shapes.items()}
    free = shutil.disk_usage(directory).free
    first = directory / f"{prefix}.{next(iter(shapes))}.bin"
    if sum(need.values()) > free:
        raise BackingFileError(
            f"backing file {str(first)!r} (and its {len(shapes) - 1} sibling(s)) need {sum(need.values())} bytes, but "
            f"the disk of {str(directory)!r} has {free} bytes free. Set TableConfig.cache.path to a folder on a disk "
            "with room, or shrink the table."
        )
    tensors, files, handles = {}, [], []
    try:
        for name, shape in shapes.items():
            file = directory / f"{prefix}.{name}.bin"
            handles.append(_lock(file))
            files.append(file)
            _allocate(file, need[name], free)
            array = np.memmap(file, dtype=np.float32, mode="r+", shape=shape)
            _random_access(array)
            tensor = torch.from_numpy(array)
            tensor._lightning_sparse_memmap = array  # keeps the mapping alive and lets flush() reach it
            tensors[name] = tensor
    except BaseException:
        _release(files, handles)
        raise
    return BackingStore(tensors, files, handles)


def _random_access(array: np.memmap) -> None:
    """Tells the kernel the mapping is read at random rows (``MADV_RANDOM``): a page fault then reads that page
    alone, not the read-ahead around it, which in a memory budget smaller than the file would push out pages
    still needed for pages never asked for."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)


def _lock(file: Path):
    """An exclusive lock on ``file`` (created if missing), held while the returned handle is open."""
    handle = open(file, "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BackingFileError(
            f"backing file {str(file)!r} is in use by another process (a run with the same cache path and table); "
            "give this run another TableConfig.cache.path."
        ) from None
    return handle


def _allocate(file: Path, size: int, free: int) -> None:
    """Creates ``file`` with ``size`` bytes of disk space reserved (zeros)."""
    try:
        with open(file, "wb") as handle:
            if size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)
            else:
                handle.truncate(size)
    except OSError as error:
        try:
            file.unlink()
        except OSError:
            pass
        raise BackingFileError(
            f"backing file {str(file)!r} could not get its {size} bytes ({free} bytes were free on that disk): "
            f"{error}. Set TableConfig.cache.path to a folder on a disk with room."
        ) from error
