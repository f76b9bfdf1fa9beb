"""The look-ahead loader: reads the train loader's batches ``k`` ahead so the planner sees their ids early.

SparseStrategy installs it on the train loader (``process_dataloader``) when a table is cached; the user's
data module and loader are unchanged. It is a thin proxy: iterating it iterates the inner loader, keeping
up to ``ahead`` batches read but not yet handed to Lightning, and reports every batch read to the cached
tables (:meth:`~lightning_sparse.cache.tables.CachedTables.on_batch_read`). Length, ``state_dict`` and
``load_state_dict`` and any other attribute are the inner loader's. A
:class:`~lightning_sparse.data.loading.ResumableLoader` checkpoints the batches the trainer *consumed*, so
reading ahead moves no checkpointed position; it is told to keep its state for that many more batches.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator


class LookaheadLoader:
    """Proxy of ``loader`` that reads ``ahead`` batches before they are handed out.

    Args:
        loader: the train loader.
        ahead: batches read ahead of the one handed out (the largest ``cache.horizon``, resolved).
        on_pass: called when a pass starts (the batches read ahead in the last pass are void).
        on_read: called with every batch as it is read, in order.
    """

    def __init__(self, loader: Any, ahead: int, on_pass: Callable[[], None], on_read: Callable[[Any], None]) -> None:
        self.loader, self.ahead, self.on_pass, self.on_read = loader, ahead, on_pass, on_read
        if hasattr(loader, "read_ahead"):  # a ResumableLoader keeps its state for the batches read ahead
            loader.read_ahead = ahead + 1

    def __iter__(self) -> Iterator[Any]:
        self.on_pass()
        return _Ahead(iter(self.loader), self.ahead, self.on_read)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class _Ahead(Iterator):
    def __init__(self, base: Iterator[Any], ahead: int, on_read: Callable[[Any], None]) -> None:
        self.base, self.ahead, self.on_read = base, ahead, on_read
        self.queue: deque[Any] = deque()
        self.exhausted = False

    def __next__(self) -> Any:
        while not self.exhausted and len(self.queue) <= self.ahead:
            try:
                batch = next(self.base)
            except StopIteration:
                self.exhausted = True
                break
            self.on_read(batch)
            self.queue.append(batch)
        if not self.queue:
            raise StopIteration
        return self.queue.popleft()
