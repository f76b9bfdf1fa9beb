"""Starting a plain ``torch.distributed`` job of N gloo ranks from a worker script (no Lightning)."""

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp
from leave import leave_and_exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    # A rank that finished: the same ending as the Lightning-launched workers (see leave.py). A plain return
    # let the interpreter's finalisation abort a finished rank now and then ("terminate called without an
    # active exception", SIGABRT: CI of 2026-11-30, test_meta_tables, after the results were written).
    leave_and_exit()


def spawn_gloo(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Runs ``fn(rank, *args)`` on ``world_size`` processes joined in a gloo process group."""
    mp.spawn(_run, args=(world_size, _free_port(), fn, args), nprocs=world_size)
