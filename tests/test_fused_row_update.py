"""embedding_row_update (row gradients and rule in one pass) gives the bits of the two-step native route:
embedding_row_grads -> .float() -> sparse_opt_<kind>, for every kind, pooling, weights and shared tables; on
the native op and on its PyTorch twin; and the native-route optimizer uses it for tables looked up once."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse import ops
from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.optim import init_state, reference
from lightning_sparse.optim.kernels import _call_update, sparse_update_for
from lightning_sparse.optim.row_grads import (
    POOLING_MEAN,
    POOLING_NONE,
    POOLING_SUM,
    embedding_row_grads,
    embedding_row_grads_reference,
)
from lightning_sparse.optim.row_update import embedding_row_update_for, embedding_row_update_reference

native_built = ops.native_op_for("embedding_row_update", torch.device("cpu")) is not None
needs_native = pytest.mark.skipif(not native_built, reason="native extension not built")

# (kind, first_moment, per_row_step)
VARIANTS = [
    ("sgd", False, False),
    ("adagrad", False, False),
    ("rowwise_adagrad", False, False),
    ("decayed_adagrad", False, False),
    ("rowwise_adam", False, False),
    ("rowwise_adam", True, False),
    ("rowwise_adam", True, True),
    ("adam", False, False),
    ("adam", False, True),
]
NUM_ROWS, DIM = 40, 6


def lookup(
    seed: int,
    *,
    mode: int,
    weighted: bool,
    features=(2, 0),
    num_features=3,
    batch=7,
    max_len=5,
    index_dtype=torch.int64,
    empty_bags=False,
):
    """One lookup's (grad_output, indices, offsets, weights, features, columns, dim, num_features, mode)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_features * batch,), generator=g)
    if empty_bags:
        lengths[::2] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(index_dtype)
    n = int(offsets[-1])
    indices = torch.randint(0, NUM_ROWS, (n,), generator=g).to(index_dtype)
    width = num_features * DIM + 3
    grad_output = torch.randn(n if mode == POOLING_NONE else batch, width, generator=g)
    grad_output[0, :2] = -0.0  # a negative zero gradient must stay what the two-step path makes of it
    weights = torch.randn(n, generator=g) if weighted else None
    columns = [1 + f * DIM for f in features]
    return (
        grad_output,
        indices,
        offsets,
        weights,
        torch.tensor(features, dtype=torch.int64),
        torch.tensor(columns, dtype=torch.int64),
        DIM,
        num_features,
        mode,
    )


def table(kind: str, first_moment: bool, per_row_step: bool, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_ROWS, DIM, generator=g)
    weight[3, 1] = -0.0
    state = init_state(kind, weight, first_moment=first_moment, per_row_step=per_row_step)
    for value in state.values():  # non-trivial state: earlier steps happened
        if value.dtype == torch.float32:
            value.copy_(torch.rand(value.shape, generator=g))
        else:
            value.fill_(3)
    return weight, state


def config_for(kind: str, first_moment: bool, weight_decay: float) -> SparseOptimizerConfig:
    return SparseOptimizerConfig(
        kind=kind,
        lr=0.07,
        eps=1e-3,
        weight_decay=weight_decay,
        beta1=0.85,
        beta2=0.97,
        decay=0.9,
        first_moment=first_moment,
    )


def two_step(config, weight, state, args) -> None:
    """Today's path: row grads (native op when built) -> .float() -> sparse_opt_<kind> (native op when built)."""
    rows, grads = embedding_row_grads(*args)
    sparse_update_for(config, weight, state, rows, grads.float())


def two_step_twins(config, weight, state, args) -> None:
    """The same two steps through the PyTorch twins of both ops."""
    rows, grads = embedding_row_grads_reference(*args)
    fn = getattr(reference, f"sparse_opt_{config.kind.value}")
    _call_update(
        config.kind,
        fn,
        weight,
        state,
        rows,
        grads.float(),
        config.lr,
        config.eps,
        config.weight_decay,
        config.beta1,
        config.beta2,
        config.decay,
    )


