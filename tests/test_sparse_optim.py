"""Fused sparse row kernels: native vs PyTorch twin vs an independent float64 formulation vs torch's own
sparse optimizers, on random batches with duplicate ids; only present rows may change."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sparse import ops
from lightning_sparse.config import SparseOptimizerKind as K
from lightning_sparse.optim import init_state, kernels, reference, sparse_update

HP = dict(lr=0.05, eps=1e-6, weight_decay=0.01, beta1=0.9, beta2=0.99, decay=0.9)
VARIANTS = [
    (K.SGD, False, False),
    (K.ADAGRAD, False, False),
    (K.ROWWISE_ADAGRAD, False, False),
    (K.DECAYED_ADAGRAD, False, False),
    (K.ROWWISE_ADAM, False, False),
    (K.ROWWISE_ADAM, True, False),
    (K.ROWWISE_ADAM, True, True),
    (K.ADAM, False, False),
    (K.ADAM, False, True),
]
needs_native = pytest.mark.skipif(
    not (ops.native_enabled() and ops.native_available()),
    reason="native extension not built or LIGHTNING_SPARSE_NATIVE=0",
)


def batches(num_rows: int, dim: int, steps: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # few distinct ids so duplicates are common
        yield torch.randint(0, num_rows, (n,), generator=g), torch.randn(n, dim, generator=g)


def run(kind, first_moment, per_row_step, w0, data, *, native: bool, monkeypatch=None, **hp):
    w = w0.clone()
    state = init_state(kind, w, first_moment=first_moment, per_row_step=per_row_step)
    fn, is_native = kernels.kernel(kind)
    assert is_native == native
    for idx, grad in data:
        sparse_update(kind, w, state, idx, grad, **hp)
    return w, state


def plain_update(kind, first_moment, per_row_step, w0, data, lr, eps, weight_decay, beta1, beta2, decay):
    """The same rules written independently, row by row, in float64 Python."""
    w = w0.double().clone()
    n, d = w.shape
    init = kernels.default_initial_accumulator(kind)
    s = torch.full((n, d), init, dtype=torch.float64)
    r = torch.full((n,), init, dtype=torch.float64)
    m = torch.zeros(n, d, dtype=torch.float64)
    v = torch.zeros(n, d, dtype=torch.float64)
    vr = torch.zeros(n, dtype=torch.float64)
    row_steps = [0] * n
    global_step = 0
    for idx, grad in data:
        global_step += 1
        sums: dict[int, torch.Tensor] = {}
        for pos, row in enumerate(idx.tolist()):
            sums[row] = sums.get(row, torch.zeros(d, dtype=torch.float64)) + grad[pos].double()
        for row, g in sums.items():
            g = g + weight_decay * w[row]
            row_steps[row] += 1
            t = row_steps[row] if per_row_step else global_step
            if kind is K.SGD:
                w[row] -= lr * g
            elif kind is K.ADAGRAD:
                s[row] += g * g
                w[row] -= lr * g / (s[row].sqrt() + eps)
            elif kind is K.ROWWISE_ADAGRAD:
                r[row] += float((g * g).sum()) / d
                w[row] -= lr * g / (math.sqrt(r[row]) + eps)
            elif kind is K.DECAYED_ADAGRAD:
                w[row] -= lr * g / (s[row] + eps).sqrt()
                s[row] = s[row] * decay + g * g
            elif kind is K.ROWWISE_ADAM:
                vr[row] = beta2 * vr[row] + (1 - beta2) * float((g * g).mean())
                denom = math.sqrt(vr[row] / (1 - beta2**t)) + eps
                if first_moment:
                    m[row] = beta1 * m[row] + (1 - beta1) * g
                    w[row] -= lr * m[row] / (1 - beta1**t) / denom
                else:
                    w[row] -= lr * g / denom
            else:
                m[row] = beta1 * m[row] + (1 - beta1) * g
                v[row] = beta2 * v[row] + (1 - beta2) * g * g
                w[row] -= lr * (m[row] / (1 - beta1**t)) / ((v[row] / (1 - beta2**t)).sqrt() + eps)
    return w.float()


@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
def test_reference_matches_independent_formulation(kind, first_moment, per_row_step, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    w0 = torch.randn(40, 6)
    data = list(batches(40, 6, steps=6, n=64, seed=1))
    w, _ = run(kind, first_moment, per_row_step, w0, data, native=False, **HP)
    expected = plain_update(kind, first_moment, per_row_step, w0, data, **HP)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("kind,first_moment,per_row_step", VARIANTS)
def test_native_matches_reference(kind, first_moment, per_row_step, monkeypatch):
    w0 = torch.randn(200, 13)
    data = list(batches(200, 13, steps=8, n=300, seed=2))
    w_native, s_native = run(kind, first_moment, per_row_step, w0, data, native=True, **HP)
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    w_ref, s_ref = run(kind, first_moment, per_row_step, w0, data, native=False, **HP)
    torch.testing.assert_close(w_native, w_ref, atol=1e-5, rtol=1e-5)
    assert s_native.keys() == s_ref.keys()
    for name in s_native:
        torch.testing.assert_close(s_native[name], s_ref[name], atol=1e-5, rtol=1e-5)
    expected = plain_update(kind, first_moment, per_row_step, w0, data, **HP)
    torch.testing.assert_close(w_native, expected, atol=1e-5, rtol=1e-5)


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(list(K)),
    rows=st.integers(1, 30),
    dim=st.integers(1, 9),
    n=st.integers(0, 60),
    seed=st.integers(0, 2**16),
    per_row_step=st.booleans(),
)
def test_native_matches_reference_property(kind, rows, dim, n, seed, per_row_step):
    """Any table shape, any batch (empty, all-duplicate, ...): native == twin, and untouched rows stay put."""
    data = list(batches(rows, dim, steps=3, n=n, seed=seed))
    w0 = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    results = []
    for native in (True, False):
        w = w0.clone()
        state = init_state(kind, w, first_moment=True, per_row_step=per_row_step)
        fn = (
            getattr(torch.ops.lightning_sparse, f"sparse_opt_{kind.value}")
            if native
            else getattr(reference, f"sparse_opt_{kind.value}")
        )
        for idx, grad in data:
            with torch.no_grad():
                _call(fn, kind, w, state, idx, grad)
        results.append((w, state))
    (w_a, s_a), (w_b, s_b) = results
    torch.testing.assert_close(w_a, w_b, atol=1e-5, rtol=1e-5)
    for name in s_a:
        torch.testing.assert_close(s_a[name], s_b[name], atol=1e-5, rtol=1e-5)
    touched = torch.zeros(rows, dtype=torch.bool)
    for idx, _ in data:
        touched[idx] = True
    assert torch.equal(w_a[~touched], w0[~touched])


def _call(fn, kind, w, state, idx, grad):
    hp = HP
    if kind is K.SGD:
        fn(w, idx, grad, hp["lr"], hp["weight_decay"])
    elif kind in (K.ADAGRAD, K.ROWWISE_ADAGRAD):
        fn(w, state["sum"], idx, grad, hp["lr"], hp["eps"], hp["weight_decay"])
    elif kind is K.DECAYED_ADAGRAD:
        fn(w, state["sum"], idx, grad, hp["lr"], hp["eps"], hp["weight_decay"], hp["decay"])
    else:
        fn(
            w,
            state.get("exp_avg"),
            state["exp_avg_sq"],
            state["step"],
            idx,
            grad,
            hp["lr"],
            hp["eps"],
            hp["weight_decay"],
            hp["beta1"],
            hp["beta2"],
        )


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(
    "kind,eps,torch_opt",
    [
        (K.SGD, 0.0, lambda p: torch.optim.SGD([p], lr=0.05)),
        (K.ADAGRAD, 1e-6, lambda p: torch.optim.Adagrad([p], lr=0.05, eps=1e-6)),
        # SparseAdam adds eps to sqrt(v) before bias correction (ours/fbgemm/torch.optim.Adam: to sqrt(v_hat)),
        # so compare with an eps too small to matter.
        (K.ADAM, 1e-12, lambda p: torch.optim.SparseAdam([p], lr=0.05, eps=1e-12, betas=(0.9, 0.99))),
    ],
)
def test_matches_torch_sparse_optimizers(kind, eps, torch_opt, native, monkeypatch):
    """Without weight decay our kernels equal torch's own sparse optimizers fed the same EmbeddingBag grads."""
    if native and not (ops.native_enabled() and ops.native_available()):
        pytest.skip("native extension _C.so not built")
    if not native:
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    torch.manual_seed(3)
    bag = torch.nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    ours = bag.weight.detach().clone()
    state = init_state(kind, ours)
    opt = torch_opt(bag.weight)
    for idx, _ in batches(50, 8, steps=5, n=48, seed=4):
        offsets = torch.arange(0, 48, 4)
        opt.zero_grad()
        (bag(idx, offsets) ** 2).sum().backward()
        grad = bag.weight.grad
        sparse_update(kind, ours, state, grad._indices()[0], grad._values(), lr=0.05, eps=eps, beta1=0.9, beta2=0.99)
        opt.step()
    torch.testing.assert_close(ours, bag.weight.detach(), atol=1e-5, rtol=1e-5)


