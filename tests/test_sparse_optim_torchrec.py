"""Non-fbgemm kinds inside a TorchRec-sharded table on CPU (fused SGD at lr=2^20 + TBEGradientTap) give the
same weights as SparseRowOptimizer on an unsharded EmbeddingBagCollection."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.optim import SparseRowOptimizer
from lightning_sparse.optim.tbe_tap import GRADIENT_SCALE, TBEGradientTap, find_tbes


@pytest.fixture
def gloo_world_of_one():
    if dist.is_initialized():
        # Earlier in-process Trainers (devices=1) leave a world of one behind: that is what this test needs.
        assert dist.get_world_size() == 1, "this test needs a single-process group"
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_rowwise_adam_and_decayed_adagrad_in_sharded_tables(gloo_world_of_one):
    import torchrec
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=50, feature_names=["f2", "f3"]),
    ]
    configs = {
        "t1": SparseOptimizerConfig(kind="rowwise_adam", lr=0.05, first_moment=True, weight_decay=0.01),
        "t2": SparseOptimizerConfig(kind="decayed_adagrad", lr=0.1),
    }
    torch.manual_seed(0)
    reference = EmbeddingBagCollection(tables=tables)
    ref_opts = [SparseRowOptimizer([reference.embedding_bags[n].weight], configs[n]) for n in configs]

    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(torchrec.optim.SGD, ebc.parameters(), {"lr": GRADIENT_SCALE})
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"),
        constraints={t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables},
    )
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD), sharders=sharders)
    state = dmp.state_dict()
    for name in configs:
        state[f"embedding_bags.{name}.weight"].local_shards()[0].tensor.copy_(reference.embedding_bags[name].weight.detach())
    taps = [TBEGradientTap(tbe, [configs[n] for n in tbe.table_names]) for tbe in find_tbes(dmp)]
    assert sorted(n for tap in taps for n in tap.tbe.table_names) == ["t1", "t2"]

    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1", "f2", "f3"],
            values=torch.cat([torch.randint(0, 15, (12,), generator=g), torch.randint(0, 8, (16,), generator=g)]),
            lengths=torch.tensor([3] * 4 + [2] * 8),
        )
        upstream = torch.randn(4, 16, generator=g)
        dmp(kjt).values().backward(upstream)
        for tap in taps:
            tap.step()
        for opt in ref_opts:
            opt.zero_grad()
        ref_bags = reference.embedding_bags
        for bag in ref_bags.values():  # unsharded EBC bags are dense; give the optimizer sparse grads
            bag.sparse = True
        reference(kjt).values().backward(upstream)
        for opt in ref_opts:
            opt.step()

    for name in configs:
        sharded = state[f"embedding_bags.{name}.weight"].local_shards()[0].tensor
        expected = reference.embedding_bags[name].weight.detach()
        assert not torch.equal(expected, torch.zeros_like(expected))
        torch.testing.assert_close(sharded, expected, atol=1e-5, rtol=1e-5)
