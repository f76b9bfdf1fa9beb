"""The README's several-node command: two ``torchrun`` launchers (two "nodes" of one process each, on the
loopback interface, c10d rendezvous) train to the same weights and optimizer state as ``devices: 2`` in one
launch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _worker_env, assert_trees_equal, read_checkpoint
from test_cli import EXAMPLES, run_cli

pytestmark = pytest.mark.multiprocess
SMALL = [
    "--config",
    str(EXAMPLES / "dlrm.yaml"),
    "--trainer.logger",
    "false",
    "--trainer.max_epochs",
    "1",
    "--data.init_args.num_embeddings_per_feature",
    "[300, 200, 100, 50, 40, 30, 20, 10]",
    "--data.init_args.batch_size",
    "32",
    "--data.init_args.num_train_batches",
    "8",
    "--trainer.val_check_interval",
    "null",
    "--trainer.limit_val_batches",
    "0",
    "--model.init_args.embedding_dim",
    "8",
    "--model.init_args.dense_arch_layer_sizes",
    "[16, 8]",
    "--model.init_args.over_arch_layer_sizes",
    "[16, 1]",
]


def _checkpoint_to(path: Path) -> list[str]:
    return [
        "--trainer.callbacks",
        "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: %s, filename: final}}]" % path,
    ]


def test_two_torchrun_nodes_train_like_one_launch_of_two_devices(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    nodes_dir, single_dir = tmp_path / "nodes", tmp_path / "single"
    nodes_dir.mkdir()
    single_dir.mkdir()
    command = [
        str(torchrun),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "-m",
        "lightning_sparse.cli",
        "fit",
        *SMALL,
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        *_checkpoint_to(tmp_path / "nodes.ckpt"),
    ]
    launchers = [
        subprocess.Popen(
            command, cwd=nodes_dir, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    for p, out in zip(launchers, outputs):
        assert p.returncode == 0, out[-4000:]
    run_cli("fit", *SMALL, "--trainer.devices", "2", *_checkpoint_to(tmp_path / "single.ckpt"), cwd=single_dir)
    nodes, _ = read_checkpoint(tmp_path / "nodes.ckpt" / "final.ckpt")
    single, _ = read_checkpoint(tmp_path / "single.ckpt" / "final.ckpt")
    assert any(".embedding_bags." in k for k in nodes)
    assert_trees_equal(nodes, single, "two torchrun nodes vs devices: 2")
