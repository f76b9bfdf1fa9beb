"""The look-forward cache (issue 16) side by side with the caches a user would pick instead, in one run.

1. **Hit rate and rows moved.** Two id streams over a table of ``--rows`` rows, ``--ids`` ids a batch:
   Zipf(1.05) (popularity fixed; ranks spread over the rows by a fixed permutation) and a drifting Zipf (the
   same, shifted by ``--drift`` rows a batch, so the popular rows keep changing). Scratchpads of 5, 10 and 25%
   of the rows; look-ahead k = 1, 2, 4. Each contender is fed the same batches and trains every row it reads
   (so an evicted trained row is written back):
   - ours: :class:`~lightning_sparse.cache.scratchpad.CachedTable`'s planner, with the strategy's schedule
     (batch t + k planned before step t, the batches after it up to t + K as its ``ahead``; K = ``--horizon``,
     ``CacheConfig.horizon``'s default; a column with K = k shows the window alone); hit rate at lookup = the
     step's distinct rows copied in before the step;
   - LRU: a fully associative cache of the same slots that loads a batch's misses at its lookup;
   - fbgemm LRU: the same laid out as fbgemm's LRU cache (32-way sets, fbgemm's hash of the row picks the set,
     a miss that finds no free way in its set is read and updated in the backing store directly);
   - one-batch-ahead prefetch: LRU that loads batch t + 1 during step t with the rows of t and t + 1 locked
     (the semantics of fbgemm's ``prefetch_pipeline``).
   - Belady with the whole stream known: not a contender (nothing sees that far), the bound for the order of
     rows beyond the look-ahead window.
   Rows moved = rows copied in + rows written back, per step, after ``--warm`` warm-up steps, counted the
   same way for every contender: only a trained (dirty) row is written back, and each contender trains every
   row it holds (so fbgemm's unconditional write-back counts the same).
2. **CPU throughput** of training steps on a table 4x larger than the memory budget given to it, its rows in
   memory-mapped files (``CacheConfig.backing: mmap``), against the same table fully in RAM. The budget is
   enforced: the cached contender runs in a memory cgroup (``benchmarks/memory_budget.py``) limited to a
   quarter of the table's bytes (weight and optimizer state) for everything it allocates after joining it:
   scratchpad (``--slot-fraction``: 1/32 of the rows), planner, the page cache of the files. A third
   contender runs the same without the budget. A step: embedding bags of the batch (``F.embedding_bag``), an
   MLP forward and backward on them, then the rows' rowwise_adagrad update (our native kernel); the cached
   step also plans k = 2 batches ahead (victims chosen with K = ``--horizon`` batches' ids) and copies on the
   side thread. Each pass of each contender is a
   process of its own, with ``MALLOC_MMAP_THRESHOLD_=65536`` (without it glibc kept freed step buffers and
   the resident set grew until the budget's limit killed the process).
   Round-robin passes, median of the per-pass throughputs, each timed after ``WARM_STEPS`` steps (the first
   step waits for its own rows; a checkpoint's write-back of the dirty slots is not timed).

Run: ``.venv/bin/python benchmarks/lookahead_cache.py`` as root for the cgroup (about 12 minutes on 2 cores). No GPU
was used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import memory_budget  # benchmarks/, next to this script
import torch
import torch.nn.functional as F

from lightning_sparse.cache import WorkingSetTooLarge, mmap_store
from lightning_sparse.cache.reference import belady_moves, fbgemm_lru_moves, lru_moves, schedule
from lightning_sparse.cache.scratchpad import CachedTable
from lightning_sparse.config import DEFAULT_HORIZON, SparseOptimizerConfig
from lightning_sparse.optim import init_state_for, sparse_update_for

WARM_STEPS = 4


def stream(kind: str, steps: int, rows: int, ids: int, drift: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.05
    spread = torch.randperm(rows, generator=g)
    shift = drift if kind == "drifting" else 0
    return [
        spread[(torch.multinomial(popularity, ids, replacement=True, generator=g) + shift * t) % rows]
        for t in range(steps)
    ]


def ours(
    batches: list[torch.Tensor], rows: int, slots: int, k: int, warm: int, horizon: int = DEFAULT_HORIZON
) -> tuple[float, float]:
    """(hit rate at lookup, rows moved per step) after warm-up, copies ``k`` batches ahead and victims chosen with
    the ids of ``max(k, horizon)`` batches (CachedTables' schedule); raises WorkingSetTooLarge if the window does
    not fit."""
    table = CachedTable("bench", rows, slots, None, None)
    unique = [torch.unique(b) for b in batches]
    horizon = max(k, horizon)
    hits = lookups = moved = 0
    for t, plans in schedule(len(batches), k, horizon):
        ids = batches[t]
        table.planner.retire(t - 1)
        loaded_now = 0
        for seq, later in plans:
            moves = table.plan(seq, unique[seq], [(s, unique[s]) for s in later])
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


def fbgemm_lru(batches: list[list[int]], slots: int, warm: int) -> tuple[float, float]:
    misses: list[int] = []
    moves = fbgemm_lru_moves(batches, slots, misses=misses)
    distinct = sum(len(set(b)) for b in batches[warm:])
    return 1.0 - sum(misses[warm:]) / distinct, sum(moves[warm:]) / (len(batches) - warm)


def moves_table(args: argparse.Namespace) -> None:
    K = args.horizon
    print(
        f"## rows moved per step: {args.rows} rows, {args.ids} ids a batch, {args.steps} steps ({args.warm} warm-up "
        f"not counted), drift {args.drift} rows/batch; ours: copies k batches ahead, victims chosen with the ids of "
        f"K = {K} batches (CacheConfig.horizon), and, for comparison, with the window's only (K = k)\n"
    )
    print("Rows moved per step (rows copied in + dirty rows written back):\n")
    print(
        "| stream | C | LRU | fbgemm LRU (32-way sets) | prefetch-1 | ours k=1 | ours k=2 | ours k=4 | ours k=2, K=2 | "
        "k=1 / LRU | k=2 / LRU | k=4 / LRU | k=2, K=2 / LRU | k=2 / fbgemm LRU | k=2 / prefetch-1 | "
        "Belady, whole stream known | Belady / LRU |"
    )
    print("|---|---:|" + "---:|" * 15)
    hits = []
    for kind in ("zipf", "drifting"):
        batches = stream(kind, args.steps, args.rows, args.ids, args.drift)
        plain = [b.tolist() for b in batches]
        for fraction in (0.05, 0.10, 0.25):
            slots = int(args.rows * fraction)
            lru_hit, lru_moved = lru(plain, slots, 0, args.warm)
            fb_hit, fb_moved = fbgemm_lru(plain, slots, args.warm)
            pre_hit, pre_moved = lru(plain, slots, 1, args.warm)
            bound = sum(belady_moves(plain, slots)[args.warm :]) / (len(plain) - args.warm)
            moved, hit = {}, {}
            for key, k, horizon in ((1, 1, K), (2, 2, K), (4, 4, K), ("blind", 2, 2)):
                try:
                    hit[key], moved[key] = ours(batches, args.rows, slots, k, args.warm, horizon)
                except WorkingSetTooLarge:
                    pass
            cell = lambda k, moved=moved: f"{moved[k]:.0f}" if k in moved else "window does not fit"  # noqa: E731
            ratio = lambda k, base, moved=moved: f"{moved[k] / base:.2f}x" if k in moved else "-"  # noqa: E731
            print(
                f"| {kind} | {fraction:.0%} | {lru_moved:.0f} | {fb_moved:.0f} | {pre_moved:.0f} | {cell(1)} | {cell(2)} | "
                f"{cell(4)} | {cell('blind')} | {ratio(1, lru_moved)} | {ratio(2, lru_moved)} | {ratio(4, lru_moved)} | "
                f"{ratio('blind', lru_moved)} | {ratio(2, fb_moved)} | {ratio(2, pre_moved)} | {bound:.0f} | "
                f"{bound / lru_moved:.2f}x |",
                flush=True,
            )
            hits.append((kind, fraction, lru_hit, fb_hit, pre_hit, hit))
    print("\nHit rate at lookup (distinct rows of a step already in the cache when the step looks them up):\n")
    print("| stream | C | LRU | fbgemm LRU | prefetch-1 | ours k=1 | ours k=2 | ours k=4 |")
    print("|---|---:|" + "---:|" * 6)
    for kind, fraction, lru_hit, fb_hit, pre_hit, hit in hits:
        cells = " | ".join(f"{100 * hit[k]:.1f}" if k in hit else "window does not fit" for k in (1, 2, 4))
        print(f"| {kind} | {fraction:.0%} | {100 * lru_hit:.1f} | {100 * fb_hit:.1f} | {100 * pre_hit:.1f} | {cells} |")


class Step:
    """One training step on a table: bags of the batch, an MLP forward/backward, the rows' update."""

    def __init__(self, dim: int, bag: int) -> None:
        torch.manual_seed(0)
        self.bag = bag
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 1),
        )
        self.config = SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.01)

    def __call__(self, weight: torch.Tensor, state: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
        leaf = weight.detach().requires_grad_(False)
        offsets = torch.arange(0, ids.numel(), self.bag)
        pooled = F.embedding_bag(ids, leaf, offsets, mode="sum").requires_grad_(True)
        loss = self.mlp(pooled).square().mean()
        loss.backward()
        grads = pooled.grad.repeat_interleave(self.bag, dim=0)  # d loss / d row, one per occurrence (sum pooling)
        sparse_update_for(self.config, weight, state, ids, grads)


def fill_chunks(rows: int, dim: int, chunk: int = 1 << 13):
    """The table's initial rows in chunks (row range, values), the same in every process, never all at once."""
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk)
        yield start, end, torch.randn(end - start, dim, generator=torch.Generator().manual_seed(start)) * 0.01


