"""Lightning callbacks that report what recommendation training needs watched: throughput, memory, curves."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_sparse.data.loading import process_rank_world
from lightning_sparse.models.prequential import PrequentialState
from lightning_sparse.optim.memory import MemoryReport, memory_report
from lightning_sparse.plotting import NothingToPlot, plot_training_curves


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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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


def _due(trainer: pl.Trainer, every_n_steps: int) -> bool:
    """True on the first optimizer step and every ``every_n_steps`` after (global_step is 1 after the first)."""
    return (trainer.global_step - 1) % every_n_steps == 0


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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        metrics = strategy_memory_report(trainer).as_metrics(per_table=self.per_table)
        for name, value in metrics.items():
            pl_module.log(name, value, reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)


class DynamicTableMonitor(pl.Callback):
    """Logs each dynamic table's counters (``dynamic/<table>/live``, admitted, evicted, expired,
    rejected_full, ...) every ``every_n_steps``: whole-table counts, summed over the ranks' partitions for
    tables with sharded hash tables (a collective; every rank logs the same values)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tables = getattr(trainer.strategy, "dynamic_tables", None)
        if tables is None or not _due(trainer, self.every_n_steps):
            return
        for table, counters in tables.global_metrics().items():
            for name, value in counters.items():
                pl_module.log(f"dynamic/{table}/{name}", float(value), on_step=True, on_epoch=False)


