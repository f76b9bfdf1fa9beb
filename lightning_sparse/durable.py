"""Durable file-system steps shared by checkpoint IO (``distributed/checkpoint_manifest.py``) and delta
exports (``serving/format.py``): both publish a directory by renames that must survive a crash."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Makes renames and new entries in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
