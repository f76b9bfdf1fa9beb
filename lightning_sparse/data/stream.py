"""A click stream read in time order, split over ranks and workers without reordering, resumed at its exact record.

:class:`StreamDataModule` reads a :class:`~lightning_sparse.data.stream_sources.RecordSource` (TSV, Parquet,
the synthetic stream, any iterable of records; a list of them is read one after the other) and turns its
records into torchrec ``Batch``es through a typed :class:`~lightning_sparse.data.stream_schema.StreamSchema`.

* **Order.** Record ``g`` of the stream (counted from its start, malformed records included) belongs to
  reader ``g mod R`` with ``R = world_size * num_workers``; reader ``rank * num_workers + worker`` reads the
  stream and keeps its records, in stream order, in batches of ``batch_size``. So a rank's ``k``-th batch
  holds records of the same stretch of time as every other rank's ``k``-th batch, and nothing is shuffled.
* **Bounded or not.** ``max_records`` ends the stream after that many records (of the whole stream, all
  readers together); without it a source that never ends (``SyntheticSource``, a file source with
  ``follow=True``) gives an endless epoch: bound the run with ``trainer.max_steps``.
* **Position in the checkpoint.** The train loader is a :class:`~lightning_sparse.data.loading.ResumableLoader`:
  every reader's position (the source's position after its last batch, e.g. file, byte offset and line, the
  stream records passed and its counters) is saved with the fit loop, so a run resumed at any step reads
  exactly the batches the straight run reads (same number of processes and ``num_workers``), and ranks end a
  bounded stream together.
* **Malformed records** are counted and skipped (``on_error: skip``; logged as ``data/<stage>/skipped_lines``
  and ``.../<reason>`` by the :class:`~lightning_sparse.data.criteo.SkippedLinesMonitor` the data module adds)
  or stop the run (``on_error: raise``) with :class:`~lightning_sparse.data.stream_schema.StreamRecordError`
  naming where the record is (``file:line``, ``file row N``, ``record N``) and why.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.data.criteo import OnError, SkippedLinesMonitor
from lightning_sparse.data.loading import ResumableLoader, fit_progress, process_rank_world, reader_of
from lightning_sparse.data.stream_schema import (
    REASONS,
    IdTransform,
    RecordError,
    SparseColumn,
    StreamRecordError,
    StreamSchema,
)
from lightning_sparse.data.stream_sources import (
    ChainedSource,
    IterableSource,
    ParquetSource,
    RecordSource,
    SyntheticSource,
    TsvSource,
)
from lightning_sparse.trainer_attrs import add_callback_once

__all__ = [
    "ChainedSource", "IdTransform", "IterableSource", "ParquetSource", "RecordSource", "SparseColumn", "StreamDataModule",
    "StreamDataset", "StreamRecordError", "StreamSchema", "StreamStats", "SyntheticSource", "TsvSource",
]  # fmt: skip

_COL_RECORDS, _COL_SAMPLES, _COL_REASON0 = 0, 1, 2


class StreamStats:
    """Counters of one pass of this process's readers, summed over its DataLoader workers.

    Attributes: ``records`` (records assigned to this rank, valid or not), ``samples`` (valid ones, in
    batches) and ``malformed`` (skipped records per reason, see ``stream_schema.REASONS``).
    """

    def __init__(self, counts: List[int]) -> None:
        self.records, self.samples = counts[_COL_RECORDS], counts[_COL_SAMPLES]
        self.malformed = {reason: counts[_COL_REASON0 + k] for k, reason in enumerate(REASONS)}


class _Builder:
    """Accumulates parsed records and turns them into a ``Batch`` (KJT values key-major, as TorchRec wants)."""

    def __init__(self, schema: StreamSchema) -> None:
        self.schema = schema
        self.reset()

    def reset(self) -> None:
        self.labels: List[float] = []
        self.dense: List[List[float]] = []
        self.ids: List[List[List[int]]] = [[] for _ in self.schema.sparse]

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, label: float, dense: List[float], sparse: List[List[int]]) -> None:
        self.labels.append(label)
        self.dense.append(dense)
        for bags, ids in zip(self.ids, sparse):
            bags.append(ids)

    def build(self) -> Batch:
        n = len(self.labels)
        lengths = [len(bag) for bags in self.ids for bag in bags]
        values = [v for bags in self.ids for bag in bags for v in bag]
        batch = Batch(
            dense_features=torch.tensor(self.dense, dtype=torch.float32).reshape(n, len(self.schema.dense)),
            sparse_features=KeyedJaggedTensor(
                keys=self.schema.feature_names,
                values=torch.tensor(values, dtype=torch.int64),
                lengths=torch.tensor(lengths, dtype=torch.int32),
                stride=n,
            ),
            labels=torch.tensor(self.labels, dtype=torch.float32),
        )
        self.reset()
        return batch


class StreamDataset(IterableDataset):
    """Batches of one reader's share of a stream (see the module docstring); torchdata ``Stateful``.

    :meth:`state_dict` is the position after the last batch yielded; :meth:`load_state_dict` makes the next
    pass continue from it. Rank and world size come from ``torch.distributed`` unless given.
    """

    def __init__(
        self,
        source: RecordSource,
        schema: StreamSchema,
        batch_size: int,
        max_records: Optional[int] = None,
        on_error: OnError = OnError.SKIP,
        drop_last: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_workers: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0 or None (no bound), got {max_records}")
        self.source, self.schema, self.batch_size, self.max_records = source, schema, batch_size, max_records
        self.on_error = OnError.parse(on_error, "on_error")
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = rank, world_size
        # Workers run in other processes: counters live in shared memory, one row per worker.
        self._counters = torch.zeros(max_workers, _COL_REASON0 + len(REASONS), dtype=torch.int64).share_memory_()
        self._state: Optional[dict[str, Any]] = None
        self._resume: Optional[dict[str, Any]] = None

    def __getstate__(self) -> dict:
        # Pickled for spawned DataLoader workers, where torch.distributed is not initialised: pin the rank now.
        state = dict(self.__dict__)
        if state["rank"] is None:
            state["rank"], state["world_size"] = process_rank_world()
        return state

    @property
    def stats(self) -> StreamStats:
        return StreamStats(self._counters.sum(dim=0).tolist())

    def _reader(self) -> tuple[int, int, int]:
        return reader_of(self.rank, self.world_size, self._counters.shape[0])

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state else None

    def __iter__(self) -> Iterator[Batch]:
        reader, readers, slot = self._reader()
        resume, self._resume = self._resume, None
        if resume is None:
            resume = {"position": None, "passed": 0, "counts": None}
        elif (resume["reader"], resume["readers"]) != (reader, readers):
            raise ValueError(
                f"The saved stream position is of reader {resume['reader']} of {resume['readers']} (ranks x DataLoader "
                f"workers); this one is reader {reader} of {readers}. Resume with the same number of processes and "
                "workers, or from a checkpoint saved at the end of an epoch."
            )
        counts = list(resume["counts"] or [0] * self._counters.shape[1])
        self._state = self._snapshot(reader, readers, resume["position"], resume["passed"], counts)
        return self._read(reader, readers, slot, resume["position"], resume["passed"], counts)

    @staticmethod
    def _snapshot(reader: int, readers: int, position: Any, passed: int, counts: List[int]) -> dict[str, Any]:
        return {"reader": reader, "readers": readers, "position": position, "passed": passed, "counts": list(counts)}

    def _read(
        self, reader: int, readers: int, slot: int, position: Any, passed: int, counts: List[int]
    ) -> Iterator[Batch]:
        counters = self._counters[slot]
        builder = _Builder(self.schema)
        skip = self.on_error is OnError.SKIP

        def batch_done() -> Batch:
            counters.copy_(torch.tensor(counts, dtype=torch.int64))
            self._state = self._snapshot(reader, readers, position, passed, counts)
            return builder.build()

        counters.copy_(torch.tensor(counts, dtype=torch.int64))
        records = self.source.read(position)
        try:
            while self.max_records is None or passed < self.max_records:
                item = next(records, None)
                if item is None:
                    break
                raw, position = item
                passed += 1
                if (passed - 1) % readers != reader:
                    continue
                counts[_COL_RECORDS] += 1
                try:
                    parsed = self.schema.parse(self.source.decode(raw))
                except RecordError as error:
                    if not skip:
                        raise StreamRecordError(self.source.where(position), error.reason, error.detail) from None
                    counts[_COL_REASON0 + REASONS.index(error.reason)] += 1
                    continue
                builder.add(*parsed)
                counts[_COL_SAMPLES] += 1
                if len(builder) == self.batch_size:
                    yield batch_done()
            if len(builder) and not self.drop_last:
                yield batch_done()
        finally:
            counters.copy_(torch.tensor(counts, dtype=torch.int64))


class StreamDataModule(LightningDataModule):
    """A time-ordered click stream as the train loader (and optionally a validation stream); see the module docstring.

    Models read the table layout from it: ``num_embeddings_per_feature``, ``num_dense_features`` and
    ``feature_names`` come from the schema.

    Args:
        source: the training stream, or a list of sources read one after the other.
        schema: which record fields are the label, the dense and the sparse features.
        batch_size: records per batch (per rank).
        max_records: end the training stream after this many records (None: when the source ends, or never).
        val_source: an optional validation stream (e.g. the day after the training days); without it, fit
            runs no validation (measure the stream with the ``PrequentialEvaluation`` callback instead).
        val_max_records: bound of the validation stream.
        on_error: ``skip`` (count and drop malformed records) or ``raise``.
        num_workers: DataLoader worker processes per rank (the records are dealt between them too).
        drop_last: drop each reader's last incomplete batch.
    """

    def __init__(
        self,
        source: Union[RecordSource, List[RecordSource]],
        schema: StreamSchema,
        batch_size: int = 512,
        max_records: Optional[int] = None,
        val_source: Optional[Union[RecordSource, List[RecordSource]]] = None,
        val_max_records: Optional[int] = None,
        on_error: OnError = OnError.SKIP,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"StreamDataModule.batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"StreamDataModule.num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(schema, StreamSchema):
            raise TypeError(f"StreamDataModule.schema must be a StreamSchema, got {type(schema).__name__}")
        self.source, self.val_source = _one_source(source), _one_source(val_source) if val_source is not None else None
        self.schema, self.batch_size = schema, batch_size
        self.max_records, self.val_max_records = max_records, val_max_records
        self.on_error = OnError.parse(on_error, "StreamDataModule.on_error")
        self.num_workers, self.drop_last = num_workers, drop_last
        self.datasets: dict[str, StreamDataset] = {}

    @property
    def num_dense_features(self) -> int:
        return len(self.schema.dense)

    @property
    def feature_names(self) -> List[str]:
        return self.schema.feature_names

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return self.schema.num_embeddings_per_feature

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            add_callback_once(self.trainer, SkippedLinesMonitor())

    def _loader(self, stage: str, source: RecordSource, max_records: Optional[int]) -> ResumableLoader:
        rank, world = process_rank_world()  # called after the process group exists (Lightning's setup)
        dataset = StreamDataset(
            source, self.schema, self.batch_size, max_records, self.on_error, self.drop_last,
            rank=rank, world_size=world, max_workers=max(1, self.num_workers),
        )  # fmt: skip
        self.datasets[stage] = dataset
        consumed = fit_progress(self.trainer) if stage == "train" and self.trainer is not None else None
        return ResumableLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False, consumed=consumed
        )

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train", self.source, self.max_records)

    def val_dataloader(self):
        # No validation stream: an empty list makes Lightning skip validation instead of failing.
        return [] if self.val_source is None else self._loader("val", self.val_source, self.val_max_records)


def _one_source(source: Union[RecordSource, List[RecordSource]]) -> RecordSource:
    if isinstance(source, RecordSource):
        return source
    if isinstance(source, (list, tuple)) and all(isinstance(s, RecordSource) for s in source):
        return source[0] if len(source) == 1 else ChainedSource(source)
    raise TypeError(f"a stream source must be a RecordSource or a list of them, got {type(source).__name__}")