def native(config, weight, state, args) -> None:
    embedding_row_update_for(config, weight, state, *args)


def twin(config, weight, state, args) -> None:
    embedding_row_update_reference(
        *args,
        config.kind.value,
        weight,
        state.get("sum"),
        state.get("exp_avg"),
        state.get("exp_avg_sq"),
        state.get("step"),
        config.lr,
        config.eps,
        config.weight_decay,
        config.beta1,
        config.beta2,
        config.decay,
    )


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(
        a.view(-1).view(torch.int32) if a.dtype == torch.float32 else a,
        b.view(-1).view(torch.int32) if b.dtype == torch.float32 else b,
    ), f"{what}: not bit-identical"


def run_steps(path, kind, first_moment, per_row_step, config, args, steps):
    weight, state = table(kind, first_moment, per_row_step)
    for _ in range(steps):
        path(config, weight, state, args)
    return weight, state


def assert_same_table(got, want, what: str) -> None:
    assert_same_bits(got[0], want[0], f"{what}: weight")
    assert got[1].keys() == want[1].keys()
    for key in got[1]:
        assert_same_bits(got[1][key], want[1][key], f"{what}: {key}")


def check(kind, first_moment, per_row_step, args, weight_decay=0.0, steps=2) -> None:
    """Native fused op == two-step path bit for bit; twin == the twins' two steps bit for bit; twin ~ native."""
    config = config_for(kind, first_moment, weight_decay)
    got_twin = run_steps(twin, kind, first_moment, per_row_step, config, args, steps)
    assert_same_table(
        got_twin, run_steps(two_step_twins, kind, first_moment, per_row_step, config, args, steps), "twin"
    )
    if not native_built:
        return
    got = run_steps(native, kind, first_moment, per_row_step, config, args, steps)
    assert_same_table(got, run_steps(two_step, kind, first_moment, per_row_step, config, args, steps), "native")
    torch.testing.assert_close(got_twin[0], got[0], atol=1e-5, rtol=1e-5)  # the twins round like torch, not bitwise
    for key in got[1]:
        torch.testing.assert_close(got_twin[1][key], got[1][key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_MEAN, POOLING_NONE])
def test_fused_update_equals_two_step_path(kind, first_moment, per_row_step, mode):
    check(kind, first_moment, per_row_step, lookup(1, mode=mode, weighted=False), weight_decay=0.02)


@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_MEAN, POOLING_NONE])
def test_fused_update_with_per_sample_weights_and_no_decay(kind, first_moment, per_row_step, mode):
    check(kind, first_moment, per_row_step, lookup(2, mode=mode, weighted=True), weight_decay=0.0)


@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
def test_fused_update_shared_table_int32_and_empty_bags(kind, first_moment, per_row_step):
    """Three features read the table (shared), a third of the bags are empty, int32 indices and offsets."""
    args = lookup(3, mode=POOLING_MEAN, weighted=True, features=(1, 2, 0), index_dtype=torch.int32, empty_bags=True)
    check(kind, first_moment, per_row_step, args, weight_decay=0.01)


@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
def test_fused_update_of_a_lookup_that_read_no_row(kind, first_moment, per_row_step):
    """Every bag empty: no row changes, and a global Adam step still advances once, as in the two-step path."""
    args = lookup(4, mode=POOLING_SUM, weighted=False, max_len=0)
    assert args[1].numel() == 0
    check(kind, first_moment, per_row_step, args, weight_decay=0.01)


