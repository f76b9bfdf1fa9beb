"""The look-forward cache's pieces: the planner against its plain-Python twin, Belady's choice within the window,
the backing stores, scratchpad training bit-identical to the full table for every kind, and the errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from lightning_sparse.cache import BackingFileError, LookaheadPlanner, WorkingSetTooLarge, host_store, mmap_store
from lightning_sparse.cache.prefetch import LookaheadLoader
from lightning_sparse.cache.reference import (
    ReferencePlanner,
    belady_moves,
    fbgemm_lru_moves,
    lookahead_moves,
    lru_moves,
    schedule,
)
from lightning_sparse.cache.scratchpad import CachedTable
from lightning_sparse.config import CacheConfig, ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.distributed.routes import resolve_tables
from lightning_sparse.dynamic import DynamicTableConfig
from lightning_sparse.optim import init_state_for, sparse_update_for

KINDS = ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "adam"]


def zipf_stream(steps: int, rows: int, per_batch: int, seed: int, drift: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.05
    return [
        (torch.multinomial(weights, per_batch, replacement=True, generator=g) + drift * t) % rows for t in range(steps)
    ]


def drive(planner, batches: list, k: int, horizon: int = 0) -> list:
    """The strategy's schedule: before step t, retire t - 1 and push batch t + k (batches 0..k at step 0), with
    the batches after it up to t + horizon as ``ahead`` (unique rows for the planner, as CachedTables passes)."""
    moves = []
    for t, plans in schedule(len(batches), k, horizon):
        planner.retire(t - 1)
        for seq, later in plans:
            if isinstance(planner, LookaheadPlanner):
                ahead = [(s, torch.unique(batches[s])) for s in later]
            else:
                ahead = [(s, batches[s]) for s in later]
            moves.append(planner.push(seq, batches[seq], ahead))
    return moves


@pytest.mark.parametrize(
    "slots,k,horizon,drift,decay",
    [
        (40, 1, 0, 0, 0.99),
        (62, 4, 0, 3, 1.0),
        (37, 2, 0, 7, 0.5),
        (200, 0, 0, 1, 0.99),
        (40, 2, 0, 1, 1e-9),
        (40, 1, 6, 0, 0.99),
        (62, 2, 9, 3, 1.0),
        (37, 0, 3, 7, 0.5),
    ],
)
def test_planner_matches_its_plain_python_twin_move_by_move(slots, k, horizon, drift, decay):
    batches = zipf_stream(30, 200, 12, seed=slots + k, drift=drift)
    ours = drive(LookaheadPlanner(200, slots, score_decay=decay), batches, k, horizon)
    theirs = drive(ReferencePlanner(200, slots, decay), [b.tolist() for b in batches], k, horizon)
    assert len(ours) == len(theirs) == 30
    evictions = 0
    for a, (loads, load_slots, evicted, evicted_slots) in zip(ours, theirs):
        assert a.load_rows.tolist() == loads and a.load_slots.tolist() == load_slots
        assert a.evict_rows.tolist() == evicted and a.evict_slots.tolist() == evicted_slots
        evictions += len(evicted)
    assert evictions > 0 or slots == 200


def test_planner_keeps_eight_bytes_a_row_a_slot_map_and_a_float32_count():
    planner = LookaheadPlanner(1000, 10)
    assert planner.slot_of.element_size() + planner.score.element_size() == 8
    assert planner.slot_of.numel() == planner.score.numel() == 1000


def test_victim_is_a_slot_unused_in_the_window_least_recently_used_first():
    planner = LookaheadPlanner(rows=10, slots=3)
    planner.push(0, torch.tensor([0]))  # slot 0
    planner.push(1, torch.tensor([1]))  # slot 1
    planner.push(2, torch.tensor([2]))  # slot 2
    planner.retire(1)  # batches 0 and 1 are trained; batch 2 (row 2) is still ahead
    moves = planner.push(3, torch.tensor([2, 5]))
    # row 2 is needed in the window (never a victim); rows 0 and 1 are not: row 0 was used least recently
    assert moves.load_rows.tolist() == [5] and moves.load_slots.tolist() == [0]
    assert moves.evict_rows.tolist() == [0] and moves.evict_slots.tolist() == [0]
    assert planner.lookup(torch.tensor([5, 2, 1])).tolist() == [0, 2, 1]


def test_victims_beyond_the_window_are_unneeded_rows_first_then_the_furthest_next_use_ahead():
    planner = LookaheadPlanner(rows=10, slots=4)
    for seq, row in enumerate([0, 1, 2, 3]):
        planner.push(seq, torch.tensor([row]))
    planner.retire(3)
    # rows 0 and 2 are needed ahead (2 at batch 6, 0 at batch 9): rows 1 and 3, which no batch ahead needs, go
    # first, then row 0, whose next use is further than row 2's (least recent use alone would take row 2)
    ahead = [(6, torch.tensor([2])), (9, torch.tensor([0, 2]))]
    moves = planner.push(4, torch.tensor([5, 6, 7]), ahead)
    assert sorted(moves.evict_rows.tolist()) == [0, 1, 3]
    assert planner.resident(torch.tensor([2])).item()
    # without the batches ahead the least recently used rows 0, 1, 2 would have gone
    blind = LookaheadPlanner(rows=10, slots=4)
    for seq, row in enumerate([0, 1, 2, 3]):
        blind.push(seq, torch.tensor([row]))
    blind.retire(3)
    assert sorted(blind.push(4, torch.tensor([5, 6, 7])).evict_rows.tolist()) == [0, 1, 2]


def test_a_planner_loaded_from_its_state_mid_stream_moves_the_same_rows_as_the_one_that_went_on():
    batches = zipf_stream(24, 300, 20, seed=9, drift=5)
    straight, k = LookaheadPlanner(300, 70), 2
    first = drive(straight, batches[:12], k)  # batches 0..11 planned, 11 still in the window
    state = {key: value.clone() for key, value in straight.state().items()}
    resumed = LookaheadPlanner(300, 70)
    resumed.load_state(state)
    assert [seq for seq, _ in resumed.window] == [seq for seq, _ in straight.window] and first
    for t in range(12, 24):
        for planner in (straight, resumed):
            planner.retire(t - 1)
        a, b = straight.push(t, batches[t]), resumed.push(t, batches[t])
        for field in ("load_rows", "load_slots", "evict_rows", "evict_slots"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (t, field)
    assert torch.equal(straight.score, resumed.score) and torch.equal(straight.slot_of, resumed.slot_of)


def test_a_backing_file_the_disk_cannot_hold_is_an_error_naming_the_file(tmp_path):
    """The free-space check passes, then the disk (here: a file-size limit, as a full disk) refuses the bytes."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(
            BackingFileError,
            match=r"backing file '.*t_big\.weight\.bin' could not get its 4000000 bytes .*TableConfig\.cache\.path",
        ):
            mmap_store({"weight": (1000, 1000)}, str(tmp_path), "t_big")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not list(tmp_path.glob("*.bin"))  # nothing left behind


