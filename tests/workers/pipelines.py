"""Trains DLRM on the synthetic stream under SparseStrategy(pipeline=...) on N CPU processes.

Several scenarios run one after another in the same processes (start-up is most of a run's time). For each,
rank 0 writes, to ``--result``: every step's loss (rank 0's), a sha256 of every rank's local tensors of the
model and sparse optimizer state after fit (so runs can be compared bit for bit), the largest staleness any
rank's row version counters saw, and the global step.
"""

import argparse
import hashlib
import json
import os

import lightning.pytorch as pl
import torch
from leave import leave_and_exit
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed._shard.sharded_tensor import ShardedTensor

import lightning_sparse
from lightning_sparse.config import SparseOptimizerConfig, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.dynamic import AdmissionConfig, DynamicTableConfig
from lightning_sparse.models import DLRMModule


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class SeenBatches(DLRMModule):
    """DLRM that keeps a sha256 of the ids each training_step receives (rows, for dynamic tables)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(hashlib.sha256(batch.sparse_features.values().numpy().tobytes()).hexdigest())
        return super().training_step(batch, batch_idx)


def digest(strategy) -> dict[str, str]:
    """sha256 of this rank's local tensors: model state (local shards) and sparse optimizer state."""
    out = {}

    def add(key, value):
        if isinstance(value, ShardedTensor):
            for i, shard in enumerate(value.local_shards()):
                add(f"{key}.shard{i}", shard.tensor)
        elif isinstance(value, torch.Tensor):
            out[key] = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}.{k}", v)

    add("model", strategy.lightning_module.state_dict())
    add("sparse", strategy.sparse_optimizer.state_dict()["state"])
    return out


def fit(spec: dict, devices: int) -> dict:
    """One fit of a scenario: ``pipeline``, ``staleness``, ``optimizer``, ``batches``, ``val_check_interval``,
    ``ckpt_dir`` + ``ckpt_every`` (a checkpoint every n steps), ``ckpt_in`` (resume), ``dynamic`` (tables
    t_cat_0 and t_cat_2 dynamic, hash tables sharded and replicated, with ten times more ids than rows: LRU
    evictions in every step)."""
    pl.seed_everything(1234)
    sizes = [40, 60, 30, 50]  # small tables: rows repeat across batches, so staleness is visible
    dynamic = spec.get("dynamic", False)
    data = SyntheticClickDataModule(
        num_embeddings_per_feature=sizes, batch_size=32, num_train_batches=spec.get("batches", 8), num_val_batches=2,
        id_space_per_feature=[400, 60, 300, 50] if dynamic else None,
    )  # fmt: skip
    model = SeenBatches(
        num_embeddings_per_feature=sizes, num_dense_features=data.num_dense_features, embedding_dim=8,
        dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
    )  # fmt: skip
    pipeline = {"kind": spec["pipeline"]}
    if spec.get("staleness") is not None:
        pipeline["staleness"] = spec["staleness"]
    optimizer = SparseOptimizerConfig(kind=spec.get("optimizer", "rowwise_adagrad"), lr=0.05)
    tables = {}
    if dynamic:
        admit = AdmissionConfig(min_count=1)
        tables = {
            "t_cat_0": TableConfig(dynamic=DynamicTableConfig(admission=admit, eviction="lru")),
            "t_cat_2": TableConfig(dynamic=DynamicTableConfig(admission=admit, eviction="lru", placement="replicated")),
        }
    strategy = lightning_sparse.SparseStrategy(
        sharding="table_wise", optimizer=optimizer, pipeline=pipeline, tables=tables
    )
    losses = Losses()
    callbacks = [losses]
    if spec.get("ckpt_dir"):
        every = ModelCheckpoint(
            dirpath=spec["ckpt_dir"], filename="{step}", save_top_k=-1, every_n_train_steps=spec["ckpt_every"]
        )
        callbacks.append(every)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=spec.get("epochs", 1),
        val_check_interval=spec.get("val_check_interval", 1.0), num_sanity_val_steps=0, logger=False,
        enable_checkpointing=bool(spec.get("ckpt_dir")), enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=spec.get("ckpt_in"))
    os.environ.setdefault("LOCAL_RANK", "0")  # the ranks exist now: later Trainers of this script start none
    staleness = torch.tensor([float(trainer.callback_metrics.get("pipeline/max_staleness", -1.0))])
    torch.distributed.all_reduce(staleness, op=torch.distributed.ReduceOp.MAX)
    hash_tables = strategy.dynamic_tables.global_metrics() if dynamic else {}
    digests = [None] * trainer.world_size
    torch.distributed.all_gather_object(digests, digest(strategy))
    return {
        "losses": losses.losses,
        "seen": model.seen,
        "digests": digests,
        "max_staleness": float(staleness),
        "global_step": trainer.global_step,
        "evicted": {name: counters["evicted"] for name, counters in hash_tables.items()},
        "routes": {t.name: t.route.value for t in strategy.embedding_tables.tables.values()},
        "val_auc": float(trainer.callback_metrics.get("val/auc", -1.0)),
        "tables_on_own_group": strategy.distributed_model._env.process_group is not torch.distributed.group.WORLD,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--scenarios", required=True, help="JSON: {name: spec} run one after another (see fit)")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    results = {name: fit(spec, args.devices) for name, spec in json.loads(args.scenarios).items()}
    if torch.distributed.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(results, f)
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
