"""Training throughput, side by side in one run, on the same model, data and 2 CPU processes:

  (a) lightning_sparse: Lightning Trainer + SparseStrategy (fused row-wise Adagrad, sharded tables)
  (b) hand-written TorchRec loop: DistributedModelParallel + the same fused optimizer, no Lightning
  (c) plain PyTorch: nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad (sparse gradients) + DDP

Goals: (a)/(b) >= 0.95 (Lightning costs nothing), (a)/(c) >= 3.0.

    python benchmarks/throughput.py [--steps 60] [--batch-size 2048] [--pooling-factor 1]
    python benchmarks/throughput.py --pipelines [...]   # the pipeline comparisons of issue 14 instead
                                                        # (benchmarks/throughput_pipelines.py; --pipelines --help)

Each variant runs in its own processes; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dlrm_setup import DENSE_FEATURES, EMBEDDING_DIM, TABLE_SIZES, RankSampler, dlrm_module, free_port
from dlrm_setup import init_process_group as _init

WARMUP_STEPS = 5


def make_batches(rank: int, steps: int, batch_size: int, pooling_factor: int) -> list:
    from lightning_sparse.data import SyntheticClickStream

    stream = SyntheticClickStream(
        num_batches=steps * 2,
        batch_size=batch_size,
        num_embeddings_per_feature=TABLE_SIZES,
        num_dense_features=DENSE_FEATURES,
        pooling_factor=pooling_factor,
    )
    return [stream[i] for i in range(rank, 2 * steps, 2)]


def sparse_config():
    from lightning_sparse import SparseOptimizerConfig

    return SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.05)


# --------------------------------------------------------------------------- (a) Lightning
def run_lightning(args) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_sparse import SparseStrategy
    from lightning_sparse.callbacks import SamplesPerSecond

    class InMemory(pl.LightningDataModule):
        def train_dataloader(self):
            rank = self.trainer.global_rank
            return DataLoader(
                make_batches(rank, args.steps, args.batch_size, args.pooling_factor),
                batch_size=None,
                sampler=RankSampler(args.steps),
            )

    pl.seed_everything(0)
    throughput = SamplesPerSecond(warmup_steps=WARMUP_STEPS)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=SparseStrategy(sharding="table_wise", optimizer=sparse_config()),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[throughput],
    )
    trainer.fit(dlrm_module(), InMemory())
    if trainer.is_global_zero:
        _write(args.result, throughput.mean_samples_per_sec)


# --------------------------------------------------------------------------- (b) TorchRec loop
def run_torchrec(rank: int, port: int, args) -> None:
    import torch.distributed as dist

    from lightning_sparse.config import ShardingType
    from lightning_sparse.distributed.planning import attach_fused_optimizers, plan_sharding, shard_model
    from lightning_sparse.distributed.routes import resolve_tables

    _init(rank, port)
    torch.manual_seed(0)
    module = dlrm_module()
    tables = resolve_tables(module, "cpu", ShardingType.TABLE_WISE, sparse_config(), None)
    attach_fused_optimizers(tables, "cpu")
    plan = plan_sharding(module, tables, torch.device("cpu"), dist.group.WORLD)
    dmp = shard_model(module, plan, torch.device("cpu"), dist.group.WORLD)
    dense_params = [p for n, p in dmp.named_parameters() if not hasattr(p, "_in_backward_optimizers")]
    optimizer = torch.optim.Adam(dense_params, lr=1e-3)
    batches = make_batches(rank, args.steps, args.batch_size, args.pooling_factor)

    def step(batch):
        optimizer.zero_grad()
        logits = dmp(batch.dense_features, batch.sparse_features).reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        optimizer.step()

    _timed_loop(rank, batches, step, args)


# --------------------------------------------------------------------------- (c) plain PyTorch
class TorchSparseArch(torch.nn.Module):
    """One nn.EmbeddingBag(sparse=True) per feature, output [B, F, D] like TorchRec's SparseArch."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.keys = keys
        self.bags = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(n, EMBEDDING_DIM, mode="sum", sparse=True) for n in TABLE_SIZES
        )

    def forward(self, features):
        pooled = []
        for key, bag in zip(self.keys, self.bags):
            jt = features[key]
            pooled.append(bag(jt.values(), jt.offsets()[:-1].long()))
        return torch.stack(pooled, dim=1)


