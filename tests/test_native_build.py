"""The native extension's build: what setup.py decides to compile, and that a failed compile stops the build."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def _setup_module():
    spec = importlib.util.spec_from_file_location("lightning_sparse_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no build: setup() runs only as __main__
    return module


@pytest.mark.parametrize(
    "torch_cuda, cuda_home, env, plan",
    [
        ("13.0", "/usr/local/cuda", {}, "cuda"),
        ("13.0", "/usr/local/cuda", {"LS_NO_CUDA": "1"}, "cpu"),
        ("13.0", "/usr/local/cuda", {"LS_NO_CUDA": "0"}, "cuda"),
        ("13.0", None, {}, "cpu"),  # torch with CUDA, but no toolkit to compile with
        (None, "/usr/local/cuda", {}, "cpu"),  # toolkit, but a CPU build of torch
        (None, None, {}, "cpu"),
        ("13.0", "/usr/local/cuda", {"LS_NO_NATIVE": "1"}, "none"),
        (None, None, {"LS_NO_NATIVE": "1"}, "none"),
    ],
)
def test_build_plan(torch_cuda, cuda_home, env, plan):
    assert _setup_module().build_plan(torch_cuda, cuda_home, env) == plan


def _path_without_ninja(tmp_path) -> str:
    """A PATH with the compiler tools but no ninja: torch's BuildExtension then compiles through setuptools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("c++", "g++", "gcc", "cc", "as", "ld"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


@pytest.mark.parametrize("backend", ["setuptools", "ninja"])
def test_a_failed_compile_stops_the_build_with_the_compilers_message(tmp_path, backend):
    """Before, the extension was optional: under setuptools' compiler (no ninja), a compile error was a warning
    and the build 'succeeded' without _C.so."""
    if backend == "ninja" and shutil.which("ninja") is None:
        pytest.skip("ninja not installed")
    project = tmp_path / "project"
    (project / "lightning_sparse").mkdir(parents=True)
    (project / "cuda_ops").mkdir()
    shutil.copy(REPO / "setup.py", project / "setup.py")
    (project / "cuda_ops" / "broken.cpp").write_text('#include "lightning_sparse_no_such_header.h"\n')
    env = {**os.environ, "LS_NO_CUDA": "1", "MAX_JOBS": "1"}
    env.pop("LS_NO_NATIVE", None)
    if backend == "setuptools":
        env["PATH"] = _path_without_ninja(tmp_path)
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "lightning_sparse_no_such_header.h: No such file" in output  # the compiler's own message
    assert "LS_NO_NATIVE=1" in output  # and the way out
    assert not list((project / "lightning_sparse").glob("_C*.so"))


def test_the_installed_extension_matches_the_build_plan():
    """What `make install` ends with (scripts/setup_env.sh): the built _C.so loads and registers its kernels."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_native.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU kernels:" in proc.stdout and "hash_remap" in proc.stdout
