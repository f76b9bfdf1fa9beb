"""Lightning callbacks that report what recommendation training needs watched: throughput and memory."""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from lightning_sparse.optim.memory import MemoryReport, memory_report


def _batch_size(batch: Any) -> int:
    labels = getattr(batch, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels.shape[0]
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}; expected a torchrec Batch with .labels")


class SamplesPerSecond(pl.Callback):
    """Logs ``train/samples_per_sec`` (all ranks together) on the progress bar, and its epoch mean.

    Each step's time is wall clock from one batch start to the next, so it covers data loading,
    forward, backward, communication and optimizer steps.
    """

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self._last: Optional[float] = None
        self._samples = 0
        self._seconds = 0.0
        self._steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last, self._samples, self._seconds, self._steps = None, 0, 0.0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            samples = _batch_size(batch) * trainer.world_size
            seconds = now - self._last
            self._steps += 1
            if self._steps > self.warmup_steps:
                self._samples += samples
                self._seconds += seconds
            pl_module.log("train/samples_per_sec", samples / seconds, prog_bar=True, on_step=True, on_epoch=False)
        self._last = now

    @property
    def mean_samples_per_sec(self) -> float:
        """Mean over the steps of the current epoch after warm-up (0 when there were none)."""
        return self._samples / self._seconds if self._seconds > 0 else 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seconds > 0:
            pl_module.log("train/epoch_samples_per_sec", self.mean_samples_per_sec)


def strategy_memory_report(trainer: pl.Trainer) -> MemoryReport:
    """This rank's bytes of embedding weights, sparse optimizer state, dense weights and dense optimizer state."""
    optimizers = list(trainer.optimizers)
    sparse = getattr(trainer.strategy, "sparse_optimizer", None)
    if sparse is not None:
        optimizers.append(sparse)
    return memory_report(trainer.lightning_module, optimizers)


class SparseMemoryMonitor(pl.Callback):
    """Logs the memory split (Kraken's weights / sparse optimizer / dense optimizer) every ``every_n_steps``.

    Values are this rank's bytes, summed over ranks for the ``memory/`` totals.
    """

    def __init__(self, every_n_steps: int = 50, per_table: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.per_table = per_table

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.global_step - 1) % self.every_n_steps != 0:  # global_step is 1 after the first step
            return
        metrics = strategy_memory_report(trainer).as_metrics(per_table=self.per_table)
        for name, value in metrics.items():
            pl_module.log(name, value, reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)
