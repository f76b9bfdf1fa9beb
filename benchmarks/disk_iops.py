"""Random 4 KiB reads a disk serves per second, measured without the page cache (``O_DIRECT``).

A memory-mapped table larger than its memory budget reads a page from disk for (nearly) every row it copies
in, whatever the software above: a row is a small part of a page, and the rows a step misses are spread over
the file. So the reads a disk serves per second, at the best queue depth, bound the rows per second any
backing store on that disk can copy in; ``benchmarks/lookahead_cache.py`` turns that into a bound on the
steps per second of a cached table. Reads go through ``O_DIRECT`` (no page cache, so neither the budget nor
earlier runs change them) from ``threads`` threads at once (``os.preadv`` releases the GIL), each into its
own page-aligned buffer.

Run alone: ``python benchmarks/disk_iops.py [folder]``.
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

PAGE = 4096


def random_read_iops(folder: Optional[str], size: int, threads: int, seconds: float = 2.0) -> Optional[float]:
    """Random page reads per second from a ``size``-byte file in ``folder`` with ``threads`` reads in flight;
    ``None`` where the file system refuses ``O_DIRECT`` (tmpfs)."""
    handle, name = tempfile.mkstemp(prefix="disk_iops_", dir=folder)
    try:
        chunk = os.urandom(1 << 20)
        for _ in range(max(1, size >> 20)):
            os.write(handle, chunk)
        os.fsync(handle)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None
        pages = max(1, size // PAGE)
        deadline = time.perf_counter() + seconds

        def reader(seed: int) -> int:
            buffer, rng, done = mmap.mmap(-1, PAGE), random.Random(seed), 0
            while time.perf_counter() < deadline:
                for _ in range(64):
                    os.preadv(fd, [buffer], rng.randrange(pages) * PAGE)
                done += 64
            return done

        try:
            begin = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                reads = sum(pool.map(reader, range(threads)))
            return reads / (time.perf_counter() - begin)
        finally:
            os.close(fd)
    finally:
        os.close(handle)
        os.unlink(name)


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else None
    for threads in (1, 4, 16, 64):
        iops = random_read_iops(folder, 256 << 20, threads)
        print(f"{threads:>3} reads in flight: " + (f"{iops:,.0f} reads/s" if iops else "O_DIRECT refused"))


if __name__ == "__main__":
    main()
