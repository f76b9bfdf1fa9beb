"""SparseRowOptimizer in a plain training loop over EmbeddingBag(sparse=True): same numbers as the kernels,
exact state_dict round trip (resume == uninterrupted run), clear errors, native and fallback paths."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lightning_sparse import ops
from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.config import SparseOptimizerKind as K
from lightning_sparse.optim import SparseRowOptimizer, init_state, sparse_update

PATHS = [pytest.param(True, id="native"), pytest.param(False, id="fallback")]


def _path(native, monkeypatch):
    if native and not (ops.native_enabled() and ops.native_available()):
        pytest.skip("native extension _C.so not built")
    if not native:
        monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")


class TwoTables(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.EmbeddingBag(40, 6, mode="sum", sparse=True)
        self.b = torch.nn.EmbeddingBag(25, 6, mode="mean", sparse=True)
        self.head = torch.nn.Linear(12, 1)

    def forward(self, ia, ib):
        offsets = torch.arange(0, ia.numel(), 3)
        return self.head(torch.cat([self.a(ia, offsets), self.b(ib, offsets)], dim=1)).squeeze(1)


def _batches(steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 40, (24,), generator=g), torch.randint(0, 25, (24,), generator=g), torch.rand(8, generator=g))
        for _ in range(steps)
    ]


def _train(model, sparse_opt, dense_opt, data):
    for ia, ib, y in data:
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ia, ib), y)
        loss.backward()
        sparse_opt.step()
        dense_opt.step()


def _make(config, seed=0, **kw):
    torch.manual_seed(seed)
    model = TwoTables()
    sparse_opt = SparseRowOptimizer([model.a.weight, model.b.weight], config, **kw)
    dense_opt = torch.optim.Adam(model.head.parameters(), lr=0.01)
    return model, sparse_opt, dense_opt


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("kind", list(K))
def test_resume_from_state_dict_is_exact(kind, native, monkeypatch):
    _path(native, monkeypatch)
    config = SparseOptimizerConfig(kind=kind, lr=0.05, weight_decay=0.01, first_moment=True)
    data = _batches(6, seed=1)

    model, sparse_opt, dense_opt = _make(config, per_row_step=True)
    _train(model, sparse_opt, dense_opt, data)
    reference_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model, sparse_opt, dense_opt = _make(config, per_row_step=True)
    _train(model, sparse_opt, dense_opt, data[:3])
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "sparse": sparse_opt.state_dict(), "dense": dense_opt.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed, sparse_opt2, dense_opt2 = _make(config, seed=123, per_row_step=True)  # different init: must be overwritten
    resumed.load_state_dict(checkpoint["model"])
    sparse_opt2.load_state_dict(checkpoint["sparse"])
    dense_opt2.load_state_dict(checkpoint["dense"])
    for p, q in zip(sparse_opt.param_groups[0]["params"], sparse_opt2.param_groups[0]["params"]):
        assert sparse_opt.state[p].keys() == sparse_opt2.state[q].keys()
        for name in sparse_opt.state[p]:
            assert torch.equal(sparse_opt.state[p][name], sparse_opt2.state[q][name])
            assert sparse_opt.state[p][name].dtype == sparse_opt2.state[q][name].dtype
    _train(resumed, sparse_opt2, dense_opt2, data[3:])
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, reference_weights[name]), name


@pytest.mark.parametrize("native", PATHS)
def test_step_equals_direct_kernel_calls_and_touches_only_present_rows(native, monkeypatch):
    _path(native, monkeypatch)
    config = SparseOptimizerConfig(kind="rowwise_adam", lr=0.1, first_moment=True)
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(30, 4, mode="sum", sparse=True)
    before = bag.weight.detach().clone()
    manual = before.clone()
    state = init_state(K.ROWWISE_ADAM, manual, first_moment=True)
    opt = SparseRowOptimizer(bag.parameters(), config)
    idx = torch.tensor([3, 3, 7, 11, 3, 7])
    bag(idx, torch.tensor([0, 2, 4])).pow(2).sum().backward()
    grad = bag.weight.grad
    sparse_update(K.ROWWISE_ADAM, manual, state, grad._indices()[0], grad._values(), lr=0.1)
    opt.step()
    assert torch.equal(bag.weight.detach(), manual)
    changed = (bag.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 7, 11]
    assert opt.state[bag.weight]["step"].tolist() == [1]


def test_param_group_override_and_state_layout():
    big = torch.nn.Parameter(torch.zeros(10, 4))
    small = torch.nn.Parameter(torch.zeros(5, 4))
    opt = SparseRowOptimizer(
        [{"params": [big]}, {"params": [small], "kind": "adam", "lr": 0.5}], kind="rowwise_adagrad"
    )
    assert opt.param_groups[0]["kind"] == "rowwise_adagrad" and opt.param_groups[1]["kind"] == "adam"
    assert {k: tuple(v.shape) for k, v in opt.state[big].items()} == {"sum": (10,)}
    assert {k: tuple(v.shape) for k, v in opt.state[small].items()} == {
        "exp_avg": (5, 4),
        "exp_avg_sq": (5, 4),
        "step": (1,),
    }
    decayed = SparseRowOptimizer([torch.nn.Parameter(torch.zeros(3, 2))], kind="decayed_adagrad")
    assert torch.equal(next(iter(decayed.state.values()))["sum"], torch.full((3, 2), 0.01))


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="allowed values"):
        SparseRowOptimizer([torch.nn.Parameter(torch.zeros(3, 2))], kind="lamb")
    with pytest.raises(ValueError, match="unknown option"):
        SparseRowOptimizer([torch.nn.Parameter(torch.zeros(3, 2))], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="2-D"):
        SparseRowOptimizer([torch.nn.Parameter(torch.zeros(3))])
    dense = torch.nn.Embedding(5, 2)  # sparse=False
    opt = SparseRowOptimizer(dense.parameters())
    dense(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse=True"):
        opt.step()


def test_state_dict_is_deep_copyable_and_keeps_hyperparameters():
    opt = SparseRowOptimizer(
        [torch.nn.Parameter(torch.zeros(3, 2))],
        SparseOptimizerConfig(kind="rowwise_adam", beta2=0.95),
        per_row_step=True,
    )
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["beta2"] == 0.95 and sd["param_groups"][0]["per_row_step"] is True
    assert sd["state"][0]["step"].shape == (3,)
