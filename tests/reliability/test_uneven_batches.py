"""A Criteo file whose batches do not divide evenly over 2 ranks trains to the end (it used to hang at the
rank with fewer batches), through the CLI, and the lines skipped as malformed reach the metrics and the
fit summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _worker_env
from test_cli import read_csv_metrics

pytestmark = pytest.mark.multiprocess


def _line(i: int) -> str:
    ints = [str(i % 97)] + [str((i * 7 + j) % 50) for j in range(1, 13)]
    cats = [f"{(i * 2654435761 + j * 40503) & 0xFFFFFFFF:08x}" for j in range(26)]
    return "\t".join([str(i % 2), *ints, *cats])


def _uneven_file(path: Path) -> Path:
    """3 malformed lines, then 401 valid ones: dealt line by line, rank 0 holds 2 malformed + 200 valid
    lines (2 batches of 100), rank 1 1 malformed + 201 valid (3 batches: 100, 100, 1)."""
    huge = _line(0).split("\t")
    huge[3] = "9" * 400  # I3: float() of it raised OverflowError, and the run died
    malformed = ["1\t2\t3", "\t".join(huge), "7" + _line(1)[1:]]  # field count, integer, label
    path.write_text("\n".join(malformed + [_line(i) for i in range(401)]) + "\n")
    return path


def test_uneven_criteo_batches_stop_together_and_skipped_lines_are_reported(tmp_path):
    data = _uneven_file(tmp_path / "uneven.tsv")
    args = [
        "fit", "--config", str(REPO / "examples" / "criteo.yaml"),
        "--trainer.devices", "2", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: out, name: csv}}]",
        "--data.init_args.train_paths", str(data), "--data.init_args.val_paths", str(data),
        "--data.init_args.batch_size", "100", "--data.init_args.num_embeddings_per_feature", "50",
        "--data.init_args.num_workers", "0", "--model.init_args.embedding_dim", "4",
        "--model.init_args.dense_arch_layer_sizes", "[8, 4]", "--model.init_args.over_arch_layer_sizes", "[8, 1]",
    ]  # fmt: skip
    # A rank left waiting in a collective never returns: the timeout turns that hang into a failure.
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_sparse.cli", *args], cwd=tmp_path, env=_worker_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]

    metrics = read_csv_metrics(tmp_path / "out" / "csv" / "version_0" / "metrics.csv")
    assert max(metrics["step"]) == 3  # 2 epochs of 2 steps: rank 1's third batch (1 line) is not read
    for stage in ("train", "val"):
        prefix = f"data/{stage}/skipped_lines"
        assert metrics[prefix] == [3.0, 3.0], f"{prefix}: one value per epoch, summed over both ranks"
        for reason in ("field_count", "integer", "label"):
            assert metrics[f"{prefix}/{reason}"] == [1.0, 1.0]
        assert metrics[f"{prefix}/categorical"] == [0.0, 0.0] and metrics[f"{prefix}/encoding"] == [0.0, 0.0]
    assert "skipped lines (train)     3 (field_count 1, integer 1, label 1)" in proc.stdout
    assert "skipped lines (val)       3 (field_count 1, integer 1, label 1)" in proc.stdout
