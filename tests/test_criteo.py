"""Criteo reader: exact parsing, hashing, malformed-line handling, rank/worker sharding, data module."""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sparse.data.criteo import (
    FEATURE_NAMES,
    CriteoDataModule,
    CriteoFormatError,
    CriteoIterableDataset,
    DenseTransform,
    MalformedReason,
    OnError,
    _splitmix64_int,
    hash_categorical,
)

N_CATS = 26


def _line(label: str, ints: list, cats: list) -> bytes:
    assert len(ints) == 13 and len(cats) == N_CATS
    return ("\t".join([label, *ints, *cats]) + "\n").encode()


def _valid_line(i: int) -> bytes:
    """A valid line whose I1 is ``i`` (so a sample can be traced back to its line) and label ``i % 2``."""
    ints = [str(i)] + [str((i * 7 + j) % 50) if (i + j) % 5 else "" for j in range(1, 13)]
    cats = [f"{(i * 2654435761 + j * 40503) & 0xFFFFFFFF:08x}" if (i + j) % 4 else "" for j in range(N_CATS)]
    return _line(str(i % 2), ints, cats)


# One malformed line per reason, with the reason the reader must report.
HAND_INTS = ["5", "", "-2", "0", "100", "", "", "", "", "", "", "", "7"]
HAND_CATS = ["68fd1e64", ""] + ["0000000a"] * 23 + ["FFFFFFFF"]
GOOD = _line("1", HAND_INTS, HAND_CATS)
MALFORMED = [
    (b"1\t2\t3\n", "field_count"),
    (b"\n", "field_count"),
    (_line("2", HAND_INTS, HAND_CATS), "label"),
    (_line("", HAND_INTS, HAND_CATS), "label"),
    (_line("1", ["1.5"] + HAND_INTS[1:], HAND_CATS), "integer"),
    (_line("1", [" 7"] + HAND_INTS[1:], HAND_CATS), "integer"),
    (_line("0", HAND_INTS, ["zzzzzzzz"] + HAND_CATS[1:]), "categorical"),
    (_line("0", HAND_INTS, HAND_CATS[:-1] + ["abc"]), "categorical"),
    (_line("0", HAND_INTS, HAND_CATS[:-1] + ["68fd1e64 "]), "categorical"),
    (GOOD.replace(b"68fd1e64", b"68fd1e\xff4"), "encoding"),
    (_line("1", ["9" * 400] + HAND_INTS[1:], HAND_CATS), "integer"),  # float() would raise OverflowError
    (_line("1", HAND_INTS[:12] + ["9223372036854775808"], HAND_CATS), "integer"),  # int64 max + 1
    (_line("1", HAND_INTS[:12] + ["-" + "1" * 5000], HAND_CATS), "integer"),  # int() refuses > 4300 digits
]


def _write(path, lines: list, compress: bool) -> str:
    data = b"".join(lines)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def _all_batches(ds):
    return list(DataLoader(ds, batch_size=None))


def test_hand_computed_line_exact_values(tmp_path):
    path = _write(tmp_path / "one.tsv", [GOOD], compress=False)
    sizes = [1000] * 25 + [7]
    (batch,) = _all_batches(CriteoIterableDataset(path, batch_size=4, num_embeddings_per_feature=sizes, hash_seed=None))
    assert batch.labels.tolist() == [1.0]
    expected_dense = [math.log(6), 0, 0, 0, math.log(101), 0, 0, 0, 0, 0, 0, 0, math.log(8)]
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (1, 13)
    torch.testing.assert_close(batch.dense_features[0], torch.tensor(expected_dense, dtype=torch.float32))
    kjt = batch.sparse_features
    assert kjt.keys() == FEATURE_NAMES and kjt.stride() == 1
    assert kjt.lengths().tolist() == [1, 0] + [1] * 24
    # 0x68fd1e64 = 1761418852 -> 852; 0xa -> 10; 0xFFFFFFFF = 4294967295 = 7 * 613566756 + 3 -> 3
    assert kjt.values().tolist() == [852] + [10] * 23 + [3]
    assert kjt.values().dtype == torch.int64


def test_sparse_layout_is_key_major_per_sample(tmp_path):
    second = _line("0", ["1"] * 13, ["00000003", "00000004"] + [""] * 24)
    path = _write(tmp_path / "two.tsv", [GOOD, second], compress=False)
    (batch,) = _all_batches(CriteoIterableDataset(path, batch_size=4, num_embeddings_per_feature=1000, hash_seed=None))
    per_key = batch.sparse_features.to_dict()
    assert per_key["cat_0"].lengths().tolist() == [1, 1] and per_key["cat_0"].values().tolist() == [852, 3]
    assert per_key["cat_1"].lengths().tolist() == [0, 1] and per_key["cat_1"].values().tolist() == [4]
    assert per_key["cat_2"].lengths().tolist() == [1, 0] and per_key["cat_2"].values().tolist() == [10]
    assert batch.labels.tolist() == [1.0, 0.0]


