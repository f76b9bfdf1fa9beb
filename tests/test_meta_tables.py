"""Tables built on meta and materialised only as each rank's shards (issue 11).

The replay of a table's initial draw is checked against TorchRec's CPU build (values and the global
generator afterwards); on 1 and 2 gloo processes, tables and dense weights after setup are bit-identical
to today's path (built on the host, copied into the shards); a rank never allocates a full copy of a
table it holds no shard of, nor a column_wise table whole; pretrained rows come from a ``.npy`` file.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import run_worker
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from lightning_sparse import table_init
from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig, TableInitKind
from lightning_sparse.distributed.routes import resolve_tables

SHAPES = [(3, 2), (1000, 8), (77, 33), (2, 16), (5000, 16)]  # tiny, non-multiples of 16, a 16-element one


def _configs(shapes=SHAPES) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"])
        for i, (n, d) in enumerate(shapes)
    ]


@pytest.mark.parametrize("numel", [1, 7, 15, 16, 17, 32, 33, 1000])
def test_advancing_like_normal_leaves_the_generator_where_normal_does(numel, monkeypatch):
    monkeypatch.setattr(table_init, "CHUNK_ELEMENTS", 8)
    drawn, advanced = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.empty(numel).normal_(generator=drawn)
    table_init.advance_like_normal(advanced, numel)
    assert torch.equal(drawn.get_state(), advanced.get_state())


def test_meta_build_replays_a_cpu_build_block_by_block_and_leaves_the_generator_as_it(monkeypatch):
    monkeypatch.setattr(table_init, "CHUNK_ELEMENTS", 100)  # many chunks per table
    torch.manual_seed(3)
    cpu = EmbeddingBagCollection(tables=_configs())
    after_cpu = torch.randn(5)
    torch.manual_seed(3)
    meta = table_init.meta_embedding_bag_collection(_configs())
    after_meta = torch.randn(5)
    assert torch.equal(after_cpu, after_meta)
    assert all(p.device.type == "meta" for p in meta.parameters())
    for config in meta.embedding_bag_configs():
        weight = cpu.embedding_bags[config.name].weight
        rows, dim = weight.shape
        for row, col, n, m in [
            (0, 0, rows, dim),
            (1, 0, rows - 1, dim),
            (rows // 2, dim // 2, rows - rows // 2, dim - dim // 2),
        ]:
            block = torch.empty(n, m)
            config.init_fn.fill(block, row, col, dim)
            assert torch.equal(block, weight[row : row + n, col : col + m]), (config.name, row, col)
    assert table_init.materialise_on_host(meta)
    for name, table in cpu.embedding_bags.items():
        assert torch.equal(meta.embedding_bags[name].weight, table.weight)


def test_dlrm_module_is_built_on_meta_with_todays_weights():
    from torchrec.models.dlrm import DLRM

    from lightning_sparse.models import DLRMModule
    from lightning_sparse.models.base import embedding_bag_collection

    sizes, names = [40, 17, 300], ["cat_0", "cat_1", "cat_2"]
    torch.manual_seed(0)
    model = DLRMModule(sizes, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    assert all(p.device.type == "meta" for p in model.dlrm.sparse_arch.parameters())
    torch.manual_seed(0)
    reference = DLRM(embedding_bag_collection(sizes, 4, names, device="cpu"), 13, [8, 4], [8, 1])
    table_init.materialise_on_host(model)
    ours = model.dlrm.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_a_custom_initialiser_is_not_replayed_but_refused_with_the_fix():
    config = EmbeddingBagConfig(
        name="t",
        embedding_dim=4,
        num_embeddings=10,
        feature_names=["f"],
        init_fn=functools.partial(torch.nn.init.constant_, val=0.5),
    )
    with pytest.raises(ValueError, match=r"Table 't'.*default float32 uniform.*Build this collection on CPU"):
        table_init.meta_embedding_bag_collection([config])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """The worker's report per rank: both paths built and sharded on 2 gloo processes."""
    return run_worker("meta_tables.py", 2, result=tmp_path_factory.mktemp("two") / "r.json")["ranks"]


