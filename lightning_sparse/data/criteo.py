"""Reader for the Criteo display-ads text format (Kaggle / Terabyte click logs).

Each line is ``label \\t I1..I13 \\t C1..C26``: a ``0``/``1`` click label, 13 integer counters and 26
categorical values written as 8-digit hex strings. Any feature may be empty (missing). Files are plain
text or gzip (detected by the magic bytes, whatever the extension).

What a line becomes (one :class:`torchrec.datasets.utils.Batch` row):

* ``labels``: float, 0.0 or 1.0.
* ``dense_features``: 13 floats. With the default :attr:`DenseTransform.LOG1P` a value ``x`` becomes
  ``log(1 + max(x, 0))`` (Criteo counters are heavy-tailed; negatives only occur in I2 and carry no
  magnitude worth keeping) and a missing value becomes ``0``. :attr:`DenseTransform.NONE` keeps ``x``
  as is (missing still ``0``).
* ``sparse_features``: a KeyedJaggedTensor with keys ``cat_0..cat_25``, one id per present value and
  length 0 for a missing one. A hex value ``h`` becomes ``splitmix64(int(h, 16) ^ splitmix64(seed))
  % num_embeddings`` (see :func:`hash_categorical`); the hash is ours, not Python's salted ``hash()``,
  so ids agree across processes, runs and machines. ``hash_seed=None`` means plain ``int(h, 16) %
  num_embeddings`` (TorchRec's own Criteo preprocessing).

A line that does not follow the format is never guessed at: it is either counted and skipped or it raises
:class:`CriteoFormatError` naming the file, the line number and the problem (``on_error``).
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.typed_config import NamedEnum

NUM_DENSE_FEATURES = 13
NUM_SPARSE_FEATURES = 26
NUM_FIELDS = 1 + NUM_DENSE_FEATURES + NUM_SPARSE_FEATURES
FEATURE_NAMES: List[str] = [f"cat_{i}" for i in range(NUM_SPARSE_FEATURES)]

_GZIP_MAGIC = b"\x1f\x8b"
_INT_RE = re.compile(r"-?[0-9]+")  # ASCII only: int() would also take " 7", "+7", "1_0" and Unicode digits
_HEX_RE = re.compile(r"[0-9a-fA-F]{8}")
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

PathsLike = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


class OnError(NamedEnum):
    """What to do with a malformed line: ``skip`` it (and count it) or ``raise`` :class:`CriteoFormatError`.

    Lower-case aliases exist so that YAML (jsonargparse parses enums by member name) accepts
    ``on_error: skip`` as well as ``on_error: SKIP``.
    """

    SKIP = "skip"
    RAISE = "raise"
    locals()["skip"] = "skip"  # aliases; `raise` is a keyword, so they cannot be written as names
    locals()["raise"] = "raise"


class DenseTransform(NamedEnum):
    """How an integer feature ``x`` becomes a float: ``log1p`` is ``log(1 + max(x, 0))``, ``none`` keeps ``x``.

    Missing values become 0 in both cases.
    """

    LOG1P = "log1p"
    NONE = "none"
    locals()["log1p"] = "log1p"
    locals()["none"] = "none"


class MalformedReason(str, Enum):
    """Why a line was rejected; the values are the keys of :attr:`CriteoStats.malformed`."""

    FIELD_COUNT = "field_count"
    ENCODING = "encoding"
    LABEL = "label"
    INTEGER = "integer"
    CATEGORICAL = "categorical"


class CriteoFormatError(ValueError):
    """A malformed line under ``on_error=raise``; carries where and why so the file can be fixed."""

    def __init__(self, path: str, line_number: int, reason: MalformedReason, detail: str) -> None:
        self.path = path
        self.line_number = line_number
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}:{line_number}: malformed Criteo line ({reason.value}): {detail}")


@dataclass
class CriteoStats:
    """Counters of one pass over the lines this process (rank) owns, summed over its DataLoader workers.

    Attributes:
        lines_read: lines assigned to this rank (valid or not).
        samples: valid lines turned into batch rows.
        malformed: skipped lines per :class:`MalformedReason` value.
    """

    lines_read: int = 0
    samples: int = 0
    malformed: dict = field(default_factory=lambda: {r.value: 0 for r in MalformedReason})

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


_REASONS = list(MalformedReason)
_COL_LINES, _COL_SAMPLES, _COL_REASON0 = 0, 1, 2


def _splitmix64_int(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 arrays (numpy array arithmetic wraps mod 2**64)."""
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def hash_categorical(values: np.ndarray, seed: Optional[int], num_embeddings: np.ndarray) -> np.ndarray:
    """Maps raw categorical integers (uint64) to row ids in ``[0, num_embeddings)``, as int64.

    ``splitmix64(v ^ splitmix64(seed mod 2**64)) % num_embeddings``; ``seed=None`` gives ``v % num_embeddings``.
    ``num_embeddings`` broadcasts against ``values`` (e.g. shape ``[26]`` against ``[B, 26]``).
    """
    values = np.asarray(values, dtype=np.uint64)
    num_embeddings = np.asarray(num_embeddings, dtype=np.uint64)
    if seed is not None:
        values = _splitmix64_np(values ^ np.uint64(_splitmix64_int(seed & _MASK64)))
    return (values % num_embeddings).astype(np.int64)


