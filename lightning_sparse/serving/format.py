"""The export format: versioned directories of Parquet row files, a dense model, a manifest written last.

Layout of an export directory (what :class:`~lightning_sparse.serving.export.DeltaExport` writes and
``lightning-sparse serve-apply`` follows)::

    current.json              the newest complete version, replaced atomically (temporary name, fsync, rename)
    v00000001/                version 1: always a full snapshot of every live row
        rank00000.parquet     the rows rank 0's shards changed since the previous version, and its tombstones
        rank00001.parquet     ... one file per rank
        dense.pt              the dense (non-embedding) weights at this version, with the model's class and
                              hyper-parameters (``torch.save``; read back with ``weights_only=True``)
        manifest.json         written last: size and sha256 of every file, the tables (name, width,
                              dynamic), step, wall time; its own sha256
    v00000002/                a delta (or a full snapshot, after a restart)
    .v00000003.partial/       a version being written; ignored by readers, deleted by the next run

A version is complete when its directory holds an intact manifest, and visible once ``current.json``
names it: ranks write into ``.vN.partial``, rank 0 gathers every rank's file entries, writes the manifest,
renames the directory and only then replaces ``current.json``. A crash anywhere leaves the previous version
as ``current.json`` names it.

Parquet schema of the row files (one row group per file; :data:`ROW_SCHEMA`):

=============  ================  =========================================================================
column         type              meaning
=============  ================  =========================================================================
``version``    int64             the version this file belongs to
``step``       int64             training step (``trainer.global_step``) of the export
``table``      string            embedding table name
``id``         int64             the raw id the user fed (for dynamic tables the raw id, not the slot)
``col``        int32             first column of ``row`` (0 unless the table is column-wise sharded: each
                                 rank writes its columns and the store joins them)
``row``        list<float32>     the row (columns ``[col, col + len)``); null for tombstones and 8-bit rows
``row_q``      list<uint8>       8-bit row-wise quantised row (``quantize="int8"``): ``row_q * scale + bias``
``scale``      float32           quantisation scale per row (null unless quantised)
``bias``       float32           quantisation bias per row (null unless quantised)
``tombstone``  bool              the id left the table (expired or evicted): delete it from the store
=============  ================  =========================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # pa.compute
import pyarrow.parquet as pq

from lightning_sparse.durable import fsync_dir

FORMAT = "lightning_sparse.serving/1"
CURRENT_FILE = "current.json"
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "dense.pt"
PARTIAL_SUFFIX = ".partial"
_CHUNK = 8 << 20

ROW_SCHEMA = pa.schema(
    [
        ("version", pa.int64()),
        ("step", pa.int64()),
        ("table", pa.string()),
        ("id", pa.int64()),
        ("col", pa.int32()),
        ("row", pa.list_(pa.float32())),
        ("row_q", pa.list_(pa.uint8())),
        ("scale", pa.float32()),
        ("bias", pa.float32()),
        ("tombstone", pa.bool_()),
    ]
)


class ExportError(ValueError):
    """Base of the serving errors about an export directory or a version in it."""


class CorruptExportError(ExportError):
    """A file of a version differs from its manifest, cannot be parsed, or has the wrong schema."""


class IncompleteExportError(ExportError):
    """A version, or the directory's ``current.json``, is missing or was not finished."""


class SchemaMismatchError(ExportError):
    """A version's tables or widths differ from what the store (or the predictor's model) holds."""


def version_dir(root: Path, version: int) -> Path:
    return Path(root) / f"v{version:08d}"


def partial_dir(root: Path, version: int) -> Path:
    return Path(root) / f".v{version:08d}{PARTIAL_SUFFIX}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.parquet"


# ------------------------------------------------------------------ files
def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of one file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    """Temporary name, fsync, rename over ``path``: a reader sees the old content or the new, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(content, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _self_checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the format tag and a sha256 of its own content (checked by :func:`read_sealed`)."""
    body = {"format": FORMAT, **body}
    return {**body, "sha256": _self_checksum(body)}


