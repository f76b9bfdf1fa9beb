"""A trial of another backing store for a table larger than its memory budget: sequential sweeps (issue 16).

``benchmarks/lookahead_cache.py`` measures the library's memory-mapped store at a quarter budget far below the
table in RAM, and bounds any store that reads a page per row copied in (the disk's random reads). This
script tries the design that escapes that bound, to see whether the goal (0.7x) is within reach here:

- write-backs go to memory (``pending``), not to the file;
- every ``S`` steps a sweep thread reads both files in order, in chunks of 32768 rows (``preadv``), writes
  the pending rows into each chunk and the chunk back (``pwritev``; ``fdatasync`` and
  ``POSIX_FADV_DONTNEED`` every 8 chunks keep the page cache small), and keeps the rows the batches
  ``[t + S, t + 2S)`` need that are not in the scratchpad (``staged``; the first sweep covers ``[0, 2S)``
  and is waited for);
- a row copied in is taken from the newest pending write-back, else from a staged generation (each cleared
  of rows a later sweep wrote), else read from the file directly (counted as ``direct``).

The planner is the library's (``LookaheadPlanner``, K = ``2S`` batches ahead), the step the same as in
``lookahead_cache.py``. It is a trial, not a library feature: values are not checked here (the library's
stores are, bit for bit). Run as root for the budget: ``python sweep_store_trial.py`` (S = 4, 8, 16, each with the budget
and without it, which says what the design costs in time alone; each run a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import memory_budget  # benchmarks/, next to this script
import numpy as np
import torch
from lookahead_cache import WARM_STEPS, Step, filled_store, stream
from torch import Tensor

from lightning_sparse.cache.lookahead import LookaheadPlanner
from lightning_sparse.cache.reference import schedule

CHUNK = 1 << 15  # rows a sweep reads and writes at once
Rows = tuple[Tensor, dict[str, Tensor]]  # rows ascending, their values per tensor name


class SweepStore:
    """The trial's copies (module docstring) over a memory-mapped store's files."""

    def __init__(self, store, scratch: dict[str, Tensor]) -> None:
        self.store, self.scratch, self.names = store, scratch, list(store.tensors)
        self.fds = {n: os.open(str(f), os.O_RDWR) for n, f in zip(self.names, store.files)}
        self.lock = threading.Lock()
        self.pending: list[Rows] = []
        self.staged: list[Rows] = []
        self.direct = self.loads = 0

    def copy(self, back_rows: Tensor, back_slots: Tensor, load_rows: Tensor, load_slots: Tensor) -> None:
        if back_rows.numel():
            order = torch.argsort(back_rows)
            values = {n: self.scratch[n].index_select(0, back_slots[order]) for n in self.names}
            with self.lock:
                self.pending.append((back_rows[order], values))
        if not load_rows.numel():
            return
        out = {n: torch.empty((load_rows.numel(), *self.scratch[n].shape[1:])) for n in self.names}
        found = torch.zeros(load_rows.numel(), dtype=torch.bool)
        with self.lock:
            sources = list(reversed(self.pending)) + list(reversed(self.staged))
        for rows, values in sources:
            if not rows.numel():
                continue
            at = torch.searchsorted(rows, load_rows).clamp(max=rows.numel() - 1)
            hit = (rows[at] == load_rows) & ~found
            for n in self.names:
                out[n][hit] = values[n][at[hit]]
            found |= hit
        miss = (~found).nonzero().squeeze(1)
        self.direct, self.loads = self.direct + miss.numel(), self.loads + load_rows.numel()
        if miss.numel():
            read = self.store.read(load_rows[miss])
            for n in self.names:
                out[n][miss] = read[n]
        for n in self.names:
            self.scratch[n].index_copy_(0, load_slots, out[n])

    def sweep(self, written: int, wanted: Tensor) -> None:
        with self.lock:
            snapshot = self.pending[:written]
        rows = torch.cat([r for r, _ in snapshot]) if snapshot else torch.empty(0, dtype=torch.int64)
        order = torch.sort(rows, stable=True).indices  # the newest write of a row last
        rows = rows[order]
        values = {
            n: torch.cat([v[n] for _, v in snapshot])[order]
            if snapshot
            else torch.empty((0, *self.scratch[n].shape[1:]))
            for n in self.names
        }
        newest = torch.ones(rows.numel(), dtype=torch.bool)
        newest[:-1] = rows[1:] != rows[:-1]
        rows, values = rows[newest], {n: v[newest] for n, v in values.items()}
        staged = {n: torch.empty((wanted.numel(), *self.scratch[n].shape[1:])) for n in self.names}
        tensors = self.store.tensors
        buffers = {n: np.empty((CHUNK, *tensors[n].shape[1:]), dtype=np.float32) for n in self.names}
        row_bytes = {n: tensors[n][0].numel() * 4 for n in self.names}
        total = int(next(iter(tensors.values())).shape[0])
        for start in range(0, total, CHUNK):
            end = min(total, start + CHUNK)
            w0, w1 = torch.searchsorted(rows, torch.tensor([start, end])).tolist()
            r0, r1 = torch.searchsorted(wanted, torch.tensor([start, end])).tolist()
            for n in self.names if (w1 > w0 or r1 > r0) else ():
                buffer = buffers[n][: end - start]
                os.preadv(self.fds[n], [buffer], start * row_bytes[n])
                chunk = torch.from_numpy(buffer)
                if w1 > w0:
                    chunk[rows[w0:w1] - start] = values[n][w0:w1]
                    os.pwritev(self.fds[n], [buffer], start * row_bytes[n])
                staged[n][r0:r1] = chunk[wanted[r0:r1] - start]
            if (start // CHUNK) % 8 == 7 or end == total:
                for n in self.names:
                    os.fdatasync(self.fds[n])
                    low = max(0, start - 7 * CHUNK) * row_bytes[n]
                    os.posix_fadvise(self.fds[n], low, end * row_bytes[n] - low, os.POSIX_FADV_DONTNEED)
        with self.lock:
            del self.pending[:written]
            kept = [
                (r[~torch.isin(r, rows)], {n: v[n][~torch.isin(r, rows)] for n in self.names})
                for r, v in self.staged[-1:]
            ]
            self.staged = kept + [(wanted, staged)]


def run(args: argparse.Namespace) -> dict:
    rows, dim, k, period = args.big_rows, args.dim, 2, args.period
    horizon = 2 * period
    slots = rows // args.slot_fraction
    batches = stream("zipf", args.big_steps, rows, args.big_ids, 0, seed=1)
    unique = [torch.unique(b) for b in batches]
    step = Step(dim, bag=16)
    table_bytes = rows * (dim + 1) * 4
    budget = None
    if not args.no_budget:
        budget, why = memory_budget.join(f"sweep_trial_{os.getpid()}")
        if budget is None:
            raise SystemExit(f"no memory budget: {why} (run as root, or --no-budget)")
        budget.limit(table_bytes // 4)
    folder = tempfile.mkdtemp(prefix="sweep_trial_", dir=args.folder)
    store, scratch = filled_store(rows, dim, slots, folder)
    sweeps = SweepStore(store, scratch)
    planner = LookaheadPlanner(rows, slots)
    dirty = torch.zeros(slots, dtype=torch.bool)
    copier, sweeper = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    copies: list[Future] = []
    sweeping: "Future | None" = None
    for t, plans in schedule(len(batches), k, horizon):
        ids = batches[t]
        if t == WARM_STEPS:
            begin = time.perf_counter()
            sweeps.direct = sweeps.loads = 0
        for future in copies:
            future.result()
        copies = []
        planner.retire(t - 1)
        if t % period == 0:
            low, high = (0, horizon) if t == 0 else (t + period, min(t + horizon, len(batches)))
            if low < high:
                wanted = torch.unique(torch.cat(unique[low:high]))
                wanted = wanted[planner.slot_of[wanted] < 0]
                if sweeping is not None:
                    sweeping.result()
                with sweeps.lock:
                    written = len(sweeps.pending)
                sweeping = sweeper.submit(sweeps.sweep, written, wanted)
                if t == 0:
                    sweeping.result()
        for seq, later in plans:
            moves = planner.push(seq, unique[seq], [(s, unique[s]) for s in later])
            back = dirty[moves.evict_slots]
            dirty[moves.load_slots] = False
            copies.append(
                copier.submit(
                    sweeps.copy, moves.evict_rows[back], moves.evict_slots[back], moves.load_rows, moves.load_slots
                )
            )
        if t == 0:
            for future in copies:
                future.result()
        dirty[planner.lookup(unique[t]).long()] = True
        step(scratch["weight"], {"sum": scratch["sum"]}, planner.lookup(ids))
    for future in copies:
        future.result()
    out = {
        "period": period,
        "horizon": horizon,
        "rate": (len(batches) - WARM_STEPS) / (time.perf_counter() - begin),
        "direct": sweeps.direct,
        "loads": sweeps.loads,
    }
    if budget is not None:
        out["peak_mib"] = (budget.peak() - budget.base) / 2**20
    store.close()
    os.rmdir(folder)
    return out


def table(args: argparse.Namespace) -> None:
    """The table in RAM (``lookahead_cache.py --one-pass ram``) and the trial for each period, with and without the
    budget, each a fresh process, one after another."""
    import subprocess
    import sys

    common = [f"--big-rows={args.big_rows}", f"--dim={args.dim}", f"--big-ids={args.big_ids}"]
    common += [f"--big-steps={args.big_steps}", f"--slot-fraction={args.slot_fraction}"]
    common += [f"--folder={args.folder}"] if args.folder else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    here = os.path.dirname(os.path.abspath(__file__))

    def one(command: list[str]) -> "dict | None":
        done = subprocess.run([sys.executable, *command, *common], capture_output=True, text=True, env=env)
        if done.returncode == -9:
            return None  # the OOM killer at the budget's limit
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.strip().split("\n")[-1])

    ram = one([os.path.join(here, "lookahead_cache.py"), "--one-pass", "ram"])["rate"]
    print(f"load average {os.getloadavg()[0]:.1f}; table in RAM: {ram:.1f} steps/s\n")
    print("| S (steps between sweeps) | K | budget | steps/s | vs in RAM | rows read directly | peak |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for period in args.periods:
        for budgeted in (True, False):
            flags = [f"--period={period}", "--one"] + ([] if budgeted else ["--no-budget"])
            r = one([os.path.abspath(__file__), *flags])
            where = "1/4 of the table" if budgeted else "none"
            if r is None:
                print(f"| {period} | {2 * period} | {where} | killed by the OOM killer at the limit | - | - | - |")
                continue
            peak = f"{r['peak_mib']:.1f} MiB" if "peak_mib" in r else "-"
            print(
                f"| {period} | {r['horizon']} | {where} | {r['rate']:.1f} | {r['rate'] / ram:.2f}x | "
                f"{r['direct'] / max(1, r['loads']):.1%} | {peak} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--periods", type=int, nargs="+", default=[4, 8, 16], help="S: steps between sweeps")
    parser.add_argument("--period", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-budget", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--big-rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--big-ids", type=int, default=32_768)
    parser.add_argument("--big-steps", type=int, default=60)
    parser.add_argument("--slot-fraction", type=int, default=32)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(run(args)))
    else:
        table(args)


if __name__ == "__main__":
    main()
