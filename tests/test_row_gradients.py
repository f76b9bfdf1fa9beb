"""Native-route tables: exact row gradients from the TBE's output gradient, in one gloo process.

Each case shards a model exactly as SparseStrategy does (``shard_tables``), trains it with
:class:`NativeKernelOptimizer` and replays the same batches on an unsharded float64 copy whose row
gradients come from autograd. Covers what the old weight-difference tap got wrong: a table looked up
twice before one backward, a table read by several features, MEAN pooling with per-sample weights,
sequence (EmbeddingCollection) tables, and tiny gradients next to large weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableRoute
from lightning_sparse.distributed.planning import shard_tables, table_owners
from lightning_sparse.distributed.routes import embedding_parameters
from lightning_sparse.optim import init_state_for, sparse_update_for
from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer, attach_row_captures

ROWS, DIM, BATCH = 30, 4, 6


class Bags(torch.nn.Module):
    """Two tables; ``t2`` is read by two features; ``lookups`` forwards per step before one backward."""

    FEATURES = [("f1", "t1"), ("f2", "t2"), ("f3", "t2")]

    def __init__(self, pooling: PoolingType, weighted: bool, lookups: int) -> None:
        super().__init__()
        self.mean = pooling is PoolingType.MEAN
        tables = [
            EmbeddingBagConfig(
                name="t1", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f1"], pooling=pooling
            ),
            EmbeddingBagConfig(
                name="t2", num_embeddings=ROWS, embedding_dim=2 * DIM, feature_names=["f2", "f3"], pooling=pooling
            ),
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=torch.device("cpu"))
        self.lookups = lookups

    def forward(self, kjts: list[KeyedJaggedTensor]) -> torch.Tensor:
        return torch.cat([self.ebc(kjt).values() for kjt in kjts[: self.lookups]], dim=1)

    def reference(self, tables: dict[str, torch.Tensor], kjts: list[KeyedJaggedTensor]) -> torch.Tensor:
        """The same output computed by hand in float64 (torch's EmbeddingBag has no weighted MEAN)."""
        outs = []
        for kjt in kjts[: self.lookups]:
            for feature, table in self.FEATURES:
                jt = kjt[feature]
                w = (
                    jt.weights().double()
                    if jt.weights_or_none() is not None
                    else torch.ones(jt.values().numel(), dtype=torch.float64)
                )
                rows = tables[table][jt.values()] * w.unsqueeze(1)
                bag = torch.repeat_interleave(torch.arange(BATCH), jt.lengths())
                pooled = torch.zeros(BATCH, tables[table].shape[1], dtype=torch.float64).index_add(0, bag, rows)
                if self.mean:
                    pooled = pooled / jt.lengths().clamp_min(1).double().unsqueeze(1)
                outs.append(pooled)
        return torch.cat(outs, dim=1)


class Sequences(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tables = [EmbeddingConfig(name="s1", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f1", "f2"])]
        self.ec = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
        self.lookups = 1

    def forward(self, kjts: list[KeyedJaggedTensor]) -> torch.Tensor:
        out = self.ec(kjts[0])
        return torch.cat([out[key].values() for key in ("f1", "f2")], dim=0)

    def reference(self, tables: dict[str, torch.Tensor], kjts: list[KeyedJaggedTensor]) -> torch.Tensor:
        return torch.cat([tables["s1"][kjts[0][key].values()] for key in ("f1", "f2")], dim=0)


def batch(g: torch.Generator, keys: list[str], weighted: bool) -> KeyedJaggedTensor:
    lengths = torch.randint(0, 4, (len(keys) * BATCH,), generator=g)
    values = torch.randint(0, ROWS // 2, (int(lengths.sum()),), generator=g)  # many repeats
    weights = torch.rand(values.numel(), generator=g) * 2 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)


def train_both(
    model: torch.nn.Module,
    keys: list[str],
    config: SparseOptimizerConfig,
    *,
    weighted: bool = False,
    steps: int = 3,
    weight_scale: float = 1.0,
    grad_scale: float = 1.0,
):
    """Returns (sharded tables, reference tables, captured row grads per step, reference row grads per step)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    ref_tables = {n.split(".")[-2]: p.detach().float().clone() for n, p in model.named_parameters()}
    dmp, tables, _ = shard_tables(model, torch.device("cpu"), dist.group.WORLD, ShardingType.TABLE_WISE, config)
    assert {t.route for t in tables.tables.values()} == {TableRoute.NATIVE}, tables.tables
    gradients, rows = attach_row_captures(dmp, tables.tables)
    native = list(tables.tables.values())
    optimizer = NativeKernelOptimizer(
        native,
        embedding_parameters(model),
        gradients,
        rows,
        table_owners(dmp, [t.name for t in native]),
        0,
        lambda r, n: r,
        torch.device("cpu"),
    )
    ref_states = {n: init_state_for(config, t) for n, t in ref_tables.items()}
    g = torch.Generator().manual_seed(7)
    captured, expected = [], []
    for _ in range(steps):
        kjts = [batch(g, keys, weighted) for _ in range(model.lookups)]
        out = dmp(kjts)
        upstream = (torch.randn(out.shape, generator=g, dtype=torch.float64) * grad_scale).float()
        out.backward(upstream)
        captured.append({t: gradients_of(gradients, t) for t in tables.tables})
        optimizer.step()
        # reference: float64 autograd gradient of the same loss, applied to the float32 tables by the same rule
        leaves = {n: t.double().requires_grad_() for n, t in ref_tables.items()}
        model.reference(leaves, kjts).backward(upstream.double())
        step_expected = {}
        for table, leaf in leaves.items():
            used = kjts[: model.lookups]
            ids = torch.unique(
                torch.cat([k[f].values() for k in used for f in k.keys() if tables.features[f] == table])
            )
            step_expected[table] = (ids, leaf.grad[ids])
            sparse_update_for(config, ref_tables[table], ref_states[table], ids, leaf.grad[ids].float())
        expected.append(step_expected)
    sharded = {n.split(".")[-2]: t for n, t in model.state_dict().items() if n.endswith("weight")}
    sharded = {n: t.local_shards()[0].tensor for n, t in sharded.items()}
    return sharded, ref_tables, captured, expected


def gradients_of(gradients, table):
    for capture in gradients:
        if table in capture.pending:
            parts = [capture.row_grads(table, lookup) for lookup in capture.pending[table]]
            rows = torch.cat([r for r, _ in parts])
            grads = torch.cat([g for _, g in parts])
            unique, inverse = torch.unique(rows, return_inverse=True)
            summed = torch.zeros(unique.numel(), grads.shape[1], dtype=torch.float64).index_add_(0, inverse, grads)
            return unique, summed
    raise KeyError(table)


def assert_exact_rows(captured, expected, rtol=1e-6):
    for got_step, want_step in zip(captured, expected):
        for table, (rows, grads) in got_step.items():
            want_rows, want = want_step[table]
            assert torch.equal(rows, want_rows), table
            err = (grads.float().double() - want).abs() / want.abs().clamp_min(1e-300)
            big = want.abs() > 0
            assert float(err[big].max()) <= rtol, f"{table}: relative error {float(err[big].max())}"


CASES = {
    "sum": (PoolingType.SUM, False, 1),
    "mean": (PoolingType.MEAN, False, 1),
    "sum-weighted": (PoolingType.SUM, True, 1),
    "mean-weighted": (PoolingType.MEAN, True, 1),
    "looked-up-twice": (PoolingType.SUM, False, 2),
    "mean-weighted-twice": (PoolingType.MEAN, True, 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_route_bags_match_float64_reference(gloo_world_of_one, case):
    pooling, weighted, lookups = CASES[case]
    config = SparseOptimizerConfig(kind="adam", lr=0.05, weight_decay=0.03, eps=1e-6, beta1=0.8, beta2=0.99)
    sharded, reference, captured, expected = train_both(
        Bags(pooling, weighted, lookups), ["f1", "f2", "f3"], config, weighted=weighted
    )
    assert_exact_rows(captured, expected)
    for name, table in reference.items():
        torch.testing.assert_close(sharded[name], table, rtol=1e-6, atol=1e-6)


def test_native_route_sequence_tables(gloo_world_of_one):
    config = SparseOptimizerConfig(kind="decayed_adagrad", lr=0.1, decay=0.9, eps=1e-5, weight_decay=0.02)
    sharded, reference, captured, expected = train_both(Sequences(), ["f1", "f2"], config)
    assert_exact_rows(captured, expected)
    torch.testing.assert_close(sharded["s1"], reference["s1"], rtol=1e-6, atol=1e-6)


def test_tiny_gradients_next_to_large_weights_are_exact(gloo_world_of_one):
    """|w| ~ 1e3 and |g| ~ 1e-12: the weight-difference tap lost such gradients entirely."""
    config = SparseOptimizerConfig(kind="rowwise_adam", lr=0.01)
    _, _, captured, expected = train_both(
        Bags(PoolingType.MEAN, True, 2),
        ["f1", "f2", "f3"],
        config,
        weighted=True,
        weight_scale=1e3 / 0.2,
        grad_scale=1e-12,
        steps=2,
    )
    assert_exact_rows(captured, expected)
    assert max(float(g.abs().max()) for step in captured for _, g in step.values()) < 1e-10


def test_a_native_tbe_leaves_its_weights_to_our_optimizer(gloo_world_of_one):
    """fbgemm's backward never runs for a native TBE: without our step, the tables stay bit-identical."""
    model = Bags(PoolingType.SUM, False, 2)
    dmp, tables, _ = shard_tables(
        model, torch.device("cpu"), dist.group.WORLD, ShardingType.TABLE_WISE, SparseOptimizerConfig(kind="adam")
    )
    gradients, _ = attach_row_captures(dmp, tables.tables)
    before = {k: v.local_shards()[0].tensor.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    g = torch.Generator().manual_seed(3)
    dmp([batch(g, ["f1", "f2", "f3"], False) for _ in range(2)]).sum().backward()
    for key, value in model.state_dict().items():
        if key.endswith("weight"):
            assert torch.equal(value.local_shards()[0].tensor, before[key]), key
    assert all(len(p) == 2 for c in gradients for p in c.pending.values())  # both lookups captured
