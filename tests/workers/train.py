"""Runs one Lightning job with SparseStrategy on N CPU processes; used by the multi-process tests.

Lightning's ``popen`` launcher re-executes this script for every extra rank, as it would a user's
script. Rank 0 writes a JSON summary (metrics, paths) to ``--result``.
"""

import argparse
import json
import os

import lightning.pytorch as pl
import torch
from leave import leave_and_exit
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_sparse
from lightning_sparse.config import SparseOptimizerConfig, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.data.criteo import CriteoDataModule
from lightning_sparse.dynamic import AdmissionConfig, DynamicTableConfig, ExpiryConfig
from lightning_sparse.models import DLRMModule


class StepLR(DLRMModule):
    """DLRM with a dense LR scheduler, so scheduler state takes part in the resume test."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SparseLRDecay(pl.Callback):
    """Halves the sparse learning rate every epoch: proves the sparse lr is settable and checkpointed."""

    def on_train_epoch_end(self, trainer, pl_module):
        strategy = trainer.strategy
        strategy.set_sparse_lr(strategy.sparse_param_groups()[0]["lr"] * 0.5)


class BatchCounter(pl.Callback):
    """Counts the training batches each rank ran in each epoch (ranks must agree, or collectives hang)."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_epoch[trainer.current_epoch] = self.per_epoch.get(trainer.current_epoch, 0) + 1


def make_data(args):
    if args.data == "criteo":
        sizes = [200, 300, 50, 1000] + [40] * 22
        return CriteoDataModule(
            train_paths=args.criteo_train, val_paths=args.criteo_val, batch_size=args.batch_size,
            num_embeddings_per_feature=sizes, on_error=args.on_error, num_workers=args.num_workers,
        )  # fmt: skip
    return SyntheticClickDataModule(
        num_embeddings_per_feature=[200, 300, 50, 1000], batch_size=args.batch_size,
        num_train_batches=args.batches, num_val_batches=2, num_test_batches=2,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--stage", default="fit", choices=["fit", "validate", "test", "predict"])
    parser.add_argument("--sharding", default="auto")
    parser.add_argument("--table-sharding", action="append", default=[], help="table=type")
    parser.add_argument("--optimizer", default="rowwise_adagrad")
    parser.add_argument("--sparse-lr", type=float, default=0.05)
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--ckpt-out", default=None, help="save a checkpoint here after the stage")
    parser.add_argument("--ckpt-dir", default=None, help="ModelCheckpoint directory: a checkpoint every epoch")
    parser.add_argument("--keep", type=int, default=-1, help="ModelCheckpoint save_top_k (0: none of the epoch files)")
    parser.add_argument(
        "--save-last", action="store_true", help="ModelCheckpoint also (re)writes last.ckpt every epoch"
    )
    parser.add_argument(
        "--ckpt-every-n-steps", type=int, default=0, help="with --ckpt-dir: every n steps instead ({step}.ckpt)"
    )
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "criteo"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--criteo-train", default=None, help="Criteo-format training file (--data criteo)")
    parser.add_argument("--criteo-val", default=None)
    parser.add_argument("--on-error", default="skip", choices=["skip", "raise"])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument(
        "--dynamic-capacity", type=int, default=0, help="make t_cat_3 a dynamic table of this many rows"
    )
    parser.add_argument("--dynamic-placement", default="sharded", choices=["sharded", "replicated"])
    parser.add_argument("--dynamic-fallback-rows", type=int, default=0)
    parser.add_argument("--count-communication", action="store_true")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    pl.seed_everything(1234)
    data = make_data(args)
    table_sizes = list(data.num_embeddings_per_feature)
    if args.dynamic_capacity:
        table_sizes[3] = args.dynamic_capacity  # the data keeps its larger id space: raw ids are hashed to rows
    model = StepLR(
        num_embeddings_per_feature=table_sizes, num_dense_features=data.num_dense_features, embedding_dim=8,
        dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
    )  # fmt: skip
    tables = {}
    for item in args.table_sharding:
        name, sharding = item.split("=")
        tables[name] = TableConfig(sharding=sharding)
    if args.dynamic_capacity:
        dynamic = DynamicTableConfig(
            capacity=args.dynamic_capacity,
            admission=AdmissionConfig(min_count=2),
            expiry=ExpiryConfig(ttl_steps=2, sweep_every_steps=1),
            placement=args.dynamic_placement,
            fallback_rows=args.dynamic_fallback_rows,
        )
        tables["t_cat_3"] = TableConfig(sharding=tables.get("t_cat_3", TableConfig()).sharding, dynamic=dynamic)
    strategy = lightning_sparse.SparseStrategy(
        sharding=args.sharding,
        optimizer=SparseOptimizerConfig(kind=args.optimizer, lr=args.sparse_lr),
        tables=tables,
        count_communication=args.count_communication,
    )
    checkpointing = []
    if args.ckpt_dir and args.ckpt_every_n_steps:
        every = ModelCheckpoint(
            dirpath=args.ckpt_dir, filename="{step}", save_top_k=-1, every_n_train_steps=args.ckpt_every_n_steps
        )
        checkpointing.append(every)
    elif args.ckpt_dir:
        checkpointing.append(
            ModelCheckpoint(
                dirpath=args.ckpt_dir,
                filename="{epoch}",
                save_top_k=args.keep,
                save_last=args.save_last,
                every_n_epochs=1,
            )
        )
    counter = BatchCounter()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=args.ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SparseLRDecay(), counter] + checkpointing,
        deterministic=True,
    )
    result = {}
    if args.stage == "fit":
        trainer.fit(model, data, ckpt_path=args.ckpt_in)
    elif args.stage == "predict":
        predictions = trainer.predict(model, data, ckpt_path=args.ckpt_in)
        result["predictions"] = [p.tolist() for p in predictions]
    else:
        getattr(trainer, args.stage)(model, data, ckpt_path=args.ckpt_in)
    if args.ckpt_out:
        trainer.save_checkpoint(args.ckpt_out)
    plan = {}
    for module_plan in strategy.distributed_model.plan.plan.values():
        for table, sharding in module_plan.items():
            plan[table] = [sharding.sharding_type, sharding.compute_kernel]
    result.update(
        metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        plan=plan,
        world_size=trainer.world_size,
        global_step=trainer.global_step,
        sparse_lr=strategy.sparse_param_groups()[0]["lr"],
        routes={t.name: t.route.value for t in strategy.embedding_tables.tables.values()},
        auto_sharding={t: s.value for t, s in strategy.auto_sharding.choice.items()}
        if strategy.auto_sharding
        else None,
    )
    if args.count_communication and args.stage == "fit":
        per_step = [None] * trainer.world_size
        torch.distributed.all_gather_object(per_step, strategy.communication_report().per_step())
        result["comm_per_step"] = per_step
    batches = [None] * trainer.world_size
    torch.distributed.all_gather_object(batches, counter.per_epoch)
    result["train_batches_per_rank"] = batches
    if strategy.dynamic_tables is not None:
        result["dynamic_metrics"] = strategy.dynamic_tables.global_metrics()
        # Replicas must stay identical on every rank; a sharded hash table's partitions live on one rank each.
        state = {k: float(t.double().sum()) for k, t in strategy.dynamic_tables.state_dict().items()}
        states = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, state)
        result["replicas_identical"] = all(s == states[0] for s in states)
        result["hash_state_keys_per_rank"] = [sorted(s) for s in states]
    if trainer.is_global_zero:
        with open(args.result, "w") as f:
            json.dump(result, f)
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