def filled_store(rows: int, dim: int, slots: int, folder: str) -> tuple:
    """The big table's memory-mapped store (weight and rowwise_adagrad's sum) filled with its initial rows, and an
    empty scratchpad of ``slots`` rows."""
    store = mmap_store({"weight": (rows, dim), "sum": (rows,)}, folder, "big")
    for start, end, values in fill_chunks(rows, dim):
        store.tensors["weight"][start:end] = values
    store.flush()
    return store, {"weight": torch.zeros(slots, dim), "sum": torch.zeros(slots)}


def one_pass(args: argparse.Namespace) -> dict:
    """One timed pass of one contender, in a process of its own (``--one-pass ram|cached``): the cached one joins
    a cgroup limited to a quarter of the table's bytes before it allocates anything of the table."""
    rows, dim, k = args.big_rows, args.dim, 2
    slots = rows // args.slot_fraction
    batches = stream("zipf", args.big_steps, rows, args.big_ids, 0, seed=1)
    step = Step(dim, bag=16)
    table_bytes = rows * (dim + 1) * 4  # weight and rowwise_adagrad's sum
    out: dict = {"table_bytes": table_bytes, "slots": slots}
    if args.one_pass == "ram":
        full = torch.empty(rows, dim)
        for start, end, values in fill_chunks(rows, dim):
            full[start:end] = values
        state = init_state_for(step.config, full)
        for t, ids in enumerate(batches):
            if t == WARM_STEPS:
                begin = time.perf_counter()
            step(full, state, ids)
        out["rate"] = (len(batches) - WARM_STEPS) / (time.perf_counter() - begin)
        out["rss"] = memory_budget.rss()
        return out
    budget, why = memory_budget.join(args.cgroup) if args.one_pass == "cached" else (None, "not asked for")
    out["budget"] = table_bytes // 4
    if budget is not None:
        out["limit"] = budget.limit(table_bytes // 4) - budget.base
    else:
        out["no_cgroup"] = why
    folder = tempfile.mkdtemp(prefix="lookahead_bench_", dir=args.folder)
    store, scratch = filled_store(rows, dim, slots, folder)
    table = CachedTable("big", rows, slots, scratch, store)
    if budget is not None and budget.version == 1:
        (budget.folder / "memory.max_usage_in_bytes").write_text("0")
    unique: dict[int, torch.Tensor] = {}
    for t, plans in schedule(len(batches), k, args.horizon):
        ids = batches[t]
        if t == WARM_STEPS:
            begin = time.perf_counter()
            table.take_counters()
        table.wait()
        table.planner.retire(t - 1)
        for seq, later in plans:
            for s in later:  # each batch's rows once, when it is read (as CachedTables does)
                if s not in unique:
                    unique[s] = torch.unique(batches[s])
            table.plan(seq, batches[seq], [(s, unique[s]) for s in later])
        if t == 0:
            table.wait()
        table.mark_trained(ids)
        step(scratch["weight"], {"sum": scratch["sum"]}, table.lookup(ids))
    table.wait()
    out["rate"] = (len(batches) - WARM_STEPS) / (time.perf_counter() - begin)
    out["rss"] = memory_budget.rss()
    counters = table.take_counters()
    out["rows_in"] = counters["rows_in"] / (len(batches) - WARM_STEPS)  # per timed step
    out["rows_back"] = counters["rows_back"] / (len(batches) - WARM_STEPS)
    out["planner_bytes"] = table.planner.slot_of.nbytes + table.planner.score.nbytes
    out["scratch_bytes"] = sum(t.nbytes for t in scratch.values())
    if budget is not None:
        stat = budget.stat()
        out.update(
            peak=budget.peak() - budget.base,
            failcnt=int((budget.folder / "memory.failcnt").read_text()) if budget.version == 1 else -1,
            cache=stat.get("cache", stat.get("file", 0)),
            pgmajfault=stat.get("pgmajfault", 0),
        )
    table.close()
    store.close()
    os.rmdir(folder)
    return out


def throughput(args: argparse.Namespace) -> None:
    """Round-robin passes of the two contenders, each pass a fresh process (``one_pass``)."""
    import json
    import subprocess
    import sys

    flags = [
        f"--big-rows={args.big_rows}",
        f"--dim={args.dim}",
        f"--big-ids={args.big_ids}",
        f"--big-steps={args.big_steps}",
        f"--slot-fraction={args.slot_fraction}",
        f"--threads={args.threads}",
        f"--horizon={args.horizon}",
    ] + ([f"--folder={args.folder}"] if args.folder else [])
    results: dict[str, list[dict]] = {name: [] for name in args.contenders.split(",")}
    for _ in range(args.passes):
        for contender in results:
            cgroup = f"lookahead_bench_{os.getpid()}_{len(results[contender])}"
            # glibc's moving mmap threshold keeps freed step buffers in the heap, growing the resident set by MiBs
            # a step; a fixed threshold returns them (every contender runs with it)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(
                [sys.executable, __file__, "--one-pass", contender, f"--cgroup={cgroup}", *flags],
                capture_output=True,
                text=True,
                env=env,
            )
            memory_budget.remove(cgroup)
            if done.returncode == -9 and contender == "cached":  # the kernel's OOM killer: the budget is too small
                results[contender].append({"rate": 0.0, "killed": True, "budget": 0, "table_bytes": 0, "slots": 0})
                continue
            if done.returncode:
                raise RuntimeError(f"{contender} pass failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            results[contender].append(json.loads(done.stdout.strip().split("\n")[-1]))
    rates = {name: [r["rate"] for r in runs] for name, runs in results.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    f = median["ram"]
    first = next(
        (r for name in ("cached", "cached-unlimited") for r in results.get(name, []) if not r.get("killed")), None
    )
    if first is None and len(results) == 1:
        first = results["ram"][0]
    if first is None:
        print("\nEvery cached pass was killed at the memory limit: the budget cannot hold the planner and scratchpad.")
        return
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(
        f"\n## CPU throughput: table {args.big_rows} x {args.dim} + rowwise_adagrad sum = {mib(first['table_bytes'])}, "
        + (f"memory budget of the cached contender {mib(first['budget'])} (1/4), " if "cached" in results else "")
        + f"scratchpad {first['slots']} rows "
        f"(1/{args.slot_fraction} of the rows), k = 2, K = {args.horizon}, batch {args.big_ids} ids (Zipf 1.05, bags of 16), {args.threads} "
        f"thread(s), {args.passes} round-robin passes of {args.big_steps} steps (each a fresh process), the first "
        f"{WARM_STEPS} not timed\n"
    )
    if "cached" not in results:
        print("Only the contenders without a budget ran (--contenders).\n")
    elif "no_cgroup" in first:
        print(f"No cgroup could be used ({first['no_cgroup']}): the budget is not enforced; resident sets below.\n")
    else:
        print(
            f"The cached contender ran in a memory cgroup limited to its usage when it joined + {mib(first['limit'])}; "
            "page cache of the memory-mapped files counts against the limit.\n"
        )
    print("| table | steps/s (median) | all passes | vs in RAM | memory |")
    print("|---|---:|---|---:|---|")
    print(
        f"| fully in RAM | {f:.1f} | {', '.join(f'{r:.1f}' for r in rates['ram'])} | 1.00x | resident set {mib(results['ram'][0]['rss'])} |"
    )
    if "cached" in results:
        runs = results["cached"]
        memory = ", ".join(
            "killed by the OOM killer at the limit"
            if r.get("killed")
            else f"peak {mib(r['peak'])} (page cache at the end {mib(r['cache'])}, limit hits {r['failcnt']}, "
            f"major faults {r['pgmajfault']})"
            if "peak" in r
            else f"resident set {mib(r['rss'])}"
            for r in runs
        )
        print(
            f"| cached: memory-mapped rows, scratchpad, budget {mib(first['budget'])} | {median['cached']:.1f} | "
            f"{', '.join(f'{r:.1f}' for r in rates['cached'])} | {median['cached'] / f:.2f}x | {memory} |"
        )
    if "cached-unlimited" in results:
        print(
            f"| cached, no budget (the files stay in the page cache) | {median['cached-unlimited']:.1f} | "
            f"{', '.join(f'{r:.1f}' for r in rates['cached-unlimited'])} | {median['cached-unlimited'] / f:.2f}x | "
            f"resident set {mib(results['cached-unlimited'][0]['rss'])} |"
        )
    if "cached" in results and "peak" in first:
        io_bound(args, first, f)


def io_bound(args: argparse.Namespace, cached: dict, ram_rate: float) -> None:
    """The most steps/s the budgeted table can reach on this disk (``benchmarks/disk_iops.py``): each step copies
    ``rows_in`` rows in, and a row not in the page cache is a page read; the page cache holds at most what the
    budget leaves after the scratchpad and planner, so at least ``rows_in * (1 - that / table bytes)`` reads a
    step, at the disk's best rate, with nothing else (write-backs, compute) in the way."""
    import disk_iops  # benchmarks/, next to this script

    size = min(cached["table_bytes"], 1 << 30)
    rates = {n: disk_iops.random_read_iops(args.folder, size, n) for n in (1, 16, 64)}
    if not all(rates.values()):
        print("\nThe folder of the files refuses O_DIRECT (tmpfs?): no disk bound measured.")
        return
    best = max(rates.values())
    left = cached["budget"] - cached["scratch_bytes"] - cached["planner_bytes"]
    share = min(1.0, max(0, left) / cached["table_bytes"])
    reads = cached["rows_in"] * (1 - share)
    bound = min(ram_rate, best / reads) if reads else ram_rate
    print(
        f"\nThe disk's bound. Random 4 KiB reads without the page cache (O_DIRECT, disk_iops.py) from the files' "
        f"folder: {', '.join(f'{r:,.0f}/s with {n} in flight' for n, r in rates.items())}. The cached contender "
        f"copied {cached['rows_in']:,.0f} rows in and {cached['rows_back']:,.0f} back a step; its page cache can "
        f"hold at most {share:.0%} of the files (the budget less the scratchpad, "
        f"{cached['scratch_bytes'] / 2**20:.1f} MiB, and the planner, {cached['planner_bytes'] / 2**20:.1f} MiB), so a "
        f"step reads at least {reads:,.0f} pages: at {best:,.0f} reads/s, at most {bound:.1f} steps/s, "
        f"{bound / ram_rate:.2f}x the table in RAM, before any write-back."
    )


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The shape of the rows-moved streams, shared with ``planner_estimators.py`` so both measure the same batches."""
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ids", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--drift", type=int, default=37)
    parser.add_argument("--horizon", type=int, default=DEFAULT_HORIZON, help="K: batches of ids choosing victims")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_stream_arguments(parser)
    parser.add_argument("--big-rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--big-ids", type=int, default=32_768)
    parser.add_argument("--big-steps", type=int, default=40)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slot-fraction", type=int, default=32, help="scratchpad = rows / this")
    parser.add_argument("--folder", default=None, help="folder of the memory-mapped files (a disk, not tmpfs)")
    parser.add_argument(
        "--contenders", default="ram,cached,cached-unlimited", help="of the throughput table, 'ram' first"
    )
    parser.add_argument("--skip-moves", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--one-pass", choices=["ram", "cached", "cached-unlimited"], help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", default="lookahead_bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_pass:
        import json

        print(json.dumps(one_pass(args)))
        return
    if not args.skip_moves:
        moves_table(args)
    if not args.skip_throughput:
        throughput(args)


if __name__ == "__main__":
    main()
