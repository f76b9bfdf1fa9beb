"""Remap throughput (ids/s) of dynamic-table id remapping: our native kernel vs TorchRec vs a dict.

Contenders, all fed the same drifting Zipf stream (popular ids move every step, so tables churn):
  native       DynamicIdRemapper.remap, cuda_ops/hash_table.cpp (admission, stamps, eviction when full)
  fallback     the same policy in pure PyTorch (lightning_sparse/dynamic/reference.py)
  torchrec     torchrec.modules.mc_modules.MCHManagedCollisionModule in training mode (profile + remap,
               eviction_interval=1 so it also admits/evicts every batch), with LFU_EvictionPolicy and
               DistanceLFU_EvictionPolicy
  python dict  a per-id Python loop over a dict: count, admit while free slots remain, no eviction
               (a lower bound on any pure-Python policy)
Each is timed over the same steps after a warm-up that fills the table; reported as the median of
three interleaved repeats, in wall-clock ids/s and in ids per CPU-second of the process (the latter is
robust to other jobs on a shared machine; with threads > 1 it also counts the pool's spinning).
Threads: torch.set_num_threads(T) for every contender.

    python benchmarks/dynamic_remap.py [--capacity 131072] [--batch 65536] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torchrec.modules.mc_modules import DistanceLFU_EvictionPolicy, LFU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig, EvictionPolicy
from lightning_sparse.ops import native_op

#: id universe (x capacity) and drift of the popular ids per batch (/ capacity) of each scenario
SCENARIOS = {
    "steady": (1.25, 1 / 1024),  # most traffic hits the table: a well-sized table in production
    "churn": (4.0, 1 / 64),  # a third of the ids miss and are admitted by evicting others every batch
}


def drifting_batches(n_batches: int, batch: int, universe: int, drift: int, seed: int = 0) -> list[torch.Tensor]:
    """Zipf-like ids (rank ~ universe * u**3) whose popular ranks shift by ``drift`` per batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        rank = (universe * torch.rand(batch, generator=g, dtype=torch.float64) ** 3).to(torch.int64)
        out.append((rank + b * drift) * 2_654_435_761 % (1 << 62))  # non-negative, scattered
    return out


class Ours:
    def __init__(self, capacity: int, policy: EvictionPolicy, native: bool) -> None:
        self.native = native
        self.table = DynamicIdRemapper(DynamicTableConfig(capacity=capacity, eviction=policy))
        self.step = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        os.environ["LIGHTNING_SPARSE_NATIVE"] = "1" if self.native else "0"
        self.step += 1
        return self.table.remap(ids, self.step, 0.0).slots


class TorchRecMCH:
    def __init__(self, capacity: int, policy) -> None:
        self.module = MCHManagedCollisionModule(
            zch_size=capacity, device=torch.device("cpu"), eviction_policy=policy, eviction_interval=1
        )
        self.module.train()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        feature = JaggedTensor(values=ids, lengths=torch.ones_like(ids, dtype=torch.int32))
        return self.module({"f": feature})["f"].values()


class PythonDict:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.slot_of, self.count = capacity, {}, {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        slot_of, count, out = self.slot_of, self.count, []
        for raw in ids.tolist():
            slot = slot_of.get(raw)
            if slot is None and len(slot_of) < self.capacity:
                slot = slot_of[raw] = len(slot_of)
            if slot is not None:
                count[raw] = count.get(raw, 0) + 1
            out.append(-1 if slot is None else slot)
        return torch.tensor(out)


def hit_rate_of(make, batches: list[torch.Tensor], warmup: int) -> float:
    remap = make()
    for ids in batches[:warmup]:
        remap(ids)
    before = remap.table.metrics()
    for ids in batches[warmup:]:
        remap(ids)
    after = remap.table.metrics()
    return (after["hits"] - before["hits"]) / max(1, after["lookups"] - before["lookups"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=1 << 17)
    parser.add_argument("--batch", type=int, default=1 << 16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=["steady", "churn"], choices=sorted(SCENARIOS))
    args = parser.parse_args()
    if native_op("hash_remap") is None:
        raise SystemExit("native extension not built: python setup.py build_ext --inplace")

    makers = {
        "native (lfu)": lambda: Ours(args.capacity, EvictionPolicy.LFU, True),
        "native (feature_score)": lambda: Ours(args.capacity, EvictionPolicy.FEATURE_SCORE, True),
        "fallback (lfu)": lambda: Ours(args.capacity, EvictionPolicy.LFU, False),
        "torchrec MCH (LFU)": lambda: TorchRecMCH(args.capacity, LFU_EvictionPolicy()),
        "torchrec MCH (DistanceLFU)": lambda: TorchRecMCH(args.capacity, DistanceLFU_EvictionPolicy()),
        "python dict": lambda: PythonDict(args.capacity),
    }
    print(
        f"# dynamic_remap: capacity={args.capacity} batch={args.batch} steps={args.steps} (after {args.warmup} warm-up)"
    )
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    for scenario in args.scenarios:
        universe, drift = SCENARIOS[scenario]
        batches = drifting_batches(
            args.warmup + args.steps, args.batch, int(universe * args.capacity), max(1, int(drift * args.capacity))
        )
        run_scenario(scenario, batches, makers, args)


def run_scenario(scenario: str, batches: list[torch.Tensor], makers: dict, args: argparse.Namespace) -> None:
    for threads in args.threads:
        torch.set_num_threads(threads)
        walls: dict[str, list[float]] = {name: [] for name in makers}
        cpus: dict[str, list[float]] = {name: [] for name in makers}
        for _ in range(args.repeats):
            for name, make in makers.items():
                remap = make()
                for ids in batches[: args.warmup]:
                    remap(ids)
                wall, cpu = time.perf_counter(), time.process_time()
                for ids in batches[args.warmup :]:
                    remap(ids)
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
        n_ids = args.steps * args.batch
        wall_rate = {name: n_ids / statistics.median(t) for name, t in walls.items()}
        cpu_rate = {name: n_ids / statistics.median(t) for name, t in cpus.items()}
        base = "torchrec MCH (LFU)"
        hit_rate = hit_rate_of(makers["native (lfu)"], batches, args.warmup)
        print(
            f"\nscenario={scenario} threads={threads} (native lfu hit rate after warm-up: {hit_rate:.0%}; "
            f"load average {os.getloadavg()[0]:.1f})"
        )
        print(
            f"| {'contender':<27} | {'ids/s (wall)':>13} | {'ids/CPU-s':>12} | {'vs MCH LFU, wall':>16} | {'vs MCH LFU, CPU':>15} |"
        )
        print(f"|{'-' * 29}|{'-' * 15}|{'-' * 14}|{'-' * 18}|{'-' * 17}|")
        for name in makers:
            print(
                f"| {name:<27} | {wall_rate[name]:>13,.0f} | {cpu_rate[name]:>12,.0f} | "
                f"{wall_rate[name] / wall_rate[base]:>15.1f}x | {cpu_rate[name] / cpu_rate[base]:>14.1f}x |"
            )


if __name__ == "__main__":
    main()
