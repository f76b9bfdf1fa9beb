"""Each state-owning component round-trips exactly through torch.distributed.checkpoint, on 2 ranks, mid-epoch.

A 2-rank fit (fused tables, a native-route table, a data-parallel table, a dynamic table with a sharded
hash partition and one replicated on both ranks) saves every component at step SAVE_AT, in the middle of the first epoch, handing
the component itself to ``dcp.save`` (DCP calls its ``state_dict``); the next step trains on and a new sparse
lr is set, so the live state moves away; then ``dcp.load`` reads the saved state back into the component
(DCP calls ``state_dict`` for the template and then ``load_state_dict``). Every rank compares its local
state after the load with the state it saved, exactly, and reports whether the state had moved in between
(else the comparison proves nothing). Rank 0 writes the results to ``--result``.
"""

import argparse
import json
import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from leave import leave_and_exit
from torch.distributed._shard.sharded_tensor import ShardedTensor

import lightning_sparse
from lightning_sparse.config import SparseOptimizerConfig, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.dynamic import AdmissionConfig, DynamicTableConfig
from lightning_sparse.models import DLRMModule

SAVE_AT, BATCHES = 2, 8  # global step of the save; batches per epoch of the two ranks together (4 steps)


def local_snapshot(tree, prefix=""):
    """Every value of a state dict as this rank holds it: local shards of ShardedTensors, cloned."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(local_snapshot(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)):
        return local_snapshot(dict(enumerate(tree)), prefix)
    if isinstance(tree, ShardedTensor):
        return {f"{prefix}shard{i}": s.tensor.detach().clone() for i, s in enumerate(tree.local_shards())}
    if isinstance(tree, torch.Tensor):
        return {prefix[:-1]: tree.detach().clone()}
    return {prefix[:-1]: tree}


def differences(a, b):
    """Keys whose values differ between two snapshots (keys present in only one count too)."""
    out = sorted(set(a) ^ set(b))
    for key in set(a) & set(b):
        va, vb = a[key], b[key]
        same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
        if not same:
            out.append(key)
    return sorted(out)


class RoundTrip(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.saved = {}
        self.report = {}

    def components(self, trainer):
        sharded = trainer.strategy.sharded_model
        return {"sparse_optimizer": sharded.optimizer, "dynamic_tables": sharded.dynamic}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == SAVE_AT:
            for name, component in self.components(trainer).items():
                dcp.save({name: component}, checkpoint_id=os.path.join(self.directory, name))
                self.saved[name] = local_snapshot(component.state_dict())
            trainer.strategy.set_sparse_lr(0.0125)  # the hyper-parameters move too
        elif trainer.global_step == SAVE_AT + 1:
            for name, component in self.components(trainer).items():
                moved = differences(self.saved[name], local_snapshot(component.state_dict()))
                dcp.load({name: component}, checkpoint_id=os.path.join(self.directory, name))
                after = differences(self.saved[name], local_snapshot(component.state_dict()))
                self.report[name] = {"moved": moved, "differs_after_load": after, "values": len(self.saved[name])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    pl.seed_everything(1234)
    sizes = [200, 300, 50, 96]
    data = SyntheticClickDataModule(
        num_embeddings_per_feature=[200, 300, 50, 1000], batch_size=32, num_train_batches=BATCHES, num_val_batches=1
    )
    model = DLRMModule(
        num_embeddings_per_feature=sizes, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )
    tables = {
        "t_cat_0": TableConfig(
            dynamic=DynamicTableConfig(admission=AdmissionConfig(min_count=1), placement="replicated")
        ),
        "t_cat_1": TableConfig(
            optimizer=SparseOptimizerConfig(kind="adam", lr=0.01)
        ),  # no fused adam on CPU: native route
        "t_cat_2": TableConfig(sharding="data_parallel", optimizer=SparseOptimizerConfig(kind="adagrad", lr=0.05)),
        "t_cat_3": TableConfig(dynamic=DynamicTableConfig(admission=AdmissionConfig(min_count=1))),
    }
    strategy = lightning_sparse.SparseStrategy(
        sharding="table_wise", optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.05), tables=tables
    )
    round_trip = RoundTrip(args.dir)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[round_trip], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, data)
    routes = {t.name: t.route.value for t in strategy.embedding_tables.tables.values()}
    reports = [None] * trainer.world_size
    dist.all_gather_object(reports, round_trip.report)
    if trainer.is_global_zero:
        with open(args.result, "w") as f:
            json.dump({"routes": routes, "ranks": reports, "global_step": trainer.global_step}, f)
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
