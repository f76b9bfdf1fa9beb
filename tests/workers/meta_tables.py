"""Tables built on meta and materialised shard by shard, against today's path (built on the host, copied).

On every rank of ``WORLD`` gloo processes the model is built and sharded both ways from the same seed;
reported: whether the local shards, the dense weights and the generator state after setup are
bit-identical, whether a pretrained table's shards equal the file's block, and, per path, the largest
numel of any tensor an op produced while the model was built and sharded (a TorchDispatchMode, which sees
fbgemm's TBE allocations).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from gloo_spawn import spawn_gloo
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from lightning_sparse import table_init
from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.distributed.materialise import local_pieces
from lightning_sparse.distributed.planning import shard_tables

# name -> (rows, dim, sharding); tw is bigger than any one rank's share of cw, so a rank without tw can
# be caught allocating it, and cw's 256 columns are split in two 128-column shards.
TABLES = {
    "tw": (8000, 8, "table_wise"),
    "cw": (400, 256, "column_wise"),
    "dp": (50, 4, "data_parallel"),
    "pre": (60, 256, "column_wise"),
}


class Model(torch.nn.Module):
    """A dense layer before the tables and one after: both must get today's weights."""

    def __init__(self, on_meta: bool, pretrained: str) -> None:
        super().__init__()
        self.bottom = torch.nn.Linear(3, 8)
        configs = [
            EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=[f"f_{n}"])
            for n, (r, d, _) in TABLES.items()
        ]
        self.ebc = (
            table_init.meta_embedding_bag_collection(configs) if on_meta else EmbeddingBagCollection(tables=configs)
        )
        self.top = torch.nn.Linear(8 + 8 + 256 + 4 + 256, 1)


def build_and_shard(on_meta: bool, pretrained: str):
    torch.manual_seed(1234)
    model = Model(on_meta, pretrained)
    overrides = {n: TableConfig(sharding=s) for n, (_, _, s) in TABLES.items()}
    overrides["pre"].pretrained = pretrained
    dmp, tables, plan = shard_tables(
        model,
        torch.device("cpu"),
        dist.group.WORLD,
        ShardingType.TABLE_WISE,
        SparseOptimizerConfig(kind="rowwise_adagrad"),
        overrides,
    )
    return model, tables, plan


def local_shards(model, tables) -> dict[str, list]:
    state = model.state_dict(keep_vars=True)
    return {
        name: [(row, col, piece.detach().clone()) for piece, row, col in local_pieces(state[t.param_path])]
        for name, t in tables.tables.items()
    }


def dense(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "ebc" not in k}


class Allocations(TorchDispatchMode):
    """The numel of every non-meta tensor produced by an op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, str] = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.largest = max(self.largest, (tensor.numel(), str(func)))
        return result


def setup(on_meta: bool, pretrained: str) -> dict:
    """Builds and shards the model one way, recording allocations; what the comparison needs."""
    with Allocations() as seen:
        model, tables, _ = build_and_shard(on_meta, pretrained)
    return {
        "shards": local_shards(model, tables),
        "dense": dense(model),
        "rng": torch.get_rng_state(),
        "inits": {n: t.init.value for n, t in tables.tables.items()},
        "largest": seen.largest,
    }


def worker(rank: int, out: str, pretrained: str) -> None:
    table_init.CHUNK_ELEMENTS = 4096  # the bounded chunks a large table would be drawn in
    old = setup(False, pretrained)
    new = setup(True, pretrained)
    file = np.load(pretrained)
    shards = new["shards"]
    report = {
        "inits": new["inits"],
        "old_inits": old["inits"],
        "shards": {n: [(r, c, list(p.shape)) for r, c, p in shards[n]] for n in TABLES},
        "tables_equal": {
            n: len(old["shards"][n]) == len(shards[n])
            and all(
                (a[0], a[1]) == (b[0], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(old["shards"][n], shards[n])
            )
            for n in TABLES
        },
        "dense_equal": old["dense"].keys() == new["dense"].keys()
        and all(torch.equal(old["dense"][k], new["dense"][k]) for k in old["dense"]),
        "rng_equal": torch.equal(old["rng"], new["rng"]),
        "pretrained_equal": all(
            torch.equal(p, torch.from_numpy(file[r : r + p.shape[0], c : c + p.shape[1]])) for r, c, p in shards["pre"]
        ),
        "not_all_zero": all(bool(p.abs().sum() > 0) for n in TABLES for _, _, p in shards[n]),
        "largest": {"host": old["largest"], "meta": new["largest"]},
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": gathered}, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("world_size", type=int)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = os.path.join(tmp, "pre.npy")
        rows, dim, _ = TABLES["pre"]
        np.save(pretrained, np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32))
        spawn_gloo(worker, args.world_size, args.result, pretrained)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
