"""Trains a tiny model with one sparse optimizer kind under SparseStrategy; the tests replay the same
batches on an unsharded reference. Dense lr is 0, so embedding gradients depend only on the tables."""

import argparse
import json

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse import SparseOptimizerConfig, SparseStrategy

TABLES = [("a", 40, 8), ("b", 25, 4)]
BATCH = 8
BATCHES_PER_EPOCH = 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyModule()


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        configs = [EmbeddingBagConfig(name=n, num_embeddings=rows, embedding_dim=dim, feature_names=[f"f_{n}"]) for n, rows, dim in TABLES]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        self.head = torch.nn.Linear(sum(dim for _, _, dim in TABLES), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.ebc(kjt).values()).squeeze(-1)

    def training_step(self, batch, batch_idx):
        kjt, target = batch
        return torch.nn.functional.mse_loss(self(kjt), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def batch_at(index: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Batch ``index`` of the stream; duplicates within a bag and across samples on purpose."""
    g = torch.Generator().manual_seed(1000 + index)
    lengths = torch.randint(1, 4, (len(TABLES) * BATCH,), generator=g)
    values = []
    for t, (_, rows, _) in enumerate(TABLES):
        n = int(lengths[t * BATCH : (t + 1) * BATCH].sum())
        values.append(torch.randint(0, rows // 3, (n,), generator=g))  # a third of the rows: many repeats
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f_{n}" for n, _, _ in TABLES], values=torch.cat(values), lengths=lengths)
    return kjt, torch.randn(BATCH, generator=g)


class Stream(Dataset):
    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __getitem__(self, index: int):
        return batch_at(index)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        dataset = Stream()
        sampler = DistributedSampler(dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=None, sampler=sampler)


def optimizer_config(kind: str) -> SparseOptimizerConfig:
    return SparseOptimizerConfig(kind=kind, lr=0.05, weight_decay=0.01 if kind not in ("sgd", "adagrad", "rowwise_adagrad") else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    strategy = SparseStrategy(sharding="table_wise", optimizer=optimizer_config(args.kind))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)],
    )
    trainer.fit(make_model(), Data(), ckpt_path=args.ckpt_in)
    if trainer.is_global_zero:
        with open(args.result, "w") as f:
            json.dump({"world_size": trainer.world_size, "global_step": trainer.global_step}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit (see train.py)


if __name__ == "__main__":
    main()
