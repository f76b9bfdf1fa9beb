"""A short benchmark for the one-call GPU check (scripts/gpu_check.sh), one table at the end:

  (1) training: DLRM (lightning_sparse.models.DLRMModule, MLPerf DLRM-v2 layer sizes, embedding dim 128)
      over the 26 tables of Criteo 1TB (the MLPerf cardinalities, 40M rows at most), each capped at
      --cap rows (default 1M: 7.1M rows, 3.6 GB of fp32 weights, about 11 GB with Adam's state), trained
      through SparseStrategy on one device with each of the six sparse optimizer kinds: samples/s over
      --steps steps after --warmup steps (device synchronised at both ends), peak device memory, and
      whether fbgemm fused the kind or our kernels ran it;
  (2) dynamic tables: ids/s of DynamicIdRemapper.remap on the GPU (cuda_ops/hash_table.cu) and on the CPU
      (cuda_ops/hash_table.cpp) over the same drifting Zipf batches, after a warm-up that fills the table.

Each kind trains in its own process (a clean device and process group; a crash or hang costs one row).
Batches are synthetic (SyntheticClickStream), built before timing and cycled.

    python benchmarks/gpu_quick.py                                   # on a GPU machine, ~2 min
    python benchmarks/gpu_quick.py --device cpu --steps 2 --warmup 1 --cap 1000 --batch-size 64 --kinds sgd \
        --remap-capacity 4096 --remap-batch 8192                     # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]

#: Criteo 1TB, as MLPerf DLRM-v2 trains it (ids hashed to at most 40M rows per feature)
CRITEO_1TB_ROWS = [40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956, 405_282, 10,
                   2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152, 12_973, 108, 36]  # fmt: skip
EMBEDDING_DIM = 128
DENSE_ARCH = [512, 256, 128]
OVER_ARCH = [1024, 1024, 512, 256, 1]
KINDS = ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "adam"]
REMAP_SECONDS = 25  # kept for the remap part out of --budget-s


def table_rows(cap: int) -> list[int]:
    return [min(rows, cap) for rows in CRITEO_1TB_ROWS]


# ------------------------------------------------------------------------------------------- (1) training
def train_one_kind(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a child process: fits DLRM with one sparse optimizer kind, returns its measurements."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_sparse import SparseOptimizerConfig, SparseStrategy
    from lightning_sparse.data import SyntheticClickStream
    from lightning_sparse.models import DLRMModule

    sizes = table_rows(args.cap)
    n_batches = min(args.warmup + args.steps, 20)  # cycled: ids of 20 distinct batches are plenty for timing
    stream = SyntheticClickStream(num_batches=n_batches, batch_size=args.batch_size, num_embeddings_per_feature=sizes)
    batches = [stream[i] for i in range(n_batches)]
    total = args.warmup + args.steps
    cycled = [batches[i % n_batches] for i in range(total)]

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.start: Optional[float] = None
            self.end: Optional[float] = None

        def _sync(self) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                self._sync()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            self._sync()
            self.end = time.perf_counter()

    pl.seed_everything(0)
    model = DLRMModule(
        num_embeddings_per_feature=sizes,
        embedding_dim=EMBEDDING_DIM,
        dense_arch_layer_sizes=DENSE_ARCH,
        over_arch_layer_sizes=OVER_ARCH,
        learning_rate=1e-3,
    )
    strategy = SparseStrategy(sharding="table_wise", optimizer=SparseOptimizerConfig(kind=args.kind, lr=0.01))
    timer = Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        max_steps=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, DataLoader(cycled, batch_size=None, shuffle=False))
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"{args.kind}: the timed steps did not run (warmup {args.warmup}, steps {args.steps})")
    names = [name for name, _ in strategy.sparse_optimizer.optimizers]
    return {
        "kind": args.kind,
        "samples_per_sec": args.steps * args.batch_size / (timer.end - timer.start),
        "route": "our kernels" if "native_kernels" in names else "fbgemm fused",
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }


def run_kinds(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    deadline = time.monotonic() + args.budget_s - REMAP_SECONDS if args.budget_s else float("inf")
    for kind in args.kinds:
        timeout = int(min(args.kind_timeout, deadline - time.monotonic()))
        if timeout < 20:
            rows.append({"kind": kind, "error": f"not run: out of time (--budget-s {args.budget_s})"})
            continue
        print(f"[gpu_quick] {kind} (at most {timeout} s)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--child-kind", kind, "--child-result", str(out), *_shared_flags(args)]
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
                env.pop(key, None)
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                if proc.returncode == 0:
                    rows.append(json.loads(out.read_text()))
                    continue
                error = _last_error_line(proc.stderr)
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout} s"
            print(f"[gpu_quick] {kind} failed: {error}", file=sys.stderr)
            rows.append({"kind": kind, "error": error})
    return rows


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--cap", str(args.cap)]  # fmt: skip


def _last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]


# ------------------------------------------------------------------------------------------- (2) remap
def drifting_ids(n_batches: int, batch: int, universe: int, drift: int) -> list[torch.Tensor]:
    """Zipf-like ids (rank ~ universe * u**3) whose popular ranks move by ``drift`` per batch, scattered over int64."""
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        rank = (universe * torch.rand(batch, generator=g, dtype=torch.float64) ** 3).to(torch.int64)
        out.append((rank + b * drift) * 2_654_435_761 % (1 << 62))
    return out


def remap_ids_per_sec(device: str, batches: list[torch.Tensor], capacity: int, warmup: int) -> float:
    from lightning_sparse.dynamic import DynamicIdRemapper, DynamicTableConfig, EvictionPolicy

    remapper = DynamicIdRemapper(DynamicTableConfig(capacity=capacity, eviction=EvictionPolicy.FEATURE_SCORE)).to(
        device
    )
    on_device = [ids.to(device) for ids in batches]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step, ids in enumerate(on_device[:warmup]):
        remapper.remap(ids, step, now=float(step))
    sync()
    start = time.perf_counter()
    for step, ids in enumerate(on_device[warmup:], start=warmup):
        remapper.remap(ids, step, now=float(step))
    sync()
    return sum(ids.numel() for ids in on_device[warmup:]) / (time.perf_counter() - start)


def run_remap(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_sparse.ops import native_op_for

    warmup = 8  # the table is full after these (universe 4x capacity, churn as in benchmarks/dynamic_remap.py)
    batches = drifting_ids(
        warmup + args.remap_steps, args.remap_batch, 4 * args.remap_capacity, args.remap_capacity // 64
    )
    result: dict[str, Any] = {
        "capacity": args.remap_capacity,
        "batch": args.remap_batch,
        "cpu_kernel": "C++" if native_op_for("hash_remap", torch.device("cpu")) else "PyTorch twin",
        "cpu_ids_per_sec": remap_ids_per_sec("cpu", batches, args.remap_capacity, warmup),
    }
    if args.device == "cuda":
        built = native_op_for("hash_remap", torch.device("cuda")) is not None
        result["cuda_kernel"] = "CUDA" if built else "twin on host copies (CUDA kernels not built)"
        result["cuda_ids_per_sec"] = remap_ids_per_sec("cuda", batches, args.remap_capacity, warmup)
    return result


# ------------------------------------------------------------------------------------------- report
def summary(args: argparse.Namespace, kinds: list[dict[str, Any]], remap: dict[str, Any]) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    rows = sum(table_rows(args.cap))
    lines = [
        f"gpu_quick on {device} | torch {torch.__version__}",
        f"DLRM, 26 Criteo-1TB tables capped at {args.cap:,} rows ({rows:,} rows x {EMBEDDING_DIM} = "
        f"{rows * EMBEDDING_DIM * 4 / 2**30:.2f} GiB fp32), batch {args.batch_size}, {args.steps} timed steps after {args.warmup}",
        f"{'sparse optimizer':<18}{'samples/s':>14}{'peak GiB':>10}  route",
    ]
    for row in kinds:
        if "error" in row:
            lines.append(f"{row['kind']:<18}{'FAILED':>14}{'':>10}  {row['error']}")
        else:
            peak = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
            lines.append(f"{row['kind']:<18}{row['samples_per_sec']:>14,.0f}{peak:>10}  {row['route']}")
    lines.append(f"dynamic-table remap, capacity {remap['capacity']:,}, {remap['batch']:,} ids per batch (ids/s):")
    lines.append(
        f"  cpu  {remap['cpu_ids_per_sec']:>14,.0f}  ({remap['cpu_kernel']}, {torch.get_num_threads()} threads)"
    )
    if "cuda_ids_per_sec" in remap:
        ratio = remap["cuda_ids_per_sec"] / remap["cpu_ids_per_sec"]
        lines.append(f"  cuda {remap['cuda_ids_per_sec']:>14,.0f}  ({remap['cuda_kernel']}; {ratio:.1f}x the cpu)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--cap", type=int, default=1_000_000, help="rows per table at most")
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--kind-timeout", type=int, default=150, help="seconds for one kind's process")
    parser.add_argument(
        "--budget-s", type=int, default=0, help="whole run's seconds: kinds that would not fit are not run"
    )
    parser.add_argument("--remap-capacity", type=int, default=1 << 20)
    parser.add_argument("--remap-batch", type=int, default=1 << 18)
    parser.add_argument("--remap-steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--child-kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu for a smoke run)")
    if args.child_kind:
        args.kind = args.child_kind
        Path(args.child_result).write_text(json.dumps(train_one_kind(args)))
        return
    kinds = run_kinds(args)
    remap = run_remap(args)
    print(summary(args, kinds, remap))
    if args.json:
        Path(args.json).write_text(json.dumps({"kinds": kinds, "remap": remap}, indent=1))
    if any("error" in row for row in kinds):
        sys.exit(1)


if __name__ == "__main__":
    main()
