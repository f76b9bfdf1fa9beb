"""The Parquet row files: schema, float32 rows exact, 8-bit row-wise rows within half a quantisation step."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from lightning_sparse.serving.format import ROW_SCHEMA, RowBatch, quantize_rows, read_row_file, write_row_file


def test_rows_and_tombstones_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 6)).astype(np.float32)
    ids = rng.integers(-(1 << 62), 1 << 62, 50)
    path = tmp_path / "rank00000.parquet"
    written = write_row_file(
        path, 7, 70, [RowBatch("t", ids, 2, rows)], [RowBatch("t", np.array([5, -5]))], quantize=False
    )
    assert written == 52 and pq.read_schema(path).equals(ROW_SCHEMA)
    records = read_row_file(path, 7)["t"]
    got_ids, got_rows = records.pieces[2]
    assert np.array_equal(got_ids, ids) and np.array_equal(got_rows, rows) and records.tombstones.tolist() == [5, -5]


def test_int8_rows_are_within_half_a_step(tmp_path):
    rng = np.random.default_rng(1)
    rows = (rng.normal(size=(2000, 16)) * rng.uniform(0.01, 10, size=(2000, 1))).astype(np.float32)
    rows[0] = 0.25  # a constant row is exact
    path = tmp_path / "q.parquet"
    write_row_file(path, 1, 1, [RowBatch("t", np.arange(2000), 0, rows)], [], quantize=True)
    _, got = read_row_file(path, 1)["t"].pieces[0]
    _, scale, _ = quantize_rows(rows)
    assert np.all(np.abs(got - rows) <= scale[:, None] * 0.5 + 1e-6 * np.abs(rows)) and np.array_equal(got[0], rows[0])
    full = write_row_file(tmp_path / "f.parquet", 1, 1, [RowBatch("t", np.arange(2000), 0, rows)], [], quantize=False)
    assert full == 2000 and (tmp_path / "q.parquet").stat().st_size < (tmp_path / "f.parquet").stat().st_size / 2
