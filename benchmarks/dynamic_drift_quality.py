"""Prequential quality under drift at equal memory: static hashing, TorchRec MCH, dynamic tables, full tables.

Streams (``drift_streams.py``): ``sliding`` (Zipf window sliding at a constant pace) and ``lifecycle``
(items appear, peak and fade; users join, come back at heavy-tailed rates and leave). Model (plain torch,
one process, one thread): per feature (user, item) an EmbeddingBag (sum, dim 32) -> [u, i, u * i] ->
MLP(32, 1). Rows train with sparse Adagrad (lr 0.05, element-wise state), the MLP with Adam (1e-3).

Prequential AUC: every batch is scored by the training forward, before its own optimizer step; the
stream is cut into 10 chunks in time, and the mean of the 10 chunks' AUCs is reported.

Memory: each feature's budget is a plain table of ``--fraction`` (20%) of the feature's distinct ids,
rows plus Adagrad state. Every contender is charged rows + optimizer state + its id-mapping state
(hash table, sketch, MCH's sorted ids, mapping, counts and history buffers) and gets as many rows as fit.

  static    row = raw id mod rows (the hashing trick)
  mch       torchrec ManagedCollisionCollection of MCHManagedCollisionModule, DistanceLFU_EvictionPolicy,
            eviction_interval 1 (misses read the module's last row); evicted rows re-initialised and
            their Adagrad state zeroed, as for dynamic tables
  dynamic   DynamicIdRemapper per feature with DynamicTableConfig defaults (min_count 1 without a sketch,
            distance_lfu eviction, no expiry, no fallback rows: the --sweep picked them); rows lent to
            a new id re-initialised and their Adagrad state zeroed. Its hash state is counted from the
            tensors it allocates (only those its policy needs, see lightning_sparse/dynamic/state.py)
  earlier   the same with the earlier defaults (feature_score eviction, decay 0.99, a 4-row sketch)
  full      one row per entity (no budget): the ceiling

    python benchmarks/dynamic_drift_quality.py                 # the comparison, seeds 0 1 2
    python benchmarks/dynamic_drift_quality.py --sweep         # dynamic-table settings, seed 0
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from drift_streams import STREAMS, Batch, Stream

from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig, RowInitConfig

FEATURES = ("user", "item")
DIM = 32
INIT = 0.05
ROW_BYTES = DIM * 4 * 2  # fp32 row + element-wise Adagrad state
CHUNKS = 10


def state_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def rows_within(budget: int, overhead: Callable[[int], int]) -> int:
    """The most rows R with R * ROW_BYTES + overhead(R) <= budget (overhead grows with R)."""
    lo, hi = 1, budget // ROW_BYTES
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if mid * ROW_BYTES + overhead(mid) <= budget else (lo, mid - 1)
    return lo


# ----------------------------------------------------------------------------------- contenders
class Contender:
    """Maps a batch's raw ids to rows; ``fresh`` lists rows to re-initialise before the lookup."""

    rows: dict[str, int]
    extra_bytes: dict[str, int]

    def remap(self, batch: Batch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def note(self) -> str:
        return ""


class Static(Contender):
    def __init__(self, rows: dict[str, int]) -> None:
        self.rows, self.extra_bytes = rows, {f: 0 for f in FEATURES}

    def remap(self, batch, step):
        raw = {"user": batch.user_raw, "item": batch.item_raw}
        return {f: raw[f] % self.rows[f] for f in FEATURES}, {}


class Full(Contender):
    def __init__(self, stream: Stream) -> None:
        self.rows, self.extra_bytes = {"user": stream.users, "item": stream.items}, {f: 0 for f in FEATURES}

    def remap(self, batch, step):
        return {"user": batch.user_index, "item": batch.item_index}, {}


class Dynamic(Contender):
    def __init__(
        self,
        budgets: dict[str, int],
        make_config: Callable[[int], DynamicTableConfig],
        rows: Optional[dict[str, int]] = None,
    ) -> None:
        def overhead(rows: int) -> int:
            return state_bytes(DynamicIdRemapper(make_config(rows)))

        self.rows = rows or {f: rows_within(budgets[f], overhead) for f in FEATURES}
        self.remappers = {f: DynamicIdRemapper(make_config(self.rows[f])) for f in FEATURES}
        self.extra_bytes = {f: state_bytes(r) for f, r in self.remappers.items()}

    def remap(self, batch, step):
        raw = {"user": batch.user_raw, "item": batch.item_raw}
        rows, fresh = {}, {}
        for f, remapper in self.remappers.items():
            result = remapper.remap(raw[f], step, now=float(step))
            rows[f], fresh[f] = result.slots, result.assigned
            remapper.maybe_expire(step, now=float(step))
        return rows, fresh

    def note(self) -> str:
        parts = []
        for f, r in self.remappers.items():
            m = r.metrics()
            parts.append(
                f"{f}: {r.capacity} slots + {r.fallback_rows} fallback, hit rate {m['hits'] / m['lookups']:.0%}"
            )
        return "; ".join(parts)


class MCH(Contender):
    def __init__(self, budgets: dict[str, int], batch: int) -> None:
        # history buffers: batch * interval * 1.25 int64 ids + one int64 per history metadata (last access)
        history = int(batch * 1.25) * 8 * 2

        def overhead(rows: int) -> int:
            return state_bytes(self._module(rows)) + history

        self.rows = {f: rows_within(budgets[f], overhead) for f in FEATURES}
        modules = {f"t_{f}": self._module(self.rows[f]) for f in FEATURES}
        configs = [
            EmbeddingBagConfig(num_embeddings=self.rows[f], embedding_dim=DIM, name=f"t_{f}", feature_names=[f])
            for f in FEATURES
        ]
        self.mcc = ManagedCollisionCollection(modules, configs).train()
        self.extra_bytes = {f: 0 for f in FEATURES}

    @staticmethod
    def _module(rows: int) -> MCHManagedCollisionModule:
        return MCHManagedCollisionModule(
            zch_size=rows, device=torch.device("cpu"), eviction_policy=DistanceLFU_EvictionPolicy(), eviction_interval=1
        )

    def remap(self, batch, step):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(FEATURES), values=torch.cat([batch.user_raw, batch.item_raw]),
            lengths=torch.ones(2 * batch.labels.numel(), dtype=torch.int32),
        )  # fmt: skip
        out = self.mcc(kjt).to_dict()
        fresh = {f: e.long() for f, e in ((k[2:], v) for k, v in self.mcc.evict().items()) if e is not None}
        for f in FEATURES:
            self.extra_bytes[f] = state_bytes(self.mcc._managed_collision_modules[f"t_{f}"])
        return {f: out[f].values() for f in FEATURES}, fresh