def test_dense_transform_none_keeps_raw_values(tmp_path):
    path = _write(tmp_path / "one.tsv", [GOOD], compress=False)
    (batch,) = _all_batches(CriteoIterableDataset(path, batch_size=4, dense_transform="none"))
    assert batch.dense_features[0].tolist() == [5, 0, -2, 0, 100, 0, 0, 0, 0, 0, 0, 0, 7]


def test_splitmix64_known_answer_and_numpy_matches_python():
    # Reference output of splitmix64 seeded with 0 (Vigna's published generator).
    assert _splitmix64_int(0) == 0xE220A8397B1DCDAF
    v = 0x68FD1E64
    expected = _splitmix64_int(v ^ _splitmix64_int(17)) % 1_000_003
    assert hash_categorical(np.array([v], dtype=np.uint64), 17, np.array([1_000_003]))[0] == expected


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    size=st.integers(1, 2**40),
)
def test_hash_in_range_and_matches_scalar_formula(values, seed, size):
    ids = hash_categorical(np.array(values, dtype=np.uint64), seed, np.array(size))
    assert ids.dtype == np.int64 and ((ids >= 0) & (ids < size)).all()
    mask = (1 << 64) - 1
    for v, h in zip(values, ids.tolist()):
        ref = v % size if seed is None else _splitmix64_int(v ^ _splitmix64_int(seed & mask)) % size
        assert h == ref


def test_hash_seed_changes_ids_and_is_stable_across_processes(tmp_path):
    lines = [_valid_line(i) for i in range(50)]
    path = _write(tmp_path / "d.tsv", lines, compress=False)

    def ids(seed):
        return torch.cat(
            [
                b.sparse_features.values()
                for b in _all_batches(
                    CriteoIterableDataset(path, batch_size=16, num_embeddings_per_feature=1000, hash_seed=seed)
                )
            ]
        )

    a, b = ids(3), ids(4)
    assert torch.equal(a, ids(3)) and not torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 1000
    # Another interpreter with a different str-hash salt must give the same ids.
    code = (
        "import numpy as np;from lightning_sparse.data.criteo import hash_categorical as h;"
        "print(h(np.array([0x68fd1e64, 0xdeadbeef], dtype=np.uint64), 3, np.array(1000)).tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hash_categorical(np.array([0x68FD1E64, 0xDEADBEEF], dtype=np.uint64), 3, np.array(1000)).tolist()
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize("compress", [False, True])
def test_skip_counts_per_reason_plain_and_gzip(tmp_path, compress):
    good = [_valid_line(i) for i in range(20)]
    lines = good[:10] + [m for m, _ in MALFORMED] + good[10:]
    # No .gz extension: gzip must be recognised by its magic bytes.
    path = _write(tmp_path / "mixed.txt", lines, compress)
    ds = CriteoIterableDataset(path, batch_size=8, dense_transform=DenseTransform.NONE)
    batches = _all_batches(ds)
    assert [b.labels.numel() for b in batches] == [8, 8, 4]
    assert torch.cat([b.dense_features[:, 0] for b in batches]).tolist() == list(range(20))
    assert torch.cat([b.labels for b in batches]).tolist() == [i % 2 for i in range(20)]
    assert len(_all_batches(ds)) == 3  # a second pass: counters describe one pass, they do not accumulate
    stats = ds.stats
    assert stats.lines_read == len(lines) and stats.samples == 20
    expected = {}
    for _, reason in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in stats.malformed.items() if v} == expected
    assert stats.malformed_total == len(MALFORMED)


@pytest.mark.parametrize("index", range(len(MALFORMED)))
def test_raise_mode_names_file_line_and_reason(tmp_path, index):
    bad, reason = MALFORMED[index]
    path = _write(tmp_path / "bad.tsv", [_valid_line(0), _valid_line(1), bad, _valid_line(2)], compress=False)
    ds = CriteoIterableDataset(path, batch_size=2, on_error="raise")
    with pytest.raises(CriteoFormatError) as info:
        _all_batches(ds)
    err = info.value
    assert (err.path, err.line_number, err.reason.value) == (path, 3, reason)
    assert str(err).startswith(f"{path}:3: malformed Criteo line ({reason})")


