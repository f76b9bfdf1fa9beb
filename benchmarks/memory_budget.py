"""A real memory budget for one benchmark process: a cgroup (v1 ``memory`` controller, or v2 ``memory.max``)
that the process joins and then limits to what it already uses plus the budget. Page-cache pages of a
memory-mapped file count against a cgroup's limit, so a table memory-mapped inside it is paged in and out
by the kernel within the budget. Needs root and a writable cgroup hierarchy; :func:`join` says why not
otherwise, and the caller reports the process's own figures instead.

Memory the process used before it joined stays charged to its old cgroup (``move_charge_at_immigrate`` is
left at 0), so ``usage`` counts only what is allocated after joining.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


class Budget:
    """A cgroup holding this process, limited to ``usage at join + budget`` bytes."""

    def __init__(self, folder: Path, version: int) -> None:
        self.folder, self.version = folder, version
        self.base = self.usage()

    def _file(self, v1: str, v2: str) -> Path:
        return self.folder / (v1 if self.version == 1 else v2)

    def usage(self) -> int:
        return int(self._file("memory.usage_in_bytes", "memory.current").read_text())

    def peak(self) -> int:
        """Peak usage since :meth:`limit` (v1: ``max_usage_in_bytes``; v2: ``memory.peak``, since the cgroup was made)."""
        return int(self._file("memory.max_usage_in_bytes", "memory.peak").read_text())

    def limit(self, budget: int) -> int:
        """Limits the cgroup to its usage now plus ``budget`` bytes; returns that limit."""
        self.base = self.usage()
        limit = self.base + budget
        self._file("memory.limit_in_bytes", "memory.max").write_text(str(limit))
        if self.version == 1:
            (self.folder / "memory.max_usage_in_bytes").write_text("0")
        return limit

    def stat(self) -> dict[str, int]:
        lines = (self.folder / "memory.stat").read_text().split("\n")
        return {k: int(v) for k, v in (line.split() for line in lines if line)}


def _folder(name: str) -> tuple[Optional[Path], int, str]:
    """The cgroup ``name`` under this process's memory cgroup, its version, or (None, 0, why not)."""
    try:
        entries = Path("/proc/self/cgroup").read_text().split("\n")
    except OSError as error:
        return None, 0, f"no /proc/self/cgroup: {error}"
    parts = [entry.split(":", 2) for entry in entries if entry.count(":") >= 2]
    for _, controllers, path in parts:
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/") / name, 1, ""
    own = next((path for number, _, path in parts if number == "0"), None)
    if own is None:
        return None, 0, "no memory cgroup in /proc/self/cgroup"
    return Path("/sys/fs/cgroup") / own.lstrip("/") / name, 2, ""


def join(name: str) -> tuple[Optional[Budget], str]:
    """Moves this process into a new cgroup ``name`` under its own memory cgroup: (the budget, "") or (None, why not)."""
    folder, version, why = _folder(name)
    if folder is None:
        return None, why
    try:
        folder.mkdir(exist_ok=True)
        (folder / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as error:
        return None, f"cannot make or join the cgroup {str(folder)!r}: {error}"
    return Budget(folder, version), ""


def remove(name: str) -> None:
    """Removes the cgroup ``name`` under this process's memory cgroup (once its processes ended), if it exists."""
    folder, _, _ = _folder(name)
    if folder is not None and folder.exists():
        folder.rmdir()


def rss() -> int:
    """This process's resident set now, bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