def test_rowwise_adagrad_matches_torchrec_dense_rowwise_adagrad(monkeypatch):
    """TorchRec's unfused RowWiseAdagrad on the dense gradient leaves zero-grad rows unchanged (wd=0)."""
    from torchrec.optim import RowWiseAdagrad

    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(30, 5))
    ours = w.detach().clone()
    state = init_state(K.ROWWISE_ADAGRAD, ours)
    opt = RowWiseAdagrad([w], lr=0.05, eps=1e-6)
    for idx, grad in batches(30, 5, steps=4, n=40, seed=6):
        dense = torch.zeros(30, 5).index_add_(0, idx, grad)
        w.grad = dense
        opt.step()
        sparse_update(K.ROWWISE_ADAGRAD, ours, state, idx, grad, lr=0.05, eps=1e-6)
    torch.testing.assert_close(ours, w.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_per_row_step_counts_only_present_rows(native, monkeypatch):
    if native and not (ops.native_enabled() and ops.native_available()):
        pytest.skip("native extension _C.so not built")
    if not native:
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    w = torch.zeros(4, 2)
    per_row = init_state(K.ROWWISE_ADAM, w, per_row_step=True)
    glob = init_state(K.ROWWISE_ADAM, w.clone())
    for idx in ([0, 0, 1], [1], [3, 1]):
        idx_t = torch.tensor(idx)
        grad = torch.ones(len(idx), 2)
        sparse_update(K.ROWWISE_ADAM, w, per_row, idx_t, grad, lr=0.1)
        sparse_update(K.ROWWISE_ADAM, w.clone(), glob, idx_t, grad, lr=0.1)
    assert per_row["step"].tolist() == [1, 3, 0, 1]
    assert glob["step"].tolist() == [3]
    # A row's first step under per-row counting is a bias-corrected unit step: lr * g / |g|.
    torch.testing.assert_close(w[3], torch.full((2,), -0.1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("native", [True, False])
def test_bad_inputs_name_the_problem(native, monkeypatch):
    if native and not (ops.native_enabled() and ops.native_available()):
        pytest.skip("native extension _C.so not built")
    if not native:
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    w = torch.zeros(4, 2)
    state = init_state(K.ADAGRAD, w)
    with pytest.raises((IndexError, RuntimeError), match="out of range"):
        sparse_update(K.ADAGRAD, w, state, torch.tensor([4]), torch.ones(1, 2), lr=0.1)
    with pytest.raises((ValueError, RuntimeError), match="grad must have shape"):
        sparse_update(K.ADAGRAD, w, state, torch.tensor([1]), torch.ones(1, 3), lr=0.1)
    with pytest.raises(ValueError, match="allowed values"):
        init_state("lamb", w)


@needs_native
@pytest.mark.parametrize("kind", list(K))
def test_native_sorted_unique_ids_fast_path_equals_the_sorting_path(kind):
    """Strictly increasing ids (what embedding_row_grads returns) skip the sort; the same rows given in
    shuffled order take the sorting path. Both must give the same bits."""
    g = torch.Generator().manual_seed(12)
    w0 = torch.randn(50, 7, generator=g)
    results = []
    for shuffled in (False, True):
        w = w0.clone()
        state = init_state(kind, w, first_moment=True, per_row_step=True)
        fn = getattr(torch.ops.lightning_sparse, f"sparse_opt_{kind.value}")
        gen = torch.Generator().manual_seed(13)
        for _ in range(3):
            idx = torch.unique(torch.randint(0, 50, (30,), generator=gen))
            grad = torch.randn(idx.numel(), 7, generator=gen)
            if shuffled:
                perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(14))
                idx, grad = idx[perm], grad[perm]
            with torch.no_grad():
                _call(fn, kind, w, state, idx, grad)
        results.append((w, state))
    (w_a, s_a), (w_b, s_b) = results
    assert torch.equal(w_a, w_b)
    assert all(torch.equal(s_a[name], s_b[name]) for name in s_a)
