"""SparseStrategy(pipeline=...): exactness of sparse_dist and hybrid S=0, staleness measured <= S, mid-epoch
validation, exact resume from a checkpoint taken with batches in flight (2 processes), and setup errors."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
from conftest import run_worker
from torchrec import KeyedJaggedTensor

from lightning_sparse import SparseStrategy, TableConfig
from lightning_sparse.cli import main
from lightning_sparse.config import CacheConfig, PipelineConfig, PipelineKind
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.models import DLRMModule


def _scenarios(tmp_path) -> dict[str, dict]:
    fused = {"batches": 12, "val_check_interval": 0.5}  # 6 steps on 2 ranks, a validation mid-epoch
    native = {"batches": 12, "optimizer": "decayed_adagrad"}  # no fused kernel on CPU: the native route
    saving = {**native, "pipeline": "hybrid", "staleness": 2, "ckpt_every": 2}
    dynamic = {"batches": 12, "val_check_interval": 0.5, "dynamic": True}  # LRU evictions in every step
    return {
        "none": {**fused, "pipeline": "none"},
        "sparse_dist": {**fused, "pipeline": "sparse_dist"},
        "hybrid_0": {**fused, "pipeline": "hybrid", "staleness": 0},
        "hybrid_1": {**fused, "pipeline": "hybrid", "staleness": 1},
        "semi_sync": {**fused, "pipeline": "semi_sync"},
        "hybrid_2": {**fused, "pipeline": "hybrid", "staleness": 2},
        "hybrid_4": {**fused, "pipeline": "hybrid", "staleness": 4},
        "two_epochs_none": {"batches": 8, "epochs": 2, "pipeline": "none"},
        "two_epochs_hybrid_0": {"batches": 8, "epochs": 2, "pipeline": "hybrid", "staleness": 0},
        "native_none": {**native, "pipeline": "none"},
        "native_sparse_dist": {**native, "pipeline": "sparse_dist"},
        "native_hybrid_0": {**native, "pipeline": "hybrid", "staleness": 0},
        "native_hybrid_2": {**saving, "ckpt_dir": str(tmp_path / "a")},
        "native_hybrid_2_resumed": {
            **saving,
            "ckpt_dir": str(tmp_path / "b"),
            "ckpt_in": str(tmp_path / "a" / "step=2.ckpt"),
        },
        "dynamic_none": {**dynamic, "pipeline": "none"},
        "dynamic_sparse_dist": {**dynamic, "pipeline": "sparse_dist"},
        "dynamic_hybrid_0": {**dynamic, "pipeline": "hybrid", "staleness": 0},
        "dynamic_sparse_dist_saving": {
            **dynamic,
            "pipeline": "sparse_dist",
            "ckpt_every": 2,
            "ckpt_dir": str(tmp_path / "c"),
        },
        "dynamic_sparse_dist_resumed": {
            **dynamic,
            "pipeline": "sparse_dist",
            "ckpt_every": 2,
            "ckpt_dir": str(tmp_path / "d"),
            "ckpt_in": str(tmp_path / "c" / "step=2.ckpt"),
        },
        "dynamic_hybrid_2_saving": {
            **dynamic,
            "pipeline": "hybrid",
            "staleness": 2,
            "ckpt_every": 2,
            "ckpt_dir": str(tmp_path / "e"),
        },
        "dynamic_hybrid_2_resumed": {
            **dynamic,
            "pipeline": "hybrid",
            "staleness": 2,
            "ckpt_every": 2,
            "ckpt_dir": str(tmp_path / "f"),
            "ckpt_in": str(tmp_path / "e" / "step=2.ckpt"),
        },
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipelines")
    scenarios = json.dumps(_scenarios(tmp_path))
    return run_worker("pipelines.py", "--scenarios", scenarios, result=tmp_path / "result.json", timeout=600)


@pytest.mark.parametrize("route", ["", "native_"])
@pytest.mark.parametrize("exact", ["sparse_dist", "hybrid_0"])
def test_sparse_dist_and_hybrid_0_are_bit_identical_to_none(runs, route, exact):
    expected, got = runs[f"{route}none"], runs[f"{route}{exact}"]
    assert set(got["routes"].values()) == {"native" if route else "fused"}
    assert got["global_step"] == expected["global_step"] == 6
    assert got["losses"] == expected["losses"]
    assert got["digests"] == expected["digests"]  # every rank's shards, dense weights and optimizer states
    assert got["max_staleness"] == (0.0 if exact == "hybrid_0" else -1.0)  # counted for hybrid only (-1: not logged)


@pytest.mark.parametrize("exact", ["dynamic_sparse_dist", "dynamic_hybrid_0"])
def test_dynamic_tables_under_an_exact_pipeline_are_bit_identical_to_none(runs, exact):
    """Ids are remapped as batches enter the pipeline and new rows re-initialised just before their lookup, so
    evictions of rows that in-flight batches read change nothing: hash tables, rows and optimizer state agree."""
    expected, got = runs["dynamic_none"], runs[exact]
    assert min(expected["evicted"].values()) > 0  # every dynamic table evicted rows while batches were in flight
    assert got["evicted"] == expected["evicted"]
    assert got["seen"] == expected["seen"]  # training_step receives the same rows as without a pipeline
    assert got["global_step"] == expected["global_step"] == 6
    assert (got["losses"], got["digests"]) == (expected["losses"], expected["digests"])


@pytest.mark.parametrize("pipeline", ["sparse_dist", "hybrid_2"])
def test_dynamic_tables_resume_exactly_from_a_checkpoint_with_batches_in_flight(runs, pipeline):
    """A drain rewinds the hash tables and rows to the trained batches: the checkpoint holds no remap of a batch
    read ahead, and the resumed run (which reads those batches again) repeats the saving run bit for bit."""
    saved, resumed = runs[f"dynamic_{pipeline}_saving"], runs[f"dynamic_{pipeline}_resumed"]
    assert min(saved["evicted"].values()) > 0
    assert resumed["global_step"] == saved["global_step"] == 6
    assert resumed["losses"] == saved["losses"][2:]
    assert (resumed["digests"], resumed["evicted"]) == (saved["digests"], saved["evicted"])
    # the hash tables decide as without a pipeline (drains and all): training_step sees the rows of none
    assert saved["seen"] == runs["dynamic_none"]["seen"] and resumed["seen"] == saved["seen"][2:]
    if pipeline == "sparse_dist":
        assert saved["digests"] == runs["dynamic_none"]["digests"]


def test_a_new_epoch_starts_the_pipeline_afresh(runs):
    """The look-ahead never crosses an epoch: two epochs of hybrid S=0 are still bit-identical to none."""
    expected, got = runs["two_epochs_none"], runs["two_epochs_hybrid_0"]
    assert got["global_step"] == expected["global_step"] == 8
    assert (got["losses"], got["digests"]) == (expected["losses"], expected["digests"])


@pytest.mark.parametrize("staleness", [1, 2, 4])
def test_observed_staleness_never_exceeds_the_bound_and_reaches_it(runs, staleness):
    run = runs[f"hybrid_{staleness}"]
    assert run["max_staleness"] == staleness  # measured by the row version counters, over both ranks
    assert run["losses"] != runs["none"]["losses"]  # stale lookups train differently
    assert run["global_step"] == 6


def test_only_the_worker_pipelines_shard_the_tables_on_a_group_of_their_own(runs):
    own = {name: run["tables_on_own_group"] for name, run in runs.items()}
    assert own["hybrid_2"] and own["semi_sync"] and own["native_hybrid_0"]
    assert not own["none"] and not own["sparse_dist"]


def test_semi_sync_is_hybrid_with_staleness_1(runs):
    assert runs["semi_sync"]["digests"] == runs["hybrid_1"]["digests"]
    assert runs["semi_sync"]["max_staleness"] == 1.0


def test_checkpoint_with_batches_in_flight_resumes_exactly(runs):
    """The saving run drains at every checkpoint, so the run resumed from step 2 repeats it bit for bit."""
    saved, resumed = runs["native_hybrid_2"], runs["native_hybrid_2_resumed"]
    assert resumed["global_step"] == saved["global_step"] == 6
    assert resumed["losses"] == saved["losses"][2:]
    assert resumed["digests"] == saved["digests"]
    assert saved["max_staleness"] == 2.0


# ------------------------------------------------------------------------------ setup errors (1 process)
SIZES = [100, 200, 50]


def _data() -> SyntheticClickDataModule:
    return SyntheticClickDataModule(
        num_embeddings_per_feature=SIZES, batch_size=16, num_train_batches=2, num_val_batches=1
    )


def _model() -> DLRMModule:
    return DLRMModule(
        num_embeddings_per_feature=SIZES, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )


def _fit(strategy: SparseStrategy, model: pl.LightningModule, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, strategy=strategy, **kwargs,
    )  # fmt: skip
    trainer.fit(model, _data())
    return trainer


class Untraceable(DLRMModule):
    """Branches on the batch's values: torch.fx cannot trace it."""

    def forward(self, dense_features, sparse_features):
        if sparse_features.values().numel() > 0:
            return super().forward(dense_features, sparse_features)
        return dense_features.sum(1, keepdim=True)


