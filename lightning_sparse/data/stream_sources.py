"""Time-ordered record sources of :class:`~lightning_sparse.data.stream.StreamDataModule`, each with a position.

A source yields ``(raw, position)`` pairs in stream order: ``raw`` is the record in whatever form is cheapest
to skip (a TSV line's bytes, a row index), ``position`` the point right after it, a small tuple of plain
values that the checkpoint stores. :meth:`RecordSource.read` called with a saved position continues with
the record after it. :meth:`RecordSource.decode` turns a raw record into a mapping of field names to
values only for the records a reader keeps: every reader walks the whole stream and skips the records that
belong to the other readers, so skipping must be cheap.

Sources:

* :class:`TsvSource`: tab-separated text files (plain or gzip), Criteo's column layout by default.
* :class:`ParquetSource`: Parquet files (pyarrow), one record per row.
* :class:`SyntheticSource`: the synthetic drifting click stream, record by record, without end.
* :class:`IterableSource`: any iterable of mappings a user supplies (Python only).

File sources read files in order (a list as given, a glob pattern sorted by name). With ``follow=True`` (a
glob pattern) the stream never ends: after the last file the source waits for a file whose name sorts after
it (a day-stamped file, say); ``idle_timeout_s`` ends the stream when none appears for that long. A new
file must appear complete: write it under another name and rename it into place (a rename is atomic).
A position stores the file's name, so files may appear while a run is stopped. Under several processes, a
rank waiting for the next file holds the others in the step's collectives: raise the strategy's ``timeout``
above the longest gap between files you expect (or set ``idle_timeout_s`` below it).
"""

from __future__ import annotations

import bisect
import glob
import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from lightning_sparse.data.criteo_format import open_criteo_file
from lightning_sparse.data.stream_schema import RecordError

Position = Tuple[Any, ...]
CRITEO_COLUMNS: List[str] = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


