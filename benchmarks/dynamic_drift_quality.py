"""Quality under drift: a static table (id modulo rows) vs a dynamic table (admission + expiry), equal memory.

The click stream: each sample has a user id and an item id; each feature's ids are Zipf-distributed
over a window of ranks that slides every step, so popular ids fade and new ones keep arriving (the
raw id of a rank is a scattered 62-bit value). Each raw id has a hidden effect drawn once from a
hash-seeded normal; the click probability is sigmoid(effect_user + effect_item - 1.5).

Model (plain torch, single process): per feature an EmbeddingBag (sum, dim 16) -> concat -> MLP(32, 1).
Embedding rows are trained with sparse Adagrad, the MLP with Adam. Evaluation is progressive: every
batch is scored before the model trains on it; AUC over all batches after the first 10%.

  static   row = raw id mod rows
  dynamic  DynamicIdRemapper per feature (admission min_count, TTL expiry, feature-score eviction);
           unadmitted ids are dropped from the bag (zero contribution, no update); reassigned rows are
           re-initialised and their Adagrad state reset.

Memory: the dynamic table pays for its hash state (slot ids, counts, stamps, score, free stack, index,
sketch). "equal total bytes" gives the static table that many extra rows; "equal rows" gives it the
same number of rows. Both are reported.

    python benchmarks/dynamic_drift_quality.py [--steps 400] [--batch 2048] [--rows 16384]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.dynamic import AdmissionConfig, DynamicIdRemapper, DynamicTableConfig, ExpiryConfig, remap_kjt
from lightning_sparse.dynamic.hashing import mix64

FEATURES = ("user", "item")
DIM = 16


class DriftingClicks:
    """Deterministic click stream whose popular ids slide by ``drift`` ranks per step."""

    def __init__(self, batch: int, window: int, drift: int, zipf: float = 1.1, seed: int = 0) -> None:
        self.batch, self.window, self.drift, self.seed = batch, window, drift, seed
        ranks = torch.arange(1, window + 1, dtype=torch.float64)
        self.cdf = torch.cumsum(ranks**-zipf, 0)
        self.cdf /= self.cdf[-1].clone()

    def raw_id(self, feature: int, absolute_rank: torch.Tensor) -> torch.Tensor:
        return (mix64(absolute_rank * 2 + feature + self.seed * 1_000_003) >> 2) & ((1 << 62) - 1)

    def effect(self, raw: torch.Tensor) -> torch.Tensor:
        """Hidden per-id effect ~ N(0, 1.2), a pure function of the raw id (Box-Muller on two hashes)."""
        h1 = (mix64(raw ^ 0x5DEECE66D) >> 11).to(torch.float64) / float(1 << 53)
        h2 = (mix64(raw ^ 0x2545F491) >> 11).to(torch.float64) / float(1 << 53)
        return 1.2 * torch.sqrt(-2 * torch.log(h1.clamp_min(1e-12))) * torch.cos(2 * torch.pi * h2)

    def batch_at(self, step: int) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
        """(sparse features, labels, true click logits) of batch ``step``."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        ids, logit = [], torch.full((self.batch,), -1.5, dtype=torch.float64)
        for f in range(len(FEATURES)):
            rank = torch.searchsorted(self.cdf, torch.rand(self.batch, generator=g, dtype=torch.float64))
            # each rank's position in the window is permuted per feature so user/item popularity differ
            raw = self.raw_id(f, rank + step * self.drift)
            ids.append(raw)
            logit += self.effect(raw)
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g).float()
        kjt = KeyedJaggedTensor(
            keys=list(FEATURES), values=torch.cat(ids), lengths=torch.ones(len(FEATURES) * self.batch, dtype=torch.int32)
        )
        return kjt, labels, logit


