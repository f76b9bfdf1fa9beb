"""lightning_sparse.data.stream in one process: schema, sources, ordered split, exact positions, bounds, errors.

The 2-process run (split over ranks, resume mid-epoch through a checkpoint) is in
tests/test_stream_prequential_ranks.py.
"""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_sparse.data import (
    IdTransform,
    IterableSource,
    ParquetSource,
    ResumableLoader,
    SparseColumn,
    StreamDataModule,
    StreamDataset,
    StreamRecordError,
    StreamSchema,
    SyntheticSource,
    TsvSource,
)
from lightning_sparse.data.criteo_format import hash_categorical
from lightning_sparse.data.stream import ChainedSource

COLUMNS = ["label", "price", "user", "tags"]
SCHEMA = StreamSchema(
    label="label", dense=["price"],
    sparse=[SparseColumn("user", 97, transform="hash", seed=1), SparseColumn("tags", 10, transform="modulo")],
)  # fmt: skip


def records(n: int = 40) -> list[dict]:
    return [
        {"label": g % 3 == 0, "price": g * 0.5, "user": f"user{g % 7}", "tags": [g, g + 1] if g % 4 else []}
        for g in range(n)
    ]


def tsv_line(r: dict) -> str:
    # TSV fields hold one value: the test uses the first tag only for text files
    return f"{int(r['label'])}\t{r['price']}\t{r['user']}\t{r['tags'][0] if r['tags'] else ''}\n"


def one_tag(rs: list[dict]) -> list[dict]:
    return [{**r, "label": int(r["label"]), "tags": r["tags"][:1]} for r in rs]


def batches(dataset: StreamDataset, limit: int | None = None) -> list[tuple]:
    out = []
    for batch in dataset:
        kjt = batch.sparse_features
        out.append(
            (batch.labels.tolist(), batch.dense_features.tolist(), kjt.values().tolist(), kjt.lengths().tolist())
        )
        if limit is not None and len(out) == limit:
            break
    return out


def write_files(tmp_path: Path, rs: list[dict]) -> dict[str, object]:
    """The same records as 3 TSV files (the middle one gzip), 2 Parquet files (row groups of 3) and a list."""
    (tmp_path / "tsv").mkdir()
    (tmp_path / "tsv" / "a.tsv").write_text("".join(map(tsv_line, rs[:15])))
    with gzip.open(tmp_path / "tsv" / "b.tsv", "wt") as f:
        f.write("".join(map(tsv_line, rs[15:25])))
    (tmp_path / "tsv" / "c.tsv").write_text("".join(map(tsv_line, rs[25:])))
    (tmp_path / "pq").mkdir()
    single = one_tag(rs)
    for name, part in (("a", single[:17]), ("b", single[17:])):
        pq.write_table(
            pa.table({k: [r[k] for r in part] for k in COLUMNS}), tmp_path / "pq" / f"{name}.parquet", row_group_size=3
        )
    return {
        "tsv": TsvSource(str(tmp_path / "tsv" / "*.tsv"), columns=COLUMNS),
        "parquet": ParquetSource(str(tmp_path / "pq" / "*.parquet"), read_rows=2),
        "iterable": IterableSource(single),
        "function": IterableSource(lambda start: iter(single[start:])),
        "chained": ChainedSource(
            [IterableSource(single[:11]), ParquetSource(str(tmp_path / "pq" / "*.parquet"), read_rows=4)]
        ),
    }


def test_every_source_gives_the_same_batches_and_readers_split_the_stream_in_order(tmp_path):
    rs = records()
    sources = write_files(tmp_path, rs)
    sources["chained"].sources[1] = IterableSource(one_tag(rs)[11:])
    expected = batches(StreamDataset(IterableSource(one_tag(rs)), SCHEMA, 4, rank=0, world_size=1))
    assert [len(b[0]) for b in expected] == [4] * 10
    first = expected[0]
    assert first[0] == [1.0, 0.0, 0.0, 1.0] and first[1] == [[0.0], [0.5], [1.0], [1.5]]
    assert first[3] == [1, 1, 1, 1, 0, 1, 1, 1]  # tags of record 0 are missing: an empty bag
    for name, source in sources.items():
        assert batches(StreamDataset(source, SCHEMA, 4, rank=0, world_size=1)) == expected, name
    # Three readers: reader r keeps records r, r + 3, ... in order, in batches of 2.
    readers = [batches(StreamDataset(sources["tsv"], SCHEMA, 2, rank=r, world_size=3)) for r in range(3)]
    single = batches(StreamDataset(sources["tsv"], SCHEMA, 1, rank=0, world_size=1))
    for r, got in enumerate(readers):
        mine = single[r::3]
        assert [b[0] for b in got] == [sum((m[0] for m in mine[i : i + 2]), []) for i in range(0, len(mine), 2)]


