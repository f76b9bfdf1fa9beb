"""A SparseStrategy fit on 2 CPU processes that the reliability tests signal or kill part-way.

Each rank writes ``<run-dir>/rank<k>.pid`` as soon as the script starts, and ``<run-dir>/rank<k>.<phase>``
(``train`` / ``validate``) at its first batch of that phase, so the test knows whom to signal and when.
Every batch sleeps ``--step-sleep`` seconds, so a signal lands mid-phase. Rank 0 writes
``<run-dir>/result.json`` (global step, training batches it ran) only when ``fit`` returns normally; a rank that stops on a signal
writes its exit code to ``<run-dir>/rank<k>.exit``.
"""

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
from leave import leave_and_exit

import lightning_sparse
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.models import DLRMModule


class PhaseMarkers(pl.Callback):
    """Marks the first batch of each phase on disk and slows every batch down."""

    def __init__(self, run_dir: Path, rank: int, step_sleep: float) -> None:
        self.run_dir, self.rank, self.step_sleep = run_dir, rank, step_sleep
        self.train_batches = 0  # run by this process (a resumed run continues where the checkpoint left off)

    def _mark(self, phase: str) -> None:
        marker = self.run_dir / f"rank{self.rank}.{phase}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark("train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._mark("validate")

    def on_train_batch_end(self, *args):
        self.train_batches += 1
        time.sleep(self.step_sleep)

    def on_validation_batch_end(self, *args):
        time.sleep(self.step_sleep)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--on-signal", default="stop")
    parser.add_argument("--signal-checkpoint", default=None)
    parser.add_argument("--batches", type=int, default=40, help="training batches in all (per rank: half)")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--val-every", type=int, default=5, help="validate every this many batches per rank")
    parser.add_argument("--step-sleep", type=float, default=0.5)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    parser.add_argument("--ckpt-in", default=None)
    args = parser.parse_args()

    rank = int(os.environ.get("LOCAL_RANK", "0"))  # Lightning's popen launcher sets it for the ranks it starts
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))

    pl.seed_everything(1234)
    sizes = [200, 300, 50, 1000]
    data = SyntheticClickDataModule(
        num_embeddings_per_feature=sizes,
        batch_size=64,
        num_train_batches=args.batches,
        num_val_batches=args.val_batches,
        num_test_batches=2,
    )
    model = DLRMModule(
        num_embeddings_per_feature=sizes, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]
    )
    strategy = lightning_sparse.SparseStrategy(
        sharding="table_wise",
        timeout=timedelta(seconds=args.timeout_s),
        on_signal=args.on_signal,
        signal_checkpoint_path=args.signal_checkpoint,
    )
    markers = PhaseMarkers(args.run_dir, rank, args.step_sleep)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        val_check_interval=args.val_every,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(args.run_dir),
        callbacks=[markers],
    )
    trainer.fit(model, data, ckpt_path=args.ckpt_in)
    if trainer.is_global_zero:
        result = {"global_step": trainer.global_step, "train_batches": markers.train_batches}
        (args.run_dir / "result.json").write_text(json.dumps(result))
    leave_and_exit()  # see leave.py


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        main()
    except SystemExit as stop:  # how a stopped rank ends: record its exit code (rank 1 is not the test's child)
        rank = os.environ.get("LOCAL_RANK", "0")
        run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
        (run_dir / f"rank{rank}.exit").write_text(str(stop.code))
        raise
