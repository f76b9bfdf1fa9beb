"""The stop options from YAML, their errors, the second-signal escape hatch and exit descriptions (no training)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import yaml

from conftest import REPO, _worker_env
from lightning_sparse import SparseStrategy
from lightning_sparse.cli import main
from lightning_sparse.strategies.launcher import describe_exit
from lightning_sparse.strategies.signals import OnSignal


def test_strategy_defaults_stop_on_signal_and_a_five_minute_collective_timeout():
    strategy = SparseStrategy()
    assert strategy.on_signal is OnSignal.STOP and strategy.signal_checkpoint_path is None
    assert strategy._timeout == timedelta(minutes=5)


def test_bad_on_signal_names_the_allowed_values():
    with pytest.raises(ValueError, match="SparseStrategy.on_signal='pause' is not valid; allowed values: 'stop', 'checkpoint_and_stop'"):
        SparseStrategy(on_signal="pause")


def test_stop_options_are_set_from_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tmp_path / "stops.yaml"
    config.write_text(textwrap.dedent("""\
        trainer:
          strategy:
            class_path: lightning_sparse.SparseStrategy
            init_args:
              timeout: 0:02:00
              on_signal: checkpoint_and_stop
              signal_checkpoint_path: /tmp/run/preempted.ckpt
    """))
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
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=120)
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