def read_sealed(path: Path, what: str) -> dict[str, Any]:
    """A JSON file written by :func:`sealed` + :func:`write_json_atomically`, verified."""
    if not path.is_file():
        raise IncompleteExportError(f"{what} {str(path)!r} does not exist")
    try:
        content = json.loads(path.read_text())
        body = {k: v for k, v in content.items() if k != "sha256"}
        intact = content["sha256"] == _self_checksum(body)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CorruptExportError(f"{what} {str(path)!r} is damaged: {error}") from error
    if not intact:
        raise CorruptExportError(f"{what} {str(path)!r} is damaged: its content does not match its own sha256")
    if content.get("format") != FORMAT:
        raise CorruptExportError(f"{what} {str(path)!r} has format {content.get('format')!r}, expected {FORMAT!r}")
    return content


# --------------------------------------------------------------- manifests
@dataclass(frozen=True)
class TableSchema:
    """What a store must agree on for one table: its row width and whether its ids are raw (dynamic)."""

    dim: int
    dynamic: bool


def tables_of(manifest: dict[str, Any]) -> dict[str, TableSchema]:
    return {name: TableSchema(int(t["dim"]), bool(t["dynamic"])) for name, t in manifest["tables"].items()}


def read_current(root: Path) -> Optional[dict[str, Any]]:
    """``current.json`` of an export directory (version, export_id), or None when nothing was published yet."""
    path = Path(root) / CURRENT_FILE
    if not path.exists():
        return None
    return read_sealed(path, "export pointer")


def read_manifest(root: Path, version: int) -> dict[str, Any]:
    """The verified manifest of version ``version`` (files are not re-hashed: :func:`verify_version` does)."""
    directory = version_dir(root, version)
    if not directory.is_dir():
        raise IncompleteExportError(
            f"version {version} is not in {str(root)!r} ({directory.name} is missing): it was never completed or "
            "was deleted; apply from a later full snapshot into a fresh store"
        )
    manifest = read_sealed(directory / MANIFEST_FILE, f"manifest of version {version}")
    if manifest.get("version") != version:
        raise CorruptExportError(
            f"{str(directory)!r} holds a manifest of version {manifest.get('version')}, not {version}"
        )
    return manifest


def verify_version(root: Path, manifest: dict[str, Any]) -> None:
    """Checks size and sha256 of every file of a version; raises naming each bad file."""
    directory = version_dir(root, manifest["version"])
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        file = directory / name
        if not file.is_file():
            problems.append(f"{str(file)!r} is missing (listed in its manifest)")
            continue
        found = file_entry(file)
        if found["bytes"] != expected["bytes"]:
            problems.append(f"{str(file)!r} has {found['bytes']} bytes, {expected['bytes']} were written (truncated)")
        elif found["sha256"] != expected["sha256"]:
            problems.append(f"{str(file)!r} is corrupted: its sha256 differs from the one in the manifest")
    if problems:
        raise CorruptExportError(f"version {manifest['version']} of {str(root)!r} is damaged: " + "; ".join(problems))


