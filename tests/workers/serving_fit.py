"""Trains a tiny DLRM with DeltaExport on N CPU processes; used by tests/serving (and benchmarks/serving.py).

Tables: t_cat_0 dynamic (raw ids over a 30x larger space, drifting, so ids are admitted, evicted and
expire), t_cat_1 column-wise, t_cat_2 table-wise, t_cat_3 data-parallel. Rank 0 writes a JSON result: the
raw ids every rank fed per step, the export steps, the dynamic tables' counters, the eval-mode scores of
the test batches after training (the module's own ``predict_step`` through the strategy), the data
settings to rebuild those batches, and saves a sharded checkpoint of the final state (``--ckpt-out``).
"""

import argparse
import json
import os
import time

import lightning.pytorch as pl
import torch
from leave import leave_and_exit

import lightning_sparse
from lightning_sparse.config import SparseOptimizerConfig, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.dynamic import AdmissionConfig, DynamicTableConfig, ExpiryConfig
from lightning_sparse.models import DLRMModule
from lightning_sparse.serving import DeltaExport

SIZES = [40, 30, 20, 10]


def data_args(batches: int, batch_size: int) -> dict:
    return dict(
        num_embeddings_per_feature=SIZES, id_space_per_feature=[1200, 30, 20, 10], batch_size=batch_size,
        num_train_batches=batches, num_val_batches=1, num_test_batches=2, drift_period=4, seed=3,
    )  # fmt: skip


class Touched(pl.Callback):
    """The raw ids this rank fed at each step (keyed by the step number the step ends at) and step end times."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, list[int]]] = {}
        self.ended: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        kjt = batch.sparse_features
        self.steps[trainer.global_step + 1] = {k: kjt[k].values().unique().tolist() for k in kjt.keys()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ended[trainer.global_step] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200, help="training batches (steps = batches / devices)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--exports", required=True)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--ckpt-out", default=None)
    parser.add_argument("--fallback-rows", type=int, default=0, help="fallback rows of the dynamic table t_cat_0")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    data = SyntheticClickDataModule(**data_args(args.batches, args.batch_size))
    model = DLRMModule(
        num_embeddings_per_feature=SIZES, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]
    )
    dynamic = DynamicTableConfig(
        admission=AdmissionConfig(min_count=1),
        expiry=ExpiryConfig(ttl_steps=6, sweep_every_steps=3),
        fallback_rows=args.fallback_rows,
    )
    strategy = lightning_sparse.SparseStrategy(
        sharding="table_wise",
        optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1),
        tables={
            "t_cat_0": TableConfig(dynamic=dynamic),
            "t_cat_1": TableConfig(sharding="column_wise"),
            "t_cat_3": TableConfig(sharding="data_parallel"),
        },
    )
    export = DeltaExport(args.exports, every_n_steps=args.every_n_steps, quantize=args.quantize)
    touched = Touched()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[export, touched],
    )  # fmt: skip
    started = time.time()
    trainer.fit(model, data)
    fit_seconds = time.time() - started
    predictions = trainer.predict(model, data)
    if args.ckpt_out:
        trainer.save_checkpoint(args.ckpt_out)
    world = trainer.world_size
    shares = [None] * world
    mine = {
        "touched": touched.steps, "ended": touched.ended, "predictions": [p.tolist() for p in predictions],
        "export_seconds": export.export_seconds,
    }  # fmt: skip
    torch.distributed.all_gather_object(shares, mine)
    counters = strategy.dynamic_tables.global_metrics()
    if trainer.is_global_zero:
        result = {
            "ranks": shares, "exported_steps": export.exported_steps, "version": export.version,
            "dynamic_metrics": counters, "global_step": trainer.global_step, "data": data_args(args.batches, args.batch_size),
            "world_size": world, "fit_seconds": fit_seconds,
            "plan": {t: s.sharding_type for p in strategy.distributed_model.plan.plan.values() for t, s in p.items()},
        }  # fmt: skip
        with open(args.result, "w") as f:
            json.dump(result, f)
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
