"""Memory accounting on small known shapes: exact byte counts for plain torch, unsharded TorchRec and a
sharded DMP (1 gloo rank) with its fused optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_sparse.optim import SparseRowOptimizer
from lightning_sparse.optim.memory import memory_report, tensor_bytes

F32 = 4


class Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = torch.nn.EmbeddingBag(100, 8, mode="sum", sparse=True)
        self.item = torch.nn.Embedding(30, 8, sparse=True)
        self.mlp = torch.nn.Linear(16, 4)  # 64 + 4 params

    def forward(self, u, i):
        return self.mlp(torch.cat([self.user(u, torch.tensor([0])), self.item(i)], dim=1)).sum()


def _step(model, *opts):
    for o in opts:
        o.zero_grad()
    model(torch.tensor([1, 2, 2]), torch.tensor([5])).backward()
    for o in opts:
        o.step()


def test_adam_everywhere_counts_two_moments_and_step_per_parameter():
    model = Plain()
    for m in (model.user, model.item):
        m.sparse = False  # dense Adam needs dense grads
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    before = memory_report(model, [opt])
    assert before.sparse_optimizer_bytes == 0 and before.dense_optimizer_bytes == 0  # lazy state
    _step(model, opt)
    r = memory_report(model, [opt])
    assert set(r.tables) == {"user", "item"}
    assert (r.tables["user"].rows, r.tables["user"].dim) == (100, 8)
    assert r.tables["user"].weight_bytes == 100 * 8 * F32
    assert r.tables["user"].optimizer_bytes == 2 * 100 * 8 * F32 + F32  # exp_avg, exp_avg_sq, 0-d step
    assert r.tables["item"].optimizer_bytes == 2 * 30 * 8 * F32 + F32
    assert r.dense_weight_bytes == (64 + 4) * F32
    assert r.dense_optimizer_bytes == 2 * (64 + 4) * F32 + 2 * F32
    assert r.total_bytes == r.weight_bytes + r.optimizer_bytes == 3 * (130 * 8 + 68) * F32 + 4 * F32


def test_rowwise_sparse_plus_dense_adam_and_metrics():
    model = Plain()
    sparse = SparseRowOptimizer([model.user.weight, model.item.weight], kind="rowwise_adagrad")
    dense = torch.optim.Adam(model.mlp.parameters())
    _step(model, sparse, dense)
    r = memory_report(model, [dense, sparse])
    assert r.tables["user"].optimizer_bytes == 100 * F32
    assert r.tables["item"].optimizer_bytes == 30 * F32
    assert r.sparse_optimizer_bytes == 130 * F32
    assert r.embedding_weight_bytes == 130 * 8 * F32
    assert r.dense_optimizer_bytes == 2 * 68 * F32 + 2 * F32
    metrics = r.as_metrics()
    assert metrics["memory/sparse_optimizer_bytes"] == 130.0 * F32
    assert metrics["memory/table/user/weight_bytes"] == 3200.0
    assert metrics["memory/total_bytes"] == float(r.total_bytes)
    assert all(isinstance(v, float) for v in metrics.values())
    assert "memory/table/user/weight_bytes" not in r.as_metrics(per_table=False)


def test_rowwise_adam_per_row_step_is_counted():
    model = Plain()
    sparse = SparseRowOptimizer([model.user.weight], kind="rowwise_adam", first_moment=True, per_row_step=True)
    r = memory_report(model, [sparse])
    assert r.tables["user"].optimizer_bytes == 100 * F32 + 100 * 8 * F32 + 100 * 8  # v, m, int64 steps
    assert r.tables["item"].optimizer_bytes == 0


def test_unsharded_torchrec_collection():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"]),
            EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=50, feature_names=["f2"]),
        ]
    )
    opt = SparseRowOptimizer(ebc.parameters(), kind="adagrad")
    r = memory_report(ebc, [opt])
    assert {k: (v.weight_bytes, v.optimizer_bytes) for k, v in r.tables.items()} == {
        "embedding_bags.t1": (3200, 3200),
        "embedding_bags.t2": (800, 800),
    }
    assert r.dense_weight_bytes == 0 and r.dense_optimizer_bytes == 0


def test_sharded_dmp_with_fused_rowwise_adagrad(gloo_world_of_one):
    import torchrec
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"]),
                    EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=50, feature_names=["f2"]),
                ],
                device=torch.device("meta"),
            )
            self.lin = torch.nn.Linear(12, 1)

    model = Model()
    apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1})
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"),
        constraints={t: ParameterConstraints(sharding_types=["table_wise"]) for t in ("t1", "t2")},
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = torch.optim.Adam(dmp.module.lin.parameters())

    r = memory_report(dmp, [dense])  # fused optimizer found automatically
    assert {k: (v.weight_bytes, v.optimizer_bytes) for k, v in r.tables.items()} == {
        "ebc.embedding_bags.t1": (100 * 8 * F32, 100 * F32),
        "ebc.embedding_bags.t2": (50 * 4 * F32, 50 * F32),
    }
    assert r.dense_weight_bytes == 13 * F32
    assert r.dense_optimizer_bytes == 0  # Adam state is lazy
    # Passing the fused optimizer explicitly does not count it twice.
    assert memory_report(dmp, [dense, dmp.fused_optimizer]).sparse_optimizer_bytes == 150 * F32


def test_tensor_bytes_handles_non_tensors_and_meta():
    assert tensor_bytes(None) == 0 and tensor_bytes(3) == 0
    assert tensor_bytes(torch.empty(10, 10, device="meta")) == 0
    assert tensor_bytes(torch.zeros(3, dtype=torch.float16)) == 6


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole buffer once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    "kinds",
    [("sgd", "rowwise_adagrad", "adam", "rowwise_adam"), ("adagrad", "decayed_adagrad", "rowwise_adagrad", "adam")],
)
def test_every_route_counts_its_optimizer_state_as_allocated(gloo_world_of_one, kinds):
    """fused (fbgemm's buffers), native (our kernels) and data_parallel tables: the report's sparse optimizer
    bytes equal the storage of the tensors that actually hold that state (adam once showed 0.0 MiB)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.optim.keyed import CombinedOptimizer

    from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig, TableRoute
    from lightning_sparse.distributed.planning import shard_tables, table_owners
    from lightning_sparse.distributed.routes import embedding_parameters
    from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer, attach_row_captures
    from lightning_sparse.optim.row_gradients import find_lookup_kernels

    names = [f"t{i}" for i in range(len(kinds) * 2)]
    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=n, embedding_dim=4 + 4 * (i % 2), num_embeddings=20 + i, feature_names=[f"f{n}"])
            for i, n in enumerate(names)
        ],
        device=torch.device("cpu"),
    )
    overrides = {}
    for i, kind in enumerate(kinds):
        overrides[names[2 * i]] = TableConfig(optimizer=SparseOptimizerConfig(kind=kind))
        overrides[names[2 * i + 1]] = TableConfig(
            sharding="data_parallel", optimizer=SparseOptimizerConfig(kind=kind, weight_decay=0.1)
        )
    dmp, tables, _ = shard_tables(
        model, torch.device("cpu"), dist.group.WORLD, ShardingType.TABLE_WISE, SparseOptimizerConfig(), overrides
    )
    routes = {t.route for t in tables.tables.values()}
    assert TableRoute.DATA_PARALLEL in routes and TableRoute.FUSED in routes and TableRoute.NATIVE in routes
    ours = [t for t in tables.tables.values() if t.route is not TableRoute.FUSED]
    gradients, rows = attach_row_captures(dmp, tables.tables)
    native = NativeKernelOptimizer(
        ours,
        embedding_parameters(model),
        gradients,
        rows,
        table_owners(dmp, [t.name for t in ours if t.route is TableRoute.NATIVE]),
        0,
        lambda r, n: r,
        torch.device("cpu"),
    )
    # as the strategy calls it: the module, not the DMP, and its named CombinedOptimizer (keys get prefixed)
    report = memory_report(model, [CombinedOptimizer([("fused", dmp.fused_optimizer), ("native_kernels", native)])])

    held = [
        t
        for kernel in find_lookup_kernels(dmp)
        if kernel.config.compute_kernel.value == "fused"
        for states in kernel.emb_module.split_optimizer_states()
        for t in states
    ]
    held += [t for state in native._states.values() for t in state.values()]
    assert report.sparse_optimizer_bytes == _storage_bytes(held) > 0
    for table in tables.tables.values():
        counted = report.tables[f"ebc.embedding_bags.{table.name}"].optimizer_bytes
        if table.optimizer.kind.value == "sgd":  # no state on any route
            assert counted == 0
        else:
            assert counted > 0, (table.name, table.route, table.optimizer.kind)
