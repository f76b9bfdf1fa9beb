"""Lightning's popen launcher, made to never orphan a rank and to say which rank died.

With ``start_method="popen"`` (what ``lightning-sparse fit`` and scripts use), rank 0 is the process that
starts ranks 1..N-1 as its children. Lightning's ``_SubprocessScriptLauncher`` leaves two gaps:
- a SIGTERM/SIGINT to the launching process during start-up (before the trainer's handlers exist) ends it
  alone; its children wait for it in the rendezvous until the collective timeout. Here the launching
  process forwards it to the ranks it started, at once and even while its main thread waits in C++
  (see :meth:`SparseScriptLauncher._forward_stop_signals`), then ends as it would have;
- its observer thread polls the children every 5 s and, when one exits with a non-zero code, SIGKILLs every
  process, rank 0 included, logging only at INFO level: the user sees rank 0 vanish after "Connection reset
  by peer" without being told which rank died. The same observer also kills rank 0 when a rank exits with
  a non-zero code after a coordinated stop (see ``signals.py``), possibly while rank 0 still writes a checkpoint.

How a dead rank is detected, and why this way: the launching process is the only one that knows *for sure*
that a rank died, and how (``waitpid`` gives the exit code or the signal), within a fraction of a second and
with no false alarm (a heartbeat through the TCPStore would need a staleness threshold, and a busy or
swapped-out rank can miss it). The children watch their parent: when rank 0 dies they are re-parented
(``os.getppid()`` changes). Ranks started by something else (torchrun, srun, a cluster's launcher) are
watched by that launcher, which already ends the other ranks and names the failed one.

What happens then: a rank blocked in a collective with the dead rank fails at once under gloo (the peer's
socket is closed) or at the collective timeout; :meth:`RankWatch.explain` adds the dead rank and its exit
status to that error's message. If the rank is still inside the trainer ``EXIT_GRACE_S`` seconds after the
death (e.g. waiting in the rendezvous for a rank that will never come), the watch ends it with exit code 1,
after killing the ranks it started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Any, Callable, Optional

from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from lightning_sparse.strategies.signals import STOP_SIGNALS, StopRequest

log = logging.getLogger(__name__)

# Set by the launching process for the ranks it starts: its pid (children compare it with their parent).
LAUNCHER_PID_ENV = "LIGHTNING_SPARSE_LAUNCHER_PID"
EXIT_GRACE_S = 10.0
_POLL_S = 0.2


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL`` / ``exited with code 143 (128 + SIGTERM)`` / ``exited with code 1``."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    if returncode > 128 and returncode - 128 in {s.value for s in signal.Signals}:
        return f"exited with code {returncode} (128 + {signal.Signals(returncode - 128).name})"
    return f"exited with code {returncode}"


class RankWatch:
    """Watches the other ranks of a popen launch from one rank: its children (rank 0) or its parent."""

    def __init__(
        self, request: StopRequest, children: list[tuple[int, subprocess.Popen]], parent: Optional[tuple[int, int]]
    ) -> None:
        self.request = request
        self.children = children  # (global rank, process) of the ranks this process started
        self.parent = parent  # (global rank, pid) of the process that started this rank, if one did
        self.verdict: Optional[str] = None
        self._armed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightning-sparse-rank-watch", daemon=True)

    def start(self) -> None:
        if self.children or self.parent is not None:
            self._thread.start()

    def arm(self) -> None:
        """The trainer is running: from now on a dead rank ends this process if it does not end by itself."""
        self._armed.set()

    def disarm(self) -> None:
        self._armed.clear()

    def check(self) -> Optional[str]:
        """Which rank is gone and how (None if all are alive or the ranks stopped on an agreed signal)."""
        if self.verdict is None and not self.request.stopping:
            for rank, proc in self.children:
                if proc.poll():
                    self.verdict = f"rank {rank} (pid {proc.pid}) {describe_exit(proc.returncode)}"
                    break
            if self.parent is not None and os.getppid() != self.parent[1]:
                rank, pid = self.parent
                self.verdict = f"rank {rank} (pid {pid}, the process that launched this one) has exited"
        return self.verdict

    def explain(self, exception: BaseException, wait_s: float = 2.0) -> Optional[str]:
        """Names the dead rank in ``exception``'s message (waiting a little: the error can come first)."""
        if isinstance(exception, (SystemExit, KeyboardInterrupt)) or not (self.children or self.parent):
            return None
        deadline = time.monotonic() + wait_s
        while self.check() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.verdict is not None:
            note = f"lightning_sparse: {self.verdict}; this rank cannot continue without it."
            if exception.args and isinstance(exception.args[0], str):
                exception.args = (f"{note}\n{exception.args[0]}",) + exception.args[1:]
            log.error(note)
        return self.verdict

    def _run(self) -> None:
        while self.check() is None:
            time.sleep(_POLL_S)
        if self.children and self._armed.is_set():  # the parent of the dead rank knows for sure: say it now
            log.error("lightning_sparse: %s; the other ranks cannot continue without it", self.verdict)
        deadline = time.monotonic() + EXIT_GRACE_S
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if self._armed.is_set() and not self.request.stopping:
            log.error(
                "lightning_sparse: %s; this rank is still running %.0f s later: exiting", self.verdict, EXIT_GRACE_S
            )
            for _, proc in self.children:
                if proc.poll() is None:
                    proc.kill()
            os._exit(1)