class TrainingCurvePlot(pl.Callback):
    """Writes ``training_curves.png`` into the CSVLogger's log directory at the end of fit (global rank 0).

    The figure is drawn from ``metrics.csv`` (see :mod:`lightning_sparse.plotting`), so it shows exactly
    what was logged: loss, AUC, log-loss/NE, samples/s and embedding memory when those were logged.
    Needs a ``CSVLogger`` among the Trainer's loggers; without one, setup fails rather than silently
    producing nothing. A figure that cannot be drawn after a successful fit (nothing logged yet: a run
    shorter than ``log_every_n_steps``; an unreadable file) is a warning, never a failed run; ``path``
    stays None then.
    """

    def __init__(self, filename: str = "training_curves.png") -> None:
        self.filename = filename
        self.path: Optional[str] = None

    @staticmethod
    def _csv_logger(trainer: pl.Trainer) -> Optional[CSVLogger]:
        return next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._csv_logger(trainer) is None:
            raise MisconfigurationException(
                "TrainingCurvePlot draws from the CSVLogger's metrics.csv, but the Trainer has no CSVLogger; "
                "add `lightning.pytorch.loggers.CSVLogger` to trainer.logger or remove the callback."
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = self._csv_logger(trainer)
        logger.save()  # on_fit_end runs before the loggers are finalized: flush the rows still in memory
        path = os.path.join(logger.log_dir, self.filename)
        try:
            self.path = str(plot_training_curves(os.path.join(logger.log_dir, "metrics.csv"), path))
        except NothingToPlot as reason:
            rank_zero_warn(
                f"TrainingCurvePlot drew no {self.filename}: {reason}. Log more often "
                f"(trainer.log_every_n_steps, now {trainer.log_every_n_steps}) or train longer."
            )
            return
        except Exception as error:  # a figure is not worth failing a fit that succeeded
            rank_zero_warn(f"TrainingCurvePlot drew no {self.filename}: {type(error).__name__}: {error}")
            return
        print(f"training curves: {self.path}")


class PrequentialEvaluation(pl.Callback):
    """Test-then-train: scores every training batch with the predictions made before the model trains on it.

    Logs, over all ranks' samples together, ``prequential/auc``, ``prequential/logloss``, ``prequential/ne``
    and ``prequential/samples`` (cumulative since the fit started) and the same over the last ``window``
    training batches (``prequential/window_auc``, ``window_logloss``, ``window_ne``, ``window_samples``).
    They are computed on the steps Lightning writes to the loggers (``trainer.log_every_n_steps``; or every
    ``every_n_steps``) and at the end of each training epoch; ``FitSummary`` and ``TrainingCurvePlot`` show them.

    Why no second forward pass: the training step's forward runs on the weights before this batch's update
    (the fused sparse optimizer updates rows in the backward, the dense optimizer after it), so its logits
    are exactly the "test" of test-then-train. The model's ``training_step`` returns them:
    :class:`~lightning_sparse.models.ClickModule` returns ``{"loss", "logits", "labels"}``; a module of your
    own must do the same. (They are train-mode predictions: a model with dropout would be scored with it.)

    Sums over ranks are exact: AUC over the union of the ranks' predictions from summed histograms (see
    :mod:`lightning_sparse.models.prequential`), not a mean of per-rank AUCs. The cumulative and window state
    is part of the checkpoint: it resumes bit for bit, mid-epoch included, on the number of processes that
    wrote it, and with the same sums (merged onto rank 0) on any other.

    Args:
        window: training batches in the sliding window.
        bins: histogram bins of the predicted logits over [-16, 16] (the AUC's resolution).
        every_n_steps: compute and log every this many training batches (None: when Lightning logs).
    """

    def __init__(self, window: int = 100, bins: int = 1 << 16, every_n_steps: Optional[int] = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"PrequentialEvaluation.every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.state = PrequentialState(window, bins)
        self.every_n_steps = every_n_steps
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A fit starts from zero; Lightning restores a checkpoint's state after setup, whatever the strategy.
        if stage == "fit":
            self.state.reset()
            self.last = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or "logits" not in outputs or "labels" not in outputs:
            what = f"the keys {sorted(outputs)}" if isinstance(outputs, dict) else type(outputs).__name__
            raise TypeError(
                f"PrequentialEvaluation scores the predictions of the training forward pass, but training_step gave {what}; return "
                "{'loss': loss, 'logits': logits.detach(), 'labels': labels} (as lightning_sparse.models.ClickModule does)"
            )
        self.state.update(outputs["logits"], outputs["labels"])
        if self.every_n_steps is not None:
            due = self.state.batches % self.every_n_steps == 0
        else:  # the condition under which Lightning writes this step's metrics to the loggers
            every = trainer.log_every_n_steps
            due = every > 0 and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
        if due:
            self._log(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state.batches:
            self._log(pl_module, on_step=False)

    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        self.last = self.state.compute(pl_module.device)
        for name, value in self.last.items():
            if value == value:  # an undefined value (AUC before both classes were seen) is not logged
                # Every rank holds the same value; a max over ranks keeps it exact for the epoch-level log.
                pl_module.log(f"prequential/{name}", value, on_step=on_step, on_epoch=not on_step,
                              sync_dist=not on_step, reduce_fx="max")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict(process_rank_world())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict, process_rank_world())


class CommunicationMonitor(pl.Callback):
    """Counts each training step's collectives with a :class:`~lightning_sparse.distributed.comm.CommunicationCounter`
    and logs ``comm/<sharding type>/<tables>/{sent,received}_bytes``, ``comm/dense/ddp/...`` and
    ``comm/total/...``: bytes of the step, summed over ranks (one ``all_gather_object`` after the step, not
    counted), on the first step and every ``every_n_steps`` (default: the trainer's ``log_every_n_steps``);
    every step is counted in the report. ``SparseStrategy(count_communication=True)`` adds it; it must run
    before other callbacks' ``on_train_batch_end``, so the strategy puts it first."""

    def __init__(self, counter: Any, every_n_steps: Optional[int] = None) -> None:
        self.counter = counter
        self.every_n_steps = every_n_steps

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.counter.count_batch(batch)
        self.counter.start_step()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.counter.end_step()
        if not _due(trainer, self.every_n_steps or trainer.log_every_n_steps):
            return
        metrics = self.counter.report().as_metrics()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, metrics)
            metrics = {}
            for part in gathered:
                for name, value in part.items():
                    metrics[name] = metrics.get(name, 0.0) + value
        for name, value in sorted(metrics.items()):
            pl_module.log(name, float(value), on_step=True, on_epoch=False, rank_zero_only=True)


def _comm_rows(metrics: dict[str, Any]) -> list[str]:
    """One row per ``comm/<kind>/<tables>/sent_bytes``: bytes of the last step, all ranks, total first."""
    rows = []
    keys = sorted(k for k in metrics if k.startswith("comm/") and k.endswith("/sent_bytes"))
    keys = [k for k in keys if k.startswith("comm/total/")] + [k for k in keys if not k.startswith("comm/total/")]
    for key in keys:
        name = key[len("comm/") : -len("/sent_bytes")].replace("/", " ")
        received = metrics.get(key[: -len("sent_bytes")] + "received_bytes", 0.0)
        label = f"comm {name}"
        label = f"{label:<26}" if len(label) < 26 else label + " "
        rows.append(f"{label}sent {float(metrics[key]) / 1024:,.1f} KiB, received {float(received) / 1024:,.1f} KiB")
    return rows


def _skipped_line_rows(metrics: dict[str, Any]) -> list[str]:
    """One row per stage that logged ``data/<stage>/skipped_lines`` (the data module's last pass), with the
    non-zero reasons: ``skipped lines (train)     3 (field_count 1, integer 2)``."""
    rows = []
    for stage in ("train", "val"):
        key = f"data/{stage}/skipped_lines"
        if key not in metrics:
            continue
        reasons = {name[len(key) + 1 :]: int(float(v)) for name, v in metrics.items() if name.startswith(key + "/")}
        detail = ", ".join(f"{reason} {n:,}" for reason, n in sorted(reasons.items()) if n)
        label = f"skipped lines ({stage})"
        rows.append(f"{label:<26}{int(float(metrics[key])):,}" + (f" ({detail})" if detail else ""))
    return rows


class FitSummary(pl.Callback):
    """Prints, on global rank 0 after fit, the numbers a reader checks first: the last validation AUC/NE,
    the prequential AUC/NE (:class:`PrequentialEvaluation`), mean training samples/s, embedding memory and the
    lines the data module skipped as malformed in its last train and validation pass, and the bytes the last
    training step's collectives sent and received, by channel, summed over ranks, when ``CommunicationMonitor``
    logged them, and the sharding ``auto`` chose per table with the bytes of each alternative (from whatever of
    them there is)."""

    ROWS = [
        ("val/auc", "validation AUC", "{:.4f}", 1.0),
        ("val/ne", "validation NE", "{:.4f}", 1.0),
        ("val/log_loss", "validation log-loss", "{:.4f}", 1.0),
        ("prequential/auc", "prequential AUC", "{:.4f}", 1.0),
        ("prequential/window_auc", "prequential AUC (window)", "{:.4f}", 1.0),
        ("prequential/ne", "prequential NE", "{:.4f}", 1.0),
        ("prequential/logloss", "prequential log-loss", "{:.4f}", 1.0),
        ("train/epoch_samples_per_sec", "training samples/s", "{:,.0f}", 1.0),
        ("memory/embedding_weight_bytes", "embedding weights (MiB)", "{:.1f}", 2.0**-20),
        ("memory/sparse_optimizer_bytes", "sparse optimizer (MiB)", "{:.1f}", 2.0**-20),
    ]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        lines = [
            f"{label:<26}{fmt.format(float(metrics[key]) * scale)}"
            for key, label, fmt, scale in self.ROWS
            if key in metrics
        ]
        lines += _skipped_line_rows(metrics)
        lines += _comm_rows(metrics)
        auto_sharding = getattr(trainer.strategy, "auto_sharding", None)  # SparseStrategy: what ``auto`` chose
        if auto_sharding is not None:
            lines += auto_sharding.summary_rows()
        if lines:
            print(f"\nfit summary ({trainer.world_size} processes, step {trainer.global_step})")
            print("\n".join(lines))