def _normalize_num_embeddings(value: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(value, bool):
        raise ValueError(f"num_embeddings_per_feature must be an int or a list of {NUM_SPARSE_FEATURES} ints")
    if isinstance(value, int):
        sizes = [value] * NUM_SPARSE_FEATURES
    else:
        sizes = list(value)
        if len(sizes) != NUM_SPARSE_FEATURES:
            raise ValueError(
                f"num_embeddings_per_feature must have {NUM_SPARSE_FEATURES} entries (one per categorical "
                f"feature), got {len(sizes)}"
            )
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_embeddings_per_feature[{i}] must be a positive int, got {n!r}")
    return sizes


def _normalize_paths(paths: PathsLike, what: str) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        out = [os.fspath(paths)]
    else:
        out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError(f"{what}: no files given")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{what}: file(s) not found: {missing}")
    return out


def open_criteo_file(path: str) -> IO[bytes]:
    """Opens ``path`` for binary line iteration, decompressing it if it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _dist_rank_world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _BatchBuilder:
    """Accumulates validated rows in numpy buffers and turns them into a torchrec ``Batch``."""

    def __init__(self, capacity: int, sizes: np.ndarray, seed: Optional[int], transform: DenseTransform):
        self.capacity, self.sizes, self.seed, self.transform = capacity, sizes, seed, transform
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.labels = np.zeros(self.capacity, dtype=np.float32)
        self.dense = np.zeros((self.capacity, NUM_DENSE_FEATURES), dtype=np.float64)
        self.cats = np.zeros((self.capacity, NUM_SPARSE_FEATURES), dtype=np.uint64)
        self.present = np.zeros((self.capacity, NUM_SPARSE_FEATURES), dtype=bool)

    def add(self, label: float, dense: list, cats: list) -> None:
        i = self.n
        self.labels[i] = label
        self.dense[i] = dense
        for j, v in enumerate(cats):
            if v >= 0:
                self.cats[i, j] = v
                self.present[i, j] = True
        self.n += 1

    def full(self) -> bool:
        return self.n == self.capacity

    def build(self) -> Batch:
        n = self.n
        dense = self.dense[:n]
        if self.transform is DenseTransform.LOG1P:
            dense = np.log1p(np.maximum(dense, 0.0))
        present_t = self.present[:n].T  # [26, n]: KJT values are key-major
        ids = hash_categorical(self.cats[:n], self.seed, self.sizes).T
        batch = Batch(
            dense_features=torch.from_numpy(dense.astype(np.float32)),
            sparse_features=KeyedJaggedTensor(
                keys=FEATURE_NAMES,
                values=torch.from_numpy(np.ascontiguousarray(ids[present_t])),
                lengths=torch.from_numpy(present_t.reshape(-1).astype(np.int32)),
                stride=n,
            ),
            labels=torch.from_numpy(self.labels[:n].copy()),
        )
        self._reset()
        return batch


class CriteoIterableDataset(IterableDataset):
    """Streams Criteo-format files as whole ``Batch`` objects (use ``DataLoader(ds, batch_size=None)``).

    Line ``g`` (counted across all files in order, malformed lines included) belongs to shard
    ``g % (world_size * num_workers)``; this process reads shard ``rank * num_workers + worker_id``. So every
    line is seen by exactly one (rank, worker) and the split does not depend on timing. Rank and world size
    come from ``torch.distributed`` when it is initialised (else 0/1) unless given explicitly.

    Ranks may end up with different numbers of batches (line counts that do not divide evenly, malformed
    lines); with collectives in every step (DDP/DMP) cap the epoch, e.g. ``Trainer(limit_train_batches=...)``,
    or give each rank equally many valid lines.

    Args:
        paths: one file or a list of files (plain or gzip).
        batch_size: rows per yielded batch (the last one of a worker may be smaller unless ``drop_last``).
        num_embeddings_per_feature: table size per categorical feature (26 ints) or one size for all.
        hash_seed: seed of :func:`hash_categorical`; ``None`` for plain modulo.
        on_error: :class:`OnError` (or its name): skip and count malformed lines, or raise.
        dense_transform: :class:`DenseTransform` applied to the 13 integer features.
        drop_last: drop each worker's last incomplete batch.
        rank, world_size: override the distributed rank/world size (e.g. to read one rank's share offline).
        max_workers: number of DataLoader worker slots in the shared counters of :attr:`stats`.
    """

    def __init__(
        self,
        paths: PathsLike,
        batch_size: int,
        num_embeddings_per_feature: Union[int, Sequence[int]] = 100_000,
        hash_seed: Optional[int] = 0,
        on_error: Union[OnError, str] = OnError.SKIP,
        dense_transform: Union[DenseTransform, str] = DenseTransform.LOG1P,
        drop_last: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_workers: int = 64,
    ) -> None:
        super().__init__()
        self.paths = _normalize_paths(paths, "CriteoIterableDataset.paths")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.num_embeddings_per_feature = _normalize_num_embeddings(num_embeddings_per_feature)
        if hash_seed is not None and (isinstance(hash_seed, bool) or not isinstance(hash_seed, int)):
            raise ValueError(f"hash_seed must be an int or None, got {hash_seed!r}")
        self.hash_seed = hash_seed
        self.on_error = OnError.parse(on_error, "on_error")
        self.dense_transform = DenseTransform.parse(dense_transform, "dense_transform")
        self.drop_last = bool(drop_last)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        # Workers run in other processes: counters live in shared memory, one row per worker so no races.
        self._counters = torch.zeros(max_workers, _COL_REASON0 + len(_REASONS), dtype=torch.int64).share_memory_()

    def __getstate__(self) -> dict:
        # Pickled for spawned DataLoader workers, where torch.distributed is not initialised: pin rank now.
        state = dict(self.__dict__)
        if state["rank"] is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            state["rank"], state["world_size"] = _dist_rank_world()
        return state

    @property
    def stats(self) -> CriteoStats:
        """Counters of the latest pass of each worker of this process, summed (see :class:`CriteoStats`)."""
        total = self._counters.sum(dim=0).tolist()
        return CriteoStats(
            lines_read=total[_COL_LINES],
            samples=total[_COL_SAMPLES],
            malformed={r.value: total[_COL_REASON0 + k] for k, r in enumerate(_REASONS)},
        )

    def _shard(self) -> tuple:
        rank, world = (self.rank, self.world_size) if self.rank is not None else _dist_rank_world()
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if worker_id >= self._counters.shape[0]:
            raise ValueError(f"DataLoader worker {worker_id} exceeds max_workers={self._counters.shape[0]}")
        return rank * num_workers + worker_id, world * num_workers, worker_id

    def __iter__(self) -> Iterator[Batch]:
        shard, num_shards, slot = self._shard()
        counters = self._counters[slot]
        counters.zero_()
        builder = _BatchBuilder(
            self.batch_size, np.asarray(self.num_embeddings_per_feature, dtype=np.uint64),
            self.hash_seed, self.dense_transform,
        )
        skip = self.on_error is OnError.SKIP
        # Counted in Python ints and published to the shared tensor at each batch (a tensor op per line
        # would cost more than the parsing).
        counts = [0] * counters.numel()

        def publish() -> None:
            counters.copy_(torch.tensor(counts, dtype=torch.int64))

        g = 0
        try:
            for path in self.paths:
                with open_criteo_file(path) as f:
                    for line_number, raw in enumerate(f, start=1):
                        g += 1
                        if (g - 1) % num_shards != shard:
                            continue
                        counts[_COL_LINES] += 1
                        parsed = _parse_line(raw)
                        if isinstance(parsed[0], MalformedReason):
                            reason, detail = parsed
                            if not skip:
                                raise CriteoFormatError(path, line_number, reason, detail)
                            counts[_COL_REASON0 + _REASONS.index(reason)] += 1
                            continue
                        builder.add(*parsed)
                        counts[_COL_SAMPLES] += 1
                        if builder.full():
                            publish()
                            yield builder.build()
            if builder.n and not self.drop_last:
                publish()
                yield builder.build()
        finally:
            publish()


def _parse_line(raw: bytes):
    """Returns ``(label, dense, cats)`` for a valid line, else ``(reason, detail)``.

    ``dense`` holds 13 floats (NaN-free: missing is 0 before the transform, which maps 0 to 0); ``cats``
    holds 26 ints, -1 for missing.
    """
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError as e:
        return MalformedReason.ENCODING, f"non-ASCII byte at column {e.start + 1}"
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    fields = line.split("\t")
    if len(fields) != NUM_FIELDS:
        return MalformedReason.FIELD_COUNT, f"expected {NUM_FIELDS} tab-separated fields, got {len(fields)}"
    label = fields[0]
    if label != "0" and label != "1":
        return MalformedReason.LABEL, f"label must be 0 or 1, got {label!r}"
    dense = [0.0] * NUM_DENSE_FEATURES
    for j in range(NUM_DENSE_FEATURES):
        s = fields[1 + j]
        if s:
            if _INT_RE.fullmatch(s) is None:
                return MalformedReason.INTEGER, f"integer feature I{j + 1} is not an integer: {s!r}"
            dense[j] = float(int(s))
    cats = [-1] * NUM_SPARSE_FEATURES
    for j in range(NUM_SPARSE_FEATURES):
        s = fields[1 + NUM_DENSE_FEATURES + j]
        if s:
            if _HEX_RE.fullmatch(s) is None:
                return MalformedReason.CATEGORICAL, f"categorical feature C{j + 1} is not 8 hex digits: {s!r}"
            cats[j] = int(s, 16)
    return float(label == "1"), dense, cats


class CriteoDataModule(LightningDataModule):
    """Criteo-format files as train/val/test/predict loaders; models read the table layout from it.

    Args:
        train_paths: training file(s), plain or gzip.
        val_paths, test_paths, predict_paths: optional file(s) for the other stages.
        batch_size: rows per batch (per rank).
        num_embeddings_per_feature: table size per categorical feature (26 ints) or one size for all.
        hash_seed: seed of the categorical hash; ``null``/None for plain ``int(hex) % size``.
        on_error: ``skip`` (count and drop malformed lines) or ``raise``.
        dense_transform: ``log1p`` (``log(1 + max(x, 0))``, missing -> 0) or ``none``.
        num_workers: DataLoader worker processes per rank (lines are split between them).
        drop_last: drop each worker's last incomplete batch.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        train_paths: Union[str, List[str]],
        val_paths: Optional[Union[str, List[str]]] = None,
        test_paths: Optional[Union[str, List[str]]] = None,
        predict_paths: Optional[Union[str, List[str]]] = None,
        batch_size: int = 512,
        num_embeddings_per_feature: Union[int, List[int]] = 100_000,
        hash_seed: Optional[int] = 0,
        on_error: OnError = OnError.SKIP,
        dense_transform: DenseTransform = DenseTransform.LOG1P,
        num_workers: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"CriteoDataModule.batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"CriteoDataModule.num_workers must be an int >= 0, got {num_workers!r}")
        self.train_paths = train_paths
        self.val_paths, self.test_paths, self.predict_paths = val_paths, test_paths, predict_paths
        self.batch_size = batch_size
        self._num_embeddings = _normalize_num_embeddings(num_embeddings_per_feature)
        self.hash_seed = hash_seed
        self.on_error = OnError.parse(on_error, "CriteoDataModule.on_error")
        self.dense_transform = DenseTransform.parse(dense_transform, "CriteoDataModule.dense_transform")
        self.num_workers, self.drop_last, self.pin_memory = num_workers, drop_last, pin_memory
        self.datasets: dict = {}
        # Record the per-table list, not a one-int shorthand: models built from this module record the list,
        # and Lightning refuses to log hparams that the model and the data module hold with different values.
        self.save_hyperparameters(ignore="num_embeddings_per_feature")
        self.hparams["num_embeddings_per_feature"] = self.num_embeddings_per_feature

    @property
    def num_dense_features(self) -> int:
        return NUM_DENSE_FEATURES

    @property
    def feature_names(self) -> List[str]:
        return list(FEATURE_NAMES)

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return list(self._num_embeddings)

    def _loader(self, stage: str, paths) -> DataLoader:
        if paths is None:
            raise ValueError(f"CriteoDataModule has no {stage}_paths; set data.{stage}_paths to run '{stage}'")
        rank, world = _dist_rank_world()  # called after the process group exists (Lightning's setup)
        dataset = CriteoIterableDataset(
            paths, self.batch_size, self._num_embeddings, self.hash_seed, self.on_error,
            self.dense_transform, self.drop_last, rank=rank, world_size=world,
            max_workers=max(1, self.num_workers),
        )
        self.datasets[stage] = dataset  # kept so that callers can read dataset.stats
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_paths)

    def val_dataloader(self):
        # No validation files: an empty list makes Lightning skip validation instead of failing.
        return [] if self.val_paths is None else self._loader("val", self.val_paths)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_paths)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.predict_paths)
