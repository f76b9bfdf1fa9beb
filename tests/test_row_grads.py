"""Exact row gradients from a TBE's output gradient: native op vs PyTorch twin vs an independent float64
reference (autograd through ``embedding_bag`` / ``embedding``) vs fbgemm's own CPU TBE."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sparse import ops
from lightning_sparse.optim import row_grads
from lightning_sparse.optim.row_grads import POOLING_MEAN, POOLING_NONE, POOLING_SUM, embedding_row_grads_reference

native_built = ops.native_enabled() and ops.native_available()
needs_native = pytest.mark.skipif(not native_built, reason="native extension not built or LIGHTNING_SPARSE_NATIVE=0")


def native(*args):
    return torch.ops.lightning_sparse.embedding_row_grads(*args)


def implementations() -> list:
    return [native, embedding_row_grads_reference] if native_built else [embedding_row_grads_reference]


def float64_reference(grad_output, indices, offsets, weights, features, columns, dim, num_features, mode, num_rows):
    """Rows read and their gradient, by autograd in float64 through torch's own lookups of a dense table."""
    table = torch.zeros(num_rows, dim, dtype=torch.float64, requires_grad=True)
    batch = (offsets.numel() - 1) // num_features
    off = offsets.long()
    loss = (table * 0.0).sum()  # a graph even when no feature is listed
    read = []
    for f, col in zip(features.tolist(), columns.tolist()):
        start, end = int(off[f * batch]), int(off[(f + 1) * batch])
        ids = indices[start:end].long()
        w = weights[start:end].double() if weights is not None else None
        read.append(ids)
        if mode == POOLING_NONE:
            rows = F.embedding(ids, table)
            if w is not None:
                rows = rows * w.unsqueeze(1)
            loss = loss + (rows * grad_output[start:end, :dim].double()).sum()
            continue
        bag_starts = off[f * batch : (f + 1) * batch] - start
        if mode == POOLING_MEAN and w is not None:  # torch's mean mode takes no weights: divide the sums
            lengths = (off[f * batch + 1 : (f + 1) * batch + 1] - off[f * batch : (f + 1) * batch]).clamp(min=1)
            pooled = (
                F.embedding_bag(ids, table, bag_starts, mode="sum", per_sample_weights=w)
                / lengths.unsqueeze(1).double()
            )
        else:
            pooled = F.embedding_bag(
                ids, table, bag_starts, mode="sum" if mode == POOLING_SUM else "mean", per_sample_weights=w
            )
        loss = loss + (pooled * grad_output[:, col : col + dim].double()).sum()
    loss.backward()
    rows = torch.unique(torch.cat(read)) if read else torch.empty(0, dtype=torch.int64)
    return rows, table.grad[rows]


def assert_exact_enough(rows, grads, expected_rows, expected, magnitude):
    """Same rows; float32 casts within 1e-6 relative (+ float64 rounding of the magnitudes summed)."""
    assert torch.equal(rows, expected_rows)
    assert grads.dtype == torch.float64 and grads.shape == expected.shape
    got, want = grads.float().double(), expected.float().double()
    bound = 1e-6 * want.abs() + 1e-12 * magnitude
    assert bool(((got - want).abs() <= bound).all()), f"max error {(got - want).abs().max()}"


def case(
    seed,
    *,
    num_features=3,
    batch=5,
    max_len=4,
    num_rows=9,
    width=24,
    dims=6,
    mode=POOLING_SUM,
    weighted=False,
    features=(2, 0),
    columns=(10, 3),
    index_dtype=torch.int64,
    g_scale=1.0,
    w_scale=1.0,
):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_features * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(index_dtype)
    n = int(offsets[-1])
    indices = torch.randint(0, num_rows, (n,), generator=g).to(index_dtype)
    rows_out = n if mode == POOLING_NONE else batch
    grad_output = (torch.randn(rows_out, width, generator=g) * g_scale).float()
    weights = (torch.randn(n, generator=g) * w_scale).float() if weighted else None
    features_t, columns_t = torch.tensor(features, dtype=torch.int64), torch.tensor(columns, dtype=torch.int64)
    return (grad_output, indices, offsets, weights, features_t, columns_t, dims, num_features, mode)


