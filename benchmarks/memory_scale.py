"""Peak host memory per rank when the tables are built where they live (issue 11), against today's path.

Two CPU processes (gloo) shard 8 equal tables (dim 256, total 1, 2, 4 or 8 GiB of float32) table_wise or
column_wise through ``distributed/planning.shard_tables`` with fbgemm's fused row-wise Adagrad, then run a
few training steps (so the optimizer state exists). ``host``: the tables are built whole on every rank
(TorchRec's ``EmbeddingBagCollection`` on CPU) and copied into the shards, as before issue 11. ``meta``:
built on ``meta`` by ``table_init.meta_embedding_bag_collection`` and generated for the local shards only.
Each case runs in fresh processes; the peak is the kernel's ``VmHWM`` (peak resident set) of each rank,
read from ``/proc/self/status`` at the end. Goal: peak per rank <= 0.55 x total table bytes + 1.5 GiB.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_scale.py --sizes 1 2 4 --host-max-gib 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GIB = 1 << 30
TABLES, DIM, BATCH, STEPS = 8, 256, 64, 3


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Model(torch.nn.Module):
    def __init__(self, total_bytes: int, on_meta: bool) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        from lightning_sparse.table_init import meta_embedding_bag_collection

        rows = total_bytes // (TABLES * DIM * 4)
        configs = [
            EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{i}"])
            for i in range(TABLES)
        ]
        self.ebc = meta_embedding_bag_collection(configs) if on_meta else EmbeddingBagCollection(tables=configs)
        self.head = torch.nn.Linear(TABLES * DIM, 1)

    def forward(self, kjt):
        return self.head(self.ebc(kjt).values()).sum()


def _rank(rank: int, port: int, case: dict, out_dir: str) -> None:
    from torchrec import KeyedJaggedTensor

    from lightning_sparse.config import ShardingType, SparseOptimizerConfig
    from lightning_sparse.distributed.planning import shard_tables

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = Model(int(case["gib"] * GIB), case["path"] == "meta")
    dmp, tables, _ = shard_tables(
        model,
        torch.device("cpu"),
        dist.group.WORLD,
        ShardingType(case["sharding"]),
        SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.05),
    )
    setup_s = time.perf_counter() - start
    rows = next(iter(tables.tables.values())).rows
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):  # fused row-wise Adagrad updates the rows inside backward
        lengths = torch.randint(1, 4, (TABLES * BATCH,), generator=g)
        ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{i}" for i in range(TABLES)], values=ids, lengths=lengths)
        dmp(kjt).backward()
    local = sum(p.numel() * 4 for t in tables.tables.values() for p in _local(model, t.param_path))
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"peak": _peak_rss_bytes(), "setup_s": setup_s, "local_table_bytes": local}, f)
    dist.barrier()
    dist.destroy_process_group()


def _local(model, key):
    from lightning_sparse.distributed.materialise import local_pieces

    return [piece for piece, _, _ in local_pieces(model.state_dict()[key])]


def run_case(case: dict) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(port, case, out_dir), nprocs=2)
        return [json.load(open(os.path.join(out_dir, f"{r}.json"))) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4, 8], help="total table GiB")
    parser.add_argument("--shardings", nargs="+", default=["table_wise", "column_wise"])
    parser.add_argument("--paths", nargs="+", default=["host", "meta"], choices=["host", "meta"])
    parser.add_argument(
        "--host-max-gib",
        type=float,
        default=2.0,
        help="largest total run on the host path (it holds ~1.5x the tables per rank)",
    )
    args = parser.parse_args()
    print(
        f"2 gloo processes, {TABLES} tables x dim {DIM}, fused rowwise_adagrad, {STEPS} steps of batch {BATCH}; "
        f"peak = VmHWM per rank; goal: peak <= 0.55 x tables + 1.5 GiB"
    )
    print("| tables GiB | sharding | path | local tables GiB (r0, r1) | peak GiB (r0, r1) | goal GiB | met | setup s |")
    print("|---:|---|---|---|---|---:|---|---:|")
    skipped = []
    for gib in args.sizes:
        for sharding in args.shardings:
            for path in args.paths:
                if path == "host" and gib > args.host_max_gib:
                    skipped.append(f"{gib:g} GiB {sharding} host")
                    continue
                ranks = run_case({"gib": gib, "sharding": sharding, "path": path})
                goal = 0.55 * gib + 1.5
                peaks = [r["peak"] / GIB for r in ranks]
                local = ", ".join(f"{r['local_table_bytes'] / GIB:.2f}" for r in ranks)
                met = "yes" if max(peaks) <= goal else "no"
                print(
                    f"| {gib:g} | {sharding} | {path} | {local} | {peaks[0]:.2f}, {peaks[1]:.2f} | {goal:.2f} | {met} "
                    f"| {max(r['setup_s'] for r in ranks):.1f} |",
                    flush=True,
                )
    if skipped:
        print(f"skipped (host path above --host-max-gib {args.host_max_gib:g}): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