def test_window_that_does_not_fit_names_the_batch_and_its_rows():
    planner = LookaheadPlanner(rows=100, slots=8, table="t_items")
    planner.push(0, torch.arange(5))
    with pytest.raises(
        WorkingSetTooLarge,
        match=r"cached table 't_items': batch 1 needs 5 rows .* 10 distinct rows, more than the scratchpad's 8 slots",
    ):
        planner.push(1, torch.arange(5, 10))


def test_lookup_of_an_id_no_window_batch_holds_is_an_error():
    planner = LookaheadPlanner(rows=10, slots=4, table="t")
    planner.push(0, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"ids \[7\] are not in the scratchpad"):
        planner.lookup(torch.tensor([1, 7]))


def test_lookahead_moves_fewer_rows_than_lru_on_a_zipf_stream_once_warm():
    batches = [b.tolist() for b in zipf_stream(60, 4000, 128, seed=5)]
    ours, lru = lookahead_moves(batches, 4000, 400, lookahead=2), lru_moves(batches, 400)
    assert sum(ours[20:]) < 0.9 * sum(lru[20:])
    assert lru_moves(batches, 400, ahead=1)[0] > lru[0]  # one batch ahead: step 0 also loads batch 1


def test_ids_read_further_ahead_than_the_copies_move_fewer_rows():
    # the claim of CacheConfig.horizon: the same copies k = 2 ahead, victims chosen with 12 batches' ids
    batches = [b.tolist() for b in zipf_stream(60, 4000, 128, seed=5, drift=3)]
    blind = lookahead_moves(batches, 4000, 400, lookahead=2)
    sighted = lookahead_moves(batches, 4000, 400, lookahead=2, horizon=12)
    assert sum(sighted[20:]) < 0.95 * sum(blind[20:])


def test_belady_keeps_the_row_needed_soonest_and_lru_the_one_used_last():
    batches = [[1], [2], [3], [1]]  # at step 2 one of rows 1, 2 must go: row 1 is needed again, row 2 never
    assert belady_moves(batches, 2) == [1, 1, 2, 0]  # row 2 goes (written back, it was trained)
    assert lru_moves(batches, 2) == [1, 1, 2, 2]  # row 1 goes, and comes back at step 3


