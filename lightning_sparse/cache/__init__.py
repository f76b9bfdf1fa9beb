"""Look-forward embedding cache (ScratchPipe): tables trained in a small scratchpad, filled ahead of time from
the ids of the next batches, over a backing store in host memory or a memory-mapped file."""

from lightning_sparse.cache.backing import BackingFileError, BackingStore, host_store, mmap_store
from lightning_sparse.cache.lookahead import LookaheadPlanner, Moves, WorkingSetTooLarge

__all__ = [
    "BackingFileError",
    "BackingStore",
    "LookaheadPlanner",
    "Moves",
    "WorkingSetTooLarge",
    "host_store",
    "mmap_store",
]
