"""The stop options from YAML and their errors, the second-signal escape hatch, exit descriptions, and stops
of test and predict runs in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import yaml
from conftest import REPO, _worker_env
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sparse import SparseStrategy
from lightning_sparse.cli import main
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.models import DLRMModule
from lightning_sparse.strategies.launcher import describe_exit
from lightning_sparse.strategies.signals import OnSignal


def test_strategy_defaults_stop_on_signal_and_a_five_minute_collective_timeout():
    strategy = SparseStrategy()
    assert strategy.on_signal is OnSignal.STOP and strategy.signal_checkpoint_path is None
    assert strategy._timeout == timedelta(minutes=5)


def test_bad_on_signal_names_the_allowed_values():
    with pytest.raises(
        ValueError, match="SparseStrategy.on_signal='pause' is not valid; allowed values: 'stop', 'checkpoint_and_stop'"
    ):
        SparseStrategy(on_signal="pause")


def test_stop_options_are_set_from_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tmp_path / "stops.yaml"
    config.write_text(
        textwrap.dedent("""\
        trainer:
          strategy:
            class_path: lightning_sparse.SparseStrategy
            init_args:
              timeout: 0:02:00
              on_signal: checkpoint_and_stop
              signal_checkpoint_path: /tmp/run/preempted.ckpt
    """)
    )
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    args = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["init_args"]
    assert args["timeout"] == "0:02:00"
    assert args["on_signal"] == "checkpoint_and_stop"
    assert args["signal_checkpoint_path"] == "/tmp/run/preempted.ckpt"


def test_a_second_signal_ends_the_process_at_once():
    """The first SIGTERM is only recorded (the ranks act on it at the next step boundary); a second one
    gets the handling the process had before (here the default: the process is killed by SIGTERM)."""
    script = textwrap.dedent("""\
        import os, signal, sys
        from lightning_sparse.strategies.signals import StopRequest
        request = StopRequest()
        request.install()
        os.kill(os.getpid(), signal.SIGTERM)
        print("recorded", request.signum, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still alive", flush=True)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.stdout == f"recorded {int(signal.SIGTERM)}\n", proc.stderr[-3000:]
    assert proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (-9, "was killed by SIGKILL"),
        (143, "exited with code 143 (128 + SIGTERM)"),
        (1, "exited with code 1"),
    ],
)
def test_exit_descriptions(returncode, text):
    assert describe_exit(returncode) == text


def _one_process_run(
    callback: pl.Callback, test_batches: int
) -> tuple[pl.Trainer, DLRMModule, SyntheticClickDataModule]:
    sizes = [100, 200]
    data = SyntheticClickDataModule(num_embeddings_per_feature=sizes, batch_size=16, num_test_batches=test_batches)
    model = DLRMModule(
        num_embeddings_per_feature=sizes, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=SparseStrategy(), logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    return trainer, model, data


class SignalAtBatch(pl.Callback):
    """Sends SIGTERM to this process at the start of batch 1 of a test or predict run; counts ended batches."""

    def __init__(self) -> None:
        self.ended = 0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    on_predict_batch_start = on_test_batch_start

    def on_test_batch_end(self, *args):
        self.ended += 1

    on_predict_batch_end = on_test_batch_end


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_a_signal_stops_test_and_predict_after_the_current_batch(single_process_env, stage):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # if ours were missing
    try:
        counter = SignalAtBatch()
        trainer, model, data = _one_process_run(counter, test_batches=4)
        with pytest.raises(SIGTERMException) as info:
            getattr(trainer, stage)(model, data)
        assert info.value.code == 128 + signal.SIGTERM
        assert counter.ended == 2  # batch 1, during which the signal came, ended; batches 2 and 3 never started
        assert received == []  # the trainer's handler took it, and the previous one is back
        assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"
    finally:
        signal.signal(signal.SIGTERM, previous)


class SignalAtEnd(pl.Callback):
    def on_test_end(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_after_the_last_batch_goes_to_the_previous_handler(single_process_env):
    """No step boundary follows it: the stage ends normally, then the signal is passed on, not lost."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        trainer, model, data = _one_process_run(SignalAtEnd(), test_batches=2)
        assert "test/auc" in trainer.test(model, data)[0]
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