def test_fbgemm_lru_reads_misses_beyond_a_full_set_from_the_backing_store():
    # one set of 4 ways: 6 distinct rows fill it and 2 go to the backing store (a row in and a row back each)
    assert fbgemm_lru_moves([list(range(6)), list(range(6))], slots=4, ways=4) == [4 + 2 * 2, 2 * 2]
    # 2 ways: row 2 takes row 0's way (stamps tie: the first way); rows 0 and 3 then take both ways, each a
    # write-back and a copy in
    assert fbgemm_lru_moves([[0, 1], [2], [0, 3]], slots=2, ways=2) == [2, 2, 2 + 2]


@pytest.mark.parametrize("backing", ["host", "mmap"])
@pytest.mark.parametrize("kind", KINDS)
def test_scratchpad_training_is_bit_identical_to_the_full_table(tmp_path, kind, backing):
    rows, slots, dim, k = 60, 16, 4, 2
    config = SparseOptimizerConfig(
        kind=kind,
        lr=0.1,
        eps=1e-3,
        weight_decay=0.05,
        beta1=0.8,
        beta2=0.95,
        decay=0.9,
        first_moment=kind == "rowwise_adam",
    )
    torch.manual_seed(0)
    full = torch.randn(rows, dim)
    full_state = init_state_for(config, full)
    scratch = {"weight": torch.zeros(slots, dim)}
    scratch_state = init_state_for(config, scratch["weight"])
    scratch.update({key: value for key, value in scratch_state.items() if key != "step"})
    shapes = {key: (rows, *value.shape[1:]) for key, value in scratch.items()}
    store = host_store(shapes) if backing == "host" else mmap_store(shapes, str(tmp_path), "t")
    store.tensors["weight"].copy_(full)
    for key, value in full_state.items():
        if key != "step":
            store.tensors[key].copy_(value)
    table = CachedTable("t", rows, slots, scratch, store)
    batches = zipf_stream(20, rows, 5, seed=3, drift=5)
    g = torch.Generator().manual_seed(1)
    for t, plans in schedule(len(batches), k, 0):
        ids = batches[t]
        table.planner.retire(t - 1)
        for seq, _ in plans:
            table.plan(seq, batches[seq])
        if t == 0:
            table.wait()
        table.mark_trained(ids)
        grad = torch.randn(ids.numel(), dim, generator=g)
        sparse_update_for(config, full, full_state, ids, grad)
        table.wait()  # the strategy overlaps the copies with the step; here the step runs after them
        sparse_update_for(config, scratch["weight"], scratch_state, table.lookup(ids), grad)
    table.flush()
    assert table.counters["rows_back"] > 0, "the stream should evict trained rows"
    assert torch.equal(store.tensors["weight"], full)
    for key, value in full_state.items():
        assert torch.equal(scratch_state[key] if key == "step" else store.tensors[key], value), key
    table.close()