def test_huge_integer_is_named_in_raise_mode_and_counted_in_skip_mode(tmp_path):
    huge = _line("1", HAND_INTS[:2] + ["1" * 400] + HAND_INTS[3:], HAND_CATS)
    path = _write(tmp_path / "huge.tsv", [_valid_line(0), huge, _valid_line(1)], compress=False)
    with pytest.raises(
        CriteoFormatError,
        match=r"huge.tsv:2: malformed Criteo line \(integer\): integer feature I3 "
        r"does not fit a signed 64-bit integer \(400 digits: '1111",
    ):
        _all_batches(CriteoIterableDataset(path, batch_size=2, on_error="raise"))
    ds = CriteoIterableDataset(path, batch_size=2, dense_transform="none")
    (batch,) = _all_batches(ds)
    assert batch.dense_features[:, 0].tolist() == [0, 1]
    assert ds.stats.malformed["integer"] == 1


def test_int64_extremes_are_valid_integers(tmp_path):
    edge = _line("0", ["9223372036854775807", "-9223372036854775808"] + HAND_INTS[2:], HAND_CATS)
    path = _write(tmp_path / "edge.tsv", [edge], compress=False)
    (batch,) = _all_batches(CriteoIterableDataset(path, batch_size=2, dense_transform="none", on_error="raise"))
    assert batch.dense_features[0, :2].double().tolist() == [float(2**63), float(-(2**63))]


def _first_column(batches) -> list:
    return [int(x) for b in batches for x in b.dense_features[:, 0].tolist()]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("compress", [False, True])
def test_position_round_trips_through_the_stateful_loader(tmp_path, compress, num_workers):
    """Stop after k batches, save, resume in a new loader: the rest is what the uninterrupted pass read."""
    lines = [_valid_line(i) for i in range(45)]
    lines.insert(7, MALFORMED[0][0])
    paths = [_write(tmp_path / "a.txt", lines[:20], compress), _write(tmp_path / "b.txt", lines[20:], compress)]

    def loader():
        ds = CriteoIterableDataset(paths, batch_size=4, dense_transform="none", rank=1, world_size=2, max_workers=2)
        return ds, StatefulDataLoader(
            ds, batch_size=None, num_workers=num_workers, multiprocessing_context="fork" if num_workers else None
        )

    whole_ds, whole = loader()
    expected = _first_column(whole)
    assert len(set(expected)) == len(expected) > 20 and whole_ds.stats.malformed_total == 1
    for k in range(1, 6):
        _, first = loader()
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = first.state_dict()
        ds, second = loader()
        second.load_state_dict(state)
        assert _first_column(head) + _first_column(second) == expected, f"resumed after {k} batches"
        # The skip counters are part of the position: the malformed line before the resume point is counted.
        assert ds.stats == whole_ds.stats


def test_position_refuses_other_files_or_another_split(tmp_path):
    path = _write(tmp_path / "a.tsv", [_valid_line(i) for i in range(10)], compress=False)
    other = _write(tmp_path / "b.tsv", [_valid_line(i) for i in range(10)], compress=False)
    ds = CriteoIterableDataset(path, batch_size=2, rank=0, world_size=2)
    next(iter(ds))
    state = ds.state_dict()
    moved = CriteoIterableDataset(other, batch_size=2, rank=0, world_size=2)
    moved.load_state_dict(state)
    with pytest.raises(ValueError, match=r"position is in the files \[.*a.tsv'\]; this reader reads \[.*b.tsv'\]"):
        next(iter(moved))
    resharded = CriteoIterableDataset(path, batch_size=2, rank=0, world_size=3)
    resharded.load_state_dict(state)
    with pytest.raises(ValueError, match="line shard 0 of 2 .*; this reader is shard 0 of 3"):
        next(iter(resharded))


def test_bad_options_name_the_allowed_values(tmp_path):
    path = _write(tmp_path / "one.tsv", [GOOD], compress=False)
    with pytest.raises(ValueError, match="on_error='ignore' is not valid; allowed values: 'skip', 'raise'"):
        CriteoIterableDataset(path, batch_size=2, on_error="ignore")
    with pytest.raises(ValueError, match="dense_transform=.*allowed values: 'log1p', 'none'"):
        CriteoIterableDataset(path, batch_size=2, dense_transform="log")
    with pytest.raises(ValueError, match="must have 26 entries"):
        CriteoIterableDataset(path, batch_size=2, num_embeddings_per_feature=[10] * 25)
    with pytest.raises(ValueError, match=r"num_embeddings_per_feature\[3\] must be a positive int"):
        CriteoIterableDataset(path, batch_size=2, num_embeddings_per_feature=[10] * 3 + [0] + [10] * 22)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        CriteoIterableDataset(path, batch_size=0)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        CriteoIterableDataset([path, str(tmp_path / "nope.tsv")], batch_size=2)


