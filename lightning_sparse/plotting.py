"""Training curves as a PNG, read back from the ``metrics.csv`` that Lightning's CSVLogger writes.

Reading the CSV (rather than keeping values in memory) makes the figure reproducible from the logs alone:
``python -m lightning_sparse.plotting logs/.../metrics.csv out.png``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Union

# One panel per concern; each lists (metric key, label, scale). Panels whose metrics were not logged are left out.
PANELS: list[tuple[str, list[tuple[str, str, float]]]] = [
    ("loss", [("train/loss", "train", 1.0), ("val/loss", "val", 1.0)]),
    ("AUC", [("val/auc", "val", 1.0), ("test/auc", "test", 1.0)]),
    ("log-loss / NE", [("val/log_loss", "val log-loss", 1.0), ("val/ne", "val NE", 1.0)]),
    (
        "prequential (test-then-train)",
        [
            ("prequential/auc", "AUC", 1.0),
            ("prequential/window_auc", "window AUC", 1.0),
            ("prequential/ne", "NE", 1.0),
            ("prequential/window_ne", "window NE", 1.0),
        ],
    ),
    ("samples/s (all ranks)", [("train/samples_per_sec", "train", 1.0)]),
    (
        "embedding memory (MiB, all ranks)",
        [
            ("memory/embedding_weight_bytes", "weights", 2.0**-20),
            ("memory/sparse_optimizer_bytes", "sparse optimizer", 2.0**-20),
        ],
    ),
]


class NothingToPlot(ValueError):
    """The metrics file is missing or holds none of the plotted metrics (e.g. a run shorter than ``log_every_n_steps``)."""


def read_metrics_csv(path: Union[str, Path]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a CSVLogger file (empty cells are metrics not logged that row)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, cell in row.items():
                if key in ("step", "epoch") or cell in (None, ""):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    return series


def plot_training_curves(metrics_csv: Union[str, Path], output: Union[str, Path]) -> Path:
    """Writes one panel per metric family found in ``metrics_csv`` to ``output`` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    if not Path(metrics_csv).is_file():
        raise NothingToPlot(f"{metrics_csv} does not exist: nothing was logged")
    series = read_metrics_csv(metrics_csv)
    panels = [(title, [m for m in metrics if m[0] in series]) for title, metrics in PANELS]
    panels = [(title, metrics) for title, metrics in panels if metrics]
    if not panels:
        raise NothingToPlot(f"{metrics_csv} holds none of the plotted metrics {[m[0] for _, ms in PANELS for m in ms]}")
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, metrics) in zip(axes.flat, panels):
        for key, label, scale in metrics:
            steps, values = zip(*series[key])
            ax.plot(steps, [v * scale for v in values], marker="o" if len(steps) < 20 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m lightning_sparse.plotting METRICS_CSV OUTPUT_PNG")
    print(plot_training_curves(sys.argv[1], sys.argv[2]))
