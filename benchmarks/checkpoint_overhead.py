"""What the crash-safe, checksummed checkpoints cost: save and load of a ~100 MB checkpoint, one process.

  plain     what SparseStrategy did before: delete the old directory, dcp.save into the target,
            torch.save(trainer_state); load with dcp.load + torch.load, nothing verified
  verified  lightning_sparse.distributed.checkpoint: write into .<name>.partial, sha256 of every file,
            manifest, rename into place (old one deleted after); load verifies every file's sha256 first

Both write through DCP's FileSystemWriter with its default fsync. The two are interleaved and each is
timed ``--repeats`` times; the best time is reported. The files were just written, so the checksum and
verification passes read them from the page cache: on a cold cache they also read the disk once.

    python benchmarks/checkpoint_overhead.py [--megabytes 100] [--repeats 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lightning_sparse.distributed import checkpoint


def state(megabytes: int) -> dict[str, torch.Tensor]:
    rows = megabytes * 2**20 // (4 * 64 * 4)  # 4 tables of 64 float32 columns
    generator = torch.Generator().manual_seed(0)
    return {f"table_{i}.weight": torch.randn(rows, 64, generator=generator) for i in range(4)}


def plain_save(path: Path, tensors: dict, trainer_state: dict) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    dcp.save({"model": tensors}, checkpoint_id=str(path))
    torch.save(trainer_state, path / "trainer_state.pt")


def plain_load(path: Path, tensors: dict) -> dict:
    dcp.load({"model": tensors}, checkpoint_id=str(path))
    return torch.load(path / "trainer_state.pt", weights_only=True)


def best_of(repeats: int, contenders: dict) -> dict[str, float]:
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    tensors = state(args.megabytes)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    trainer_state = {"global_step": 1, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}
    target = {name: torch.empty_like(t) for name, t in tensors.items()}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        plain, verified = Path(folder) / "plain.ckpt", Path(folder) / "verified.ckpt"
        saves = best_of(
            args.repeats,
            {
                "plain": lambda: plain_save(plain, tensors, trainer_state),
                "verified": lambda: checkpoint.save_sharded(verified, tensors, {"state": {}}, {}, trainer_state, True),
            },
        )
        loads = best_of(
            args.repeats,
            {
                "plain": lambda: plain_load(plain, target),
                "verified": lambda: checkpoint.load_sharded(verified, target, {"state": {}}, {}),
            },
        )
        assert all(torch.equal(target[name], tensors[name]) for name in tensors)
    in_memory = tensors["table_0.weight"].numpy().tobytes()
    hashing = best_of(args.repeats, {"sha256": lambda: hashlib.sha256(in_memory).hexdigest()})["sha256"]
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, one process, checkpoint of {size / 2**20:.0f} MiB"
    )
    print(f"sha256 in memory: {len(in_memory) / 2**20 / hashing:,.0f} MiB/s (best of {args.repeats})\n")
    print("| best of %d | plain | verified | verified / plain |" % args.repeats)
    print("|---|---:|---:|---:|")
    for name, times in (("save", saves), ("load", loads)):
        plain_ms, verified_ms = times["plain"] * 1000, times["verified"] * 1000
        print(f"| {name} | {plain_ms:.0f} ms | {verified_ms:.0f} ms | {verified_ms / plain_ms:.2f} |")


if __name__ == "__main__":
    main()
