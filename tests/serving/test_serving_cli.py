"""examples/serving.yaml through ``lightning-sparse fit`` (DeltaExport configured in YAML), then
``lightning-sparse serve-apply`` into a store, through the console script's entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _worker_env

from lightning_sparse import cli
from lightning_sparse.serving import Predictor, open_store
from lightning_sparse.serving.format import read_current, read_manifest


def _fit(workdir: Path) -> int:
    """``lightning-sparse fit`` in a process of its own, in ``workdir`` (the example's paths are relative)."""
    args = [
        "fit", "--config", str(REPO / "examples" / "serving.yaml"), "--trainer.devices", "1",
        "--data.init_args.num_train_batches", "30", "--data.init_args.batch_size", "32",
        "--data.init_args.num_embeddings_per_feature", "[200, 50, 20, 10]",
        "--data.init_args.id_space_per_feature", "[5000, 50, 20, 10]", "--model.init_args.embedding_dim", "4",
        "--model.init_args.dense_arch_layer_sizes", "[8, 4]", "--model.init_args.over_arch_layer_sizes", "[8, 1]",
        "--trainer.callbacks.init_args.every_n_steps", "12",
    ]  # fmt: skip
    cmd = [sys.executable, "-c", "from lightning_sparse.cli import main; main()", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.returncode


def test_fit_with_the_example_yaml_then_serve_apply(tmp_path, capsys):
    assert _fit(tmp_path) == 0
    exports = tmp_path / "outputs" / "serving" / "exports"
    assert read_current(exports)["version"] == 3  # steps 12 and 24, and the end of training (step 30)
    assert [read_manifest(exports, v)["step"] for v in (1, 2, 3)] == [12, 24, 30]
    store = f"lmdb:{tmp_path / 'store'}"
    with pytest.raises(SystemExit) as done:
        cli.main(["serve-apply", "--store", store, "--exports", str(exports), "--once"])
    assert done.value.code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["version"], line["full"]) for line in lines[:-1]] == [(1, True), (2, False), (3, False)]
    with open_store(store) as opened:
        assert Predictor(opened).version == 3