def test_ranks_and_workers_cover_every_line_exactly_once(tmp_path):
    # Two files (one gzip) whose lengths do not divide by the 2 ranks x 2 workers; malformed lines interleaved.
    first = [_valid_line(i) for i in range(23)]
    first.insert(5, MALFORMED[0][0])
    first.insert(17, MALFORMED[4][0])
    paths = [
        _write(tmp_path / "a.tsv", first, False),
        _write(tmp_path / "b.tsv", [_valid_line(i) for i in range(23, 60)], True),
    ]
    seen, lines_read, malformed = [], 0, 0
    for rank in range(2):
        ds = CriteoIterableDataset(paths, batch_size=4, dense_transform="none", rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
        mine = [int(x) for b in loader for x in b.dense_features[:, 0].tolist()]
        assert mine, f"rank {rank} got no samples"
        seen += mine
        # Counters are written by the worker processes and summed here through shared memory.
        lines_read += ds.stats.lines_read
        malformed += ds.stats.malformed_total
        assert ds.stats.samples == len(mine)
    assert sorted(seen) == list(range(60))
    assert (lines_read, malformed) == (62, 2)


def test_rank_comes_from_torch_distributed_when_initialised(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.tsv", [_valid_line(i) for i in range(10)], compress=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ds = CriteoIterableDataset(path, batch_size=100, dense_transform="none")
    (batch,) = _all_batches(ds)
    assert batch.dense_features[:, 0].tolist() == [1, 3, 5, 7, 9]
    # Spawned workers do not inherit the process group: the rank is pinned when the dataset is pickled.
    assert ds.__getstate__()["rank"] == 1 and ds.__getstate__()["world_size"] == 2


def test_data_module_batches_feed_an_embedding_bag_collection(tmp_path):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    lines = [_valid_line(i) for i in range(30)] + [MALFORMED[6][0]]
    train = _write(tmp_path / "train.tsv.gz", lines, True)
    dm = CriteoDataModule(
        train_paths=[train],
        batch_size=8,
        num_embeddings_per_feature=[50 + i for i in range(26)],
        hash_seed=11,
        on_error=OnError.SKIP,
    )
    assert dm.num_dense_features == 13 and dm.feature_names == FEATURE_NAMES
    assert dm.num_embeddings_per_feature == [50 + i for i in range(26)]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=4, num_embeddings=n, feature_names=[name])
            for name, n in zip(dm.feature_names, dm.num_embeddings_per_feature)
        ]
    )
    sizes = []
    for batch in dm.train_dataloader():
        out = ebc(batch.sparse_features)
        assert out.values().shape == (batch.labels.numel(), 26 * 4)
        assert batch.dense_features.shape == (batch.labels.numel(), dm.num_dense_features)
        sizes.append(batch.labels.numel())
    assert sizes == [8, 8, 8, 6]
    assert dm.datasets["train"].stats.malformed == {
        **{k: 0 for k in dm.datasets["train"].stats.malformed},
        "categorical": 1,
    }
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="no test_paths; set data.test_paths"):
        dm.test_dataloader()


def test_data_module_is_configurable_from_yaml(tmp_path):
    from jsonargparse import ArgumentParser

    train = _write(tmp_path / "t.tsv", [GOOD], compress=False)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CriteoDataModule, "data")
    yaml = f"data:\n  train_paths: [{train}]\n  on_error: raise\n  dense_transform: none\n  num_embeddings_per_feature: 64\n  hash_seed: null\n"
    cfg = parser.parse_string(yaml)
    dm = parser.instantiate_classes(cfg).data
    assert dm.on_error is OnError.RAISE and dm.dense_transform is DenseTransform.NONE and dm.hash_seed is None
    assert dm.num_embeddings_per_feature == [64] * 26
    with pytest.raises(Exception, match="skip") as info:
        parser.parse_string(yaml.replace("on_error: raise", "on_error: ignore"))
    assert "raise" in str(info.value)


def test_skipped_lines_are_logged_per_stage_by_the_monitor_the_data_module_adds(tmp_path, single_process_env):
    import lightning.pytorch as pl

    from lightning_sparse.data.criteo import SkippedLinesMonitor
    from lightning_sparse.models import DLRMModule

    path = _write(tmp_path / "d.tsv", [_valid_line(i) for i in range(30)] + [m for m, _ in MALFORMED], compress=False)
    dm = CriteoDataModule(train_paths=path, test_paths=path, batch_size=8, num_embeddings_per_feature=20)
    model = DLRMModule(
        num_embeddings_per_feature=dm.num_embeddings_per_feature,
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    expected: dict = {}
    for _, reason in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    for stage in ("train", "test"):  # callback_metrics hold the latest stage's
        if stage == "train":
            trainer.fit(model, dm)
        else:
            trainer.test(model, dm)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"data/{stage}/")}
        assert metrics.pop(f"data/{stage}/skipped_lines") == len(MALFORMED)
        assert metrics == {
            f"data/{stage}/skipped_lines/{r.value}": float(expected.get(r.value, 0)) for r in MalformedReason
        }
    assert sum(isinstance(c, SkippedLinesMonitor) for c in trainer.callbacks) == 1  # added once, not per stage
