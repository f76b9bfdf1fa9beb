"""Trains DLRM (no dense features) prequentially on a TSV or Parquet click stream under SparseStrategy, N CPU ranks.

Rank 0 writes to ``--result``: for every training batch of the run, every rank's record fingerprint
(the stream positions of its samples, carried in a sparse column), logits and labels (gathered), and the
PrequentialEvaluation values computed after that batch; the final global step.
"""

import argparse
import json
import os

import lightning.pytorch as pl
import torch
from leave import leave_and_exit
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_sparse
from lightning_sparse.callbacks import PrequentialEvaluation
from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.data import ParquetSource, SparseColumn, StreamDataModule, StreamSchema, TsvSource
from lightning_sparse.models import DLRMModule

SCHEMA = StreamSchema(
    label="label",
    dense=[],
    sparse=[
        SparseColumn("user", 50, transform="hash", seed=3),
        SparseColumn("item", 40, transform="modulo"),
        SparseColumn("position", 4096, transform="none"),  # the record's index in the stream
    ],
)


class Recorder(pl.Callback):
    """Per batch: the stream positions this rank trained on, its logits and labels, and the prequential values."""

    def __init__(self, prequential: PrequentialEvaluation) -> None:
        self.prequential = prequential
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        kjt = batch.sparse_features.to_dict()["position"]
        self.steps.append({
            "global_step": trainer.global_step, "positions": kjt.values().tolist(),
            "logits": outputs["logits"].tolist(), "labels": outputs["labels"].tolist(),
            "prequential": dict(self.prequential.last),
        })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--source", choices=["tsv", "parquet"], default="tsv")
    parser.add_argument("--paths", required=True, help="a glob pattern of the stream's files")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--ckpt-every", type=int, default=3)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    pl.seed_everything(7)
    columns = ["label", "user", "item", "position"]
    source = TsvSource(args.paths, columns=columns) if args.source == "tsv" else ParquetSource(args.paths, read_rows=5)
    data = StreamDataModule(source, SCHEMA, batch_size=args.batch_size)
    model = DLRMModule(
        num_embeddings_per_feature=data.num_embeddings_per_feature, num_dense_features=data.num_dense_features,
        feature_names=data.feature_names, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
    )  # fmt: skip
    prequential = PrequentialEvaluation(window=args.window, every_n_steps=1)
    recorder = Recorder(prequential)
    callbacks = [prequential, recorder]
    if args.ckpt_dir:
        callbacks.append(
            ModelCheckpoint(
                dirpath=args.ckpt_dir, filename="{step}", save_top_k=-1, every_n_train_steps=args.ckpt_every
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.max_steps, max_epochs=-1,
        strategy=lightning_sparse.SparseStrategy(optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1)),
        logger=False, enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, deterministic=True, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=args.ckpt_in)
    ranks = [None] * trainer.world_size
    torch.distributed.all_gather_object(ranks, recorder.steps)
    if trainer.is_global_zero:
        with open(args.result, "w") as f:
            json.dump({"ranks": ranks, "global_step": trainer.global_step}, f)
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
