"""Checks data_parallel tables' gradients on 2 gloo ranks against an unsharded single-process reference.

fbgemm has no CPU autograd kernel registered for its dense embedding op (it warns), so TorchRec falls
back to a composite implementation for data_parallel tables: this proves the gradient is still right.
"""

import argparse
import json

import torch
import torch.distributed as dist
from gloo_spawn import spawn_gloo
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.distributed.materialise import materialise_shards
from lightning_sparse.distributed.planning import attach_fused_optimizers, plan_sharding, shard_model
from lightning_sparse.distributed.routes import embedding_parameters, resolve_tables

WORLD_SIZE = 2
BATCH = 16


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(name="dp", embedding_dim=4, num_embeddings=20, feature_names=["f_dp"]),
            EmbeddingBagConfig(name="tw", embedding_dim=4, num_embeddings=30, feature_names=["f_tw"]),
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        self.head = torch.nn.Linear(8, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.ebc(kjt).values()).squeeze(-1)


def batch_of(rank: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(0, 3, (2 * BATCH,), generator=g)
    dp_ids = torch.randint(0, 20, (int(lengths[:BATCH].sum()),), generator=g)
    tw_ids = torch.randint(0, 30, (int(lengths[BATCH:].sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f_dp", "f_tw"], values=torch.cat([dp_ids, tw_ids]), lengths=lengths
    )
    return kjt, torch.randn(BATCH, generator=g)


def reference_grad() -> torch.Tensor:
    torch.manual_seed(0)
    model = Model()
    losses = []
    for rank in range(WORLD_SIZE):
        kjt, target = batch_of(rank)
        losses.append(torch.nn.functional.mse_loss(model(kjt), target))
    (sum(losses) / WORLD_SIZE).backward()  # DDP averages the ranks' gradients
    return model.ebc.embedding_bags["dp"].weight.grad.clone()


def worker(rank: int, out: str) -> None:
    torch.manual_seed(0)
    model = Model()
    tables = resolve_tables(
        model,
        "cpu",
        ShardingType.TABLE_WISE,
        SparseOptimizerConfig(kind="sgd", lr=0.0),
        {"dp": TableConfig(sharding=ShardingType.DATA_PARALLEL)},
    )
    attach_fused_optimizers(tables, "cpu")
    device = torch.device("cpu")
    plan = plan_sharding(model, tables, device, dist.group.WORLD)
    dmp = shard_model(model, plan, device, dist.group.WORLD)
    materialise_shards(model, tables)
    kjt, target = batch_of(rank)
    torch.nn.functional.mse_loss(dmp(kjt), target).backward()
    weight = embedding_parameters(model)["ebc.embedding_bags.dp.weight"]
    grad = weight.grad.to_dense() if weight.grad.is_sparse else weight.grad
    if rank == 0:
        expected = reference_grad()
        torch.manual_seed(0)
        reference = Model()
        with open(out, "w") as f:
            json.dump(
                {
                    "max_abs_diff": float((grad - expected).abs().max()),
                    "grad_norm": float(expected.norm()),
                    # the shards hold the weights the model was built with (not a re-initialisation)
                    "weight_diff": float((weight.detach() - reference.ebc.embedding_bags["dp"].weight).abs().max()),
                },
                f,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    spawn_gloo(worker, WORLD_SIZE, args.result)
