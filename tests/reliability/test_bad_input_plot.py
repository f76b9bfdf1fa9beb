"""TrainingCurvePlot never fails a fit that succeeded: what it cannot draw is a warning."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse.callbacks import TrainingCurvePlot


def _trainer(tmp_path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path), name="csv", version=0), enable_progress_bar=False
    )


def test_nothing_logged_is_a_warning_naming_log_every_n_steps(tmp_path):
    trainer, plot = _trainer(tmp_path), TrainingCurvePlot()
    with pytest.warns(
        UserWarning,
        match=r"drew no training_curves.png: .*metrics.csv does not exist: nothing was logged.*log_every_n_steps, now 50",
    ):
        plot.on_fit_end(trainer, None)
    assert plot.path is None


def test_unreadable_metrics_file_is_a_warning(tmp_path):
    trainer, plot = _trainer(tmp_path), TrainingCurvePlot()
    _ = trainer.logger.experiment  # creates the log directory (and would clear a metrics.csv found there)
    log_dir = tmp_path / "csv" / "version_0"
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,1,not-a-number\n")
    with pytest.warns(UserWarning, match="drew no training_curves.png: ValueError: could not convert string to float"):
        plot.on_fit_end(trainer, None)
    assert plot.path is None and not (log_dir / "training_curves.png").exists()