class RecordSource(ABC):
    """A time-ordered stream of records with a resumable position (subclass it for your own store)."""

    @abstractmethod
    def read(self, position: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        """``(raw record, position after it)`` from ``position`` on (``None``: from the first record)."""

    def decode(self, raw: Any) -> Mapping[str, Any]:
        """The record's fields; raises :class:`~lightning_sparse.data.stream_schema.RecordError` when malformed."""
        return raw

    def where(self, position: Position) -> str:
        """Where the record ending at ``position`` is, for error messages."""
        return f"{type(self).__name__} record ending at {position}"


class _FileSource(RecordSource):
    """Files in order; ``paths`` is a list (read as given) or a glob pattern (sorted by name, may grow)."""

    def __init__(
        self, paths: Union[str, List[str]], follow: bool, poll_seconds: float, idle_timeout_s: Optional[float]
    ) -> None:
        self.pattern = paths if isinstance(paths, str) and glob.has_magic(paths) else None
        self.fixed = None if self.pattern else ([paths] if isinstance(paths, str) else [os.fspath(p) for p in paths])
        self.follow, self.poll_seconds, self.idle_timeout_s = bool(follow), float(poll_seconds), idle_timeout_s
        name = type(self).__name__
        if self.follow and self.pattern is None:
            raise ValueError(
                f"{name}(follow=True) needs a glob pattern (e.g. 'clicks/*.tsv') to find new files in, got {paths!r}"
            )
        if self.poll_seconds <= 0:
            raise ValueError(f"{name}.poll_seconds must be > 0, got {poll_seconds!r}")
        if not self.follow:
            if not self._listing():
                raise FileNotFoundError(f"{name}: no file matches {paths!r}")
            missing = [p for p in self.fixed or [] if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{name}: file(s) not found: {missing}")

    def _listing(self) -> List[str]:
        return sorted(glob.glob(self.pattern)) if self.pattern is not None else list(self.fixed or [])

    def _next_file(self, current: Optional[str]) -> Optional[str]:
        """The file after ``current`` (the first when None); with ``follow``, waits for one to appear."""
        waited_since = time.monotonic()
        while True:
            files = self._listing()
            if current is None:
                following = files
            elif self.fixed is not None:
                if current not in files:
                    raise ValueError(
                        f"{type(self).__name__}: the saved position is in {current!r}, which is not among {files}"
                    )
                following = files[files.index(current) + 1 :]
            else:
                following = files[bisect.bisect_right(files, current) :]
            if following:
                return following[0]
            if not self.follow:
                return None
            if self.idle_timeout_s is not None and time.monotonic() - waited_since >= self.idle_timeout_s:
                return None
            time.sleep(self.poll_seconds)

    def read(self, position: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        if position is not None:
            path, start = position[0], position[1:]
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{type(self).__name__}: the saved position is in {path!r}, which no longer exists"
                )
            yield from self._read_file(path, start)
        else:
            path = None
        while True:
            path = self._next_file(path)
            if path is None:
                return
            yield from self._read_file(path, None)

    @abstractmethod
    def _read_file(self, path: str, start: Optional[Position]) -> Iterator[Tuple[Any, Position]]: ...


class TsvSource(_FileSource):
    """Delimited text files (plain or gzip, detected by their magic bytes), one record per line.

    Args:
        paths: a file, a list of files (read in that order) or a glob pattern (sorted by name).
        columns: the name of every field of a line, in order (default: Criteo's ``label, I1..I13, C1..C26``).
            A line with another number of fields is malformed (``field_count``), bytes that are not UTF-8
            too (``encoding``).
        delimiter: the field separator.
        follow: keep waiting for new files matching the pattern after the last one (an endless stream).
        poll_seconds: how often to look for a new file when following.
        idle_timeout_s: end the stream when no new file appeared for this long (None: never).

    Position: ``(file, byte offset, line number)`` after the line; resuming seeks to the offset.
    """

    def __init__(
        self,
        paths: Union[str, List[str]],
        columns: Optional[List[str]] = None,
        delimiter: str = "\t",
        follow: bool = False,
        poll_seconds: float = 1.0,
        idle_timeout_s: Optional[float] = None,
    ) -> None:
        super().__init__(paths, follow, poll_seconds, idle_timeout_s)
        self.columns = list(columns) if columns is not None else list(CRITEO_COLUMNS)
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"TsvSource.columns has duplicate names: {self.columns}")
        self.delimiter = delimiter

    def _read_file(self, path: str, start: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        offset, line = start if start is not None else (0, 0)
        with open_criteo_file(path) as handle:
            if offset:
                handle.seek(offset)
            for raw in handle:
                offset += len(raw)
                line += 1
                yield raw, (path, offset, line)

    def decode(self, raw: bytes) -> Mapping[str, Any]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RecordError("encoding", f"byte {error.start + 1} is not UTF-8") from None
        fields = text.rstrip("\r\n").split(self.delimiter)
        if len(fields) != len(self.columns):
            raise RecordError(
                "field_count", f"expected {len(self.columns)} fields ({self.columns[0]}, ...), got {len(fields)}"
            )
        return dict(zip(self.columns, fields))

    def where(self, position: Position) -> str:
        return f"{position[0]}:{position[2]}"


class ParquetSource(_FileSource):
    """Parquet files, one record per row (a list column is a multi-hot sparse feature).

    ``paths``, ``follow``, ``poll_seconds`` and ``idle_timeout_s`` are as for :class:`TsvSource`.

    Args:
        read_rows: rows decoded at a time.

    Position: ``(file, rows read)``; resuming skips whole row groups by their metadata and reads from there.
    """

    def __init__(
        self,
        paths: Union[str, List[str]],
        follow: bool = False,
        poll_seconds: float = 1.0,
        idle_timeout_s: Optional[float] = None,
        read_rows: int = 4096,
    ) -> None:
        super().__init__(paths, follow, poll_seconds, idle_timeout_s)
        if read_rows < 1:
            raise ValueError(f"ParquetSource.read_rows must be >= 1, got {read_rows}")
        self.read_rows = read_rows

    def _read_file(self, path: str, start: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        import pyarrow.parquet as pq

        row = start[0] if start is not None else 0
        parquet = pq.ParquetFile(path)
        first_group, skip = 0, row
        while first_group < parquet.num_row_groups and skip >= parquet.metadata.row_group(first_group).num_rows:
            skip -= parquet.metadata.row_group(first_group).num_rows
            first_group += 1
        groups = list(range(first_group, parquet.num_row_groups))
        if not groups:
            return
        for table in parquet.iter_batches(batch_size=self.read_rows, row_groups=groups):
            rows = table.to_pylist()[skip:]
            skip = max(0, skip - table.num_rows)
            for record in rows:
                row += 1
                yield record, (path, row)

    def where(self, position: Position) -> str:
        return f"{position[0]} row {position[1]}"


class SyntheticSource(RecordSource):
    """The synthetic click stream (:class:`~lightning_sparse.data.synthetic.SyntheticClickStream`) record by record.

    Record ``g`` is row ``g mod chunk_size`` of the stream's batch ``g // chunk_size``, a pure function of
    ``(seed, g)``: the stream has no end (``num_records`` bounds it) and any position resumes at once.
    Fields: ``label``, ``dense_0..`` and ``cat_0..`` (ids within ``id_space_per_feature``, by default
    ``num_embeddings_per_feature``). With ``drift_period_records > 0`` the popular ids move every that many
    records (a multiple of ``chunk_size``).
    """

    def __init__(
        self,
        num_embeddings_per_feature: List[int],
        id_space_per_feature: Optional[List[int]] = None,
        num_dense_features: int = 0,
        drift_period_records: int = 0,
        zipf_exponent: float = 1.1,
        seed: int = 0,
        chunk_size: int = 256,
        num_records: Optional[int] = None,
    ) -> None:
        from lightning_sparse.data.synthetic import SyntheticClickStream

        if drift_period_records % chunk_size:
            raise ValueError(
                f"SyntheticSource.drift_period_records={drift_period_records} must be a multiple of chunk_size={chunk_size}"
            )
        self.num_records = num_records
        self.num_dense_features = num_dense_features
        self.stream = SyntheticClickStream(
            num_batches=1 << 40, batch_size=chunk_size, num_embeddings_per_feature=list(id_space_per_feature or num_embeddings_per_feature),
            num_dense_features=num_dense_features, zipf_exponent=zipf_exponent, drift_period=drift_period_records // chunk_size, seed=seed,
        )  # fmt: skip
        self._chunk: Tuple[int, List[dict]] = (-1, [])

    def read(self, position: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        g = position[0] if position is not None else 0
        while self.num_records is None or g < self.num_records:
            g += 1
            yield g - 1, (g,)

    def decode(self, raw: int) -> Mapping[str, Any]:
        size = self.stream.batch_size
        index, row = divmod(raw, size)
        if self._chunk[0] != index:
            batch = self.stream[index]
            labels = batch.labels.tolist()
            dense = batch.dense_features.tolist()
            ids = batch.sparse_features.values().view(len(self.stream.feature_names), size).T.tolist()
            records = []
            for i in range(size):
                record = {"label": labels[i], **{f"dense_{j}": v for j, v in enumerate(dense[i])}}
                record.update(zip(self.stream.feature_names, ids[i]))
                records.append(record)
            self._chunk = (index, records)
        return self._chunk[1][row]

    def where(self, position: Position) -> str:
        return f"synthetic record {position[0] - 1}"


class IterableSource(RecordSource):
    """Records from a Python iterable of mappings (field name -> value), in its order.

    ``records`` is either re-iterable (a list, or an object whose ``__iter__`` starts over) or a function of
    the start index returning the records from there (``lambda start: my_log.read_from(start)``), which lets
    a resumed run start at its record without replaying the ones before it; a re-iterable is replayed and
    the first ``start`` records skipped. A one-shot iterator (a generator object) is refused: every reader
    (rank, worker) and every epoch iterates the stream from its start. Position: ``(records read,)``.
    """

    def __init__(
        self, records: Union[Iterable[Mapping[str, Any]], Callable[[int], Iterable[Mapping[str, Any]]]]
    ) -> None:
        if not callable(records) and iter(records) is records:
            raise TypeError(
                "IterableSource got a one-shot iterator (e.g. a generator object); every reader and every epoch reads "
                "the stream from its start: pass a list, a re-iterable, or a function of the start index (start -> records)"
            )
        self.records = records

    def read(self, position: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        start = position[0] if position is not None else 0
        if callable(self.records) and not hasattr(self.records, "__iter__"):
            iterator: Iterator = iter(self.records(start))
        else:
            iterator = iter(self.records)
            for skipped in range(start):
                if next(iterator, _END) is _END:
                    raise ValueError(
                        f"IterableSource: the saved position is after record {start}, but the iterable has only {skipped}"
                    )
        g = start
        for record in iterator:
            g += 1
            yield record, (g,)

    def where(self, position: Position) -> str:
        return f"record {position[0] - 1}"


_END = object()


class ChainedSource(RecordSource):
    """Several sources read one after the other (a Parquet backlog, then the TSV files still arriving, say).

    Position: ``(index of the source, that source's position)``.
    """

    def __init__(self, sources: Sequence[RecordSource]) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("ChainedSource needs at least one source")

    def read(self, position: Optional[Position]) -> Iterator[Tuple[Any, Position]]:
        first, inner = (position[0], position[1]) if position is not None else (0, None)
        if not 0 <= first < len(self.sources):
            raise ValueError(f"the saved position is in source {first}, but there are {len(self.sources)} sources")
        for index in range(first, len(self.sources)):
            for raw, where in self.sources[index].read(inner if index == first else None):
                yield (index, raw), (index, where)

    def decode(self, raw: Any) -> Mapping[str, Any]:
        return self.sources[raw[0]].decode(raw[1])

    def where(self, position: Position) -> str:
        return self.sources[position[0]].where(position[1])