class SparseScriptLauncher(_SubprocessScriptLauncher):
    """``_SubprocessScriptLauncher`` with signal forwarding during start-up and a :class:`RankWatch`
    instead of Lightning's observer thread (see the module docstring)."""

    def __init__(
        self, request: StopRequest, cluster_environment: ClusterEnvironment, num_processes: int, num_nodes: int
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.request = request
        self.watch: Optional[RankWatch] = None
        self._previous: dict[int, Any] = {}  # this process's stop-signal handlers before ours
        self._lock = threading.Lock()
        self._spawning = False
        self._pending = 0  # a stop signal that came while the children were being started

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        # Lightning's launch with its observer left out (_launch_process_observer; our watch replaces it).
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if self.watch is None:
            first = self.cluster_environment.node_rank() * self.num_processes  # global rank of this node's launcher
            if not self.cluster_environment.creates_processes_externally:
                if self.num_processes > 1:
                    self._forward_stop_signals()
                    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
                self._call_children_scripts()
                self.watch = RankWatch(self.request, [(first + i + 1, p) for i, p in enumerate(self.procs)], None)
            else:
                self.watch = RankWatch(self.request, [], _launching_parent(first))
            self.watch.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        self.watch.arm()
        try:
            return function(*args, **kwargs)
        finally:
            self.watch.disarm()

    def _call_children_scripts(self) -> None:
        """Starts the other ranks; a stop signal that comes meanwhile is forwarded once all of them exist
        (``self.procs`` is filled one by one: a child started but not yet listed would miss it)."""
        with self._lock:
            self._spawning = True
        try:
            super()._call_children_scripts()
        finally:
            with self._lock:
                self._spawning, pending = False, self._pending
        if pending:
            self._forward(pending, None)

    def _forward_stop_signals(self) -> None:
        """Until the trainer installs its own handlers, a SIGTERM/SIGINT to this process reaches its children
        too, then gets this process's previous handling (by default: end it).

        Python runs signal handlers in the main thread only, between bytecodes; during start-up the main
        thread may wait in C++ (the rendezvous waits for every rank) for as long as the collective timeout.
        So the C-level handler's wake-up byte (``signal.set_wakeup_fd``) is read by a thread, which forwards
        the signal at once and ends this process ``EXIT_GRACE_S`` later if the main thread never got to it.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._forward)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        forwarder = threading.Thread(target=self._forward_from_thread, args=(read_end,), daemon=True)
        forwarder.name = "lightning-sparse-signals"
        forwarder.start()

    def _forward(self, signum: int, frame: Optional[FrameType]) -> None:
        """The main thread's handler: forward to the children, then this process's previous handling."""
        if self._spawning:
            self._pending = signum
            return
        self.kill(signum)
        previous = self._previous[signum]
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def _forward_from_thread(self, read_end: int) -> None:
        while True:
            for signum in os.read(read_end, 64):
                if signum not in STOP_SIGNALS or self.request.active:
                    continue  # the trainer's handlers are in place: the ranks agree at the next step boundary
                self.request.stopping = True  # the ranks it started end on it: not a failure to report
                with self._lock:
                    if self._spawning:
                        self._pending = signum
                        continue
                self.kill(signum)
                timer = threading.Timer(EXIT_GRACE_S, self._exit_if_still_starting, args=(signum,))
                timer.daemon = True  # never keeps the process alive
                timer.start()

    def _exit_if_still_starting(self, signum: int) -> None:
        if not self.request.active:
            log.error("lightning_sparse: %s during start-up; exiting", signal.Signals(signum).name)
            os._exit(128 + signum)


def _launching_parent(first_rank: int) -> Optional[tuple[int, int]]:
    """(global rank, pid) of the SparseScriptLauncher that started this rank, if one did. It may already be
    gone (this rank was then re-parented): the watch then sees it at its first look."""
    launcher_pid = int(os.environ.get(LAUNCHER_PID_ENV, "0"))
    if not launcher_pid or launcher_pid == os.getpid():
        return None
    return first_rank, launcher_pid
