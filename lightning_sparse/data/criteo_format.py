"""The Criteo display-ads text format (Kaggle / Terabyte click logs): parsing, validation, hashing, batches.

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
:class:`CriteoFormatError` naming the file, the line number and the problem (``on_error``). Integer features
are signed 64-bit integers: a longer one (a 400-digit counter, say) is a malformed line like any other.

The reader that streams files as batches is in :mod:`lightning_sparse.data.criteo`.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.typed_config import NamedEnum

NUM_DENSE_FEATURES = 13
NUM_SPARSE_FEATURES = 26
NUM_FIELDS = 1 + NUM_DENSE_FEATURES + NUM_SPARSE_FEATURES
FEATURE_NAMES: List[str] = [f"cat_{i}" for i in range(NUM_SPARSE_FEATURES)]

_GZIP_MAGIC = b"\x1f\x8b"
_INT_RE = re.compile(r"-?[0-9]+")  # ASCII only: int() would also take " 7", "+7", "1_0" and Unicode digits
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT64_DIGITS = 19  # digits of the largest int64; longer strings are rejected before int() parses them
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


def normalize_num_embeddings(value: Union[int, Sequence[int]]) -> List[int]:
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


def normalize_paths(paths: PathsLike, what: str) -> List[str]:
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


def open_criteo_file(path: str) -> io.BufferedIOBase:
    """Opens ``path`` for binary line iteration, decompressing it if it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


class BatchBuilder:
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


def _clip(text: str, limit: int = 24) -> str:
    """``repr(text)``, shortened so that an error message stays one readable line."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def parse_line(raw: bytes):
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
                return MalformedReason.INTEGER, f"integer feature I{j + 1} is not an integer: {_clip(s)}"
            # float() of an int over ~309 digits raises OverflowError, and int() refuses over 4300 digits.
            digits = len(s) - (s[0] == "-")
            value = int(s) if digits <= _INT64_DIGITS else None
            if value is None or not _INT64_MIN <= value <= _INT64_MAX:
                return (
                    MalformedReason.INTEGER,
                    f"integer feature I{j + 1} does not fit a signed 64-bit integer ({digits} digits: {_clip(s)})",
                )
            dense[j] = float(value)
    cats = [-1] * NUM_SPARSE_FEATURES
    for j in range(NUM_SPARSE_FEATURES):
        s = fields[1 + NUM_DENSE_FEATURES + j]
        if s:
            if _HEX_RE.fullmatch(s) is None:
                return MalformedReason.CATEGORICAL, f"categorical feature C{j + 1} is not 8 hex digits: {_clip(s)}"
            cats[j] = int(s, 16)
    return float(label == "1"), dense, cats
