"""The package installs on its own: the wheel, built from this checkout, in a fresh virtualenv.

``python -m build --wheel --no-isolation`` builds the wheel against the torch of this environment (the
native extension's objects from ``scripts/setup_env.sh`` are reused, so it only links). A fresh virtualenv
gets the same torch (from pip's cache), torchrec with ``--no-deps`` (its metadata wants the CUDA fbgemm-gpu)
and then the wheel with the ``cpu`` extra (``cuda`` where this torch is a CUDA build), as the README's
installation section says. The installed ``lightning-sparse`` then trains DLRM for 5 steps, run outside the
checkout so that nothing is imported from it. Selected by ``-m packaging``; part of ``make test``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.packaging


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def _source_version() -> str:
    text = (REPO / "lightning_sparse" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert found, "lightning_sparse/__init__.py has no __version__ line"
    return found.group(1)


def test_wheel_installs_into_fresh_venv_and_trains(tmp_path: Path) -> None:
    version = _source_version()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)], cwd=REPO)
    wheels = list(dist.glob("lightning_sparse-*.whl"))
    assert [w.name.split("-")[1] for w in wheels] == [version], wheels

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    # --no-compile: no .pyc for every file of torch & co. up front (Python compiles what it imports)
    pip = [python, "-m", "pip", "install", "-q", "--no-compile"]
    cuda = torch.version.cuda is not None
    _run([*pip, f"torch=={torch.__version__}"], cwd=tmp_path)
    _run([*pip, "--no-deps", f"torchrec=={importlib.metadata.version('torchrec')}"], cwd=tmp_path)
    _run([*pip, f"{wheels[0]}[{'cuda' if cuda else 'cpu'}]"], cwd=tmp_path)
    # The documented limit, and the only one: torchrec's metadata wants the CUDA fbgemm-gpu and torchmetrics 1.0.3.
    check = subprocess.run([python, "-m", "pip", "check"], env=_env(), capture_output=True, text=True, timeout=300)
    problems = sorted(line.split()[0] for line in check.stdout.splitlines() if line.strip())
    assert set(problems) <= {"torchrec"}, check.stdout
    if not cuda:
        assert "fbgemm-gpu" in check.stdout, check.stdout

    # The torch installed first stayed; on a CPU machine nothing pulled a CUDA build or NVIDIA libraries.
    probe = (
        "import importlib.metadata as m, torch, lightning_sparse, lightning_sparse.ops as ops;"
        "print(torch.__version__, torch.version.cuda, lightning_sparse.__file__, ops.native_available());"
        "print(sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia')))"
    )
    torch_line, nvidia = _run([python, "-c", probe], cwd=tmp_path).splitlines()
    installed_torch, installed_cuda, package_file, native = torch_line.split()
    assert installed_torch == torch.__version__
    assert Path(package_file).is_relative_to(venv), package_file  # the wheel's copy, not this checkout
    assert native == "True", "the wheel has no native extension lightning_sparse/_C.so"
    if not cuda:
        assert installed_cuda == "None" and nvidia == "[]", (installed_cuda, nvidia)

    cli = str(venv / "bin" / "lightning-sparse")
    assert _run([cli, "--version"], cwd=tmp_path).strip() == f"lightning-sparse {version}"
    config = REPO / "examples" / "dlrm.yaml"
    _run([cli, "fit", "--config", str(config), "--trainer.max_steps", "5"], cwd=tmp_path)
    metrics = list((tmp_path / "outputs" / "dlrm" / "csv").glob("version_*/metrics.csv"))
    assert len(metrics) == 1 and "train/loss" in metrics[0].read_text(), metrics