def check_case(args, num_rows=9):
    grad_output, _, _, weights, _, _, _, _, mode = args
    expected_rows, expected = float64_reference(*args, num_rows)
    abs_args = (grad_output.abs(), *args[1:3], weights.abs() if weights is not None else None, *args[4:])
    _, magnitude = float64_reference(*abs_args, num_rows)
    results = [fn(*args) for fn in implementations()]
    for rows, grads in results:
        assert_exact_enough(rows, grads, expected_rows, expected, magnitude)
    if len(results) == 2:  # same order, same roundings: the same bits on CPU
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_MEAN, POOLING_NONE])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_float64_autograd_reference(mode, weighted, index_dtype):
    """Duplicates within and across bags, empty bags, two features of one table at different columns."""
    for seed in range(4):
        check_case(case(seed, mode=mode, weighted=weighted, index_dtype=index_dtype))


@pytest.mark.parametrize("mode", [POOLING_SUM, POOLING_MEAN])
def test_tiny_gradients_and_large_weights(mode):
    """|w| ~ 1e3 and |g| ~ 1e-12 (products ~1e-9): float64 sums keep every digit float32 can hold."""
    check_case(case(7, mode=mode, weighted=True, g_scale=1e-12, w_scale=1e3, num_rows=3, max_len=6), num_rows=3)


def test_hand_computed_example():
    # feature 0 (columns 0:2): bags [4, 1, 4], [] ; feature 1 (columns 2:4): [1], [4]; mean pooling, weights
    grad_output = torch.tensor([[1.0, 2.0, 10.0, 20.0], [3.0, 4.0, 30.0, 40.0]])
    indices = torch.tensor([4, 1, 4, 1, 4])
    offsets = torch.tensor([0, 3, 3, 4, 5])
    weights = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0])
    for fn in implementations():
        rows, grads = fn(
            grad_output, indices, offsets, weights, torch.tensor([1, 0]), torch.tensor([2, 0]), 2, 2, POOLING_MEAN
        )
        assert rows.tolist() == [1, 4]
        # row 1: 2/3 * [1, 2] + 0.5 * [10, 20]; row 4: (1 + 3)/3 * [1, 2] + 4 * [30, 40]
        torch.testing.assert_close(
            grads, torch.tensor([[2 / 3 + 5, 4 / 3 + 10], [4 / 3 + 120, 8 / 3 + 160]], dtype=torch.float64)
        )


@needs_native
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_features=st.integers(1, 4),
    batch=st.integers(0, 6),
    max_len=st.integers(0, 5),
    num_rows=st.integers(1, 12),
    dims=st.integers(1, 5),
    mode=st.sampled_from([POOLING_SUM, POOLING_MEAN, POOLING_NONE]),
    weighted=st.booleans(),
    data=st.data(),
)
def test_native_matches_twin_and_reference_property(
    seed, num_features, batch, max_len, num_rows, dims, mode, weighted, data
):
    features = data.draw(st.lists(st.integers(0, num_features - 1), unique=True, max_size=num_features))
    width = dims * (num_features + 1)
    columns = [data.draw(st.integers(0, width - dims)) for _ in features]
    args = case(seed, num_features=num_features, batch=batch, max_len=max_len, num_rows=num_rows, width=width, dims=dims,
                mode=mode, weighted=weighted, features=features, columns=columns)  # fmt: skip
    check_case(args, num_rows=num_rows)


