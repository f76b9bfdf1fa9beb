"""Serving from a training run (issue 13): export cost, freshness, store lookup throughput, exact replay.

cost        DLRM (tables 100k/50k/1k/100 x 16, batch 1024, one process, 1 thread): the same 300 steps with
            and without DeltaExport at its default interval (every 100 steps), round-robin; the export's
            own time (every rank's, summed, including the full snapshot) as a share of step time
freshness   the same model exporting every --interval seconds while ``lightning-sparse serve-apply`` follows
            the directory into LMDB (poll 0.1 s): for every step, seconds from its end (its rows updated)
            to the commit of the version holding it
lookups     100k rows of width 16 in LMDB and in Redis (a redis-server on loopback, started here); batches
            of 1024 random ids, rows/s, one client
replay      tests/workers/serving_fit.py for 200 steps on 2 processes (400 batches of 8): every version
            replayed into LMDB and Redis against the live tables (max |difference|)

  python benchmarks/serving.py [--steps 300] [--rounds 2] [--interval 2.0] [--parts lookups,cost,freshness,replay]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_sparse import SparseStrategy, TableConfig
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.dynamic import DynamicTableConfig
from lightning_sparse.models import DLRMModule
from lightning_sparse.serving import DeltaExport, open_store
from lightning_sparse.serving.format import TableSchema
from lightning_sparse.serving.stores import TableUpdate, VersionUpdate

REPO = Path(__file__).resolve().parents[1]
SIZES = [100_000, 50_000, 1_000, 100]


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.ended: dict[int, float] = {}
        self.started = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ended[trainer.global_step] = time.time()


def fit(steps: int, export: "DeltaExport | None") -> tuple[float, StepClock]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    data = SyntheticClickDataModule(
        num_embeddings_per_feature=SIZES, id_space_per_feature=[1_000_000] + SIZES[1:], batch_size=1024,
        num_train_batches=steps, num_val_batches=1, num_test_batches=1, drift_period=20,
    )  # fmt: skip
    model = DLRMModule(num_embeddings_per_feature=SIZES, embedding_dim=16)
    strategy = SparseStrategy(sharding="table_wise", tables={"t_cat_0": TableConfig(dynamic=DynamicTableConfig())})
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[clock] + ([export] if export else []),
    )  # fmt: skip
    trainer.fit(model, data)
    return max(clock.ended.values()) - clock.started, clock


def cost(steps: int, root: Path, rounds: int) -> None:
    plain, exported, shares = [], [], []
    for r in range(rounds):
        seconds, _ = fit(steps, None)
        plain.append(seconds)
        export = DeltaExport(str(root / f"cost{r}"))  # defaults: every 100 steps and at the end
        seconds, _ = fit(steps, export)
        exported.append(seconds)
        shares.append(sum(export.export_seconds) / (seconds - sum(export.export_seconds)))
        per_export = ", ".join(f"{s * 1000:.0f}" for s in export.export_seconds)
    print(f"\n## export cost ({steps} steps, default interval: every 100 steps + the end; best of {rounds})")
    print("| run | fit seconds | ms per step |\n|---|---:|---:|")
    print(f"| without DeltaExport | {min(plain):.2f} | {min(plain) / steps * 1000:.1f} |")
    print(f"| with DeltaExport | {min(exported):.2f} | {min(exported) / steps * 1000:.1f} |")
    print(f"export time / step time: {min(shares) * 100:.2f}% (each export, ms, the first a full snapshot: {per_export}); "
          f"fit-time difference: {(min(exported) / min(plain) - 1) * 100:+.2f}%")  # fmt: skip


def freshness(steps: int, interval: float, root: Path) -> None:
    exports, store = root / "fresh", root / "fresh_store"
    follower = subprocess.Popen(
        [sys.executable, "-m", "lightning_sparse.cli", "serve-apply", "--store", f"lmdb:{store}", "--exports", str(exports),
         "--poll-seconds", "0.1"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in follower.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not store.exists() and time.time() < deadline:  # the follower opened the store: its imports are done
        time.sleep(0.1)
    export = DeltaExport(str(exports), every_n_steps=None, every_seconds=interval)
    _, clock = fit(steps, export)
    deadline = time.time() + 60
    while not any(line.get("step") == export.exported_steps[-1] for line in lines) and time.time() < deadline:
        time.sleep(0.1)
    follower.terminate()
    follower.wait(10)
    applied = {line["step"]: line["applied_at"] for line in lines if "step" in line}
    ages, previous = [], 0
    for step in export.exported_steps:
        ages += [applied[step] - clock.ended[s] for s in range(previous + 1, step + 1)]
        previous = step
    ages = np.array(ages)
    print(
        f"\n## freshness (export every {interval} s, serve-apply polling every 0.1 s into LMDB, {len(export.exported_steps)} versions)"
    )
    print("| seconds from a step's row updates to their visibility | mean | p50 | p99 | max | goal (2 x interval) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| | {ages.mean():.2f} | {np.percentile(ages, 50):.2f} | {np.percentile(ages, 99):.2f} | {ages.max():.2f} | {2 * interval:.2f} |"
    )


def lookups(root: Path, batches: int) -> None:
    ids = np.arange(100_000, dtype=np.int64) * 7919
    rows = np.random.default_rng(0).normal(size=(len(ids), 16)).astype(np.float32)
    update = VersionUpdate(
        1, 1, True, "bench", time.time(), {"t": TableSchema(16, True)}, b"", {"t": TableUpdate(ids=ids, rows=rows)}
    )
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    time.sleep(1.0)
    print(f"\n## store lookups (100k rows x 16 float32, batches of 1024 random ids, one client, {batches} batches)")
    print("| store | apply 100k rows (s) | rows/s | ms per batch |\n|---|---:|---:|---:|")
    try:
        for spec in (f"lmdb:{root / 'lookup_store'}", f"redis://127.0.0.1:{port}"):
            with open_store(spec) as store:
                started = time.perf_counter()
                store.apply(update)
                applied = time.perf_counter() - started
                rng = np.random.default_rng(1)
                wanted = [rng.choice(ids, 1024) for _ in range(batches)]
                started = time.perf_counter()
                for batch in wanted:
                    snapshot = store.lookup({"t": batch})
                    assert snapshot.rows["t"][1].all()
                seconds = time.perf_counter() - started
                print(
                    f"| {spec.split(':')[0]} | {applied:.2f} | {batches * 1024 / seconds:,.0f} | {seconds / batches * 1000:.2f} |"
                )
    finally:
        server.terminate()


def replay(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "tests" / "serving"))
    from conftest import read_checkpoint, run_worker  # the tests' helpers
    from replay import checkpoint_tensors, live_tables, max_difference

    exports = root / "replay"
    result = run_worker("serving_fit.py", "--devices", 2, "--batches", 400, "--every-n-steps", 20,
                        "--exports", exports, "--ckpt-out", root / "replay.ckpt", result=root / "replay.json", timeout=900)  # fmt: skip
    live = live_tables(checkpoint_tensors(root / "replay.ckpt", read_checkpoint))
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    time.sleep(1.0)
    from lightning_sparse.serving import apply_pending

    print(
        f"\n## replay: {result['global_step']} steps on {result['world_size']} processes, {result['version']} versions"
    )
    print(f"t_cat_0 (dynamic) counters: {result['dynamic_metrics']['t_cat_0']}")
    print("| store | versions applied | max abs difference to the live tables |\n|---|---:|---:|")
    try:
        for spec in (f"lmdb:{root / 'replay_store'}", f"redis://127.0.0.1:{port}"):
            with open_store(spec) as store:
                applied = apply_pending(store, exports)
                print(f"| {spec.split(':')[0]} | {len(applied)} | {max_difference(store, live)} |")
    finally:
        server.terminate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--lookup-batches", type=int, default=2000)
    parser.add_argument("--parts", default="lookups,cost,freshness,replay", help="which measurements, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    root = Path(tempfile.mkdtemp(prefix="serving_bench_"))
    try:
        parts = args.parts.split(",")
        if "lookups" in parts:
            lookups(root, args.lookup_batches)
        if "cost" in parts:
            cost(args.steps, root, args.rounds)
        if "freshness" in parts:
            freshness(args.steps, args.interval, root)
        if "replay" in parts:
            replay(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
