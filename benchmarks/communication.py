"""Bytes per training step of each sharding type, measured, against their closed-form counts; DES (row-wise
partial sums) against a parameter-server exchange; step time of row_wise vs table_wise for a table over budget.

Everything runs on 2 CPU processes (gloo) through ``SparseStrategy(count_communication=True)``: one table
``t`` of ``--rows`` x ``--dim`` (feature ``f``), a head ``Linear(dim, 1)`` under DDP, ``--batch`` samples per
rank, every bag holding ``pooling`` uniformly drawn ids, row-wise Adagrad. Bytes are what leave a rank
(a chunk a rank keeps is not traffic), summed over both ranks, per step. Closed forms per step, with
W = 2, B samples per rank, L ids per bag, D = dim, N = rows, P = D + 1 dense parameters, int64 ids and
lengths, float32 values (all sums over both ranks):

    every sharded type   KJT all-to-all split counts: 3 int64 per destination        48 = 2 * 3 * 8
    dense (DDP)          all-reduce of the head's gradient, 2 (W - 1) / W of it      8 P
    table_wise           the non-owner's lengths and ids to the owner                8 B (1 + L)
                         pooled rows to the non-owner, its gradients back            2 * 4 B D
    column_wise          per column shard of width d on rank h: the other rank's
                         lengths and ids to h, d-wide pooled rows and gradients      sum 8 B (1 + L) + 8 B d
    row_wise (DES)       each rank's lengths to the other, ids in the other's block  16 B + 8 X
                         reduce-scatter of partial sums, all-gather of gradients     2 * 2 * 4 B D
    data_parallel        DDP all-reduce of the table's dense gradient                8 N D
                         union of the rows read (all-reduce of an int32 mask)        8 N

X: ids of one rank's batch that fall in the other rank's row block (counted from the batches). The
parameter-server contender (rows split in the same blocks) is run with real collectives: per step each rank
sends the owners its unique ids (after a count exchange), gets their rows back and pushes the rows'
gradients, i.e. 2 * 8 + 8 U + 2 * 4 D U over both ranks for U unique ids that live on the other rank.

Run: ``python benchmarks/communication.py`` (add ``--quick`` for a short check).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse import SparseOptimizerConfig, SparseStrategy, TableConfig
from lightning_sparse.distributed.comm import CommunicationCounter
from lightning_sparse.distributed.comm_hint import sharding_hint

W = 2
SHARDINGS = ("data_parallel", "table_wise", "column_wise", "row_wise")


class OneTable(pl.LightningModule):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        config = EmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"])
        self.ebc = EmbeddingBagCollection(tables=[config], device=torch.device("cpu"))
        self.head = torch.nn.Linear(dim, 1)
        self.step_seconds: list[float] = []

    def training_step(self, batch, batch_idx):
        kjt, target = batch
        return torch.nn.functional.mse_loss(self.head(self.ebc(kjt)["f"]).squeeze(-1), target)

    def on_train_batch_start(self, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.step_seconds.append(time.perf_counter() - self._t0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def batch_at(index: int, rows: int, batch: int, pooling: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * pooling + index)
    ids = torch.randint(0, rows, (batch * pooling,), generator=g)
    lengths = torch.full((batch,), pooling, dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths), torch.randn(batch, generator=g)


class Batches(Dataset):
    def __init__(self, n: int, rows: int, batch: int, pooling: int) -> None:
        self.n, self.args = n, (rows, batch, pooling)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return batch_at(index, *self.args)


class Data(pl.LightningDataModule):
    def __init__(self, steps: int, rows: int, batch: int, pooling: int) -> None:
        super().__init__()
        self.dataset = Batches(steps * W, rows, batch, pooling)

    def train_dataloader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=W, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=None, sampler=sampler)


def fit(sharding: str, rows: int, dim: int, batch: int, pooling: int, steps: int, count: bool = True) -> dict:
    """Trains ``steps`` steps; returns (on every rank) the plan's shards and the bytes per step summed over ranks."""
    torch.manual_seed(0)
    model = OneTable(rows, dim)
    strategy = SparseStrategy(
        tables={"t": TableConfig(sharding=sharding)},
        optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.05),
        count_communication=count,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=W, strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, Data(steps, rows, batch, pooling))
    spec = next(p["t"] for p in strategy.distributed_model.plan.plan.values() if "t" in p).sharding_spec
    shards = [(s.placement.rank(), s.shard_sizes[1]) for s in spec.shards] if spec is not None else []
    out = {"shards": shards, "step_seconds": model.step_seconds}
    release = [model, trainer]
    if count:
        per_rank: list = [None] * W
        dist.all_gather_object(per_rank, strategy.communication_report().by_kind())
        out["sent"] = sum(sent for part in per_rank for sent, _ in part.values())
        out["received"] = sum(received for part in per_rank for _, received in part.values())
        stats: list = [None] * W
        dist.all_gather_object(stats, strategy.communication_report().batch_stats)
        splits = 0 if sharding == "data_parallel" else 48  # what the hint leaves out: split counts, dense layers
        out["hint"] = sharding_hint(stats, {"t": (rows, dim)})["t"][sharding] + splits + 8 * (dim + 1)
    del release, model, trainer, strategy
    gc.collect()  # this run's model (reference cycles through the trainer) before the next one builds its table
    return out