class ComputedInput(DLRMModule):
    """Feeds the tables a KeyedJaggedTensor built in forward: its input cannot be distributed ahead."""

    def forward(self, dense_features, sparse_features):
        shifted = KeyedJaggedTensor(
            keys=sparse_features.keys(), values=sparse_features.values() * 1, lengths=sparse_features.lengths()
        )
        return super().forward(dense_features, shifted)


def test_pipeline_config_errors_name_the_allowed_values():
    with pytest.raises(
        ValueError,
        match="PipelineKind='async' is not valid; allowed values: 'none', 'sparse_dist', 'hybrid', 'semi_sync'",
    ):
        PipelineConfig.parse("async", "PipelineKind")
    with pytest.raises(ValueError, match="pipeline 'hybrid' needs an integer staleness >= 0"):
        PipelineConfig(kind="hybrid")
    with pytest.raises(ValueError, match="does not apply to pipeline 'semi_sync' \\(its staleness is 1\\)"):
        PipelineConfig(kind="semi_sync", staleness=3)
    assert PipelineConfig.parse({"kind": "hybrid", "staleness": 4}, "x") == PipelineConfig(PipelineKind.HYBRID, 4)
    assert SparseStrategy(pipeline="semi_sync").pipeline.staleness == 1


@pytest.mark.parametrize(
    "model, match",
    [
        (Untraceable, "cannot be traced by torch.fx"),
        (ComputedInput, "do not take the forward's KeyedJaggedTensor argument unchanged"),
    ],
)
def test_a_forward_the_pipeline_cannot_trace_stops_at_setup(single_process_env, model, match):
    model = model(
        num_embeddings_per_feature=SIZES, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )
    with pytest.raises(ValueError, match=match):
        _fit(SparseStrategy(pipeline="sparse_dist"), model)