def _assert_identical(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["old_inits"] == {"tw": "copy", "cw": "copy", "dp": "copy", "pre": "pretrained"}
        assert rank["inits"] == {"tw": "replay", "cw": "replay", "dp": "replay", "pre": "pretrained"}
        assert all(rank["tables_equal"].values()), rank["tables_equal"]
        assert rank["dense_equal"] and rank["rng_equal"] and rank["pretrained_equal"] and rank["not_all_zero"]


def test_tables_and_dense_weights_after_setup_equal_todays_path_on_one_process(tmp_path):
    (rank,) = run_worker("meta_tables.py", 1, result=tmp_path / "r.json")["ranks"]
    _assert_identical([rank])
    assert rank["shards"]["cw"] == [[0, 0, [400, 128]], [0, 128, [400, 128]]]  # two column shards, both here


def test_tables_and_dense_weights_after_setup_equal_todays_path_on_two_processes(two_ranks):
    _assert_identical(two_ranks)
    # the column_wise tables really are split, one 128-column shard per rank; one rank holds tw
    assert sorted(r["shards"]["cw"][0][:2] for r in two_ranks) == [[0, 0], [0, 128]]
    assert sorted(r["shards"]["pre"][0][:2] for r in two_ranks) == [[0, 0], [0, 128]]
    assert sorted(len(r["shards"]["tw"]) for r in two_ranks) == [0, 1]


def test_no_rank_allocates_a_table_it_holds_no_shard_of_nor_a_column_wise_table_whole(two_ranks):
    tw, cw = 8000 * 8, 400 * 256  # the worker's table_wise and column_wise tables
    holder = [r for r in two_ranks if r["shards"]["tw"]]
    # Today's path (built on the host): the probe sees every rank allocate every table whole.
    assert all(r["largest"]["host"][0] >= cw for r in two_ranks)
    # The TBE fbgemm allocates for the table_wise shard is seen (so the probe sees fbgemm's allocations) ...
    assert holder[0]["largest"]["meta"] == [tw, "aten.zeros.default"]
    # ... no rank allocates cw whole, and the rank without tw never allocates anything as large as tw.
    assert all(r["largest"]["meta"][0] < cw for r in two_ranks)
    assert all(r["largest"]["meta"][0] < tw for r in two_ranks if not r["shards"]["tw"])


# ---------------------------------------------------------------------------- resolution and pretrained rows
def _resolve(model, overrides):
    return resolve_tables(model, "cpu", ShardingType.TABLE_WISE, SparseOptimizerConfig(), overrides)


def _model(on_meta: bool, init_fn=None) -> torch.nn.Module:
    model = torch.nn.Module()
    config = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"], init_fn=init_fn)
    model.ebc = (
        table_init.meta_embedding_bag_collection([config])
        if on_meta and init_fn is None
        else EmbeddingBagCollection(tables=[config], device=torch.device("meta" if on_meta else "cpu"))
    )
    return model


def test_the_initialisation_is_decided_once_on_the_resolved_table(tmp_path):
    np.save(tmp_path / "rows.npy", np.zeros((10, 4), dtype=np.float32))
    assert _resolve(_model(False), None).tables["t"].init is TableInitKind.COPY
    assert _resolve(_model(True), None).tables["t"].init is TableInitKind.REPLAY
    user_meta = _resolve(_model(True, functools.partial(torch.nn.init.constant_, val=0.5)), None).tables["t"]
    assert user_meta.init is TableInitKind.INIT_FN
    pretrained = _resolve(_model(True), {"t": TableConfig(pretrained=str(tmp_path / "rows.npy"))}).tables["t"]
    assert pretrained.init is TableInitKind.PRETRAINED and pretrained.initialiser == str(tmp_path / "rows.npy")


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((10, 5), dtype=np.float32), r"shape \(10, 5\) and dtype float32; the table needs shape \(10, 4\)"),
        (np.zeros((9, 4), dtype=np.float32), r"shape \(9, 4\) and dtype float32; the table needs shape \(10, 4\)"),
        (np.zeros((10, 4), dtype=np.float64), r"shape \(10, 4\) and dtype float64; the table needs .* dtype float32"),
    ],
)
def test_a_pretrained_file_that_disagrees_with_its_table_is_a_clear_error(array, message, tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=rf"Table 't': pretrained file '{path}' holds an array of {message}"):
        _resolve(_model(True), {"t": TableConfig(pretrained=str(path))})