# ------------------------------------------------------------- row files
@dataclass
class RowBatch:
    """Rows (or tombstones) of one table, as arrays; ``rows`` is float32 [n, width] or None for tombstones."""

    table: str
    ids: np.ndarray
    col: int = 0
    rows: Optional[np.ndarray] = None


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit row-wise quantisation (fbgemm's layout): ``q = round((x - min) / scale)``, ``scale = (max - min) / 255``.

    Dequantised values ``q * scale + bias`` are within ``scale / 2`` of the originals (a constant row is exact).
    """
    low = rows.min(axis=1).astype(np.float32)
    high = rows.max(axis=1).astype(np.float32)
    scale = ((high - low) / np.float32(255.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint((rows - low[:, None]) / safe[:, None]), 0, 255).astype(np.uint8)
    return codes, scale, low


def _rows(batch: RowBatch) -> np.ndarray:
    """The rows of a batch of rows (not tombstones)."""
    if batch.rows is None:
        raise ValueError(f"a row batch of table {batch.table!r} has no rows (tombstones go in `tombstones`)")
    return batch.rows


def write_row_file(
    path: Path, version: int, step: int, batches: list[RowBatch], tombstones: list[RowBatch], quantize: bool
) -> int:
    """Writes one rank's rows and tombstones as Parquet (fsynced); returns the number of records.

    Columns are built once from concatenated numpy arrays (no per-record Python work), written without
    compression and with dictionaries only for the constant columns and the 8-bit codes: float rows barely compress,
    and this is on the training step's critical path (``benchmarks/serving.py``).
    """
    parts = [(b, False) for b in batches if len(b.ids)] + [(t, True) for t in tombstones if len(t.ids)]
    counts = np.array([len(b.ids) for b, _ in parts], np.int64)
    total = int(counts.sum())
    names = sorted({b.table for b, _ in parts})
    codes = np.repeat(np.array([names.index(b.table) for b, _ in parts], np.int32), counts)
    dead = np.repeat(np.array([d for _, d in parts], bool), counts)
    widths = np.repeat(np.array([0 if d else _rows(b).shape[1] for b, d in parts], np.int64), counts)
    live_rows = [_rows(b).astype(np.float32, copy=False).reshape(-1) for b, d in parts if not d]
    values = np.concatenate(live_rows) if live_rows else np.zeros(0, np.float32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(widths)]).astype(np.int32))
    nulls = pa.array(np.ones(total, bool))
    if quantize:
        matrices = [_quantized(_rows(b)) for b, d in parts if not d]
        codes_q = np.concatenate([m[0].reshape(-1) for m in matrices]) if matrices else np.zeros(0, np.uint8)
        scale = np.zeros(total, np.float32)
        bias = np.zeros(total, np.float32)
        scale[~dead] = np.concatenate([m[1] for m in matrices]) if matrices else []
        bias[~dead] = np.concatenate([m[2] for m in matrices]) if matrices else []
        row = pa.ListArray.from_arrays(pa.array(np.zeros(total + 1, np.int32)), pa.array([], pa.float32()), mask=nulls)
        row_q = pa.ListArray.from_arrays(offsets, pa.array(codes_q, pa.uint8()), mask=pa.array(dead))
        scale_arr, bias_arr = pa.array(scale, mask=dead), pa.array(bias, mask=dead)
    else:
        row = pa.ListArray.from_arrays(offsets, pa.array(values, pa.float32()), mask=pa.array(dead))
        row_q = pa.ListArray.from_arrays(pa.array(np.zeros(total + 1, np.int32)), pa.array([], pa.uint8()), mask=nulls)
        scale_arr, bias_arr = pa.nulls(total, pa.float32()), pa.nulls(total, pa.float32())
    ids = np.concatenate([b.ids.astype(np.int64) for b, _ in parts]) if parts else np.zeros(0, np.int64)
    cols = np.repeat(np.array([b.col for b, _ in parts], np.int32), counts)
    table_names = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(names, pa.string())).cast(pa.string())
    arrays = [
        pa.array(np.full(total, version, np.int64)), pa.array(np.full(total, step, np.int64)), table_names,
        pa.array(ids), pa.array(cols), row, row_q, scale_arr, bias_arr, pa.array(dead),
    ]  # fmt: skip
    table = pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)
    with open(path, "wb") as handle:
        # dictionary-encoded 8-bit codes take ~1 byte each (Parquet stores uint8 as 4-byte INT32 otherwise)
        dictionaries = ["version", "step", "table", "col", "row_q.list.element"]
        pq.write_table(table, handle, compression="none", use_dictionary=dictionaries, write_statistics=False)
        handle.flush()
        os.fsync(handle.fileno())
    return total


def _quantized(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_rows(rows.astype(np.float32, copy=False))


@dataclass
class TableRecords:
    """Everything one version says about one table: row pieces by first column, and tombstoned ids."""

    pieces: dict[int, tuple[np.ndarray, np.ndarray]]  # first column -> (ids int64 [n], rows float32 [n, width])
    tombstones: np.ndarray  # int64 [m]


def read_row_file(path: Path, version: int) -> dict[str, TableRecords]:
    """One rank file of a version, checked against :data:`ROW_SCHEMA`, 8-bit rows dequantised (vectorised)."""
    try:
        table = pq.read_table(path).combine_chunks()
    except (pa.ArrowException, OSError) as error:
        raise CorruptExportError(f"{str(path)!r} is not a readable Parquet file: {error}") from error
    if not table.schema.equals(ROW_SCHEMA):
        raise CorruptExportError(
            f"{str(path)!r} has columns {table.schema.names} of types {[str(t) for t in table.schema.types]}; "
            f"expected {ROW_SCHEMA.names} of types {[str(t) for t in ROW_SCHEMA.types]} "
            "(lightning_sparse.serving.format.ROW_SCHEMA)"
        )
    out: dict[str, TableRecords] = {}
    if table.num_rows == 0:
        return out
    column = {name: table.column(name).chunk(0) for name in ROW_SCHEMA.names}
    if not bool(np.all(column["version"].to_numpy() == version)):
        raise CorruptExportError(f"{str(path)!r} holds records of another version than {version}")
    encoded = column["table"].dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    ids = column["id"].to_numpy()
    cols = column["col"].to_numpy()
    dead = column["tombstone"].to_numpy(zero_copy_only=False)
    has_row = column["row"].is_valid().to_numpy(zero_copy_only=False)
    has_q = column["row_q"].is_valid().to_numpy(zero_copy_only=False)
    for code, name in enumerate(encoded.dictionary.to_pylist()):
        mine = codes == code
        records = out.setdefault(name, TableRecords({}, ids[mine & dead]))
        live = mine & ~dead
        if bool(np.any(live & ~has_row & ~has_q)):
            bad = int(ids[live & ~has_row & ~has_q][0])
            raise CorruptExportError(f"{str(path)!r}: table {name!r} id {bad} has neither row nor row_q")
        for col in np.unique(cols[live]).tolist():
            sel = live & (cols == col)
            rows = _matrix(column["row"], sel & has_row, np.float32, path, name)
            pieces = [(ids[sel & has_row], rows)]
            if bool(np.any(sel & has_q)):
                q = _matrix(column["row_q"], sel & has_q, np.float32, path, name)
                scale = column["scale"].to_numpy(zero_copy_only=False)[sel & has_q].astype(np.float32)
                bias = column["bias"].to_numpy(zero_copy_only=False)[sel & has_q].astype(np.float32)
                pieces.append((ids[sel & has_q], q * scale[:, None] + bias[:, None]))
            got = [p for p in pieces if p[0].size]
            records.pieces[int(col)] = (
                np.concatenate([p[0] for p in got]),
                np.concatenate([p[1] for p in got]).astype(np.float32, copy=False),
            )
    return out


def _matrix(lists: pa.Array, mask: np.ndarray, dtype: type, path: Path, table: str) -> np.ndarray:
    """The selected entries of a list column as an [n, width] matrix (every entry must have the same width)."""
    chosen = lists.filter(pa.array(mask))
    if len(chosen) == 0:
        return np.zeros((0, 0), dtype)
    lengths = pa.compute.list_value_length(chosen).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise CorruptExportError(f"{str(path)!r}: rows of table {table!r} with one first column have different widths")
    flat = pa.compute.list_flatten(chosen).to_numpy(zero_copy_only=False)
    return flat.reshape(len(chosen), int(lengths[0])).astype(dtype, copy=False)
