"""The typed schema of a click stream: which field of a record is the label, which are dense and sparse features.

A record is a mapping from field names to values (a TSV line split by its column names, a Parquet row, a
dict a user's iterable yields). :class:`StreamSchema` turns it into one sample of a torchrec ``Batch``:

* ``label``: ``0``/``1`` (int, float, bool or the strings ``"0"``/``"1"``); anything else is malformed.
* ``dense``: floats; a missing value (absent, ``None`` or ``""``) is 0, a non-number or a non-finite number
  is malformed. ``dense_transform: log1p`` maps ``x`` to ``log(1 + max(x, 0))`` (as the Criteo reader).
  An empty ``dense`` list gives ``dense_features`` of shape ``[batch, 0]``: the bundled models then have no
  bottom MLP input (see :mod:`lightning_sparse.models.base`), no zero column is needed.
* ``sparse``: one :class:`SparseColumn` per feature; a value is an integer, a string, or a list of them (a
  multi-hot feature: one id each); missing is an empty bag. The column's :class:`IdTransform` maps each
  raw value to an id.

Why not Python's ``hash()``: it is salted per process, and every rank and every run must agree on the ids.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

import numpy as np

from lightning_sparse.data.criteo_format import DenseTransform, hash_categorical
from lightning_sparse.typed_config import NamedEnum

_DECIMAL = re.compile(r"-?[0-9]+")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_MASK64 = (1 << 64) - 1


class IdTransform(NamedEnum):
    """How a sparse column's raw value becomes an id.

    * ``none``: the integer as is (for dynamic tables, which take raw ids of any value; a static table's
      ids must already lie in ``[0, num_embeddings)``, which SparseStrategy checks on every batch).
    * ``modulo``: ``value mod num_embeddings`` (non-negative), integers only.
    * ``hash``: ``splitmix64(value ^ splitmix64(seed)) mod num_embeddings`` for integers (the Criteo
      reader's hash); a string that is not a decimal integer is first reduced to 64 bits with BLAKE2b.
    """

    NONE = "none"
    MODULO = "modulo"
    HASH = "hash"
    locals()["none"] = "none"  # lower-case aliases: jsonargparse parses enums by member name
    locals()["modulo"] = "modulo"
    locals()["hash"] = "hash"


class RecordError(ValueError):
    """One record that does not follow the schema: ``reason`` is a key of the reader's skip counters."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class StreamRecordError(ValueError):
    """A malformed record under ``on_error=raise``: names where it is (``file:line`` or ``record N``) and why."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(f"{where}: malformed record ({reason}): {detail}")


# Reasons a record is skipped; the keys of ``StreamStats.malformed`` (``field_count`` and ``encoding`` come
# from the sources: a TSV line with the wrong number of fields or bytes that are not UTF-8).
REASONS = ("field_count", "encoding", "missing_field", "label", "dense", "sparse")


@dataclass
class SparseColumn:
    """One sparse feature: the record field it reads and how its raw values become ids.

    Args:
        name: the feature key in the batch (and the model's table ``t_<name>``).
        num_embeddings: rows of its table.
        transform: ``hash`` (default), ``modulo`` or ``none`` (see :class:`IdTransform`).
        field: the record field to read (default: ``name``).
        seed: seed of the ``hash`` transform.
    """

    name: str
    num_embeddings: int
    transform: IdTransform = IdTransform.HASH
    field: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.transform = IdTransform.parse(self.transform, f"SparseColumn({self.name!r}).transform")
        if isinstance(self.num_embeddings, bool) or not isinstance(self.num_embeddings, int) or self.num_embeddings < 1:
            raise ValueError(
                f"SparseColumn({self.name!r}).num_embeddings must be an int >= 1, got {self.num_embeddings!r}"
            )
        if self.field is None:
            self.field = self.name
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SparseColumn({self.name!r}).seed must be an int, got {self.seed!r}")

    def ids(self, value: Any) -> List[int]:
        """The ids of one record's value (an empty list when missing); raises :class:`RecordError`."""
        if value is None or value == "":
            return []
        values = value if isinstance(value, (list, tuple)) else [value]
        raw = [self._raw(v) for v in values if v is not None and v != ""]
        if self.transform is IdTransform.NONE:
            return raw
        if self.transform is IdTransform.MODULO:
            return [v % self.num_embeddings for v in raw]
        unsigned = np.array([v & _MASK64 for v in raw], dtype=np.uint64)
        return hash_categorical(unsigned, self.seed, np.array(self.num_embeddings)).tolist()

    def _raw(self, v: Any) -> int:
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            v = int(v)
        elif isinstance(v, str) and _DECIMAL.fullmatch(v) and len(v.lstrip("-")) <= 19:
            v = int(v)
        elif isinstance(v, (str, bytes)) and self.transform is IdTransform.HASH:
            data = v.encode("utf-8") if isinstance(v, str) else v
            return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        else:
            raise RecordError(
                "sparse",
                f"feature {self.name!r} (field {self.field!r}): {v!r} is not a 64-bit integer"
                + ("" if self.transform is IdTransform.HASH else f" (transform {self.transform.value} needs one)"),
            )
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise RecordError("sparse", f"feature {self.name!r} (field {self.field!r}): {v} does not fit 64 bits")
        return v


@dataclass
class StreamSchema:
    """Names the label, dense and sparse fields of a record (see the module docstring for what each becomes).

    Args:
        sparse: one :class:`SparseColumn` per sparse feature (at least one: the models need a table).
        label: the field holding the 0/1 click label.
        dense: the fields of the dense features, in order (may be empty).
        dense_transform: ``none`` (default) or ``log1p``.
    """

    sparse: List[SparseColumn]
    label: str = "label"
    dense: List[str] = field(default_factory=list)
    dense_transform: DenseTransform = DenseTransform.NONE

    def __post_init__(self) -> None:
        self.sparse = [c if isinstance(c, SparseColumn) else SparseColumn(**c) for c in self.sparse]
        self.dense = list(self.dense)
        self.dense_transform = DenseTransform.parse(self.dense_transform, "StreamSchema.dense_transform")
        if not self.sparse:
            raise ValueError("StreamSchema.sparse is empty; name at least one sparse feature (the models need a table)")
        names = [c.name for c in self.sparse]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"StreamSchema.sparse names the features {duplicates} more than once; feature names must be unique"
            )

    @property
    def feature_names(self) -> List[str]:
        return [c.name for c in self.sparse]

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return [c.num_embeddings for c in self.sparse]

    def parse(self, record: Mapping[str, Any]) -> tuple[float, List[float], List[List[int]]]:
        """``(label, dense, ids per sparse feature)`` of one record; raises :class:`RecordError`."""
        if not isinstance(record, Mapping):
            raise RecordError(
                "missing_field", f"a record must be a mapping of field names to values, got {type(record).__name__}"
            )
        if self.label not in record:
            raise RecordError("missing_field", f"no label field {self.label!r} (fields: {sorted(record)[:20]})")
        label = record[self.label]
        if isinstance(label, str):
            label = {"0": 0.0, "1": 1.0}.get(label.strip(), label)
        if isinstance(label, (bool, int, float, np.integer, np.floating)) and label in (0, 1):
            label = float(label)
        else:
            raise RecordError("label", f"label field {self.label!r} must be 0 or 1, got {label!r}")
        dense = [self._dense(name, record.get(name)) for name in self.dense]
        sparse = [column.ids(record.get(column.field or column.name)) for column in self.sparse]
        return label, dense, sparse

    def _dense(self, name: str, value: Any) -> float:
        if value is None or value == "":
            return 0.0
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise RecordError("dense", f"dense field {name!r} is not a number: {str(value)[:24]!r}") from None
        if not math.isfinite(x):
            raise RecordError("dense", f"dense field {name!r} is {x}")
        return math.log1p(max(x, 0.0)) if self.dense_transform is DenseTransform.LOG1P else x
