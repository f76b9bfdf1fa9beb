"""The first thing to run: DLRM on the synthetic click stream, SparseStrategy on 2 CPU processes.

    python examples/demo.py            # or: make demo

Prints validation AUC, training samples/s and the memory of the embedding tables and their optimizer.
"""

import os

import lightning.pytorch as pl

from lightning_sparse import ShardingType, SparseOptimizerConfig, SparseStrategy, TableConfig
from lightning_sparse.callbacks import SamplesPerSecond, strategy_memory_report
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.models import DLRMModule

SIZES = [100_000, 50_000, 20_000, 10_000, 5_000, 1_000, 500, 100]


def main() -> None:
    pl.seed_everything(0)
    data = SyntheticClickDataModule(
        num_embeddings_per_feature=SIZES, batch_size=1024, num_train_batches=120, num_val_batches=16
    )
    model = DLRMModule(num_embeddings_per_feature=SIZES, embedding_dim=16, learning_rate=3e-3)
    strategy = SparseStrategy(
        optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.05),
        # The big table is split by columns over both processes; the tiny one is replicated.
        tables={
            "t_cat_0": TableConfig(sharding=ShardingType.COLUMN_WISE),
            "t_cat_7": TableConfig(sharding="data_parallel"),
        },
    )
    throughput = SamplesPerSecond()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("DEMO_DEVICES", "2")),
        strategy=strategy,
        max_epochs=2,
        callbacks=[throughput],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    memory = strategy_memory_report(trainer)
    auc = trainer.callback_metrics["val/auc"].item()
    embedding_mib = strategy.all_reduce_bytes(memory.embedding_weight_bytes + memory.sparse_optimizer_bytes) / 2**20
    if trainer.is_global_zero:
        print()
        print(f"validation AUC          {auc:.4f}")
        print(f"training samples/s      {throughput.mean_samples_per_sec:,.0f}  ({trainer.world_size} processes)")
        print(f"embedding memory        {embedding_mib:.1f} MiB  (weights + sparse optimizer state, all ranks)")
        print(
            f"  of which this rank    {(memory.embedding_weight_bytes + memory.sparse_optimizer_bytes) / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
