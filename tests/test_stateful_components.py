"""The components that own SparseStrategy's state: exact Stateful round-trips on 2 ranks, and nothing on the user's module."""

from __future__ import annotations

import gc
import weakref

import lightning.pytorch as pl
import pytest
from conftest import run_worker

from lightning_sparse import ShardingType, SparseOptimizerConfig, SparseStrategy, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.dynamic import DynamicTableConfig
from lightning_sparse.models import DLRMModule

# Attributes that others put on a LightningModule during a fit, with any strategy: Lightning's forward
# redirection leaves the module's own bound ``forward`` in its __dict__, and TorchRec's DMP tells DDP which
# (sharded) parameters to ignore through ``_ddp_params_and_buffers_to_ignore``.
NOT_OURS = {"forward", "_ddp_params_and_buffers_to_ignore"}


@pytest.mark.multiprocess
def test_each_component_round_trips_exactly_on_two_ranks_mid_epoch(tmp_path):
    result = run_worker("stateful_components.py", "--dir", tmp_path / "dcp", result=tmp_path / "r.json")
    assert result["routes"] == {"t_cat_0": "fused", "t_cat_1": "native", "t_cat_2": "data_parallel", "t_cat_3": "fused"}
    assert result["global_step"] == 4  # one epoch: the save (step 2) and the load (step 3) were mid-epoch
    for rank, report in enumerate(result["ranks"]):
        assert set(report) == {"sparse_optimizer", "dynamic_tables"}, rank
        for name, outcome in report.items():
            assert outcome["values"] > 0, (rank, name)
            assert outcome["moved"], f"rank {rank}: {name} did not change after the save, the round trip proves nothing"
            assert outcome["differs_after_load"] == [], f"rank {rank}: {name} differs after the load"
        moved = report["sparse_optimizer"]["moved"]
        assert any(key.startswith("hyperparameters.") and key.endswith(".lr") for key in moved), moved
        assert any(".momentum1" in key or ".exp_avg" in key for key in moved), moved


def _model() -> DLRMModule:
    return DLRMModule(
        num_embeddings_per_feature=[100, 200, 50],
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
    )


def _data() -> SyntheticClickDataModule:
    return SyntheticClickDataModule(
        num_embeddings_per_feature=[100, 200, 5000], batch_size=32, num_train_batches=3, num_val_batches=1
    )


def _trainer(strategy: SparseStrategy) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def _strategy() -> SparseStrategy:
    return SparseStrategy(
        optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1),
        tables={
            "t_cat_1": TableConfig(
                sharding=ShardingType.DATA_PARALLEL, optimizer=SparseOptimizerConfig(kind="adam", lr=0.5)
            ),
            "t_cat_2": TableConfig(dynamic=DynamicTableConfig(admission={"min_count": 1})),
        },
    )


def test_nothing_is_added_to_the_module_and_a_new_trainer_reuses_the_sharded_model(single_process_env):
    model = _model()
    before = set(vars(model))
    _trainer(_strategy()).fit(model, _data())  # the first Trainer is referenced by nothing but the module
    added = set(vars(model)) - before
    assert added <= NOT_OURS, f"SparseStrategy put {sorted(added - NOT_OURS)} on the user's module"
    first = model.trainer.strategy.sharded_model
    dmp, hash_tables = weakref.ref(first.dmp), weakref.ref(first.dynamic)
    del first
    gc.collect()

    other = _trainer(_strategy())
    other.validate(model, _data())
    assert other.strategy.distributed_model is dmp()
    assert other.strategy.dynamic_tables is hash_tables()
    assert set(vars(model)) - before <= NOT_OURS

    # Nothing keeps a dropped module (and its shards) alive: the registry holds it weakly.
    module, record = weakref.ref(model), weakref.ref(other.strategy.sharded_model)
    del model, other
    gc.collect()
    assert module() is None and record() is None


def test_a_sharded_module_whose_sharded_model_was_released_is_refused_clearly(single_process_env):
    model = _model()
    _trainer(_strategy()).fit(model, _data())
    model.trainer = None  # detaches the only Trainer holding the sharded model
    gc.collect()
    with pytest.raises(
        RuntimeError, match="DLRMModule's embedding tables are already sharded, but no SparseStrategy holds"
    ):
        _trainer(_strategy()).validate(model, _data())
