"""DCN-v2 and DeepFM: they output logits, their tables are sharded by SparseStrategy, and they learn."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse import SparseOptimizerConfig, SparseStrategy
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.models import DCNModule, DeepFMModule

SIZES = [500, 300, 200, 100]
MODELS = {
    "dcn": lambda: DCNModule(
        SIZES,
        embedding_dim=8,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        dcn_num_layers=2,
        dcn_low_rank_dim=4,
        learning_rate=0.01,
    ),
    "deepfm": lambda: DeepFMModule(
        SIZES, embedding_dim=8, hidden_layer_size=16, deep_fm_dimension=8, learning_rate=0.01
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_gives_one_unbounded_logit_per_sample(name):
    data = SyntheticClickDataModule(num_embeddings_per_feature=SIZES, batch_size=64)
    batch = data.train_set[0]
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        model.head.bias.fill_(-5.0) if name == "deepfm" else None
        logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (64, 1)
    if name == "deepfm":  # a logit head, not torchrec's sigmoid OverArch: values leave [0, 1]
        assert (logits < 0).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trains_under_sparse_strategy(name, single_process_env):
    pl.seed_everything(0)
    data = SyntheticClickDataModule(
        num_embeddings_per_feature=SIZES, batch_size=128, num_train_batches=40, num_val_batches=4
    )
    model = MODELS[name]()
    strategy = SparseStrategy(sharding="table_wise", optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, data)
    untrained_auc = trainer.callback_metrics["val/auc"].item()
    trainer.fit(model, data)
    assert sorted(strategy.embedding_tables.tables) == [f"t_cat_{i}" for i in range(4)]
    assert trainer.callback_metrics["val/auc"].item() > max(0.7, untrained_auc + 0.1)