def planner_under_budget(rows: int, dim: int, batch: int, budget_mib: int) -> dict:
    """Whether TorchRec's planner places a ``rows`` x ``dim`` table (row-wise Adagrad) on 2 ranks of ``budget_mib``
    each, per sharding type, and what ``sharding: auto`` picks there from the pooling-8 batches each rank would
    read first (4 per rank, ``distributed/auto_sharding.py``). Trial plans only, on a meta-device table."""
    from torchrec.distributed.planner import Topology

    from lightning_sparse.config import ShardingType
    from lightning_sparse.distributed.auto_sharding import choose_sharding, plan_fits
    from lightning_sparse.distributed.comm_hint import BatchStats
    from lightning_sparse.distributed.planning import planner_constraints, sharders
    from lightning_sparse.distributed.routes import resolve_tables

    config = EmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"])
    model = torch.nn.ModuleDict({"ebc": EmbeddingBagCollection(tables=[config], device=torch.device("meta"))})
    tables = resolve_tables(model, "cpu", ShardingType.AUTO, SparseOptimizerConfig(kind="rowwise_adagrad"), None)
    topology = Topology(world_size=W, compute_device="cpu", ddr_cap=budget_mib * 2**20)
    constraints = planner_constraints(tables, "cpu")
    fits = {
        t: plan_fits(model, tables, {"t": ShardingType(t)}, constraints, topology, sharders(), "cpu") for t in SHARDINGS
    }
    stats = [BatchStats() for _ in range(W)]
    for rank, rank_stats in enumerate(stats):  # the DistributedSampler (no shuffle) gives rank r batches r, r + W, ...
        for index in range(rank, 4 * W, W):
            rank_stats.add(batch_at(index, rows, batch, 8)[0], {"f": "t"}, {"t": rows}, rank, W)
            rank_stats.steps += 1
    decision = choose_sharding(model, tables, ["t"], stats, 4, constraints, topology, sharders(), None, "cpu")
    return {"fits": fits, "auto": decision.choice["t"].value, "memory_bound": decision.memory_bound == ["t"],
            "auto_bytes": decision.bytes["t"]}  # fmt: skip


