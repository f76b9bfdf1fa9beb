"""SparseStrategy in one process: clear errors for bad setups, the optimizer split, registry, stages."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_sparse
from lightning_sparse import ShardingType, SparseOptimizerConfig, SparseStrategy, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.models import DLRMModule

SIZES = [100, 200, 50]


def _data() -> SyntheticClickDataModule:
    return SyntheticClickDataModule(
        num_embeddings_per_feature=SIZES, batch_size=32, num_train_batches=3, num_val_batches=1, num_test_batches=1
    )


def _model() -> DLRMModule:
    return DLRMModule(
        num_embeddings_per_feature=SIZES, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )


def _trainer(strategy, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(strategy=strategy, **defaults)


class NoTables(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(13, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch.dense_features).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_registered_by_name(single_process_env):
    trainer = _trainer("sparse")
    assert isinstance(trainer.strategy, SparseStrategy)


def test_model_without_embedding_tables_is_refused(single_process_env):
    with pytest.raises(ValueError, match="found no TorchRec EmbeddingBagCollection"):
        _trainer(SparseStrategy()).fit(NoTables(), _data())


def test_optimizer_kind_without_fbgemm_kernel_names_what_works(single_process_env):
    """adam has no fused fbgemm kernel on CPU: it runs in our kernels, which need table_wise sharding."""
    strategy = SparseStrategy(sharding="column_wise", optimizer=SparseOptimizerConfig(kind="adam"))
    with pytest.raises(
        ValueError,
        match="no fused 'adam' kernel on cpu.*need whole rows on a rank: sharding 'table_wise', 'row_wise'.*sgd, adagrad or rowwise_adagrad",
    ):
        _trainer(strategy).fit(_model(), _data())


def test_weight_decay_on_a_column_wise_table_says_why_it_needs_table_wise(single_process_env):
    """fbgemm ignores weight_decay on CPU, so such a table runs in our kernels: never silently without decay."""
    optimizer = SparseOptimizerConfig(kind="rowwise_adagrad", weight_decay=0.01)
    strategy = SparseStrategy(sharding="column_wise", optimizer=optimizer)
    with pytest.raises(
        ValueError, match="'t_cat_0': fbgemm's fused kernels do not apply weight_decay.*need whole rows on a rank"
    ):
        _trainer(strategy).fit(_model(), _data())


def test_unknown_table_name_lists_the_model_tables(single_process_env):
    strategy = SparseStrategy(tables={"t_typo": TableConfig(sharding="table_wise")})
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['t_typo'\].*'t_cat_0', 't_cat_1', 't_cat_2'"):
        _trainer(strategy).fit(_model(), _data())


def test_gradient_accumulation_is_refused_with_a_reason(single_process_env):
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2 is not supported.*fused kernels"):
        _trainer(SparseStrategy(), accumulate_grad_batches=2).fit(_model(), _data())


def test_bad_enum_values_name_the_allowed_values():
    with pytest.raises(ValueError, match="SparseStrategy.sharding='diagonal' is not valid; allowed values: 'auto'"):
        SparseStrategy(sharding="diagonal")
    with pytest.raises(ValueError, match="SparseOptimizerConfig.kind='adamw' is not valid; allowed values: 'sgd'"):
        SparseOptimizerConfig(kind="adamw")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rate'\]"):
        SparseStrategy(tables={"t": {"optimizer": {"learning_rate": 0.1}}})


def test_loading_a_file_checkpoint_explains_the_format(single_process_env, tmp_path):
    bogus = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(FileNotFoundError, match="is not a SparseStrategy checkpoint"):
        _trainer(SparseStrategy()).validate(_model(), _data(), ckpt_path=str(bogus))


def test_dense_optimizer_excludes_fused_tables_and_tables_learn(single_process_env):
    import copy

    from lightning_sparse.table_init import materialise_on_host

    model = _model()
    initial = copy.deepcopy(model)  # the tables are on meta: their initial values, materialised on a copy
    materialise_on_host(initial)
    before = {k: v.clone() for k, v in initial.state_dict().items() if "embedding_bags" in k}
    strategy = SparseStrategy(
        optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1),
        tables={
            "t_cat_1": TableConfig(
                sharding=ShardingType.DATA_PARALLEL, optimizer=SparseOptimizerConfig(kind="sgd", lr=0.5)
            )
        },
    )
    trainer = _trainer(strategy)
    trainer.fit(model, _data())
    embedding_ids = {id(p) for n, p in model.named_parameters() if "embedding_bags" in n}
    dense_ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert dense_ids and not dense_ids & embedding_ids
    assert {id(p) for n, p in model.named_parameters() if "embedding_bags" not in n} == dense_ids
    after = strategy.lightning_module.state_dict()
    for key, old in before.items():
        new = after[key]
        new = new.local_shards()[0].tensor if hasattr(new, "local_shards") else new
        assert not torch.equal(old, new), f"{key} was not trained"
    # The sparse optimizer holds both kinds: fbgemm fused state and the data-parallel table's SGD.
    assert len(strategy.sparse_optimizer.optimizers) == 2


def test_sparse_lr_is_settable_and_reaches_the_kernel(single_process_env):
    strategy = SparseStrategy(optimizer=SparseOptimizerConfig(kind="sgd", lr=0.1))
    trainer = _trainer(strategy)
    trainer.fit(_model(), _data())
    strategy.set_sparse_lr(0.0)
    weights = {
        k: v.local_shards()[0].tensor.clone()
        for k, v in strategy.lightning_module.state_dict().items()
        if hasattr(v, "local_shards")
    }
    # A new Trainer reuses the sharded tables and their optimizer, with the lr just set.
    again = SparseStrategy(optimizer=SparseOptimizerConfig(kind="sgd", lr=0.1))
    _trainer(again).fit(strategy.lightning_module, _data())
    assert again.sparse_optimizer.param_groups[0]["lr"] == 0.0
    for key, old in weights.items():
        assert torch.equal(old, strategy.lightning_module.state_dict()[key].local_shards()[0].tensor), key
    with pytest.raises(ValueError, match="must be >= 0"):
        strategy.set_sparse_lr(-1.0)


def test_fit_then_validate_test_predict_reuse_the_sharded_model(single_process_env):
    model, data = _model(), _data()
    trainer = _trainer(SparseStrategy())
    trainer.fit(model, data)
    dmp = trainer.strategy.distributed_model
    assert trainer.validate(model, data)[0]["val/auc"] >= 0.0
    assert "test/ne" in trainer.test(model, data)[0]
    predictions = trainer.predict(model, data)
    assert predictions[0].shape == (32,)
    # A second Trainer reuses the same sharded tables instead of sharding twice.
    other = _trainer(SparseStrategy())
    other.validate(model, data)
    assert other.strategy.distributed_model is dmp


def test_dynamic_table_capacity_must_match_its_rows(single_process_env):
    from lightning_sparse.dynamic import DynamicTableConfig

    strategy = SparseStrategy(tables={"t_cat_0": TableConfig(dynamic=DynamicTableConfig(capacity=64))})
    with pytest.raises(
        ValueError, match="'t_cat_0': dynamic.capacity=64 must equal the table's rows .num_embeddings=100."
    ):
        _trainer(strategy).fit(_model(), _data())


def test_dynamic_table_trains_and_logs_its_counters(single_process_env):
    from lightning_sparse.callbacks import DynamicTableMonitor

    data = SyntheticClickDataModule(
        num_embeddings_per_feature=[100, 200, 5000], batch_size=32, num_train_batches=3, num_val_batches=1
    )
    model = DLRMModule(
        num_embeddings_per_feature=[100, 200, 64],
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
    )
    strategy = SparseStrategy(tables={"t_cat_2": TableConfig(dynamic={"capacity": 64, "admission": {"min_count": 1}})})
    trainer = _trainer(strategy, callbacks=[DynamicTableMonitor(every_n_steps=1)])
    trainer.fit(model, data)
    assert trainer.callback_metrics["dynamic/t_cat_2/live"] > 0
    assert trainer.callback_metrics["dynamic/t_cat_2/capacity"] == 64
    assert "val/auc" in trainer.callback_metrics


def test_dynamic_table_capacity_is_read_from_the_table(single_process_env):
    from lightning_sparse.callbacks import DynamicTableMonitor

    data = SyntheticClickDataModule(
        num_embeddings_per_feature=[100, 200, 5000], batch_size=32, num_train_batches=2, num_val_batches=1
    )
    model = DLRMModule(
        num_embeddings_per_feature=[100, 200, 48],
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
    )
    strategy = SparseStrategy(tables={"t_cat_2": TableConfig(dynamic={"admission": {"min_count": 1}})})
    trainer = _trainer(strategy, callbacks=[DynamicTableMonitor(every_n_steps=1)])
    trainer.fit(model, data)
    assert trainer.strategy.embedding_tables.tables["t_cat_2"].dynamic.capacity == 48
    assert trainer.callback_metrics["dynamic/t_cat_2/capacity"] == 48


def test_public_api():
    assert lightning_sparse.SparseStrategy is SparseStrategy
    assert {"ShardingType", "SparseOptimizerConfig", "SparseOptimizerKind", "TableConfig"} <= set(
        lightning_sparse.__all__
    )


def test_rowwise_adam_without_first_moment_never_takes_fbgemms_partial_rowwise_adam():
    from lightning_sparse.optim.fbgemm_kinds import fused_blocker

    lean = SparseOptimizerConfig(kind="rowwise_adam", first_moment=False)
    assert fused_blocker(lean, "cuda") and fused_blocker(lean, "cpu")
    assert not fused_blocker(SparseOptimizerConfig(kind="rowwise_adam", first_moment=True), "cuda")
    assert not fused_blocker(SparseOptimizerConfig(kind="adam"), "cuda")
    assert fused_blocker(SparseOptimizerConfig(kind="adam"), "cpu")
