"""Shared helpers: running the multi-process worker scripts and reading sharded checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "workers"


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)  # let Lightning pick a free port for each job
    return env


def run_worker(script: str, *args: Any, result: Path, timeout: int = 300) -> dict[str, Any]:
    """Runs ``tests/workers/<script>`` (which may launch several ranks) and returns its JSON result."""
    cmd = [sys.executable, str(WORKERS / script), *map(str, args), "--result", str(result)]
    proc = subprocess.run(cmd, cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


def run_worker_expecting_failure(
    script: str, *args: Any, env: "dict[str, str] | None" = None, timeout: int = 300
) -> str:
    """Runs ``tests/workers/<script>`` that must fail (a rank killed by a fault hook, a refused checkpoint);
    returns its stdout and stderr. ``env`` adds variables to the workers' environment."""
    cmd = [sys.executable, str(WORKERS / script), *map(str, args), "--result", os.devnull]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**_worker_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode == 0:
        raise AssertionError(f"{' '.join(cmd)} was expected to fail but succeeded:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A sharded checkpoint directory as (flat dict of full tensors, trainer state), in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".full.pt")
    dcp_to_torch_save(str(path), str(out))
    tensors = _flatten(torch.load(out, weights_only=False))
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    return tensors, trainer_state


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, (list, tuple)):
        tree = dict(enumerate(tree))
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def assert_trees_equal(a: Any, b: Any, what: str) -> None:
    """Exact equality of two nested structures of tensors and plain values."""
    fa, fb = _flatten(a), _flatten(b)
    assert fa.keys() == fb.keys(), f"{what}: keys differ: {sorted(set(fa) ^ set(fb))}"
    for key in fa:
        va, vb = fa[key], fb[key]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f"{what}: {key} differs by {(va.double() - vb.double()).abs().max()}"
        else:
            assert va == vb, f"{what}: {key}: {va!r} != {vb!r}"


@pytest.fixture
def gloo_world_of_one():
    """A gloo process group of one rank in this process (reused when an earlier in-process Trainer left one)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        assert dist.get_world_size() == 1, "this test needs a single-process group"
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def single_process_env(monkeypatch):
    """A clean environment for in-process ``devices=1`` trainers."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    yield


def skewed_ids(generator: torch.Generator, n: int, universe: int, shift: int) -> torch.Tensor:
    """Zipf-like ids spread over the int64 range, whose popular ids move with ``shift``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    rank = (universe * u**3).to(torch.int64) + shift
    return rank * 0x9E3779B97F4A7C1 - (1 << 62)


# the serving tests' fixtures (redis_url, store_spec), importable by name from every test folder
from serving_fixtures import redis_url, store_spec  # noqa: E402,F401
