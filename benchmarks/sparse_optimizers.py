"""Throughput of the fused sparse row kernels against torch's sparse alternatives, side by side in one run.

Every contender gets the same uncoalesced sparse gradient that ``nn.EmbeddingBag(sparse=True)`` produces
for a batch of Zipf-distributed ids (duplicates included); only the optimizer step is timed. Alternatives:
``torch.optim.SGD`` / ``Adagrad`` / ``SparseAdam`` on the sparse gradient, and TorchRec's unfused
``RowWiseAdagrad`` (dense gradient: the whole table) for row-wise Adagrad. Decayed Adagrad and row-wise Adam
have no torch counterpart. Run: ``.venv/bin/python benchmarks/sparse_optimizers.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

from lightning_sparse import ops
from lightning_sparse.config import SparseOptimizerKind as K
from lightning_sparse.optim import init_state, sparse_update


def zipf_ids(rows: int, n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-alpha), 0)
    cdf /= cdf[-1].clone()
    return torch.searchsorted(cdf, torch.rand(n, generator=generator, dtype=torch.float64)).clamp_(max=rows - 1)


def make_grads(rows: int, dim: int, batch: int, pooling: int, steps: int, alpha: float) -> list[torch.Tensor]:
    """Sparse gradients exactly as EmbeddingBag(sparse=True) emits them (uncoalesced, one row per id)."""
    g = torch.Generator().manual_seed(0)
    bag = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
    grads = []
    for _ in range(steps):
        ids = zipf_ids(rows, batch * pooling, alpha, g)
        offsets = torch.arange(0, batch * pooling, pooling)
        bag.weight.grad = None
        bag(ids, offsets).backward(torch.randn(batch, dim, generator=g))
        grads.append(bag.weight.grad)
    return grads


def time_ours(kind, weight, grads, native: bool, hp, repeats: int) -> float:
    os.environ["LIGHTNING_SPARSE_NATIVE"] = "1" if native else "0"
    state = init_state(kind, weight)
    for grad in grads[:2]:  # warm-up
        sparse_update(kind, weight, state, grad._indices()[0], grad._values(), **hp)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for grad in grads:
            sparse_update(kind, weight, state, grad._indices()[0], grad._values(), **hp)
        passes.append((time.perf_counter() - start) / len(grads))
    os.environ.pop("LIGHTNING_SPARSE_NATIVE")
    return min(passes)  # best pass: the machine is shared, the minimum is the least disturbed


def time_torch(make_opt, weight, grads, dense: bool, repeats: int) -> float:
    p = torch.nn.Parameter(weight)
    opt = make_opt(p)
    prepared = [g.to_dense() if dense else g for g in grads]
    for grad in prepared[:2]:
        p.grad = grad
        opt.step()
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for grad in prepared:
            p.grad = grad
            opt.step()
        passes.append((time.perf_counter() - start) / len(grads))
    return min(passes)


def main() -> None:
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--pooling", type=int, default=8, help="ids per sample (bag size)")
    parser.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the steps; the best is reported")
    args = parser.parse_args()
    torch.manual_seed(0)
    grads = make_grads(args.rows, args.dim, args.batch, args.pooling, args.steps, args.alpha)
    ids = args.batch * args.pooling
    unique = sum(int(torch.unique(g._indices()[0]).numel()) for g in grads) / len(grads)
    lr, eps = 0.01, 1e-8
    hp = dict(lr=lr, eps=eps)
    torch_alternatives = {
        K.SGD: ("torch.optim.SGD (sparse grad)", lambda p: torch.optim.SGD([p], lr=lr), False),
        K.ADAGRAD: ("torch.optim.Adagrad (sparse grad)", lambda p: torch.optim.Adagrad([p], lr=lr, eps=eps), False),
        K.ROWWISE_ADAGRAD: ("torchrec RowWiseAdagrad (dense grad)", lambda p: __import__("torchrec.optim", fromlist=["RowWiseAdagrad"]).RowWiseAdagrad([p], lr=lr, eps=eps), True),
        K.ADAM: ("torch.optim.SparseAdam (sparse grad)", lambda p: torch.optim.SparseAdam([p], lr=lr, eps=eps), False),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, native built: {ops.native_available()}")
    print(f"table {args.rows:,} x {args.dim} fp32, batch {args.batch} x {args.pooling} ids (Zipf {args.alpha}): {ids:,} ids/step, {unique:,.0f} unique rows/step")
    print()
    print("| kind | ours native ms/step | ours native M ids/s | ours PyTorch fallback ms/step | torch alternative | alternative ms/step | native speed-up vs alternative | native speed-up vs fallback |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for kind in K:
        base = torch.randn(args.rows, args.dim) * 0.01
        native = time_ours(kind, base.clone(), grads, True, hp, args.repeats) if ops.native_available() else float("nan")
        fallback = time_ours(kind, base.clone(), grads, False, hp, args.repeats)
        if kind in torch_alternatives:
            name, make_opt, dense = torch_alternatives[kind]
            alt = time_torch(make_opt, base.clone(), grads, dense, 2 if dense else args.repeats)
            alt_ms, ratio = f"{alt * 1e3:.2f}", f"{alt / native:.1f}x"
        else:
            name, alt_ms, ratio = "(none in torch)", "-", "-"
        print(f"| {kind.value} | {native * 1e3:.2f} | {ids / native / 1e6:.1f} | {fallback * 1e3:.2f} | {name} | {alt_ms} | {ratio} | {fallback / native:.1f}x |")
        del base


if __name__ == "__main__":
    main()
