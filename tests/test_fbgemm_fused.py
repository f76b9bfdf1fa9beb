"""What fbgemm's fused kernels do, pinned, and what lightning_sparse hands them.

The routes in ``optim/fbgemm_kinds.fused_blocker`` rest on two measured facts about fbgemm-gpu-cpu 1.8:
its CPU kernels ignore ``weight_decay`` in every ``weight_decay_mode``, and its CPU backward drops the 1/L
factor of MEAN pooling when per-sample weights are given. If an fbgemm upgrade fixes either, these tests
fail and the route can be widened. Every kwarg we attach for TorchRec to hand to the TBE is checked against
the installed constructor's signature, for every kind on both devices.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

from lightning_sparse.config import SparseOptimizerConfig, SparseOptimizerKind
from lightning_sparse.optim.fbgemm_kinds import FBGEMM_KINDS, fused_blocker, fused_optimizer_for

CPU_KINDS = {
    EmbOptimType.EXACT_SGD: "sgd",
    EmbOptimType.EXACT_ADAGRAD: "adagrad",
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
}


def _tbe(
    optimizer: EmbOptimType, pooling: PoolingMode = PoolingMode.SUM, **kwargs
) -> SplitTableBatchedEmbeddingBagsCodegen:
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=optimizer, pooling_mode=pooling, **kwargs
    )


def _reference_rule(kind: str, w: torch.Tensor, steps: int, lr: float, weight_decay: float) -> torch.Tensor:
    """Three steps of gradient 1 with L2 decay, in float64."""
    w, s, sr = w.double().clone(), torch.zeros(4, dtype=torch.float64), 0.0
    for _ in range(steps):
        g = torch.ones(4, dtype=torch.float64) + weight_decay * w
        if kind == "sgd":
            w = w - lr * g
        elif kind == "adagrad":
            s = s + g * g
            w = w - lr * g / (s.sqrt() + 1e-8)
        else:
            sr = sr + float((g * g).mean())
            w = w - lr * g / (sr**0.5 + 1e-8)
    return w.float()


@pytest.mark.parametrize("mode", [WeightDecayMode.L2, WeightDecayMode.DECOUPLE])
@pytest.mark.parametrize("optimizer", sorted(CPU_KINDS, key=lambda o: o.name))
def test_fbgemm_cpu_ignores_weight_decay(optimizer, mode):
    results = {}
    for weight_decay in (0.0, 0.5):
        tbe = _tbe(optimizer, learning_rate=0.1, eps=1e-8, weight_decay=weight_decay, weight_decay_mode=mode)
        start = torch.tensor([1.0, 2.0, 3.0, 4.0])
        tbe.split_embedding_weights()[0].data[1] = start
        for _ in range(3):
            tbe(torch.tensor([1]), torch.tensor([0, 1])).sum().backward()
        results[weight_decay] = tbe.split_embedding_weights()[0][1].detach().clone()
    assert torch.equal(results[0.0], results[0.5])  # the issue: weight_decay=0.5 ends bit-identical to 0
    with_decay = _reference_rule(CPU_KINDS[optimizer], start, 3, 0.1, 0.5)
    assert (results[0.5] - with_decay).abs().max() > 1e-3
    # and so such tables never take the fused route
    config = SparseOptimizerConfig(kind=CPU_KINDS[optimizer], weight_decay=0.5)
    assert "weight_decay" in fused_blocker(config, "cpu")


def test_fbgemm_cpu_backward_drops_mean_factor_with_per_sample_weights():
    """Bag ids [1,2,3,3], weights [1,2,0.5,1], output gradient 1: fbgemm applies [1, 2, 1.5] instead of
    [0.25, 0.5, 0.375] (the forward is right)."""
    tbe = _tbe(EmbOptimType.EXACT_SGD, PoolingMode.MEAN, learning_rate=1.0)
    weights = tbe.split_embedding_weights()[0]
    weights.data.zero_()
    indices, offsets, psw = torch.tensor([1, 2, 3, 3]), torch.tensor([0, 4]), torch.tensor([1.0, 2.0, 0.5, 1.0])
    weights.data[1:4] = torch.tensor([[1.0] * 4, [2.0] * 4, [4.0] * 4])
    out = tbe(indices, offsets, per_sample_weights=psw)
    torch.testing.assert_close(out[0], torch.full((4,), (1 * 1 + 2 * 2 + 0.5 * 4 + 1 * 4) / 4.0))
    before = weights[1:4, 0].clone()
    out.sum().backward()
    applied = before - weights[1:4, 0]
    torch.testing.assert_close(applied, torch.tensor([1.0, 2.0, 1.5]))  # correct would be [0.25, 0.5, 0.375]
    for kind in ("sgd", "adagrad", "rowwise_adagrad"):
        assert "MEAN" in fused_blocker(SparseOptimizerConfig(kind=kind), "cpu", pooling="mean", weighted=True)
        assert fused_blocker(SparseOptimizerConfig(kind=kind), "cpu", pooling="mean", weighted=False) == ""
        assert fused_blocker(SparseOptimizerConfig(kind=kind), "cpu", pooling="sum", weighted=True) == ""


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_every_fused_kwarg_is_a_tbe_constructor_parameter(device_type):
    """TorchRec passes the attached optimizer's kwargs to fbgemm's TBE constructor (``lr`` renamed): a key it
    does not take (``betas`` did) is a TypeError at setup, on the GPU only, where no test here runs."""
    accepted = set(inspect.signature(SplitTableBatchedEmbeddingBagsCodegen.__init__).parameters)
    for kind in FBGEMM_KINDS[device_type]:
        for first_moment in (False, True):
            config = SparseOptimizerConfig(kind=kind, lr=0.3, eps=1e-4, beta1=0.7, beta2=0.9, first_moment=first_moment)
            if fused_blocker(config, device_type):
                continue
            _, kwargs = fused_optimizer_for(config, device_type)
            names = {"learning_rate" if k == "lr" else k for k in kwargs}
            assert names <= accepted, f"{kind.value}: {sorted(names - accepted)} not in the TBE's constructor"
            for key, value in kwargs.items():
                assert value == getattr(config, key), (kind, key)


def test_fused_kwargs_build_a_cpu_tbe():
    for kind, optimizer in (
        (SparseOptimizerKind.SGD, EmbOptimType.EXACT_SGD),
        (SparseOptimizerKind.ADAGRAD, EmbOptimType.EXACT_ADAGRAD),
        (SparseOptimizerKind.ROWWISE_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD),
    ):
        _, kwargs = fused_optimizer_for(SparseOptimizerConfig(kind=kind, lr=0.3, eps=1e-4), "cpu")
        kwargs["learning_rate"] = kwargs.pop("lr")
        tbe = _tbe(optimizer, **kwargs)
        assert tbe.get_learning_rate() == pytest.approx(0.3)
