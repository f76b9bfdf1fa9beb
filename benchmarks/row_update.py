"""The native route's update of one lookup: one pass (``embedding_row_update``) vs the two steps it replaces.

For the benchmark model of ``benchmarks/sparse_optimizers.py`` (4 tables of 250k x 64, batch 2048 x 20
Zipf ids, one lookup per table) this times, per kind, the whole optimizer work of one step over the four
tables: the one-pass native op, the two-step path (``embedding_row_grads`` -> ``.float()`` ->
``sparse_opt_<kind>``), and the row gradients alone. Contenders run round-robin (a busy spell of a shared
machine slows each alike); each number is the median of ``--repeats`` rounds, in ms.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/row_update.py [--rows 3000]`` (a small ``--rows``
keeps every table in cache: what is left of the update's cost at 250k rows is scattered-row memory traffic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.optim import init_state
from lightning_sparse.optim.kernels import sparse_update_for
from lightning_sparse.optim.row_grads import POOLING_SUM, embedding_row_grads
from lightning_sparse.optim.row_update import embedding_row_update_for


def zipf_ids(rows: int, n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-alpha), 0)
    cdf /= cdf[-1].clone()
    return torch.searchsorted(cdf, torch.rand(n, generator=generator, dtype=torch.float64)).clamp_(max=rows - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--pooling", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.05)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.pooling
    one = torch.zeros(1, dtype=torch.int64)
    lookups = [
        (
            torch.randn(args.batch, args.dim, generator=g),
            zipf_ids(args.rows, n, args.alpha, g),
            torch.arange(0, n + 1, args.pooling),
            None,
            one,
            one,
            args.dim,
            1,
            POOLING_SUM,
        )
        for _ in range(args.tables)
    ]
    unique = statistics.mean(int(torch.unique(lookup[1]).numel()) for lookup in lookups)
    print(
        f"{args.tables} tables x {args.rows:,} x {args.dim}, batch {args.batch} x {args.pooling} Zipf({args.alpha}) ids "
        f"(~{unique:,.0f} unique rows per table), {args.threads} thread(s); ms for all tables, median of {args.repeats}\n"
    )
    print("| kind | one pass | two steps | row grads alone |")
    print("|---|---:|---:|---:|")
    for kind in ("sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "adam"):
        config = SparseOptimizerConfig(kind=kind, weight_decay=1e-4)
        weights = [torch.randn(args.rows, args.dim, generator=g) * 0.01 for _ in range(args.tables)]
        states = [init_state(kind, w) for w in weights]

        def one_pass(weights=weights, states=states, config=config) -> None:
            for w, s, lookup in zip(weights, states, lookups):
                embedding_row_update_for(config, w, s, *lookup)

        def two_steps(weights=weights, states=states, config=config) -> None:
            for w, s, lookup in zip(weights, states, lookups):
                rows, grads = embedding_row_grads(*lookup)
                sparse_update_for(config, w, s, rows, grads.float())

        def row_grads() -> None:
            for lookup in lookups:
                embedding_row_grads(*lookup)

        contenders = (one_pass, two_steps, row_grads)
        times: dict = {f: [] for f in contenders}
        for _ in range(args.repeats + 2):
            for f in contenders:
                start = time.perf_counter()
                f()
                times[f].append(time.perf_counter() - start)
        ms = [statistics.median(times[f][2:]) * 1e3 for f in contenders]
        print(f"| {kind} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