def test_a_missing_or_unreadable_pretrained_file_and_a_dynamic_pretrained_table_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Table 't': pretrained file '.*nope.npy' does not exist"):
        _resolve(_model(True), {"t": TableConfig(pretrained=str(tmp_path / "nope.npy"))})
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ValueError, match=r"Table 't': pretrained file '.*text.npy' is not a .npy array file"):
        _resolve(_model(True), {"t": TableConfig(pretrained=str(tmp_path / "text.npy"))})
    np.save(tmp_path / "rows.npy", np.zeros((10, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Table 't': pretrained=.* cannot be used with a dynamic table"):
        _resolve(_model(True), {"t": TableConfig(pretrained=str(tmp_path / "rows.npy"), dynamic={})})


def test_a_user_meta_table_gets_its_init_fn_per_shard_and_pretrained_rows_on_one_rank(tmp_path, gloo_world_of_one):
    from lightning_sparse.distributed.materialise import local_pieces
    from lightning_sparse.distributed.planning import shard_tables

    model = torch.nn.Module()
    rows = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    np.save(tmp_path / "rows.npy", rows)
    model.ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="mine",
                embedding_dim=4,
                num_embeddings=20,
                feature_names=["a"],
                init_fn=functools.partial(torch.nn.init.constant_, val=0.5),
            ),
            EmbeddingBagConfig(name="pre", embedding_dim=4, num_embeddings=30, feature_names=["b"]),
        ],
        device=torch.device("meta"),
    )
    overrides = {"pre": TableConfig(pretrained=str(tmp_path / "rows.npy"))}
    _, tables, _ = shard_tables(
        model, torch.device("cpu"), dist.group.WORLD, ShardingType.TABLE_WISE, SparseOptimizerConfig(), overrides
    )
    state = model.state_dict()
    ((mine, _, _),) = local_pieces(state[tables.tables["mine"].param_path])
    ((pre, _, _),) = local_pieces(state[tables.tables["pre"].param_path])
    assert torch.equal(mine, torch.full((20, 4), 0.5)) and torch.equal(pre, torch.from_numpy(rows))


def test_pretrained_is_a_per_table_option_in_yaml(tmp_path, capsys, monkeypatch):
    from lightning_sparse.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_sparse.SparseStrategy\n    init_args:\n"
        "      tables:\n        t_cat_0: {pretrained: rows.npy, sharding: column_wise}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    tables = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["init_args"]["tables"]
    assert tables["t_cat_0"]["pretrained"] == "rows.npy" and tables["t_cat_0"]["sharding"] == "column_wise"


def test_replay_draws_on_the_host_under_another_default_device():
    """Lightning's configure_model runs under a torch.device context (the GPU on GPU machines): the draws
    must still use host buffers and the CPU generator; "meta" stands in for that device here."""
    torch.manual_seed(5)
    reference = EmbeddingBagCollection(tables=_configs())
    torch.manual_seed(5)
    with torch.device("meta"):
        model = torch.nn.Module()
        model.ebc = table_init.meta_embedding_bag_collection(_configs())
        assert table_init.materialise_on_host(model)
    for name, table in reference.embedding_bags.items():
        assert torch.equal(model.ebc.embedding_bags[name].weight, table.weight), name