@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_NONE])
def test_fused_update_over_many_rows_and_threads(mode):
    """Enough work for the op's OpenMP path (>= 2**20 multiply-adds), with 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        global NUM_ROWS, DIM
        saved = NUM_ROWS, DIM
        NUM_ROWS, DIM = 3000, 64
        try:
            args = lookup(6, mode=mode, weighted=True, batch=1200, max_len=30)
            check("adam", False, True, args, weight_decay=0.01, steps=1)
            check("rowwise_adagrad", False, False, args, weight_decay=0.01, steps=1)
        finally:
            NUM_ROWS, DIM = saved
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_fused_op_errors_name_the_problem():
    args = lookup(7, mode=POOLING_SUM, weighted=False)
    weight, state = table("adagrad", False, False)
    op = torch.ops.lightning_sparse.embedding_row_update
    with pytest.raises(RuntimeError, match="unknown sparse optimizer kind 'adamw'"):
        op(*args, "adamw", weight, state["sum"], None, None, None, 0.1, 1e-8, 0.0, 0.9, 0.999, 0.95)
    with pytest.raises(RuntimeError, match="adagrad needs its state tensor 'sum'"):
        op(*args, "adagrad", weight, None, None, None, None, 0.1, 1e-8, 0.0, 0.9, 0.999, 0.95)
    with pytest.raises(RuntimeError, match=r"row index \d+ out of range \[0, 10\)"):
        op(
            *args,
            "adagrad",
            weight[:10].clone(),
            state["sum"][:10].clone(),
            None,
            None,
            None,
            0.1,
            1e-8,
            0.0,
            0.9,
            0.999,
            0.95,
        )
    with pytest.raises(RuntimeError, match=r"weight must have shape \[rows, 6\]"):
        op(*args, "sgd", torch.zeros(NUM_ROWS, 5), None, None, None, None, 0.1, 1e-8, 0.0, 0.9, 0.999, 0.95)


@pytest.mark.parametrize("lookups", [1, 2])
@pytest.mark.parametrize("kind", ["adam", "rowwise_adagrad", "decayed_adagrad"])
def test_native_route_step_has_the_two_step_bits(gloo_world_of_one, kind, lookups):
    """The optimizer's step (fused op for one lookup, float64 merge for two) == the two-step path, bit for bit."""
    import torch.distributed as dist
    from test_row_gradients import Bags, batch
    from torchrec.modules.embedding_configs import PoolingType

    from lightning_sparse.config import ShardingType
    from lightning_sparse.distributed.planning import shard_tables, table_owners
    from lightning_sparse.distributed.routes import embedding_parameters
    from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer, attach_row_captures
    from lightning_sparse.optim.row_gradients import merge_row_grads

    config = SparseOptimizerConfig(kind=kind, lr=0.05, weight_decay=0.03, eps=1e-6, beta1=0.8, beta2=0.99, decay=0.9)
    model = Bags(PoolingType.MEAN, True, lookups)
    dmp, tables, _ = shard_tables(model, torch.device("cpu"), dist.group.WORLD, ShardingType.TABLE_WISE, config)
    gradients, rows = attach_row_captures(dmp, tables.tables)
    native_tables = list(tables.tables.values())
    optimizer = NativeKernelOptimizer(
        native_tables,
        embedding_parameters(model),
        gradients,
        rows,
        table_owners(dmp, [t.name for t in native_tables]),
        0,
        lambda r, n: r,
        torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        out = dmp([batch(g, ["f1", "f2", "f3"], True) for _ in range(lookups)])
        out.backward(torch.randn(out.shape, generator=g))
        expected = {}
        for capture in gradients:
            for t in capture.tables:
                assert len(capture.pending[t.name]) == lookups
                weight = optimizer._local_weight[t.name].clone()
                state = {k: v.clone() for k, v in optimizer._states[t.name].items()}
                merged = merge_row_grads([capture.row_grads(t.name, lookup) for lookup in capture.pending[t.name]])
                sparse_update_for(config, weight, state, *merged)
                expected[t.name] = (weight, state)
        optimizer.step()
        for name, want in expected.items():
            assert_same_table((optimizer._local_weight[name], optimizer._states[name]), want, name)
            assert not any(capture.pending.get(name) for capture in gradients)  # taken by the step
