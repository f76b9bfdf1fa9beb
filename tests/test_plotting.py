"""Training-curve PNG: drawn from CSVLogger's metrics.csv; a missing CSVLogger fails at setup, not silently."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sparse.callbacks import TrainingCurvePlot
from lightning_sparse.plotting import plot_training_curves, read_metrics_csv

CSV = """epoch,step,train/loss,val/auc,memory/embedding_weight_bytes
0,4,0.69,,1048576
0,9,0.61,,1048576
0,9,,0.71,
0,14,0.55,nan,
"""


def test_reads_sparse_rows_and_plots_a_png(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    series = read_metrics_csv(path)
    assert series == {
        "train/loss": [(4, 0.69), (9, 0.61), (14, 0.55)],
        "val/auc": [(9, 0.71)],  # empty and non-finite cells are not points
        "memory/embedding_weight_bytes": [(4, 1048576.0), (9, 1048576.0)],
    }
    png = plot_training_curves(path, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_without_known_metrics_is_an_error(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,other\n0,1,2.0\n")
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plot_training_curves(path, tmp_path / "curves.png")


def test_callback_without_csv_logger_fails_at_setup():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(MisconfigurationException, match="no CSVLogger"):
        TrainingCurvePlot().setup(trainer, None, "fit")
    TrainingCurvePlot().setup(trainer, None, "test")  # only fit draws curves