# ----------------------------------------------------------------------------------- training
class ClickModel(nn.Module):
    def __init__(self, rows: dict[str, int], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bags = nn.ModuleDict({f: nn.EmbeddingBag(rows[f], DIM, mode="sum", sparse=True) for f in FEATURES})
        for bag in self.bags.values():
            nn.init.uniform_(bag.weight, -INIT, INIT)
        self.mlp = nn.Sequential(nn.Linear(3 * DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for f in FEATURES:
            keep = rows[f] >= 0  # rows -1 (no slot, no fallback rows): dropped, the bag reads zero
            offsets = torch.cumsum(keep.long(), 0) - keep.long()
            pooled.append(self.bags[f](rows[f][keep], offsets))
        u, i = pooled
        return self.mlp(torch.cat([u, i, u * i], 1)).squeeze(1)


def prequential_auc(contender: Contender, stream: Stream, seed: int) -> tuple[float, list[float]]:
    """Mean over CHUNKS time chunks of the AUC of each batch's training-forward scores (before its step)."""
    model = ClickModel(contender.rows, seed)
    sparse_opt = torch.optim.Adagrad([b.weight for b in model.bags.values()], lr=0.05)
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    init = torch.Generator().manual_seed(seed + 7)
    scores, labels = [], []
    for step, batch in enumerate(stream.batches):
        rows, fresh = contender.remap(batch, step)
        with torch.no_grad():
            for f, new in fresh.items():
                if new.numel():
                    weight = model.bags[f].weight
                    weight[new] = torch.empty(new.numel(), DIM).uniform_(-INIT, INIT, generator=init)
                    if weight in sparse_opt.state:
                        sparse_opt.state[weight]["sum"][new] = 0.0
        logits = model(rows)
        scores.append(logits.detach())
        labels.append(batch.labels)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    per_chunk = []
    bounds = [round(k * len(scores) / CHUNKS) for k in range(CHUNKS + 1)]
    for a, b in zip(bounds, bounds[1:]):
        per_chunk.append(float(binary_auroc(torch.cat(scores[a:b]), torch.cat(labels[a:b]).long())))
    return sum(per_chunk) / CHUNKS, per_chunk


def dynamic_config(**overrides) -> Callable[[int], DynamicTableConfig]:
    """Library defaults, rows initialised like every other contender's (uniform +-INIT), ``overrides`` on top."""
    return lambda rows: DynamicTableConfig(capacity=rows, init=RowInitConfig(scale=INIT), **overrides)


def budgets_of(stream: Stream, fraction: float) -> dict[str, int]:
    return {f: round(fraction * n) * ROW_BYTES for f, n in zip(FEATURES, stream.distinct())}


# ----------------------------------------------------------------------------------- runs
def sweep_variants(only: Optional[list[str]] = None) -> dict[str, Callable[[int], DynamicTableConfig]]:
    """Dynamic-table settings, one change at a time from the defaults, then a few pairs (``only``: a subset)."""

    def with_fallback(divisor: int) -> Callable[[int], DynamicTableConfig]:
        return lambda rows: dynamic_config(fallback_rows=rows // divisor)(rows)

    variants = {
        "defaults (fallback_rows=0)": dynamic_config(),
        "eviction=feature_score (the earlier default)": dynamic_config(eviction="feature_score"),
        "eviction=feature_score, sketch_depth=0": dynamic_config(
            eviction="feature_score", admission={"sketch_depth": 0}
        ),
        "eviction=feature_score, score_decay=0.95": dynamic_config(eviction="feature_score", score_decay=0.95),
        "sketch_depth=4": dynamic_config(admission={"sketch_depth": 4}),
        "fallback_rows=1 (one shared row, like MCH's misses)": dynamic_config(fallback_rows=1),
        "fallback_rows=capacity//64": with_fallback(64),
        "fallback_rows=capacity//16": with_fallback(16),
        "fallback_rows=capacity//8": with_fallback(8),
        "fallback_rows=capacity//4": with_fallback(4),
        "fallback_rows=capacity//2": with_fallback(2),
        "min_count=2": dynamic_config(admission={"min_count": 2}),
        "min_count=2, fallback_rows=capacity//16": lambda rows: dynamic_config(
            admission={"min_count": 2}, fallback_rows=rows // 16
        )(rows),
        "min_count=4": dynamic_config(admission={"min_count": 4}),
        "eviction=lfu": dynamic_config(eviction="lfu"),
        "eviction=lru": dynamic_config(eviction="lru"),
        "ttl_steps=100": dynamic_config(expiry={"ttl_steps": 100, "sweep_every_steps": 10}),
        "sketch_width=capacity/8": lambda rows: dynamic_config(
            admission={"sketch_width": max(64, 1 << max(0, (rows // 8 - 1).bit_length()))}
        )(rows),
    }
    return {k: v for k, v in variants.items() if only is None or k.startswith("defaults") or k in only}


def contenders(stream: Stream, fraction: float, batch: int, equal_rows: bool) -> dict[str, Callable[[], Contender]]:
    budgets = budgets_of(stream, fraction)
    static_rows = {f: b // ROW_BYTES for f, b in budgets.items()}
    out = {
        "(a) static, id mod rows": lambda: Static(static_rows),
        "(b) torchrec MCH, DistanceLFU": lambda: MCH(budgets, batch),
        "(c) dynamic, defaults": lambda: Dynamic(budgets, dynamic_config()),
        "(d) full-size tables (ceiling)": lambda: Full(stream),
        "(c) earlier defaults: feature_score, sketch": lambda: Dynamic(
            budgets, dynamic_config(eviction="feature_score")
        ),
    }
    if equal_rows:  # what (c) would score with hash state as small as MCH's (more memory than the budget)
        out["(c) at (b)'s rows, over budget"] = lambda: Dynamic(budgets, dynamic_config(), MCH(budgets, batch).rows)
    return out


def run(args, make_variants: Callable[[Stream], dict[str, Callable[[], Contender]]]) -> dict:
    results: dict[str, dict[str, list[float]]] = {}
    for name in args.streams:
        for seed in args.seeds:
            start = time.perf_counter()
            stream = STREAMS[name](args.steps, args.batch, seed)
            users, items = stream.distinct()
            print(
                f"# {name} seed {seed}: {users} distinct users, {items} distinct items ({time.perf_counter() - start:.1f} s)"
            )
            for label, make in make_variants(stream).items():
                start = time.perf_counter()
                contender = make()
                auc, chunks = prequential_auc(contender, stream, seed)
                results.setdefault(name, {}).setdefault(label, []).append(auc)
                memory = {f: contender.rows[f] * ROW_BYTES + contender.extra_bytes[f] for f in FEATURES}
                print(
                    f"#   {label}: mean prequential AUC {auc:.4f} (chunks {' '.join(f'{c:.3f}' for c in chunks)}); "
                    f"rows user {contender.rows['user']} item {contender.rows['item']}, "
                    f"MB user {memory['user'] / 1e6:.2f} item {memory['item'] / 1e6:.2f} "
                    f"({time.perf_counter() - start:.1f} s) {contender.note()}"
                )
    return results


def print_table(results: dict, baseline: str, ceiling: Optional[str]) -> None:
    for name, by_label in results.items():
        base = sum(by_label[baseline]) / len(by_label[baseline])
        top = sum(by_label[ceiling]) / len(by_label[ceiling]) if ceiling else None
        print(f"\nstream={name}")
        print(f"| {'contender':<46} | {'mean prequential AUC':>20} | {'vs ' + baseline[:3]:>8} | {'gap closed':>10} |")
        print(f"|{'-' * 48}|{'-' * 22}|{'-' * 10}|{'-' * 12}|")
        for label, values in by_label.items():
            mean = sum(values) / len(values)
            closed = f"{(mean - base) / (top - base):>10.0%}" if top is not None and top != base else f"{'':>10}"
            print(f"| {label:<46} | {mean:>20.4f} | {mean - base:>+8.4f} | {closed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument(
        "--fraction", type=float, default=0.2, help="memory budget: a plain table of this share of distinct ids"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--sweep: 0)")
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    parser.add_argument("--sweep", action="store_true", help="compare dynamic-table settings instead")
    parser.add_argument("--only", nargs="+", default=None, help="--sweep: these variants (and the defaults) only")
    parser.add_argument("--equal-rows", action="store_true", help="also run (c) with as many rows as (b) gets")
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.sweep else [0, 1, 2])
    torch.set_num_threads(1)
    print(
        f"# dynamic_drift_quality: steps={args.steps} batch={args.batch} dim={DIM} fraction={args.fraction} "
        f"streams={args.streams} seeds={args.seeds}{' sweep' if args.sweep else ''}"
    )
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    if args.sweep:

        def variants(stream: Stream) -> dict[str, Callable[[], Contender]]:
            budgets = budgets_of(stream, args.fraction)
            return {label: (lambda c=c: Dynamic(budgets, c)) for label, c in sweep_variants(args.only).items()}

        print_table(run(args, variants), "defaults (fallback_rows=0)", None)
        return
    results = run(args, lambda stream: contenders(stream, args.fraction, args.batch, args.equal_rows))
    print_table(results, "(a) static, id mod rows", "(d) full-size tables (ceiling)")
    for name, by_label in results.items():
        a, b, c, d = (sum(v) / len(v) for v in list(by_label.values())[:4])
        print(
            f"# {name}: (c) - (a) = {c - a:+.4f}, (c) - (b) = {c - b:+.4f} (goal >= +0.01 each); "
            f"gap (a)->(d) closed {(c - a) / (d - a):.0%} (goal >= 50%)"
        )


if __name__ == "__main__":
    main()
