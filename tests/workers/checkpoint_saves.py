"""Saves ``--saves`` small checkpoints to one path in one process (no Lightning, no process group): the
i-th holds ``w = i`` and global_step i. With the fault hook set, the process is killed in one of them."""

import argparse
import os

import torch

from lightning_sparse.distributed import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    for step in range(1, args.saves + 1):
        state = {"w": torch.full((16,), float(step))}
        checkpoint.save_sharded(args.path, state, {"state": {}}, {}, {"global_step": step}, is_global_zero=True)
    with open(args.result, "w") as f:
        f.write("{}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
