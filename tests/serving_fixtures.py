"""Fixtures of the serving tests (tests/serving/): a real redis-server on a free loopback port, a fresh store
per test. Registered by tests/conftest.py; a conftest.py of its own in tests/serving would take over the
module name ``conftest`` that the other test files import their helpers from."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:<port>`` of a redis-server this session starts (no persistence) and stops."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail(
            "redis-server is not installed: the serving tests need it (apt-get install redis-server; .ci/run does)"
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=["lmdb", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each backend: an LMDB directory, or a Redis database flushed first."""
    if request.param == "lmdb":
        return f"lmdb:{tmp_path / 'store'}"
    url = request.getfixturevalue("redis_url")
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()
    return url
