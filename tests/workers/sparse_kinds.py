"""Trains a tiny model whose tables each use one sparse optimizer kind, on one route, under SparseStrategy;
the tests replay the same batches on an unsharded reference. Dense lr is 0, so embedding gradients depend
only on the tables. Every hyper-parameter is set to a non-default value, and the sparse lr changes mid-run."""

import argparse
import dataclasses
import json

import lightning.pytorch as pl
import torch
from leave import leave_and_exit
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse import SparseOptimizerConfig, SparseStrategy, TableConfig

BATCH = 8
BATCHES_PER_EPOCH = 4
LR, LR_LATER, LR_CHANGE_STEP = 0.05, 0.02, 2
# Ids are drawn from the first third of each table's rows (many repeats), or from all of them (so that every
# block of a row-wise table is read): set by --ids-over-all-rows, and by tests before they replay the stream.
IDS_OVER_ALL_ROWS = False
# route -> the kinds it trains, one table each
ROUTES = {
    "fused": ["sgd", "adagrad", "rowwise_adagrad"],
    "native": ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "rowwise_adam_m", "adam"],
    "data_parallel": ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "rowwise_adam_m", "adam"],
}


def tables(route: str) -> list[tuple[str, int, int]]:
    return [(f"t_{kind}", 30 + 3 * i, 8 if i % 2 else 4) for i, kind in enumerate(ROUTES[route])]


def optimizer_config(route: str, kind: str) -> SparseOptimizerConfig:
    """Non-default values everywhere; weight decay only off the fused route (fbgemm ignores it on CPU)."""
    first_moment = kind == "rowwise_adam_m"
    kind = "rowwise_adam" if first_moment else kind
    return SparseOptimizerConfig(
        kind=kind,
        lr=LR,
        eps=1e-3,
        weight_decay=0.0 if route == "fused" else 0.05,
        beta1=0.8,
        beta2=0.95,
        decay=0.9,
        first_moment=first_moment,
    )


def table_configs(route: str, sharding: str = "table_wise") -> dict[str, TableConfig]:
    sharding = "data_parallel" if route == "data_parallel" else sharding
    return {
        name: TableConfig(sharding=sharding, optimizer=optimizer_config(route, name[2:]))
        for name, _, _ in tables(route)
    }


def make_model(route: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyModule(route)


class TinyModule(pl.LightningModule):
    def __init__(self, route: str) -> None:
        super().__init__()
        configs = [
            EmbeddingBagConfig(name=n, num_embeddings=rows, embedding_dim=dim, feature_names=[f"f_{n}"])
            for n, rows, dim in tables(route)
        ]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        self.features = [f"f_{n}" for n, _, _ in tables(route)]
        self.head = torch.nn.Linear(sum(dim for _, _, dim in tables(route)), 1)
        self.predictions: list[list[float]] = []  # this rank's forward outputs, step by step

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        # by key: a sharded collection's KeyedTensor orders its features by shard, not as configured
        pooled = self.ebc(kjt).to_dict()
        return self.head(torch.cat([pooled[key] for key in self.features], dim=1)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        kjt, target = batch
        prediction = self(kjt)
        self.predictions.append(prediction.detach().tolist())
        return torch.nn.functional.mse_loss(prediction, target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def batch_at(route: str, index: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Batch ``index`` of the stream; duplicates within a bag and across samples on purpose."""
    specs = tables(route)
    g = torch.Generator().manual_seed(1000 + index)
    lengths = torch.randint(1, 4, (len(specs) * BATCH,), generator=g)
    values = []
    for t, (_, rows, _) in enumerate(specs):
        n = int(lengths[t * BATCH : (t + 1) * BATCH].sum())
        high = rows if IDS_OVER_ALL_ROWS else rows // 3  # a third of the rows: many repeats
        values.append(torch.randint(0, high, (n,), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f_{n}" for n, _, _ in specs], values=torch.cat(values), lengths=lengths
    )
    return kjt, torch.randn(BATCH, generator=g)


class Stream(Dataset):
    def __init__(self, route: str) -> None:
        self.route = route

    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __getitem__(self, index: int):
        return batch_at(self.route, index)


class Data(pl.LightningDataModule):
    def __init__(self, route: str) -> None:
        super().__init__()
        self.route = route

    def train_dataloader(self):
        dataset = Stream(self.route)
        sampler = DistributedSampler(
            dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(dataset, batch_size=None, sampler=sampler)


class ChangeSparseLr(Callback):
    """Sets every table's lr to LR_LATER before step LR_CHANGE_STEP, through the strategy's public API."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == LR_CHANGE_STEP:
            trainer.strategy.set_sparse_lr(LR_LATER)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--route", required=True, choices=sorted(ROUTES))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--sharding", default="table_wise", help="sharding of every table off the data_parallel route")
    parser.add_argument("--count-communication", action="store_true")
    parser.add_argument("--ids-over-all-rows", action="store_true")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    global IDS_OVER_ALL_ROWS
    IDS_OVER_ALL_ROWS = args.ids_over_all_rows
    strategy = SparseStrategy(
        sharding="table_wise",
        tables=table_configs(args.route, args.sharding),
        count_communication=args.count_communication,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ChangeSparseLr(),
            ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
        ],
    )
    model = make_model(args.route)
    trainer.fit(model, Data(args.route), ckpt_path=args.ckpt_in)
    routes = {t.name: t.route.value for t in trainer.strategy.embedding_tables.tables.values()}
    plan = {
        t: s.sharding_type
        for module_plan in strategy.distributed_model.plan.plan.values()
        for t, s in module_plan.items()
    }
    predictions = [None] * trainer.world_size
    torch.distributed.all_gather_object(predictions, model.predictions)
    comm = [None] * trainer.world_size
    if args.count_communication:
        report = strategy.communication_report()
        stats = dataclasses.asdict(report.batch_stats)
        torch.distributed.all_gather_object(
            comm, {"steps": report.steps, "per_step": report.per_step(), "batch_stats": stats}
        )
    if trainer.is_global_zero:
        result = {"world_size": trainer.world_size, "global_step": trainer.global_step, "routes": routes, "plan": plan}
        with open(args.result, "w") as f:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            json.dump({**result, "predictions": predictions, "comm": comm, "metrics": metrics}, f)
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    main()
