"""The model, process setup and per-rank batch order shared by ``benchmarks/throughput.py`` and the pipeline
comparisons it runs with ``--pipelines`` (``benchmarks/throughput_pipelines.py``): one definition, so both
measure the same DLRM on the same 2 gloo processes."""

from __future__ import annotations

import os
import socket

import torch

# Criteo-like: a few large tables, many small ones (26 sparse features), scaled to a 24 GiB, 2-core machine.
TABLE_SIZES = [400_000, 200_000, 100_000, 100_000, 50_000, 50_000, 20_000, 20_000, 10_000, 10_000,
               5_000, 5_000, 2_000, 2_000, 1_000, 1_000, 500, 500, 200, 200, 100, 100, 50, 50, 20, 10]  # fmt: skip
EMBEDDING_DIM = 64
DENSE_FEATURES = 13
DENSE_ARCH = [256, 64]
OVER_ARCH = [256, 128, 1]


def dlrm_module(module_class=None):
    """The benchmarks' DLRM: a ``DLRMModule``, or the given subclass of it."""
    from lightning_sparse.models import DLRMModule

    return (module_class or DLRMModule)(
        num_embeddings_per_feature=TABLE_SIZES,
        embedding_dim=EMBEDDING_DIM,
        num_dense_features=DENSE_FEATURES,
        dense_arch_layer_sizes=DENSE_ARCH,
        over_arch_layer_sizes=OVER_ARCH,
        learning_rate=1e-3,
    )


class RankSampler(torch.utils.data.Sampler):
    """Every rank reads its own pre-built list in order (a DistributedSampler keeps Lightning from adding one)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def init_process_group(rank: int, port: int) -> None:
    """A 2-process gloo group for the hand-written loops, with the threads Lightning would give each process."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Lightning gives each of its processes cores/processes threads; the hand-written loops get the same.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group("gloo", rank=rank, world_size=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
