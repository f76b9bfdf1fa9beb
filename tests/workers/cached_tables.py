"""Trains two tables per sparse optimizer kind under SparseStrategy, side by side in one run: ``t_<kind>``
cached (a scratchpad of ``--cache`` slots over a backing store) and its twin ``t_<kind>_plain`` not cached.
Both start from the same rows and read the same ids, and one head reads each (``head(cached) + head(plain)``),
so both get the same output gradient: the tests compare them bit for bit. Ids drift through the table, so
rows are evicted, written back and copied in again; weight decay is set, so the uncached twins run on the
native route, as cached tables do. Checkpoints are written every 3 steps (mid-epoch) and validation runs."""

import argparse
import json

import lightning.pytorch as pl
import torch
from leave import leave_and_exit
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset, DistributedSampler
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse import SparseOptimizerConfig, SparseStrategy, TableConfig
from lightning_sparse.config import CacheConfig
from lightning_sparse.data.loading import ResumableLoader, fit_progress

KINDS = ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "rowwise_adam_m", "adam"]
ROWS, BATCH, BATCHES = 120, 6, 8


def optimizer_config(kind: str) -> SparseOptimizerConfig:
    first_moment = kind == "rowwise_adam_m"
    return SparseOptimizerConfig(
        kind="rowwise_adam" if first_moment else kind,
        lr=0.05,
        eps=1e-3,
        weight_decay=0.05,
        beta1=0.8,
        beta2=0.95,
        decay=0.9,
        first_moment=first_moment,
    )


def table_configs(kinds: list[str], cache: int, lookahead: int, folder: str) -> dict[str, TableConfig]:
    configs = {}
    for kind in kinds:
        configs[f"t_{kind}"] = TableConfig(
            sharding="table_wise",
            optimizer=optimizer_config(kind),
            cache=CacheConfig(rows=cache, lookahead=lookahead, path=folder),
        )
        configs[f"t_{kind}_plain"] = TableConfig(sharding="table_wise", optimizer=optimizer_config(kind))
    return configs


class TinyModule(pl.LightningModule):
    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = [f"f_{kind}" for kind in kinds]
        configs = [
            EmbeddingBagConfig(
                name=f"t_{k}{twin}", num_embeddings=ROWS, embedding_dim=4, feature_names=[f"f_{k}{twin}"]
            )
            for k in kinds
            for twin in ("", "_plain")
        ]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        with torch.no_grad():
            for k in kinds:
                self.ebc.embedding_bags[f"t_{k}_plain"].weight.copy_(self.ebc.embedding_bags[f"t_{k}"].weight)
        self.head = torch.nn.Linear(4 * len(kinds), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(kjt).to_dict()
        cached = torch.cat([pooled[key] for key in self.features], dim=1)
        plain = torch.cat([pooled[key + "_plain"] for key in self.features], dim=1)
        return (self.head(cached) + self.head(plain)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        kjt, target = batch
        return torch.nn.functional.mse_loss(self(kjt), target)

    def validation_step(self, batch, batch_idx):
        kjt, target = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self(kjt), target), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def batch_at(kinds: list[str], index: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Batch ``index``: ids from a band of 16 rows that moves 11 rows a batch (eviction and reloads)."""
    g = torch.Generator().manual_seed(1000 + index)
    lengths = torch.randint(1, 4, (len(kinds) * BATCH,), generator=g)
    values = [
        (11 * index + torch.randint(0, 16, (int(lengths[t * BATCH : (t + 1) * BATCH].sum()),), generator=g)) % ROWS
        for t in range(len(kinds))
    ]
    keys = [f"f_{k}" for k in kinds] + [f"f_{k}_plain" for k in kinds]  # the twins read the same ids
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values + values), lengths=torch.cat([lengths, lengths])
    )
    return kjt, torch.randn(BATCH, generator=g)


class Stream(Dataset):
    def __init__(self, kinds: list[str], offset: int = 0) -> None:
        self.kinds, self.offset = kinds, offset

    def __len__(self) -> int:
        return BATCHES

    def __getitem__(self, index: int):
        return batch_at(self.kinds, self.offset + index)


class Data(pl.LightningDataModule):
    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        self.kinds = kinds

    def _loader(self, dataset: Dataset, train: bool):
        sampler = DistributedSampler(
            dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return ResumableLoader(
            dataset, batch_size=None, sampler=sampler, consumed=fit_progress(self.trainer) if train else None
        )

    def train_dataloader(self):
        return self._loader(Stream(self.kinds), True)

    def val_dataloader(self):
        return self._loader(Stream(self.kinds, offset=50), False)


class CacheMetrics(Callback):
    """Collects the cache/... metrics the strategy logs at every step."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key, value in trainer.callback_metrics.items():
            if key.startswith("cache/"):
                self.seen.setdefault(key, []).append(float(value))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--cache", type=int, default=40, help="scratchpad rows")
    parser.add_argument("--lookahead", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--no-val", action="store_true", help="no validation (it moves rows in the scratchpads too)")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    strategy = SparseStrategy(
        sharding="table_wise", tables=table_configs(kinds, args.cache, args.lookahead, args.ckpt_dir)
    )
    metrics = CacheMetrics()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if args.no_val else 2,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        callbacks=[
            metrics,
            ModelCheckpoint(
                dirpath=args.ckpt_dir, filename="{step}", save_top_k=-1, every_n_train_steps=3, save_last=True
            ),
        ],
    )
    trainer.fit(TinyModule(kinds), Data(kinds), ckpt_path=args.ckpt_in)
    # each rank's backing files (deleted when the process ends) and their sizes
    stores = {
        name: table.store for name, table in trainer.strategy.cached_tables.tables.items() if table.store is not None
    }
    with open(f"{args.result}.rank{trainer.global_rank}", "w") as f:
        json.dump({str(file): file.stat().st_size for store in stores.values() for file in store.files}, f)
    if trainer.is_global_zero:
        routes = {t.name: t.route.value for t in trainer.strategy.embedding_tables.tables.values()}
        with open(args.result, "w") as f:
            json.dump({"global_step": trainer.global_step, "routes": routes, "metrics": metrics.seen}, f)
    for store in stores.values():
        store.close()  # what the interpreter's exit would do; leave_and_exit's os._exit skips it
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    main()