def test_memory_mapped_store_larger_than_the_free_disk_is_an_error_naming_the_file(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    rows = free // (4 * 1024) + 1
    with pytest.raises(
        BackingFileError,
        match=r"backing file '.*t_big\.weight\.bin' .* need \d+ bytes, but the disk .* has \d+ bytes free",
    ):
        mmap_store({"weight": (rows, 1024)}, str(tmp_path), "t_big")
    assert not list(tmp_path.iterdir())


def test_memory_mapped_store_reads_back_what_it_wrote(tmp_path):
    store = mmap_store({"weight": (10, 3), "sum": (10,)}, str(tmp_path), "t")
    store.write(torch.tensor([7, 2]), {"weight": torch.ones(2, 3), "sum": torch.tensor([5.0, 6.0])})
    store.flush()
    assert store.read(torch.tensor([2]))["sum"].tolist() == [6.0]
    assert (tmp_path / "t.weight.bin").stat().st_size == 10 * 3 * 4 and store.row_bytes == 16
    store.close()
    assert not (tmp_path / "t.weight.bin").exists()


def test_memory_mapped_store_asks_for_the_pages_of_its_rows_ahead_in_runs(tmp_path, monkeypatch):
    import os

    from lightning_sparse.cache import backing

    store = mmap_store({"weight": (8, 1030), "sum": (8,)}, str(tmp_path), "t")  # a weight row spans two pages
    asked: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length, advice)))
    store.prefetch(torch.tensor([0, 1, 5]))
    page, need = backing.PAGE, os.POSIX_FADV_WILLNEED
    rows_end = 6 * 1030 * 4 - 1  # last byte of row 5
    assert asked == [(0, 3 * page, need), (5 * page, (rows_end // page - 4) * page, need), (0, page, need)]
    store.close()


def test_memory_mapped_store_reads_and_writes_in_chunks_like_host_memory(tmp_path, monkeypatch):
    from lightning_sparse.cache import backing

    monkeypatch.setattr(backing, "PREFETCH_ROWS", 3)  # 11 rows: four chunks, the pages of two asked for ahead
    mapped = mmap_store({"weight": (40, 1030), "sum": (40,)}, str(tmp_path), "t")
    host = host_store({"weight": (40, 1030), "sum": (40,)})
    rows = torch.tensor([0, 1, 2, 5, 9, 10, 17, 18, 30, 38, 39])
    values = {"weight": torch.randn(11, 1030), "sum": torch.rand(11)}
    for store in (mapped, host):
        store.write(rows, values)
    for name, tensor in mapped.read(rows).items():
        assert torch.equal(tensor, values[name]) and torch.equal(mapped.tensors[name], host.tensors[name])
    mapped.close()


def test_memory_mapped_files_are_deleted_when_the_process_ends_without_closing_the_store(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from lightning_sparse.cache import mmap_store; "
        "store = mmap_store({'weight': (10, 3)}, sys.argv[1], 't'); print(store.files[0].exists())"
    )
    import os
    from pathlib import Path

    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert not list(tmp_path.glob("*.bin"))


def test_a_backing_file_in_use_by_another_store_is_an_error(tmp_path):
    first = mmap_store({"weight": (10, 3)}, str(tmp_path), "t")
    with pytest.raises(BackingFileError, match=r"backing file '.*t\.weight\.bin' is in use by another process"):
        mmap_store({"weight": (10, 3)}, str(tmp_path), "t")
    assert (tmp_path / "t.weight.bin").exists()  # the first store's file is untouched
    first.close()
    mmap_store({"weight": (10, 3)}, str(tmp_path), "t").close()


def _model() -> torch.nn.Module:
    configs = [EmbeddingBagConfig(name="t_a", num_embeddings=50, embedding_dim=4, feature_names=["f_a"])]
    return torch.nn.ModuleDict({"ebc": EmbeddingBagCollection(tables=configs)})


@pytest.mark.parametrize(
    "override,reason",
    [
        (dict(sharding="data_parallel"), "its sharding is 'data_parallel'; a cached table must be whole on one rank"),
        (dict(sharding="column_wise"), "its sharding is 'column_wise'"),
        (dict(dynamic=DynamicTableConfig()), "it is also dynamic"),
    ],
)
def test_cache_on_a_table_kind_that_cannot_take_it_is_an_error_at_setup(override, reason):
    tables = {"t_a": TableConfig(cache=CacheConfig(rows=10), **override)}
    with pytest.raises(ValueError, match=rf"Table 't_a': a cache option on a table kind that cannot take it: {reason}"):
        resolve_tables(_model(), "cpu", ShardingType.AUTO, SparseOptimizerConfig(), tables)


def test_a_cached_table_runs_on_the_native_route_whatever_its_kind():
    tables = {"t_a": TableConfig(cache={"rows": 10, "lookahead": 1, "backing": "host"})}
    resolved = resolve_tables(_model(), "cpu", ShardingType.AUTO, SparseOptimizerConfig(kind="sgd"), tables).tables[
        "t_a"
    ]
    assert resolved.route.value == "native" and resolved.cache == CacheConfig(rows=10, lookahead=1, backing="host")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"rows": 0}, "CacheConfig.rows must be an integer >= 1"),
        ({"rows": 8, "lookahead": -1}, "CacheConfig.lookahead must be an integer >= 0"),
        ({"rows": 8, "backing": "ssd"}, "CacheConfig.backing='ssd' is not valid"),
        ({"rows": 8, "size": 3}, r"TableConfig.cache: unknown option\(s\) \['size'\]"),
        ({"rows": 8, "score_decay": 0.0}, r"CacheConfig.score_decay must be a number in \(0, 1\]"),
        ({"rows": 8, "lookahead": 4, "horizon": 3}, r"CacheConfig.horizon must be an integer >= lookahead \(4\)"),
        ({"rows": 8, "horizon": True}, "CacheConfig.horizon must be an integer"),
    ],
)
def test_cache_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        TableConfig(cache=values)