@pytest.mark.parametrize("high", [2**20, 2**40, 2**62])
def test_large_row_ids_group_like_compact_ones(high):
    """Row ids up to 2**62 (multi-pass radix sort; past 64 key bits, a comparison sort) give the gradients
    of the same ids renumbered 0..U-1."""
    args = list(case(4, num_rows=6, max_len=6, weighted=True))
    compact = args[1]
    spread = torch.tensor([0, 1, high // 3, high // 2 + 7, high - 2, high - 1])
    args[1] = spread[compact]
    expected_rows, expected = embedding_row_grads_reference(grad_output=args[0], indices=compact, offsets=args[2],
                                                            per_sample_weights=args[3], features=args[4], column_offsets=args[5],
                                                            dim=args[6], num_features=args[7], pooling_mode=args[8])  # fmt: skip
    for fn in implementations():
        rows, grads = fn(*args)
        assert torch.equal(rows, spread[expected_rows])
        assert torch.equal(grads, expected)


def test_grad_output_with_a_row_stride_wider_than_its_columns():
    args = list(case(5, weighted=True, mode=POOLING_MEAN))
    wide = torch.randn(args[0].shape[0], args[0].shape[1] + 9)
    wide[:, 4 : 4 + args[0].shape[1]] = args[0]
    expected = implementations()[0](*args)
    args[0] = wide[:, 4 : 4 + args[0].shape[1]]
    assert not args[0].is_contiguous()
    for fn in implementations():
        rows, grads = fn(*args)
        assert torch.equal(rows, expected[0]) and torch.equal(grads, expected[1])


def test_dispatcher_uses_native_op_or_twin(monkeypatch):
    args = case(3, mode=POOLING_MEAN, weighted=True)
    expected = embedding_row_grads_reference(*args)
    for enabled in ("1", "0"):
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", enabled)
        picked = ops.native_op_for("embedding_row_grads", "cpu")
        assert (picked is not None) == (enabled == "1" and ops.native_available())
        rows, grads = row_grads.embedding_row_grads(*args)
        assert torch.equal(rows, expected[0]) and torch.equal(grads, expected[1])


def _negative_id(kwargs: dict) -> dict:
    indices = kwargs["indices"].clone()
    indices[int(kwargs["offsets"][2 * 5])] = -3  # first id of feature 2 (batch 5)
    return dict(indices=indices)


BAD = [
    (lambda kw: dict(grad_output=kw["grad_output"].double()), "grad_output must be float32, got .*(Double|float64)"),
    (lambda kw: dict(offsets=kw["offsets"][:-1]), "variable batch size per feature is not supported"),
    (_negative_id, "negative row id -3"),
    (lambda kw: dict(pooling_mode=3), "pooling_mode must be 0 .SUM., 1 .MEAN. or 2 .NONE."),
    (lambda kw: dict(features=torch.tensor([2, 3])), "feature 3 out of range"),
    (lambda kw: dict(column_offsets=torch.tensor([20, 3])), r"columns \[20, 26\) of feature 2 do not fit"),
    (lambda kw: dict(features=torch.tensor([2, 2])), "feature 2 is listed twice"),
    (lambda kw: dict(per_sample_weights=torch.ones(2)), "per_sample_weights must have shape"),
    (lambda kw: dict(indices=kw["indices"].float()), "indices must be int64 or int32"),
    (lambda kw: dict(grad_output=kw["grad_output"][:4]), "one row per sample .batch 5"),
]


@pytest.mark.parametrize("fn", implementations(), ids=lambda fn: fn.__name__)
@pytest.mark.parametrize("change,message", BAD, ids=[message[:24] for _, message in BAD])
def test_bad_inputs_name_the_problem(fn, change, message):
    names = [
        "grad_output",
        "indices",
        "offsets",
        "per_sample_weights",
        "features",
        "column_offsets",
        "dim",
        "num_features",
        "pooling_mode",
    ]
    kwargs = dict(zip(names, case(1)))
    kwargs.update(change(kwargs))
    with pytest.raises((ValueError, RuntimeError), match=message):
        fn(*[kwargs[name] for name in names])


@pytest.mark.parametrize("fn", implementations(), ids=lambda fn: fn.__name__)
def test_decreasing_offsets_are_an_error(fn):
    args = list(case(2, max_len=3))
    offsets = args[2].clone()
    offsets[4] = int(offsets[5]) + 1  # offsets[4] > offsets[5]
    args[2] = offsets
    with pytest.raises((ValueError, RuntimeError), match="offsets must"):
        fn(*args)


# ---- against fbgemm's CPU TBE ------------------------------------------------------------------------------


def make_tbe(dims: list[int], num_rows: list[int], feature_table_map: list[int], mode: int, lr: float):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    specs = [(n, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for n, d in zip(num_rows, dims)]
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=specs, feature_table_map=feature_table_map, optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=lr, pooling_mode=PoolingMode(mode),
    )  # fmt: skip


def tbe_batch(
    seed: int, num_features: int, batch: int, num_rows: list[int], feature_table_map: list[int], weighted: bool
):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (num_features * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = []
    for f in range(num_features):
        count = int(lengths[f * batch : (f + 1) * batch].sum())
        ids.append(torch.randint(0, num_rows[feature_table_map[f]], (count,), generator=g))
    indices = torch.cat(ids)
    weights = torch.rand(indices.numel(), generator=g) + 0.5 if weighted else None
    return indices, offsets, weights


def run_tbe(tbe, indices, offsets, weights, seed):
    """Forward, a nonlinear loss, backward; returns (weights before, output gradient, output)."""
    g = torch.Generator().manual_seed(seed)
    tables = tbe.split_embedding_weights()
    with torch.no_grad():
        for t in tables:
            t.copy_(torch.randn(t.shape, generator=g))
    before = [t.clone() for t in tables]
    out = tbe(indices=indices, offsets=offsets, per_sample_weights=weights)
    out.retain_grad()
    (out.sin() * torch.randn(out.shape, generator=g)).sum().backward()
    return before, out.grad, out.detach()


@pytest.mark.parametrize(
    "mode,weighted,feature_table_map",
    [(POOLING_SUM, False, [0, 1, 0]), (POOLING_SUM, True, [0, 1, 0]), (POOLING_MEAN, False, [0, 1, 0]),
     (POOLING_MEAN, True, [1, 0, 1]), (POOLING_NONE, False, [0, 1])],
)  # fmt: skip
def test_matches_fbgemm_tbe(mode, weighted, feature_table_map):
    """Row gradients from a real TBE's output gradient equal the float64 reference for every table, with the
    TBE's own column layout (D_offsets) and two features sharing a table. (fbgemm's CPU sequence lookup
    rejects shared tables, so NONE uses one feature per table.)"""
    dims = [4, 4] if mode == POOLING_NONE else [4, 8]
    num_rows, batch = [11, 7], 6
    num_features = len(feature_table_map)
    tbe = make_tbe(dims, num_rows, feature_table_map, mode, lr=0.0)
    indices, offsets, weights = tbe_batch(5, num_features, batch, num_rows, feature_table_map, weighted)
    before, grad_output, out = run_tbe(tbe, indices, offsets, weights, seed=6)
    d_offsets = tbe.D_offsets.tolist()
    for t, table in enumerate(before):
        features = torch.tensor([f for f, owner in enumerate(feature_table_map) if owner == t])
        columns = torch.tensor([d_offsets[f] for f in features.tolist()])
        args = (grad_output, indices, offsets, weights, features, columns, dims[t], num_features, mode)
        # the layout we assume is the TBE's: its output is the lookup of each feature at its columns
        ref_out = _pooled(table, indices, offsets, weights, features, columns, dims[t], num_features, mode)
        for f, col in zip(features.tolist(), columns.tolist()):
            got = out[_positions(offsets, f, batch)] if mode == POOLING_NONE else out[:, col : col + dims[t]]
            torch.testing.assert_close(got.double(), ref_out[f], rtol=1e-5, atol=1e-5)
        expected_rows, expected = float64_reference(*args, num_rows[t])
        _, magnitude = float64_reference(
            grad_output.abs(), indices, offsets, weights, features, columns, dims[t], num_features, mode, num_rows[t]
        )
        for fn in implementations():
            rows, grads = fn(*args)
            assert_exact_enough(rows, grads, expected_rows, expected, magnitude)
        torch.testing.assert_close(tbe.split_embedding_weights()[t], table, rtol=0, atol=0)  # lr 0: untouched


def fbgemm_sgd_row_grads(mode: int, weighted: bool, seed: int):
    """fbgemm's own float32 row gradients: fused SGD at lr 1 on zero tables leaves -gradient in the rows."""
    feature_table_map, dims, num_rows, batch = [0, 1, 0], [4, 8], [11, 7], 6
    tbe = make_tbe(dims, num_rows, feature_table_map, mode, lr=1.0)
    indices, offsets, weights = tbe_batch(seed, 3, batch, num_rows, feature_table_map, weighted=weighted)
    with torch.no_grad():
        for t in tbe.split_embedding_weights():
            t.zero_()
    out = tbe(indices=indices, offsets=offsets, per_sample_weights=weights)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad_output)
    d_offsets = tbe.D_offsets.tolist()
    for t, table in enumerate(tbe.split_embedding_weights()):
        features = torch.tensor([f for f, owner in enumerate(feature_table_map) if owner == t])
        columns = torch.tensor([d_offsets[f] for f in features.tolist()])
        args = (grad_output, indices, offsets, weights, features, columns, dims[t], 3)
        yield args, -table


@pytest.mark.parametrize("mode,weighted", [(POOLING_SUM, False), (POOLING_SUM, True), (POOLING_MEAN, False)])
def test_matches_fbgemm_own_row_gradients(mode, weighted):
    for args, fbgemm_grad in fbgemm_sgd_row_grads(mode, weighted, seed=8):
        rows, grads = row_grads.embedding_row_grads(*args, mode)
        touched = torch.nonzero(fbgemm_grad.abs().sum(1)).view(-1)
        assert set(touched.tolist()) <= set(rows.tolist())
        torch.testing.assert_close(grads.float(), fbgemm_grad[rows], rtol=1e-5, atol=1e-6)


def test_fbgemm_cpu_mean_pooling_with_weights_drops_the_bag_length_in_backward():
    """fbgemm 1.8's CPU TBE pools MEAN with per-sample weights as sum(w * row) / L (checked against the float64
    lookup in test_matches_fbgemm_tbe) but its backward applies sum(w * g), without the 1 / L: such tables
    are wrong under fbgemm's fused optimizers and right with embedding_row_grads. If this test fails, fbgemm
    was fixed."""
    for args, fbgemm_grad in fbgemm_sgd_row_grads(POOLING_MEAN, True, seed=8):
        rows, true_grads = row_grads.embedding_row_grads(*args, POOLING_MEAN)
        _, without_length = row_grads.embedding_row_grads(*args, POOLING_SUM)
        torch.testing.assert_close(without_length.float(), fbgemm_grad[rows], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(true_grads.float(), fbgemm_grad[rows], rtol=1e-3, atol=1e-3)


def _positions(offsets: torch.Tensor, f: int, batch: int) -> slice:
    return slice(int(offsets[f * batch]), int(offsets[(f + 1) * batch]))


def _pooled(
    table, indices, offsets, weights: Optional[torch.Tensor], features, columns, dim, num_features, mode
) -> dict[int, torch.Tensor]:
    """Each listed feature's lookup output in float64 (for the layout check)."""
    batch = (offsets.numel() - 1) // num_features
    result = {}
    for f in features.tolist():
        span = _positions(offsets, f, batch)
        ids = indices[span]
        w = weights[span].double() if weights is not None else None
        if mode == POOLING_NONE:
            result[f] = table.double()[ids]
            continue
        starts = offsets[f * batch : (f + 1) * batch] - offsets[f * batch]
        summed = F.embedding_bag(ids, table.double(), starts, mode="sum", per_sample_weights=w)
        if mode == POOLING_MEAN:
            lengths = (offsets[f * batch + 1 : (f + 1) * batch + 1] - offsets[f * batch : (f + 1) * batch]).clamp(min=1)
            summed = summed / lengths.unsqueeze(1).double()
        result[f] = summed
    return result
