"""The look-forward cache (issue 16) side by side with the caches a user would pick instead, in one run.

1. **Hit rate and rows moved.** Two id streams over a table of ``--rows`` rows, ``--ids`` ids a batch:
   Zipf(1.05) (popularity fixed; ranks spread over the rows by a fixed permutation) and a drifting Zipf (the
   same, shifted by ``--drift`` rows a batch, so the popular rows keep changing). Scratchpads of 5, 10 and 25%
   of the rows; look-ahead k = 1, 2, 4. Each contender is fed the same batches and trains every row it reads
   (so an evicted trained row is written back):
   - ours: :class:`~lightning_sparse.cache.scratchpad.CachedTable`'s planner, with the strategy's schedule
     (batch t + k planned before step t); hit rate at lookup = the step's distinct rows copied in before the step;
   - LRU: a cache of the same slots that loads a batch's misses at its lookup;
   - one-batch-ahead prefetch: LRU that loads batch t + 1 during step t with the rows of t and t + 1 locked
     (the semantics of fbgemm's ``prefetch_pipeline``).
   Rows moved = rows copied in + rows written back, per step, after ``--warm`` warm-up steps.
2. **CPU throughput** of training steps on a table 4x larger than its scratchpad, its rows in a memory-mapped
   file (``CacheConfig.backing: mmap``), against the same table fully in RAM. A step: embedding bags of the
   batch (``F.embedding_bag``), an MLP forward and backward on them, then the rows' rowwise_adagrad update
   (our native kernel); the cached step also plans k = 2 batches ahead and copies on the side thread.
   Round-robin passes, median of the per-pass throughputs, each timed after ``WARM_STEPS`` steps (the first
   step waits for its own rows; a checkpoint's write-back of the dirty slots is not timed).

Run: ``.venv/bin/python benchmarks/lookahead_cache.py`` (about 4 minutes on 2 cores). No GPU was used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from lightning_sparse.cache import WorkingSetTooLarge, mmap_store
from lightning_sparse.cache.reference import lru_moves
from lightning_sparse.cache.scratchpad import CachedTable
from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.optim import init_state_for, sparse_update_for


WARM_STEPS = 4


def stream(kind: str, steps: int, rows: int, ids: int, drift: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.05
    spread = torch.randperm(rows, generator=g)
    shift = drift if kind == "drifting" else 0
    return [spread[(torch.multinomial(popularity, ids, replacement=True, generator=g) + shift * t) % rows] for t in range(steps)]


def ours(batches: list[torch.Tensor], rows: int, slots: int, k: int, warm: int) -> tuple[float, float]:
    """(hit rate at lookup, rows moved per step) after warm-up; raises WorkingSetTooLarge if the window does not fit."""
    table = CachedTable("bench", rows, slots, None, None)
    hits = lookups = moved = 0
    for t, ids in enumerate(batches):
        table.planner.retire(t - 1)
        loaded_now = 0
        for seq in range(0 if t == 0 else t + k, min(t + k, len(batches) - 1) + 1):
            moves = table.plan(seq, batches[seq])
            if seq == t:
                loaded_now = int(moves.load_rows.numel())
        table.mark_trained(ids)
        counters = table.take_counters()
        if t >= warm:
            distinct = int(torch.unique(ids).numel())
            hits, lookups = hits + distinct - loaded_now, lookups + distinct
            moved += counters["rows_in"] + counters["rows_back"]
    return hits / lookups, moved / (len(batches) - warm)


def lru(batches: list[list[int]], slots: int, ahead: int, warm: int) -> tuple[float, float]:
    misses: list[int] = []
    moves = lru_moves(batches, slots, ahead=ahead, misses=misses)
    distinct = sum(len(set(b)) for b in batches[warm:])
    return 1.0 - sum(misses[warm:]) / distinct, sum(moves[warm:]) / (len(batches) - warm)


def moves_table(args: argparse.Namespace) -> None:
    print(f"## rows moved per step: {args.rows} rows, {args.ids} ids a batch, {args.steps} steps ({args.warm} warm-up "
          f"not counted), drift {args.drift} rows/batch\n")
    print("| stream | C | LRU hit% | LRU moved | prefetch-1 hit% | prefetch-1 moved | ours k=1 hit% | k=1 moved | k=2 hit% | "
          "k=2 moved | k=4 hit% | k=4 moved | ours k=2 / LRU | ours k=2 / prefetch-1 |")
    print("|---|---:|" + "---:|" * 12)
    for kind in ("zipf", "drifting"):
        batches = stream(kind, args.steps, args.rows, args.ids, args.drift)
        plain = [b.tolist() for b in batches]
        for fraction in (0.05, 0.10, 0.25):
            slots = int(args.rows * fraction)
            lru_hit, lru_moved = lru(plain, slots, 0, args.warm)
            pre_hit, pre_moved = lru(plain, slots, 1, args.warm)
            cells, ours_k2 = [], None
            for k in (1, 2, 4):
                try:
                    hit, moved = ours(batches, args.rows, slots, k, args.warm)
                    cells += [f"{100 * hit:.1f}", f"{moved:.0f}"]
                    ours_k2 = moved if k == 2 else ours_k2
                except WorkingSetTooLarge:
                    cells += ["window does not fit", "-"]
            ratios = [f"{ours_k2 / lru_moved:.2f}x", f"{ours_k2 / pre_moved:.2f}x"] if ours_k2 else ["-", "-"]
            print(f"| {kind} | {fraction:.0%} | {100 * lru_hit:.1f} | {lru_moved:.0f} | {100 * pre_hit:.1f} | {pre_moved:.0f} | "
                  + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


class Step:
    """One training step on a table: bags of the batch, an MLP forward/backward, the rows' update."""

    def __init__(self, dim: int, bag: int) -> None:
        torch.manual_seed(0)
        self.bag = bag
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 1))
        self.config = SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.01)

    def __call__(self, weight: torch.Tensor, state: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
        leaf = weight.detach().requires_grad_(False)
        offsets = torch.arange(0, ids.numel(), self.bag)
        pooled = F.embedding_bag(ids, leaf, offsets, mode="sum").requires_grad_(True)
        loss = self.mlp(pooled).square().mean()
        loss.backward()
        grads = pooled.grad.repeat_interleave(self.bag, dim=0)  # d loss / d row, one per occurrence (sum pooling)
        sparse_update_for(self.config, weight, state, ids, grads)


def throughput(args: argparse.Namespace) -> None:
    rows, dim, slots, k = args.big_rows, args.dim, args.big_rows // 4, 2
    batches = stream("zipf", args.big_steps, rows, args.big_ids, 0, seed=1)
    step = Step(dim, bag=16)
    torch.manual_seed(1)
    full = torch.randn(rows, dim) * 0.01
    full_state = init_state_for(step.config, full)
    folder = tempfile.mkdtemp(prefix="lookahead_bench_")
    scratch = {"weight": torch.zeros(slots, dim), "sum": torch.zeros(slots)}
    scratch_state = {"sum": scratch["sum"]}
    store = mmap_store({"weight": (rows, dim), "sum": (rows,)}, folder, "big")
    store.tensors["weight"].copy_(full)
    store.flush()

    def run_full() -> float:
        for t, ids in enumerate(batches):
            if t == WARM_STEPS:
                start = time.perf_counter()
            step(full, full_state, ids)
        return (len(batches) - WARM_STEPS) / (time.perf_counter() - start)

    def run_cached() -> float:
        table = CachedTable("big", rows, slots, scratch, store)
        for t, ids in enumerate(batches):
            if t == WARM_STEPS:
                start = time.perf_counter()
            table.wait()
            table.planner.retire(t - 1)
            for seq in range(0 if t == 0 else t + k, min(t + k, len(batches) - 1) + 1):
                table.plan(seq, batches[seq])
            if t == 0:
                table.wait()
            table.mark_trained(ids)
            step(scratch["weight"], scratch_state, table.lookup(ids))
        table.wait()
        rate = (len(batches) - WARM_STEPS) / (time.perf_counter() - start)
        table.flush()  # what a checkpoint would write: not a training step's cost
        table.close()
        return rate

    full_rates, cached_rates = [], []
    for _ in range(args.passes):
        full_rates.append(run_full())
        cached_rates.append(run_cached())
    f, c = statistics.median(full_rates), statistics.median(cached_rates)
    gib = rows * dim * 4 / 2**30
    print(f"\n## CPU throughput: table {rows} x {dim} ({gib:.2f} GiB weights), scratchpad {slots} rows (1/4), k = {k}, "
          f"batch {args.big_ids} ids (Zipf 1.05, bags of 16), rowwise_adagrad, {torch.get_num_threads()} thread(s), "
          f"{args.passes} round-robin passes of {len(batches)} steps, the first {WARM_STEPS} not timed\n")
    print("| table | steps/s (median) | all passes | vs in RAM |")
    print("|---|---:|---|---:|")
    print(f"| fully in RAM | {f:.1f} | {', '.join(f'{r:.1f}' for r in full_rates)} | 1.00x |")
    print(f"| cached: 1/4 in a scratchpad, rows in a memory-mapped file | {c:.1f} | {', '.join(f'{r:.1f}' for r in cached_rates)} | {c / f:.2f}x |")
    store.close()
    os.rmdir(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ids", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--drift", type=int, default=37)
    parser.add_argument("--big-rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--big-ids", type=int, default=32_768)
    parser.add_argument("--big-steps", type=int, default=40)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-moves", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_moves:
        moves_table(args)
    throughput(args)


if __name__ == "__main__":
    main()