@pytest.mark.parametrize("kind", ["tsv", "parquet", "iterable", "function", "chained"])
def test_a_saved_position_resumes_at_the_next_record_of_every_source(kind, tmp_path):
    source = write_files(tmp_path, records())[kind]
    straight = batches(StreamDataset(source, SCHEMA, 3, rank=1, world_size=2))
    for k in range(len(straight)):
        dataset = StreamDataset(source, SCHEMA, 3, rank=1, world_size=2)
        iterator = iter(dataset)
        for _ in range(k):
            next(iterator)
        state = dataset.state_dict()
        resumed = StreamDataset(source, SCHEMA, 3, rank=1, world_size=2)
        resumed.load_state_dict(state)
        assert batches(resumed) == straight[k:], f"resumed after batch {k}"
    wrong = StreamDataset(source, SCHEMA, 3, rank=0, world_size=3)
    wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="reader 1 of 2.*reader 0 of 3.*same number of processes"):
        next(iter(wrong))


def test_two_workers_per_rank_deal_the_records_between_them_and_the_loader_resumes_them(tmp_path):
    source = write_files(tmp_path, records())["tsv"]
    loader = ResumableLoader(
        StreamDataset(source, SCHEMA, 2, rank=0, world_size=1, max_workers=2), batch_size=None, num_workers=2
    )
    got = [b.labels.tolist() for b in loader]
    single = [b[0] for b in batches(StreamDataset(source, SCHEMA, 1, rank=0, world_size=1))]
    # Worker w keeps records w, w + 2, ...; the loader takes one batch from each worker in turn.
    worker = [sum(single[w::2][i : i + 2], []) for w in range(2) for i in range(0, 20, 2)]
    assert got == [worker[i // 2 + (i % 2) * 10] for i in range(20)]
    # Each worker's position is in the loader's state: a new loader continues with batch 7.
    iterator = iter(loader)
    for _ in range(7):
        next(iterator)
    state = loader.state_dict()
    resumed = ResumableLoader(
        StreamDataset(source, SCHEMA, 2, rank=0, world_size=1, max_workers=2), batch_size=None, num_workers=2
    )
    resumed.load_state_dict(state)
    assert [b.labels.tolist() for b in resumed] == got[7:]


def test_max_records_bounds_an_endless_source_and_counts_malformed_records(tmp_path):
    schema = StreamSchema(
        sparse=[SparseColumn("cat_0", 50, transform="none"), SparseColumn("cat_1", 50)], dense=["dense_0"]
    )
    dataset = StreamDataset(
        SyntheticSource([50, 50], num_dense_features=1, chunk_size=8), schema, 4, max_records=10, rank=0, world_size=1
    )
    got = batches(dataset)
    assert [len(b[0]) for b in got] == [4, 4, 2] and dataset.stats.records == 10
    lines = [
        "1\t2.0\tu1\t3\n",
        "2\t2.0\tu1\t3\n",
        "1\tnan\tu1\t3\n",
        "0\t1\tu2\tx7\n",
        "0\t1\n",
        b"1\t\xff\tu\t1\n",
        "0\t\tu3\t\n",
    ]
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    dataset = StreamDataset(TsvSource(str(path), columns=COLUMNS), SCHEMA, 8, rank=0, world_size=1)
    ((labels, dense, _, lengths),) = batches(dataset)
    assert labels == [1.0, 0.0] and dense == [[2.0], [0.0]] and lengths == [1, 1, 1, 0]
    assert dataset.stats.malformed == {
        "field_count": 1,
        "encoding": 1,
        "missing_field": 0,
        "label": 1,
        "dense": 1,
        "sparse": 1,
    }
    with pytest.raises(
        StreamRecordError, match=r"bad.tsv:2: malformed record \(label\): label field 'label' must be 0 or 1, got '2'"
    ):
        batches(StreamDataset(TsvSource(str(path), columns=COLUMNS), SCHEMA, 8, on_error="raise", rank=0, world_size=1))


def test_a_followed_pattern_reads_files_that_appear_later_until_it_is_idle(tmp_path):
    rs = records(8)
    (tmp_path / "day_0.tsv").write_text("".join(map(tsv_line, rs[:5])))

    def publish_later() -> None:
        time.sleep(0.5)
        staged = tmp_path / ".staging"
        staged.write_text("".join(map(tsv_line, rs[5:])))
        staged.rename(tmp_path / "day_1.tsv")  # appears complete, as the docstring asks

    thread = threading.Thread(target=publish_later)
    thread.start()
    source = TsvSource(str(tmp_path / "day_*.tsv"), columns=COLUMNS, follow=True, poll_seconds=0.05, idle_timeout_s=2.0)
    started = time.monotonic()
    got = batches(StreamDataset(source, SCHEMA, 3, rank=0, world_size=1))
    thread.join()
    assert [len(b[0]) for b in got] == [3, 3, 2]
    assert time.monotonic() - started >= 2.0  # it waited for more before ending
    with pytest.raises(ValueError, match="follow=True.*needs a glob pattern"):
        TsvSource(str(tmp_path / "day_0.tsv"), follow=True)


def test_tsv_columns_default_to_criteo_and_a_criteo_line_becomes_a_record(tmp_path):
    path = tmp_path / "day_0.tsv"
    path.write_text(
        "1\t" + "\t".join(str(i) for i in range(13)) + "\t" + "\t".join(f"{i:08x}" for i in range(26)) + "\n"
    )
    ((raw, position),) = TsvSource(str(path)).read(None)
    record = TsvSource(str(path)).decode(raw)
    assert list(record) == ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert record["I13"] == "12" and record["C26"] == "00000019" and position == (str(path), len(raw), 1)
    schema = StreamSchema(
        label="label", dense=["I1", "I2"], sparse=[SparseColumn("C26", 1000)], dense_transform="log1p"
    )
    label, dense, sparse = schema.parse(record)
    assert (
        label == 1.0
        and dense == pytest.approx([0.0, 0.6931471805599453])
        and sparse == [SparseColumn("C26", 1000).ids(19)]
    )  # a decimal string is that integer


def test_the_readme_example_and_files_listed_in_their_own_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    schema = StreamSchema(
        label="label", dense=["price"],
        sparse=[SparseColumn("user", 1_000_000, transform="hash"), SparseColumn("item", 100_000, transform="modulo"),
                SparseColumn("ad", 50_000, transform="none")],
    )  # fmt: skip
    source = TsvSource("clicks/day_*.tsv", columns=["label", "price", "user", "item", "ad"], follow=True)  # no file yet
    data = StreamDataModule(source, schema, batch_size=1024)
    assert (data.num_dense_features, data.feature_names, data.num_embeddings_per_feature) == (
        1,
        ["user", "item", "ad"],
        [1_000_000, 100_000, 50_000],
    )
    rs = records(6)
    (tmp_path / "b.tsv").write_text("".join(map(tsv_line, rs[:3])))
    (tmp_path / "a.tsv").write_text("".join(map(tsv_line, rs[3:])))
    listed = TsvSource([str(tmp_path / "b.tsv"), str(tmp_path / "a.tsv")], columns=COLUMNS)
    assert [b[1] for b in batches(StreamDataset(listed, SCHEMA, 6, rank=0, world_size=1))] == [
        [[r["price"]] for r in rs]
    ]


def test_a_parquet_list_column_is_a_multi_hot_feature(tmp_path):
    rows = [
        {"label": 1, "price": 1.0, "user": "a", "tags": [12, 3, 25]},
        {"label": 0, "price": None, "user": "b", "tags": []},
    ]
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in COLUMNS}), tmp_path / "m.parquet")
    ((labels, dense, values, lengths),) = batches(
        StreamDataset(ParquetSource(str(tmp_path / "m.parquet")), SCHEMA, 4, rank=0, world_size=1)
    )
    assert lengths == [1, 1, 3, 0] and values[2:] == [2, 3, 5] and dense == [[1.0], [0.0]]  # tags modulo 10


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"transform='crc' is not valid; allowed values: 'none', 'modulo', 'hash'"):
        SparseColumn("user", 10, transform="crc")
    assert SparseColumn("user", 10, transform="MODULO").transform is IdTransform.MODULO
    with pytest.raises(ValueError, match="names the features \\['a'\\] more than once"):
        StreamSchema(sparse=[SparseColumn("a", 3), SparseColumn("a", 4)])
    with pytest.raises(TypeError, match="one-shot iterator"):
        IterableSource(r for r in records())
    with pytest.raises(FileNotFoundError, match="no file matches"):
        TsvSource(str(tmp_path / "*.tsv"))
    assert SparseColumn("t", 10, transform="hash").ids(["x", 12, "12"]) == SparseColumn("t", 10).ids(["x", "12", 12])
    with pytest.raises(Exception, match="'x' is not a 64-bit integer \\(transform modulo needs one\\)"):
        SparseColumn("t", 10, transform="modulo").ids("x")
    assert SparseColumn("t", 10, transform="modulo").ids(-3) == [7] and SparseColumn("t", 10, transform="none").ids(
        1 << 40
    ) == [1 << 40]
    # Integers hash as the Criteo reader hashes its categorical values.
    raw = np.array([0, 7, 0x68FD1E64, (1 << 63) + 5], dtype=np.uint64)
    assert (
        SparseColumn("t", 1000, seed=5).ids([0, 7, 0x68FD1E64, -(1 << 63) + 5])
        == hash_categorical(raw, 5, np.array(1000)).tolist()
    )
