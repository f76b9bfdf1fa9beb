"""What a user gets from each sparse optimizer kind through SparseStrategy, side by side in one run.

Every contender trains the same model (4 tables of 250k x 64, one feature each, pooled sums concatenated into
a linear head) on the same batches (2048 samples, 20 Zipf ids per bag), one process, with the same number of
threads. Timed: whole training steps (forward, backward, every optimizer), median after warm-up.

- SparseStrategy, each kind as a user configures it: sgd / adagrad / rowwise_adagrad run in fbgemm's fused
  kernels; decayed_adagrad / rowwise_adam / adam (and any kind with weight_decay > 0) in our kernels, fed by
  the exact row gradients assembled from the lookup's output gradient. Goal: every own-kernel kind within
  1.2x of fused rowwise_adagrad's step time.
- What a competent user writes without this plugin: ``nn.EmbeddingBag(sparse=True)`` tables with
  ``torch.optim.SGD`` / ``Adagrad`` / ``SparseAdam`` (torch's sparse-gradient optimizers), Adam on the head.

Memory: sparse optimizer bytes per kind from the tensors that hold the state (``strategy_memory_report``).
Run: ``.venv/bin/python benchmarks/sparse_optimizers.py`` (``--threads 1 2`` by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse import SparseOptimizerConfig, SparseStrategy, ops
from lightning_sparse.callbacks import strategy_memory_report

TABLES = 4


def zipf_ids(rows: int, n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-alpha), 0)
    cdf /= cdf[-1].clone()
    return torch.searchsorted(cdf, torch.rand(n, generator=generator, dtype=torch.float64)).clamp_(max=rows - 1)


def make_batches(args) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps + args.warmup):
        values = torch.cat([zipf_ids(args.rows, args.batch * args.pooling, args.alpha, g) for _ in range(TABLES)])
        lengths = torch.full((TABLES * args.batch,), args.pooling)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{t}" for t in range(TABLES)], values=values, lengths=lengths)
        batches.append((kjt, torch.randn(args.batch, generator=g)))
    return batches


class Model(pl.LightningModule):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        configs = [
            EmbeddingBagConfig(name=f"t{t}", num_embeddings=rows, embedding_dim=dim, feature_names=[f"f{t}"])
            for t in range(TABLES)
        ]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        self.head = torch.nn.Linear(TABLES * dim, 1)

    def training_step(self, batch, batch_idx):
        kjt, target = batch
        pooled = self.ebc(kjt).to_dict()
        logits = self.head(torch.cat([pooled[f"f{t}"] for t in range(TABLES)], dim=1)).squeeze(-1)
        return torch.nn.functional.mse_loss(logits, target)

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=1e-3)


class Batches(Dataset):
    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def time_strategy(config: SparseOptimizerConfig, batches, args) -> tuple[float, int, str]:
    torch.manual_seed(0)
    model = Model(args.rows, args.dim)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=SparseStrategy(sharding="table_wise", optimizer=config),
        max_steps=len(batches),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[timer],
    )
    trainer.fit(model, DataLoader(Batches(batches), batch_size=None))
    route = {t.route.value for t in trainer.strategy.embedding_tables.tables.values()}.pop()
    memory = strategy_memory_report(trainer).sparse_optimizer_bytes
    return statistics.median(timer.times[args.warmup :]), memory, route


def time_torch(kind: str, batches, args) -> float:
    torch.manual_seed(0)
    bags = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(args.rows, args.dim, mode="sum", sparse=True) for _ in range(TABLES)
    )
    head = torch.nn.Linear(TABLES * args.dim, 1)
    tables = list(bags.parameters())
    sparse = {
        "sgd": lambda: torch.optim.SGD(tables, lr=0.01),
        "adagrad": lambda: torch.optim.Adagrad(tables, lr=0.01),
        "adam": lambda: torch.optim.SparseAdam(tables, lr=0.01),
    }[kind]()
    dense = torch.optim.Adam(head.parameters(), lr=1e-3)
    times = []
    for kjt, target in batches:
        start = time.perf_counter()
        offsets = torch.arange(0, args.batch * args.pooling, args.pooling)
        pooled = [bags[t](kjt[f"f{t}"].values(), offsets) for t in range(TABLES)]
        loss = torch.nn.functional.mse_loss(head(torch.cat(pooled, dim=1)).squeeze(-1), target)
        sparse.zero_grad()
        dense.zero_grad()
        loss.backward()
        sparse.step()
        dense.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup :])


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--pooling", type=int, default=20, help="ids per bag")
    parser.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    batches = make_batches(args)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, native kernels built: {ops.native_available()}"
    )
    print(
        f"{TABLES} tables x {args.rows:,} x {args.dim} fp32, batch {args.batch} x {args.pooling} ids per bag (Zipf {args.alpha}); "
        f"median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    contenders = [
        ("rowwise_adagrad", SparseOptimizerConfig(kind="rowwise_adagrad")),
        ("sgd", SparseOptimizerConfig(kind="sgd")),
        ("adagrad", SparseOptimizerConfig(kind="adagrad")),
        ("decayed_adagrad", SparseOptimizerConfig(kind="decayed_adagrad")),
        ("rowwise_adam", SparseOptimizerConfig(kind="rowwise_adam")),
        ("adam", SparseOptimizerConfig(kind="adam")),
        ("rowwise_adagrad + weight_decay", SparseOptimizerConfig(kind="rowwise_adagrad", weight_decay=1e-4)),
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"### {threads} thread(s)\n")
        print("| contender | route | ms/step | vs fused rowwise_adagrad | sparse optimizer MiB |")
        print("|---|---|---:|---:|---:|")
        base = None
        for name, config in contenders:
            seconds, memory, route = time_strategy(config, batches, args)
            base = base or seconds
            print(
                f"| SparseStrategy {name} | {route} | {seconds * 1e3:.1f} | {seconds / base:.2f}x | {memory / 2**20:.1f} |",
                flush=True,
            )
        for kind, name in (
            ("sgd", "torch.optim.SGD"),
            ("adagrad", "torch.optim.Adagrad"),
            ("adam", "torch.optim.SparseAdam"),
        ):
            seconds = time_torch(kind, batches, args)
            print(
                f"| EmbeddingBag(sparse=True) + {name} | plain PyTorch | {seconds * 1e3:.1f} | {seconds / base:.2f}x | - |",
                flush=True,
            )
        print()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