def closed_form(sharding: str, shards: list, rows: int, dim: int, batch: int, pooling: int, steps: int) -> float:
    """Bytes per step over both ranks (see the module docstring), from the batches themselves."""
    B, L, D, P = batch, pooling, dim, dim + 1
    dense = 8 * P
    if sharding == "data_parallel":
        return 8 * rows * D + 8 * rows + dense
    if sharding == "table_wise":
        return 48 + 8 * B * (1 + L) + 8 * B * D + dense
    if sharding == "column_wise":
        return 48 + sum(8 * B * (1 + L) + 8 * B * d for _, d in shards) + dense
    block = (rows + W - 1) // W
    crossing = 0
    for step in range(steps):
        for rank in range(W):
            ids = batch_at(step * W + rank, rows, batch, pooling)[0].values()
            crossing += int(((ids // block) != rank).sum())
    return 48 + 16 * B + 8 * crossing / steps + 16 * B * D + dense


def parameter_server(rows: int, dim: int, batch: int, pooling: int, steps: int) -> float:
    """Pull the batch's unique rows from their owners, push their gradients back: bytes per step, both ranks."""
    rank, block = dist.get_rank(), (rows + W - 1) // W
    shard = torch.randn(min(block, rows - rank * block), dim)
    counter = CommunicationCounter()
    counter.install()
    try:
        for step in range(steps):
            counter.start_step()
            ids = torch.unique(batch_at(step * W + rank, rows, batch, pooling)[0].values())
            owner = ids // block
            send_counts = torch.bincount(owner, minlength=W)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts)
            send, recv = send_counts.tolist(), recv_counts.tolist()
            wanted = torch.empty(sum(recv), dtype=torch.int64)
            dist.all_to_all_single(wanted, ids, recv, send)  # ids sorted by value: grouped by owner already
            pulled = torch.empty(ids.numel(), dim)
            dist.all_to_all_single(pulled, shard[wanted - rank * block], send, recv)
            grads = pulled * 0.01  # stands for the rows' gradients of this step
            pushed = torch.empty(sum(recv), dim)
            dist.all_to_all_single(pushed, grads, recv, send)
            shard.index_add_(0, wanted - rank * block, pushed, alpha=-0.05)
            counter.end_step()
    finally:
        counter.uninstall()
    mine = sum(t.sent for t in counter.total.values()) / steps
    gathered: list = [None] * W
    dist.all_gather_object(gathered, mine)
    return sum(gathered)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument(
        "--dim", type=int, default=256, help="256: TorchRec's planner splits column_wise in 128-wide shards"
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--big-rows", type=int, default=2_000_000, help="rows of the over-budget table (dim 64)")
    parser.add_argument("--budget-mib", type=int, default=384, help="memory per rank (TorchRec's planner's ddr_cap)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--timing-only", action="store_true", help="only the step times")
    parser.add_argument(
        "--repeats", type=int, default=3, help="step-time runs per setup, interleaved; the median is shown"
    )
    args = parser.parse_args()
    steps = 2 if args.quick else 4
    rows, dim, batch = args.rows, args.dim, args.batch
    poolings = (1, 8, 20)
    out: dict = {"bytes": [], "des_vs_ps": [], "step_time": {}}
    for pooling in () if args.timing_only else poolings:
        for sharding in SHARDINGS:
            got = fit(sharding, rows, dim, batch, pooling, steps)
            expected = closed_form(sharding, got["shards"], rows, dim, batch, pooling, steps)
            out["bytes"].append({"pooling": pooling, "sharding": sharding, "measured": got["sent"], "received": got["received"],
                                 "closed_form": expected, "shards": got["shards"], "hint": got["hint"]})  # fmt: skip
    for pooling in () if args.timing_only else (1, 2, 3, 4, 8, 20):
        des = next((r for r in out["bytes"] if r["pooling"] == pooling and r["sharding"] == "row_wise"), None)
        des_sent = des["measured"] if des else fit("row_wise", rows, dim, batch, pooling, steps)["sent"]
        dense = 8 * (dim + 1)  # the head's all-reduce: the same for both, left out
        ps = parameter_server(rows, dim, batch, pooling, steps)
        out["des_vs_ps"].append({"pooling": pooling, "des": des_sent - dense, "ps": ps})
    big_mib = args.big_rows * 64 * 4 / 2**20
    time_steps = 3 if args.quick else 8
    runs = {"big table_wise": ("table_wise", args.big_rows, 64, False), "big row_wise": ("row_wise", args.big_rows, 64, False),
            "big row_wise, counted": ("row_wise", args.big_rows, 64, True), "small row_wise": ("row_wise", rows, dim, False),
            "small row_wise, counted": ("row_wise", rows, dim, True)}  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in runs}
    fastest: dict[str, float] = {name: float("inf") for name in runs}
    for _ in range(args.repeats):  # interleaved, so that load from other jobs spreads over every setup
        for name, (sharding, n, d, count) in runs.items():
            seconds = fit(sharding, n, d, batch, 8, time_steps, count=count)["step_seconds"][
                1:
            ]  # step 1 builds input dists
            gathered: list = [None] * W
            dist.all_gather_object(gathered, (sum(seconds) / len(seconds), min(seconds)))
            samples[name].append(max(mean for mean, _ in gathered))
            fastest[name] = min(fastest[name], max(low for _, low in gathered))
    out["step_time"] = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    out["fastest_step"] = fastest  # the least disturbed step: the slower rank's fastest, over all runs
    out["big_table_mib"], out["budget_mib"] = big_mib, args.budget_mib
    out["planner"] = planner_under_budget(args.big_rows, 64, batch, args.budget_mib)
    if dist.get_rank() == 0:
        report(out, rows, dim, batch, steps)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def report(out: dict, rows: int, dim: int, batch: int, steps: int) -> None:
    if out["bytes"]:
        report_bytes(out, rows, dim, batch, steps)
    report_time(out, rows, dim)


def report_bytes(out: dict, rows: int, dim: int, batch: int, steps: int) -> None:
    print(
        f"\none table {rows:,} x {dim}, {batch} samples per rank, 2 gloo processes, {steps} steps, bytes per step (both ranks)"
    )
    print(
        f"{'pooling':>8} {'sharding':<14}{'measured':>14}{'closed form':>14}{'diff %':>9}{'recv = sent':>12}{'hint':>14}"
    )
    for r in out["bytes"]:
        diff = 100 * (r["measured"] - r["closed_form"]) / r["closed_form"]
        print(f"{r['pooling']:>8} {r['sharding']:<14}{r['measured']:>14,.0f}{r['closed_form']:>14,.0f}{diff:>9.3f}"
              f"{str(r['received'] == r['measured']):>12}{r['hint']:>14,.0f}")  # fmt: skip
    print(
        "\nDES (row_wise: ids in, partial pooled sums out, their gradients back) vs parameter server (pull unique rows, push row gradients)"
    )
    print(f"{'pooling':>8}{'DES bytes':>14}{'PS bytes':>14}{'DES fewer %':>13}")
    crossover = None
    for r in out["des_vs_ps"]:
        fewer = 100 * (1 - r["des"] / r["ps"])
        if crossover is None and r["des"] < r["ps"]:
            crossover = r["pooling"]
        print(f"{r['pooling']:>8}{r['des']:>14,.0f}{r['ps']:>14,.0f}{fewer:>13.1f}")
    print(f"crossover: DES sends fewer bytes from pooling {crossover} on (of those measured)")


def report_time(out: dict, rows: int, dim: int) -> None:
    t = out["step_time"]
    print(f"\ntable of {out['big_table_mib']:.0f} MiB (float32 weights) under a budget of {out['budget_mib']} MiB per rank: "
          f"table_wise puts it whole on one rank (over budget), row_wise {out['big_table_mib'] / 2:.0f} MiB on each; "
          f"pooling 8; small: the {rows:,} x {dim} table")  # fmt: skip
    plans = out["planner"]
    print(
        f"TorchRec's planner, {W} ranks of {out['budget_mib']} MiB (it keeps 15% in reserve), the big table with row-wise "
        f"Adagrad state: " + ", ".join(f"{t} {'fits' if ok else 'no plan'}" for t, ok in plans["fits"].items())
    )
    bytes_per_type = ", ".join(f"{t} {b:,.0f}" for t, b in plans["auto_bytes"].items())
    print(
        f"sharding auto there, from 4 batches per rank at pooling 8: {plans['auto']}"
        f"{' (cheapest that fits)' if plans['memory_bound'] else ''}; bytes/step {bytes_per_type}"
    )
    f = out["fastest_step"]
    print(f"{'':<26}{'s/step':>10}{'fastest':>10}")
    for name, seconds in t.items():
        print(f"{name:<26}{seconds:>10.4f}{f[name]:>10.4f}")
    print(
        f"row_wise / table_wise step time (big table): {t['big row_wise'] / t['big table_wise']:.2f} "
        f"(fastest steps: {f['big row_wise'] / f['big table_wise']:.2f})"
    )
    print(
        f"counting on / off: big table {t['big row_wise, counted'] / t['big row_wise']:.2f}, "
        f"small table {t['small row_wise, counted'] / t['small row_wise']:.2f}"
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
