"""One process, one GPU, an nccl process group: the strategy's collectives must hand nccl CUDA tensors."""

import argparse
import json

import torch
import torch.distributed as dist

from lightning_sparse import SparseStrategy
from lightning_sparse.distributed.collectives import collective_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{args.store}", rank=0, world_size=1)
    try:
        result = {
            "collective_device": str(collective_device()),
            "all_reduce_bytes": SparseStrategy().all_reduce_bytes(12345),
        }
    finally:
        dist.destroy_process_group()
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