def test_lookahead_loader_reads_ahead_and_reports_each_batch_once():
    read, passes = [], []
    loader = LookaheadLoader(list(range(5)), ahead=2, on_pass=lambda: passes.append(1), on_read=read.append)
    it = iter(loader)
    assert next(it) == 0 and read == [0, 1, 2]
    assert list(it) == [1, 2, 3, 4] and read == [0, 1, 2, 3, 4]
    assert len(loader) == 5 and passes == [1]


def test_cache_option_from_yaml_through_the_cli_parser():
    from jsonargparse import ArgumentParser

    from lightning_sparse import SparseStrategy
    from lightning_sparse.cli import register_enums_by_value

    register_enums_by_value()
    parser = ArgumentParser()
    parser.add_class_arguments(SparseStrategy, "strategy")
    config = parser.parse_string(
        "strategy:\n  tables:\n    t_items:\n      cache: {rows: 50000, lookahead: 3, horizon: 24, backing: mmap, path: /mnt/nvme/ls-cache}\n"
    )
    strategy = parser.instantiate_classes(config).strategy
    assert strategy.table_configs["t_items"].cache == CacheConfig(
        rows=50000, lookahead=3, horizon=24, backing="mmap", path="/mnt/nvme/ls-cache"
    )
    assert strategy.table_configs["t_items"].cache.batches_ahead == 24
    assert (
        CacheConfig(rows=8, lookahead=3).batches_ahead == 16 and CacheConfig(rows=8, lookahead=20).batches_ahead == 20
    )


def test_cached_tables_built_on_meta_fill_their_backing_store_from_the_full_initialisation(tmp_path, gloo_world_of_one):
    """Tables built on meta (replayed draw, pretrained file): the scratchpad is sharded with C rows, the backing
    store holds all N initial rows, equal to a CPU build and to the file."""
    import numpy as np
    import torch.distributed as dist

    from lightning_sparse import table_init
    from lightning_sparse.distributed.collectives import Collectives
    from lightning_sparse.distributed.planning import shard_tables
    from lightning_sparse.distributed.sharded_model import ShardedModel

    def configs() -> list[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(name="replayed", embedding_dim=4, num_embeddings=50, feature_names=["a"]),
            EmbeddingBagConfig(name="pre", embedding_dim=4, num_embeddings=30, feature_names=["b"]),
        ]

    torch.manual_seed(5)
    cpu = EmbeddingBagCollection(tables=configs())
    rows = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    np.save(tmp_path / "rows.npy", rows)
    torch.manual_seed(5)
    model = torch.nn.Module()
    model.ebc = table_init.meta_embedding_bag_collection(configs())
    cache = {"rows": 8, "backing": "host"}
    overrides = {
        "replayed": TableConfig(optimizer=SparseOptimizerConfig(kind="adagrad"), cache=cache),
        "pre": TableConfig(pretrained=str(tmp_path / "rows.npy"), cache=cache),
    }
    dmp, tables, plan = shard_tables(
        model, torch.device("cpu"), dist.group.WORLD, ShardingType.TABLE_WISE, SparseOptimizerConfig(), overrides
    )
    sharded = ShardedModel.build(model, dmp, tables, plan, torch.device("cpu"), Collectives())
    assert (tables.tables["replayed"].rows, tables.tables["replayed"].cache_rows) == (8, 50)
    assert not tables.cache_sources, "the full-size initialisation is released once the stores are filled"
    stores = {name: table.store.tensors for name, table in sharded.cache.tables.items()}
    assert torch.equal(stores["replayed"]["weight"], cpu.embedding_bags["replayed"].weight.detach())
    assert torch.equal(stores["pre"]["weight"], torch.from_numpy(rows))
    planner = {
        f"{t}.planner.{k}"
        for t in ("pre", "replayed")
        for k in ("row_of", "last_use", "slot_score", "score", "origin", "window_seq")
    }
    assert (
        set(sharded.cache.state_dict())
        == {"pre.weight", "pre.sum", "replayed.weight", "replayed.sum", "progress"} | planner
    )


def test_a_pipeline_with_a_cached_table_is_a_setup_error_naming_the_table():
    from lightning_sparse.config import PipelineConfig, ResolvedTable
    from lightning_sparse.strategies.pipelines import check_pipeline_setup

    tables = {"t": ResolvedTable(name="t", sharding=ShardingType.TABLE_WISE, cache=CacheConfig(rows=4))}
    with pytest.raises(ValueError, match=r"pipeline='sparse_dist'\): cached tables \['t'\].*use pipeline 'none'"):
        check_pipeline_setup(PipelineConfig.parse("sparse_dist", "pipeline"), tables, {})