def oracle_auc(stream: DriftingClicks, steps: int) -> float:
    """AUC of the true click logits on the evaluated batches: the ceiling for any model."""
    logits, labels = zip(*(stream.batch_at(step)[2:0:-1] for step in range(steps // 10, steps)))
    return float(binary_auroc(torch.cat(logits), torch.cat(labels).long()))


class ClickModel(nn.Module):
    def __init__(self, rows: dict[str, int], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bags = nn.ModuleDict({f: nn.EmbeddingBag(rows[f], DIM, mode="sum", sparse=True) for f in FEATURES})
        for bag in self.bags.values():
            nn.init.uniform_(bag.weight, -0.05, 0.05)
        self.mlp = nn.Sequential(nn.Linear(DIM * len(FEATURES), 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        parts = []
        for f in FEATURES:
            jt = kjt[f]
            parts.append(self.bags[f](jt.values(), jt.offsets()[:-1]))
        return self.mlp(torch.cat(parts, 1)).squeeze(1)


def train_stream(stream: DriftingClicks, steps: int, rows: dict[str, int], remappers=None, seed: int = 0) -> float:
    model = ClickModel(rows, seed)
    sparse_opt = torch.optim.Adagrad([b.weight for b in model.bags.values()], lr=0.05)
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    preds, labels_all = [], []
    for step in range(steps):
        kjt, labels, _ = stream.batch_at(step)
        if remappers is None:
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % rows[FEATURES[0]], lengths=kjt.lengths())
        else:
            kjt, results = remap_kjt(kjt, remappers, {f: f for f in FEATURES}, step=step, now=float(step))
            for f, result in results.items():
                weight = model.bags[f].weight
                remappers[f].init_rows(weight.data, result.assigned)  # fresh rows for the new ids
                DynamicIdRemapper.reset_rows([sparse_opt.state[weight]["sum"]], result.assigned)
                remappers[f].maybe_expire(step, now=float(step))
        logits = model(kjt)
        if step >= steps // 10:
            preds.append(logits.detach())
            labels_all.append(labels)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    return float(binary_auroc(torch.cat(preds), torch.cat(labels_all).long()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=16384, help="rows of each dynamic table")
    parser.add_argument("--window", type=int, default=50_000, help="ranks in the popularity window")
    parser.add_argument("--drift", type=int, default=125, help="ranks the window slides per step")
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--ttl-steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)

    def dynamic_config() -> DynamicTableConfig:
        return DynamicTableConfig(
            capacity=args.rows,
            eviction="feature_score",
            score_decay=0.98,
            admission=AdmissionConfig(min_count=args.min_count),
            expiry=ExpiryConfig(ttl_steps=args.ttl_steps, sweep_every_steps=10),
        )

    probe = DynamicIdRemapper(dynamic_config())
    hash_bytes = sum(b.numel() * b.element_size() for b in probe.buffers())
    row_bytes = DIM * 4 * 2  # fp32 row + Adagrad (element-wise) state
    equal_bytes_rows = args.rows + hash_bytes // row_bytes
    print(
        f"# dynamic_drift_quality: steps={args.steps} batch={args.batch} features={len(FEATURES)} dim={DIM} "
        f"window={args.window} drift={args.drift}/step min_count={args.min_count} ttl_steps={args.ttl_steps}"
    )
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; seeds {args.seeds}")
    print(
        f"# memory per table: dynamic {args.rows} rows x {row_bytes} B + {hash_bytes} B hash state "
        f"= {args.rows * row_bytes + hash_bytes} B; static at equal bytes: {equal_bytes_rows} rows"
    )
    variants: dict[str, int | None] = {
        f"static, id mod rows (equal rows: {args.rows})": args.rows,
        f"static, id mod rows (equal total bytes: {equal_bytes_rows})": equal_bytes_rows,
        f"dynamic, admission+expiry ({args.rows} rows)": None,
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    extra: dict[str, str] = {}
    oracle = []
    for seed in args.seeds:
        stream = DriftingClicks(args.batch, args.window, args.drift, seed=seed)
        oracle.append(oracle_auc(stream, args.steps))
        for name, static_rows in variants.items():
            start = time.perf_counter()
            if static_rows is None:
                remappers = {f: DynamicIdRemapper(dynamic_config()) for f in FEATURES}
                auc = train_stream(stream, args.steps, {f: args.rows for f in FEATURES}, remappers, seed)
                m = remappers["item"].metrics()
                extra[name] = (
                    f"item table: live {m['live']}, admitted {m['admitted']}, evicted {m['evicted']}, "
                    f"expired {m['expired']}, rejected_full {m['rejected_full']}, hit rate {m['hits'] / m['lookups']:.0%}"
                )
            else:
                auc = train_stream(stream, args.steps, {f: static_rows for f in FEATURES}, None, seed)
            results[name].append(auc)
            print(f"#   seed {seed} {name}: AUC {auc:.4f} ({time.perf_counter() - start:.1f} s)")
    base = sum(results[next(iter(variants))]) / len(args.seeds)
    print(f"\n| {'table':<48} | {'AUC (mean over seeds)':>21} | {'vs static equal rows':>20} |")
    print(f"|{'-' * 50}|{'-' * 23}|{'-' * 22}|")
    for name in variants:
        mean = sum(results[name]) / len(args.seeds)
        print(f"| {name:<48} | {mean:>21.4f} | {mean - base:>+20.4f} |")
    print(f"| {'oracle (true click logits; the ceiling)':<48} | {sum(oracle) / len(oracle):>21.4f} | {'':>20} |")
    for name, text in extra.items():
        print(f"# {name}: {text} (last seed)")


if __name__ == "__main__":
    main()
