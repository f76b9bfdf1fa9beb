"""Every sparse optimizer kind through ``lightning-sparse fit``: checkpoint, exact resume on 2 processes, and
resharding 2 -> 1 and 1 -> 2 processes with every tensor (weights and sparse optimizer state) intact.

One table per route in the model: table_wise tables take the kind as configured, ``t_cat_1`` adds weight
decay (our kernels for every kind on CPU), ``t_cat_3`` is data_parallel. A ``sgd`` run once could not be
loaded ("Missing key in checkpoint state_dict: sparse_optimizer.").
"""

from __future__ import annotations

import os

import pytest
from conftest import REPO, assert_trees_equal, read_checkpoint
from test_cli import EXAMPLES, run_cli

pytestmark = pytest.mark.multiprocess
KINDS = ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "adam"]


def _args(kind: str, out: str, devices: int, epochs: int, extra_callbacks: str = "") -> list[str]:
    tables = (
        "{t_cat_1: {optimizer: {kind: %s, lr: 0.03, weight_decay: 0.01, eps: 0.001}}, "
        "t_cat_3: {sharding: data_parallel, optimizer: {kind: %s, lr: 0.02, weight_decay: 0.02}}}"
    ) % (kind, kind)
    checkpoint = (
        "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: %s, "
        "filename: '{epoch}', save_top_k: -1, every_n_epochs: 1}}"
    ) % out
    callbacks = f"[{checkpoint}{extra_callbacks}]"
    return [
        "--config",
        str(EXAMPLES / "dlrm.yaml"),
        "--trainer.default_root_dir",
        f"{out}.run",  # one run directory each
        "--trainer.devices",
        str(devices),
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        callbacks,
        "--trainer.val_check_interval",
        "null",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.strategy.init_args.optimizer.kind",
        kind,
        "--trainer.strategy.init_args.tables",
        tables,
        "--data.init_args.num_embeddings_per_feature",
        "[300, 200, 100, 50]",
        "--data.init_args.batch_size",
        "32",
        "--data.init_args.num_train_batches",
        "8",
        "--model.init_args.embedding_dim",
        "8",
        "--model.init_args.dense_arch_layer_sizes",
        "[16, 8]",
        "--model.init_args.over_arch_layer_sizes",
        "[16, 1]",
    ]


def _dump(path) -> str:
    return ", {class_path: cli_callbacks.SaveWhenTrainingStarts, init_args: {path: %s}}" % path


@pytest.mark.parametrize("kind", KINDS)
def test_kind_checkpoints_resume_and_reshard_through_the_cli(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests" / "workers") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    straight, resumed, one, two = (tmp_path / n for n in ("straight", "resumed", "one", "two"))
    run_cli("fit", *_args(kind, straight, devices=2, epochs=2), cwd=tmp_path)
    first = straight / "epoch=0.ckpt"
    # exact resume on 2 processes
    run_cli("fit", *_args(kind, resumed, devices=2, epochs=2), "--ckpt_path", str(first), cwd=tmp_path)
    assert_trees_equal(
        read_checkpoint(straight / "epoch=1.ckpt")[0], read_checkpoint(resumed / "epoch=1.ckpt")[0], f"{kind}: resumed"
    )
    # 2 -> 1 process: the state one process starts from is the 2-process checkpoint, tensor for tensor
    run_cli(
        "fit",
        *_args(kind, one, devices=1, epochs=2, extra_callbacks=_dump(tmp_path / "start1.ckpt")),
        "--ckpt_path",
        str(first),
        cwd=tmp_path,
    )
    saved, trainer_state = read_checkpoint(first)
    assert [k for k in saved if ".embedding_bags." in k], sorted(saved)
    loaded_on_one, state_one = read_checkpoint(tmp_path / "start1.ckpt")
    assert_trees_equal(saved, loaded_on_one, f"{kind}: 2 -> 1")
    assert state_one["sparse_optimizer_hyperparameters"] == trainer_state["sparse_optimizer_hyperparameters"]
    # 1 -> 2 processes
    run_cli(
        "fit",
        *_args(kind, two, devices=2, epochs=2, extra_callbacks=_dump(tmp_path / "start2.ckpt")),
        "--ckpt_path",
        str(tmp_path / "start1.ckpt"),
        cwd=tmp_path,
    )
    assert_trees_equal(saved, read_checkpoint(tmp_path / "start2.ckpt")[0], f"{kind}: 1 -> 2")
    if kind == "sgd":  # evaluation from a checkpoint without sparse optimizer state (it once failed)
        run_cli(
            "test",
            *_args(kind, tmp_path / "t", devices=1, epochs=2),
            "--ckpt_path",
            str(straight / "epoch=1.ckpt"),
            cwd=tmp_path,
        )
