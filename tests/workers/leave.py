"""How a Lightning-launched worker rank ends."""

import atexit
import os
import sys

import torch.distributed as dist


def leave_and_exit() -> None:
    """All ranks meet, leave the process group, run the exit handlers, and the process exits with status 0
    without running the interpreter's finalisation.

    Why not a plain return: in about one run in a few hundred on a loaded 2-core machine, a rank that had
    finished (results written, process group destroyed) still ended with ``terminate called without an
    active exception`` (SIGABRT) while the interpreter was tearing down (CI of 2026-11-30,
    test_exact_resume_and_resharding). The tests check what the ranks computed, which is written before this
    call; the teardown of the interpreter is not what they are about, and must not make them fail at random.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # What a normal exit runs before finalisation, while the interpreter is whole: atexit handlers, and so
    # weakref finalizers (a cached table's memory-mapped files are deleted by one).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
