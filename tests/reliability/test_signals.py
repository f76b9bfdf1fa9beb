"""Clean stops and dead ranks on 2 CPU processes: SIGTERM/SIGINT to either rank stops both at the next step
boundary (optionally after a checkpoint that resumes), a signal during start-up orphans no rank, and a
killed rank is named by the survivor, which exits well before the collective timeout.

Each test starts ``tests/workers/stoppable.py`` (rank 0, which launches rank 1 as Lightning's popen
launcher does), waits for the phase marker a rank writes, signals a rank by the pid it wrote, and waits
for both pids to be gone. The waits are generous for a loaded 2-core machine but bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, WORKERS, _worker_env

pytestmark = pytest.mark.multiprocess

STOP_WITHIN_S = 30.0  # the promise: every rank is gone this long after the signal
START_TIMEOUT_S = 180.0  # imports, rendezvous and sharding of both ranks on a busy machine


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


class Job:
    """``stoppable.py`` on 2 ranks in its own session, so that a failed test can end all of it."""

    def __init__(self, run_dir: Path, *args: object) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "log.txt"
        cmd = [sys.executable, str(WORKERS / "stoppable.py"), "--run-dir", str(run_dir), *map(str, args)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, name: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not (self.run_dir / name).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended ({self.proc.returncode}) before {name}:\n{self.log()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} after {timeout} s:\n{self.log()[-6000:]}")
            time.sleep(0.1)

    def pid(self, rank: int) -> int:
        self.wait_for(f"rank{rank}.pid")
        return int((self.run_dir / f"rank{rank}.pid").read_text())

    def signal_and_wait(self, rank: int, signum: int, within: float) -> float:
        """Sends ``signum`` to ``rank``; seconds until both ranks are gone (fails after ``within``)."""
        pids = [self.pid(0), self.pid(1)]
        start = time.monotonic()
        os.kill(pids[rank], signum)
        while any(_alive(p) for p in pids):
            elapsed = time.monotonic() - start
            if elapsed > within:
                alive = [r for r, p in enumerate(pids) if _alive(p)]
                raise AssertionError(f"ranks {alive} still running {within} s after the signal:\n{self.log()[-6000:]}")
            self.proc.poll()  # reaps rank 0 (our child) as soon as it exits
            time.sleep(0.1)
        return time.monotonic() - start

    def first_child(self, timeout: float = START_TIMEOUT_S) -> int:
        """The pid of the first rank that rank 0 starts, as soon as it exists (before it wrote anything)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
                try:
                    children = (task / "children").read_text().split()
                except OSError:  # the thread ended meanwhile
                    continue
                if children:
                    return int(children[0])
            time.sleep(0.02)
        raise AssertionError(f"rank 0 started no rank:\n{self.log()[-6000:]}")

    def returncode(self) -> int:
        return self.proc.wait(timeout=STOP_WITHIN_S)

    def stop_codes(self) -> list[str]:
        """The exit code each rank gave its SystemExit (see stoppable.py)."""
        return [(self.run_dir / f"rank{rank}.exit").read_text() for rank in (0, 1)]

    def end(self) -> None:
        """Kills what is left of the job: its ranks share the process group of the session it leads."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def jobs():
    started: list[Job] = []

    def start(run_dir: Path, *args: object) -> Job:
        job = Job(run_dir, *args)
        started.append(job)
        return job

    yield start
    for job in started:
        job.end()


def test_sigterm_to_rank0_mid_training_checkpoints_stops_both_and_resumes(tmp_path, jobs):
    job = jobs(tmp_path / "run", "--on-signal", "checkpoint_and_stop")
    job.wait_for("rank0.train")
    job.wait_for("rank1.train")
    job.signal_and_wait(0, signal.SIGTERM, within=STOP_WITHIN_S)
    assert job.returncode() == 128 + signal.SIGTERM
    assert job.stop_codes() == ["143", "143"]
    log = job.log()
    for rank in (0, 1):
        assert f"rank {rank}: SIGTERM received by a rank: every rank stops" in log
    assert "Traceback" not in log

    checkpoint = tmp_path / "run" / "on_signal.ckpt"  # the documented default: <default_root_dir>/on_signal.ckpt
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    stopped_at = state["global_step"]
    assert 0 < stopped_at < 20  # 40 batches over 2 ranks: 20 steps per epoch

    resumed = jobs(tmp_path / "resumed", "--ckpt-in", checkpoint, "--step-sleep", 0)
    assert resumed.proc.wait(timeout=START_TIMEOUT_S) == 0, resumed.log()[-6000:]
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert result == {"global_step": 20, "train_batches": 20 - stopped_at}  # continued from the saved step
    # the data modules' loaders are resumable: the stream continues where the signal stopped it, no warning
    assert "your dataloader is not resumable" not in resumed.log()


@pytest.mark.parametrize(("phase", "signum"), [("train", signal.SIGTERM), ("validate", signal.SIGINT)])
def test_signal_to_rank1_stops_both_ranks(tmp_path, jobs, phase, signum):
    job = jobs(tmp_path / "run")  # on_signal: stop (the default): no checkpoint
    job.wait_for(f"rank1.{phase}")
    job.signal_and_wait(1, signum, within=STOP_WITHIN_S)
    assert job.returncode() == 128 + signum
    assert job.stop_codes() == [str(128 + signum)] * 2
    name = signal.Signals(signum).name
    for rank in (0, 1):
        assert f"rank {rank}: {name} received by a rank: every rank stops" in job.log()
    assert not (tmp_path / "run" / "on_signal.ckpt").exists()


def test_sigterm_to_launcher_during_start_up_ends_every_rank(tmp_path, jobs):
    """Rank 0 starts rank 1, then waits for it in the rendezvous (in C++, where Python runs no signal
    handler): a SIGTERM to rank 0 then must reach rank 1 at once and end rank 0 too."""
    job = jobs(tmp_path / "run")
    child = job.first_child()
    start = time.monotonic()
    os.kill(job.proc.pid, signal.SIGTERM)
    while _alive(child) or job.proc.poll() is None:
        assert time.monotonic() - start < STOP_WITHIN_S, f"still running:\n{job.log()[-6000:]}"
        time.sleep(0.1)
    assert job.proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert not (tmp_path / "run" / "rank0.train").exists()


def test_sigkill_of_rank1_is_named_and_rank0_exits(tmp_path, jobs):
    job = jobs(tmp_path / "run", "--timeout-s", 120)
    job.wait_for("rank1.train")
    pid1 = job.pid(1)
    elapsed = job.signal_and_wait(1, signal.SIGKILL, within=60)
    assert job.returncode() == 1
    assert f"rank 1 (pid {pid1}) was killed by SIGKILL" in job.log()
    assert elapsed < 60


def test_rank1_killed_during_start_up_does_not_leave_rank0_waiting(tmp_path, jobs):
    """Rank 1 dies before it joins the rendezvous, where rank 0 would wait until the collective timeout
    (300 s here); the launcher's watch ends rank 0 ``EXIT_GRACE_S`` (10 s) after it saw rank 1 die."""
    job = jobs(tmp_path / "run", "--timeout-s", 300)
    child = job.first_child()
    start = time.monotonic()
    os.kill(child, signal.SIGKILL)
    assert job.proc.wait(timeout=60) == 1
    assert time.monotonic() - start < 60
    log = job.log()
    assert f"rank 1 (pid {child}) was killed by SIGKILL; this rank is still running 10 s later: exiting" in log