def run_torch(rank: int, port: int, args) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lightning_sparse.data import feature_names

    _init(rank, port)
    torch.manual_seed(0)
    module = dlrm_module()
    module.dlrm.sparse_arch = TorchSparseArch(feature_names(len(TABLE_SIZES)))
    ddp = DistributedDataParallel(module.dlrm)
    sparse_params = list(module.dlrm.sparse_arch.parameters())
    sparse_ids = {id(p) for p in sparse_params}
    dense_params = [p for p in module.dlrm.parameters() if id(p) not in sparse_ids]
    sparse_optimizer = torch.optim.Adagrad(sparse_params, lr=0.05)
    dense_optimizer = torch.optim.Adam(dense_params, lr=1e-3)
    batches = make_batches(rank, args.steps, args.batch_size, args.pooling_factor)

    def step(batch):
        sparse_optimizer.zero_grad()
        dense_optimizer.zero_grad()
        logits = ddp(batch.dense_features, batch.sparse_features).reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        sparse_optimizer.step()
        dense_optimizer.step()

    _timed_loop(rank, batches, step, args)


# --------------------------------------------------------------------------- shared
def _timed_loop(rank: int, batches: list, step, args) -> None:
    import torch.distributed as dist

    start = None
    for i, batch in enumerate(batches):
        if i == WARMUP_STEPS:
            dist.barrier()
            start = time.perf_counter()
        step(batch)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        _write(args.result, (len(batches) - WARMUP_STEPS) * args.batch_size * 2 / seconds)
    dist.destroy_process_group()


def _write(path: str, samples_per_sec: float) -> None:
    with open(path, "w") as f:
        json.dump({"samples_per_sec": samples_per_sec}, f)


CRASHES: dict[str, int] = {}


def _run_variant(variant: str, args, attempts: int = 3) -> float:
    """One run of ``variant`` in fresh processes; a crashed run (seen with the plain-PyTorch baseline:
    'malloc(): unaligned tcache chunk detected', SIGABRT/SIGSEGV) is counted and run again."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "r.json")
        cmd = [
            sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--pooling-factor", str(args.pooling_factor), "--result", result,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
        for _ in range(attempts):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode == 0:
                with open(result) as f:
                    return json.load(f)["samples_per_sec"]
            CRASHES[variant] = CRASHES.get(variant, 0) + 1
        raise RuntimeError(f"variant {variant} failed {attempts} times:\n{proc.stderr[-4000:]}")


def main() -> None:
    pipelines = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pipelines.add_argument("--pipelines", action="store_true")
    chosen, rest = pipelines.parse_known_args()
    if chosen.pipelines:
        from throughput_pipelines import main as pipelines_main

        return pipelines_main(rest)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps per rank (the first 5 are warm-up)")
    parser.add_argument("--batch-size", type=int, default=2048, help="samples per rank per step")
    parser.add_argument(
        "--pooling-factor", type=int, default=1, help="ids per feature per sample (1 = one-hot, Criteo-like)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved; the best is kept")
    parser.add_argument(
        "--pipelines",
        action="store_true",
        help="run the pipeline comparisons of issue 14 instead (options: --pipelines --help)",
    )
    parser.add_argument("--variant", choices=["lightning", "torchrec", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant == "lightning":
        return run_lightning(args)
    if args.variant in ("torchrec", "torch"):
        target = run_torchrec if args.variant == "torchrec" else run_torch
        return torch.multiprocessing.spawn(target, args=(free_port(), args), nprocs=2)

    names = {
        "lightning": "(a) Lightning + SparseStrategy",
        "torchrec": "(b) TorchRec DMP loop",
        "torch": "(c) PyTorch EmbeddingBag(sparse) + DDP",
    }
    best = {name: 0.0 for name in names}
    for _ in range(args.repeats):
        for variant in names:
            best[variant] = max(best[variant], _run_variant(variant, args))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 2 gloo processes on CPU")
    print(
        f"model: DLRM, {len(TABLE_SIZES)} tables ({sum(TABLE_SIZES):,} rows x {EMBEDDING_DIM}), pooling factor {args.pooling_factor}, "
        f"batch {args.batch_size}/rank, {args.steps} steps, best of {args.repeats}"
    )
    print()
    print("| variant | samples/s |")
    print("|---|---:|")
    for variant, name in names.items():
        print(f"| {name} | {best[variant]:,.0f} |")
    print()
    ab = best["lightning"] / best["torchrec"]
    ac = best["lightning"] / best["torch"]
    for variant, count in CRASHES.items():
        print(f"note: {names[variant]} crashed {count} time(s) and was run again")
    print(f"(a)/(b) = {ab:.3f}   goal >= 0.95   {'met' if ab >= 0.95 else 'NOT met'}")
    print(f"(a)/(c) = {ac:.2f}    goal >= 3.0    {'met' if ac >= 3.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
