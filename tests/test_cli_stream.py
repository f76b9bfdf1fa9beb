"""examples/stream.yaml through the CLI: DLRM without dense features, trained prequentially on the drifting
synthetic stream on 2 processes, for a few steps; and a bad id transform in its schema refused before start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import _main_exit, offline, read_csv_metrics, run_cli  # noqa: F401 - offline is a fixture

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stream.yaml"


def test_stream_example_trains_prequentially_through_the_cli(tmp_path):
    out = run_cli("fit", "--config", str(EXAMPLE), "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2",
                  "--data.init_args.batch_size", "64", cwd=tmp_path)  # fmt: skip
    run = tmp_path / "outputs" / "stream" / "csv" / "version_0"
    metrics = read_csv_metrics(run / "metrics.csv")
    # Logged on the steps Lightning writes (every 2 batches) and at the end: samples of both processes.
    assert metrics["prequential/samples"] == [256.0, 512.0, 768.0, 768.0]
    assert metrics["prequential/window_samples"][-1] == 768.0  # the window (20 batches) holds all 6
    for key in (
        "prequential/auc",
        "prequential/window_auc",
        "prequential/logloss",
        "prequential/ne",
        "prequential/window_ne",
    ):
        assert len(metrics[key]) == 4 and all(0 < v < 2 for v in metrics[key]), key
    assert metrics["data/train/skipped_lines"] == [0.0]  # malformed records, counted per epoch (none here)
    assert "prequential AUC " in out and "prequential NE " in out  # the fit summary
    assert (run / "training_curves.png").stat().st_size > 0


@pytest.mark.usefixtures("offline")
def test_a_bad_id_transform_in_the_schema_is_refused_before_start_up(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(EXAMPLE.read_text().replace("transform: modulo", "transform: crc"))
    code, _, err = _main_exit(["fit", "--config", str(config)], capsys)
    assert code == 2
    assert (
        "error: invalid configuration:\n  - IdTransform='crc' is not valid; allowed values: 'none', 'modulo', 'hash'"
        in err
    )