@pytest.mark.parametrize(
    "make_strategy, match",
    [
        (  # the backing files in this test's folder: the default folder may be locked by another run
            lambda tmp: SparseStrategy(
                pipeline="sparse_dist", tables={"t_cat_0": TableConfig(cache=CacheConfig(rows=64, path=str(tmp)))}
            ),
            "cached tables \\['t_cat_0'\\]",
        ),
        (
            lambda tmp: SparseStrategy(pipeline="semi_sync", tables={"t_cat_1": TableConfig(sharding="data_parallel")}),
            "data_parallel tables \\['t_cat_1'\\]",
        ),
        (
            lambda tmp: SparseStrategy(pipeline={"kind": "hybrid", "staleness": 2}, bad_ids="drop"),
            "needs bad_ids: error",
        ),
    ],
    ids=["cached tables", "data_parallel", "bad_ids"],
)
def test_unsupported_combinations_stop_at_setup(single_process_env, tmp_path, make_strategy, match):
    with pytest.raises(ValueError, match=match):
        _fit(make_strategy(tmp_path), _model())


class Manual(DLRMModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


def test_manual_optimization_is_refused(single_process_env):
    model = Manual(
        num_embeddings_per_feature=SIZES, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )
    with pytest.raises(ValueError, match="needs automatic optimization"):
        _fit(SparseStrategy(pipeline="sparse_dist"), model)


def test_hybrid_with_gradient_accumulation_is_refused(single_process_env):
    with pytest.raises(Exception, match="accumulate_grad_batches=2 is not supported"):
        _fit(SparseStrategy(pipeline={"kind": "hybrid", "staleness": 1}), _model(), accumulate_grad_batches=2)


def test_pipeline_is_set_in_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_sparse.SparseStrategy\n    init_args:\n"
        "      pipeline: {kind: hybrid, staleness: 4}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path), "--print_config"])
    assert info.value.code == 0
    assert "kind: hybrid" in capsys.readouterr().out
    path.write_text(path.read_text().replace("hybrid, staleness: 4", "asynchronous"))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path)])
    assert info.value.code == 2
    assert (
        "PipelineKind='asynchronous' is not valid; allowed values: 'none', 'sparse_dist', 'hybrid', 'semi_sync'"
        in capsys.readouterr().err
    )
