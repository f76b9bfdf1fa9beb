"""Kraken's "trisect the memory", measured: memory and AUC of (a) Adam everywhere vs (b) row-wise sparse
optimizers for the embeddings + Adam for the dense net, on one DLRM-shaped model in one run.

Model: DLRM with 26 embedding tables (Criteo Kaggle cardinalities capped at ``--max-rows``), 13 dense
features, bottom MLP, pairwise dot interaction, top MLP; plain ``nn.EmbeddingBag(sparse=True)``.
Data: a synthetic click stream drawn from a hidden ground-truth model (Zipf-distributed ids, one effect per
id, a low-rank interaction between fields and a dense linear part), so AUC has a known ceiling (the
"oracle" AUC of the true logits). Every setup starts from the same initial weights and sees the same
batches; memory is counted with :func:`lightning_sparse.optim.memory_report` (weights + optimizer state).

Run: ``.venv/bin/python benchmarks/memory_trisect.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torchmetrics.classification import BinaryAUROC

from lightning_sparse import ops
from lightning_sparse.optim import SparseRowOptimizer, memory_report

# Criteo Kaggle (Display Advertising Challenge) cardinalities of the 26 categorical features.
CRITEO_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip


class ClickStream:
    """Hidden ground truth: logit = bias + sum_f effect_f[id_f] + dense @ beta + low-rank field interactions."""

    def __init__(self, cards: list[int], alpha: float, seed: int, rank: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cards, self.alpha, self.rank = cards, alpha, rank
        self.cdfs = []
        for c in cards:
            w = torch.arange(1, c + 1, dtype=torch.float64).pow(-alpha)
            cdf = torch.cumsum(w, 0)
            self.cdfs.append(cdf / cdf[-1])
        self.perms = [torch.randperm(c, generator=g) for c in cards]  # frequent ids are not the small ones
        self.effects = [torch.randn(c, generator=g) * 0.3 for c in cards]
        self.factors = [torch.randn(c, rank, generator=g) * 0.35 for c in cards]
        self.beta = torch.randn(13, generator=g) * 0.3
        self.bias = -1.0

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.empty(n, len(self.cards), dtype=torch.int64)
        for f, cdf in enumerate(self.cdfs):
            ranks = torch.searchsorted(cdf, torch.rand(n, generator=g, dtype=torch.float64)).clamp_(max=len(cdf) - 1)
            ids[:, f] = self.perms[f][ranks]
        dense = torch.randn(n, 13, generator=g)
        logit = torch.full((n,), self.bias) + dense @ self.beta
        factor_sum = torch.zeros(n, self.rank)
        factor_sq = torch.zeros(n)
        for f in range(len(self.cards)):
            logit += self.effects[f][ids[:, f]]
            v = self.factors[f][ids[:, f]]
            factor_sum += v
            factor_sq += (v * v).sum(1)
        logit += 0.5 * ((factor_sum * factor_sum).sum(1) - factor_sq) / len(self.cards)  # sum of pairwise dots
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        return dense, ids, labels, logit


def mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class DLRM(torch.nn.Module):
    def __init__(self, cards: list[int], dim: int) -> None:
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.EmbeddingBag(c, dim, mode="sum", sparse=True) for c in cards)
        for t in self.tables:  # DLRM reference init
            torch.nn.init.uniform_(t.weight, -((1.0 / t.num_embeddings) ** 0.5), (1.0 / t.num_embeddings) ** 0.5)
        self.bottom = mlp([13, 128, 64, dim])
        n = len(cards) + 1
        self.pairs = torch.triu_indices(n, n, offset=1)
        self.top = mlp([dim + n * (n - 1) // 2, 256, 128, 1])

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        vectors = torch.stack([x] + [t(ids[:, f : f + 1]) for f, t in enumerate(self.tables)], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)

    def sparse_parameters(self) -> list[torch.nn.Parameter]:
        return [t.weight for t in self.tables]

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.bottom.parameters()) + list(self.top.parameters())


def run_setup(name, make_optimizers, init_state, cards, dim, train, test, dense_lr):
    model = DLRM(cards, dim)
    model.load_state_dict(init_state)
    optimizers = make_optimizers(model, dense_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for dense, ids, labels in train:
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss_fn(model(dense, ids), labels).backward()
        for o in optimizers:
            o.step()
    seconds = time.perf_counter() - start
    auroc = BinaryAUROC()
    with torch.no_grad():
        for dense, ids, labels in test:
            auroc.update(torch.sigmoid(model(dense, ids)), labels.long())
    report = memory_report(model, optimizers)
    return dict(name=name, report=report, auc=float(auroc.compute()), seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-rows", type=int, default=200_000, help="cap of each table's cardinality")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=1200)
    parser.add_argument("--test-samples", type=int, default=200_000)
    parser.add_argument("--alpha", type=float, default=1.1, help="Zipf exponent of the ids")
    parser.add_argument("--dense-lr", type=float, default=1e-3)
    parser.add_argument("--adam-lr", type=float, default=0.01, help="embedding lr of Adam everywhere")
    parser.add_argument("--rowwise-adagrad-lr", type=float, default=0.05)
    parser.add_argument("--rowwise-adam-lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    cards = [min(c, args.max_rows) for c in CRITEO_CARDINALITIES]
    stream = ClickStream(cards, args.alpha, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    train = [stream.sample(args.batch, g)[:3] for _ in range(args.train_steps)]
    test_batches, oracle = [], BinaryAUROC()
    for _ in range(max(1, args.test_samples // 8192)):
        dense, ids, labels, logit = stream.sample(8192, g)
        test_batches.append((dense, ids, labels))
        oracle.update(torch.sigmoid(logit), labels.long())
    ctr = torch.cat([b[2] for b in train]).mean().item()
    init = DLRM(cards, args.dim).state_dict()

    def adam_everywhere(model, dense_lr):
        # Full Adam state (exp_avg + exp_avg_sq per element) for the embeddings, lazily updated rows
        # (our fused "adam" kind == torch.optim.SparseAdam's memory), torch Adam for the dense net.
        return [
            SparseRowOptimizer(model.sparse_parameters(), kind="adam", lr=args.adam_lr),
            torch.optim.Adam(model.dense_parameters(), lr=dense_lr),
        ]

    def rowwise(kind, lr):
        def make(model, dense_lr):
            return [
                SparseRowOptimizer(model.sparse_parameters(), kind=kind, lr=lr),
                torch.optim.Adam(model.dense_parameters(), lr=dense_lr),
            ]

        return make

    setups = [
        ("(a) Adam everywhere", adam_everywhere),
        ("(b1) row-wise Adagrad + dense Adam", rowwise("rowwise_adagrad", args.rowwise_adagrad_lr)),
        ("(b2) row-wise Adam + dense Adam", rowwise("rowwise_adam", args.rowwise_adam_lr)),
    ]
    results = [
        run_setup(name, make, init, cards, args.dim, train, test_batches, args.dense_lr) for name, make in setups
    ]

    mib = 1024.0**2
    print(
        f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, no GPU; torch {torch.__version__}; native kernels: {ops.native_available()}"
    )
    print(
        f"DLRM: 26 tables (Criteo cardinalities capped at {args.max_rows:,}: {sum(cards):,} rows) x dim {args.dim}, "
        f"13 dense features; {args.train_steps} steps x batch {args.batch} = {args.train_steps * args.batch:,} samples "
        f"(Zipf {args.alpha}, CTR {ctr:.3f}); test {len(test_batches) * 8192:,} samples; oracle AUC {float(oracle.compute()):.4f}"
    )
    print()
    print(
        "| setup | embedding weights MiB | sparse opt state MiB | dense weights MiB | dense opt state MiB | total MiB | total / (a) | test AUC | AUC - (a) | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results[0]
    for r in results:
        rep = r["report"]
        print(
            f"| {r['name']} | {rep.embedding_weight_bytes / mib:.1f} | {rep.sparse_optimizer_bytes / mib:.1f} | "
            f"{rep.dense_weight_bytes / mib:.2f} | {rep.dense_optimizer_bytes / mib:.2f} | {rep.total_bytes / mib:.1f} | "
            f"{rep.total_bytes / base['report'].total_bytes:.3f} | {r['auc']:.4f} | {r['auc'] - base['auc']:+.4f} | {r['seconds']:.0f} |"
        )
    print()
    print("Goals (issue 3): total / (a) <= 0.36 and |AUC - (a)| <= 0.002.")


if __name__ == "__main__":
    main()
