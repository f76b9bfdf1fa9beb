"""Stopping every rank on SIGTERM/SIGINT: the handler only records the signal; the ranks agree at a step
boundary (one small all_reduce that all of them issue at the same point, started at one boundary and read at
the next, so no rank waits for the others there) and stop together, optionally after saving a checkpoint.

Why Lightning's own handling is replaced for SparseStrategy: Lightning 2.6
(``_SignalConnector._sigterm_notifier_fn``) calls ``dist.broadcast`` inside the SIGTERM handler. Python runs
a handler between two bytecodes of the main thread, i.e. anywhere in a step, so on the signalled rank that
broadcast is matched against whatever collective the other ranks issue next (TorchRec's all_to_all, a DDP
all_reduce...) and every rank blocks in ``Work::wait`` until the collective timeout. Its loops also act on
``trainer.received_sigterm`` per rank (only the signalled ranks raise), and the per-batch broadcast in the
training loop carries rank 0's flag only, so a signal to rank 1 stops rank 1 alone.

What is overridden, and why that much:
- :class:`SignalConnector` subclasses Lightning's ``_SignalConnector`` and is put in ``trainer._signal_connector``
  by :meth:`SparseStrategy.setup` (the trainer registers its handlers right after). It keeps Lightning's
  SIGUSR (SLURM requeue) handling and handler restoring, and installs flag-only handlers for SIGTERM and
  SIGINT. ``received_sigterm`` stays False, so Lightning's loops never stop one rank on their own, and the
  broadcast of rank 0's flag that Lightning's training loop runs before every batch (always 0 then) is
  skipped: it made every rank wait for the others once more per step (:func:`skip_lightning_sigterm_broadcast`).
- :class:`StopAtStepBoundary` is a callback the strategy adds to the trainer: after every training,
  validation, test and predict batch the ranks agree; if any rank was signalled, all of them raise
  Lightning's ``SIGTERMException`` together (so ``on_exception`` callbacks such as ``OnExceptionCheckpoint``
  still see it), with exit code 128 + the signal number (143 for SIGTERM, 130 for SIGINT): the shell's
  convention for "ended by that signal", which tells schedulers and scripts that the run did not finish.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sparse.typed_config import NamedEnum

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# File name of the checkpoint written on a signal, in the trainer's default_root_dir unless a path is given.
SIGNAL_CHECKPOINT_NAME = "on_signal.ckpt"

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class OnSignal(NamedEnum):
    """What SparseStrategy does when a rank gets SIGTERM or SIGINT (all ranks stop together at a step boundary).

    ``stop``: stop. ``checkpoint_and_stop``: while fitting, first save a checkpoint (on every rank, as any
    sharded checkpoint) to ``signal_checkpoint_path``, by default ``<default_root_dir>/on_signal.ckpt``.
    """

    STOP = "stop"
    CHECKPOINT_AND_STOP = "checkpoint_and_stop"


class StopRequest:
    """The stop signal this process received, recorded by the handler and read at step boundaries.

    A second SIGTERM/SIGINT while a stop is pending restores the handlers that were there before and
    delivers the signal again, so an impatient user (or a stuck rank) can still end the process at once.
    """

    def __init__(self) -> None:
        self.signum = 0  # first stop signal received and not yet acted upon (0: none)
        self.stopping = False  # set on every rank once the ranks agreed to stop
        self.active = False  # the flag-only handlers are installed (a trainer stage is running)
        self._previous: dict[int, _Handler] = {}
        self._pending: Optional[tuple[Any, torch.Tensor]] = None  # the all_reduce started at the last boundary
        self._flags: Optional[torch.Tensor] = None  # its buffer

    def install(self, previous: Optional[dict[int, _Handler]] = None) -> None:
        """Installs the flag-only handlers (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = previous if previous is not None else {s: signal.getsignal(s) for s in STOP_SIGNALS}
        self.signum, self.stopping = 0, False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        self.active = True

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum:
            for other, handler in self._previous.items():
                signal.signal(other, handler if handler is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum

    def agree(self, device: torch.device) -> int:
        """The signal any rank had received at the previous call (the highest number if several), or 0; every
        rank must call it at the same points (each step boundary).

        This boundary's flags are all-reduced asynchronously and read at the next call: a blocking all_reduce
        made every rank wait for the slowest at every boundary (the step's own collectives keep them together
        anyway), at the price of stopping one boundary later. One process: this process's signal, at once."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        agreed = self.finish()
        flags = self._flags  # one buffer, reused: the all_reduce that used it last is finished
        if flags is None or flags.device != device:
            flags = self._flags = torch.zeros(1, dtype=torch.int32, device=device)
        flags.fill_(self.signum)
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), flags)
        return agreed

    def finish(self) -> int:
        """Waits for the all_reduce started at the last boundary, if any; the signal it agreed on, or 0."""
        if self._pending is None:
            return 0
        (work, flags), self._pending = self._pending, None
        work.wait()
        return int(flags.item())


class SignalConnector(_SignalConnector):
    """Lightning's signal connector with flag-only SIGTERM/SIGINT handlers (see the module docstring)."""

    def __init__(self, trainer: Trainer, request: StopRequest) -> None:
        super().__init__(trainer)
        self.request = request

    def register_signal_handlers(self) -> None:
        previous: dict[int, _Handler] = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        super().register_signal_handlers()  # SIGUSR handling; remembers the handlers to restore on teardown
        self.request.install(previous)

    def teardown(self) -> None:
        """Restores the previous handlers; a signal the ranks did not stop on goes to them."""
        if dist.is_available() and dist.is_initialized():
            self.request.finish()  # every rank reaches teardown; nothing is left in flight on the group
        super().teardown()
        self.request.active = False
        pending, self.request.signum = self.request.signum, 0
        if pending and not self.request.stopping:
            log.warning(
                "%s arrived after the last step boundary: passing it to the process's previous handler",
                signal.Signals(pending).name,
            )
            signal.raise_signal(pending)


def skip_lightning_sigterm_broadcast(trainer: Trainer) -> None:
    """Lightning's training loop broadcasts rank 0's ``received_sigterm`` before every batch; under
    :class:`SignalConnector` it is always False (see the module docstring), so the broadcast only costs a wait."""
    # An instance attribute that shadows the loop's method (for this trainer only).
    vars(trainer.fit_loop.epoch_loop)["_broadcast_sigterm_tensor"] = lambda: None


class StopAtStepBoundary(Callback):
    """After every batch the ranks agree on whether any got a stop signal; if so, all stop together."""

    def __init__(self, request: StopRequest, on_signal: OnSignal, checkpoint_path: Optional[str]) -> None:
        self.request = request
        self.on_signal = on_signal
        self.checkpoint_path = checkpoint_path

    def signal_checkpoint_path(self, trainer: Trainer) -> str:
        return self.checkpoint_path or os.path.join(trainer.default_root_dir, SIGNAL_CHECKPOINT_NAME)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_test_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_predict_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: Trainer) -> None:
        signum = self.request.agree(trainer.strategy.root_device)
        if not signum:
            return
        self.request.stopping = True
        name = signal.Signals(signum).name
        log.warning(
            "rank %d: %s received by a rank: every rank stops at step %d",
            trainer.global_rank,
            name,
            trainer.global_step,
        )
        if self.on_signal is OnSignal.CHECKPOINT_AND_STOP and trainer.state.fn == TrainerFn.FITTING:
            path = self.signal_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                log.warning("saved %s at step %d; resume with ckpt_path=%s", path, trainer.global_step, path)
        raise SIGTERMException(128 + signum)
