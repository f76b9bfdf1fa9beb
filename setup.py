"""Builds the native extension `lightning_sparse._C` from `cuda_ops/`.

The C++ sources (CPU, OpenMP) are always compiled; the CUDA sources too when a CUDA toolkit is present:
torch built with CUDA, a CUDA_HOME found by torch, and LS_NO_CUDA not set to 1.

A failed compile stops the install with the compiler's message, on CPU and on CUDA machines alike: a kernel
that silently did not build would leave the slow PyTorch twins (on a GPU, host round trips) in its place,
and nothing would say so. `LS_NO_NATIVE=1` skips the extension on purpose (a machine without a compiler);
`lightning_sparse.ops` then runs the PyTorch twins, which give identical results.
`scripts/check_native.py` checks after an install that what was built matches this plan.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping, Optional

from setuptools import setup

NONE, CPU, CUDA = "none", "cpu", "cuda"


def build_plan(torch_cuda_version: Optional[str], cuda_home: Optional[str], env: Mapping[str, str]) -> str:
    """What to build: ``"cuda"`` (C++ and CUDA sources), ``"cpu"`` (C++ only) or ``"none"`` (LS_NO_NATIVE=1)."""
    if env.get("LS_NO_NATIVE") == "1":
        return NONE
    if torch_cuda_version is not None and cuda_home is not None and env.get("LS_NO_CUDA") != "1":
        return CUDA
    return CPU


def current_build_plan() -> str:
    """:func:`build_plan` for the torch installed here and this process's environment."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return build_plan(torch.version.cuda, CUDA_HOME, os.environ)


def native_extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only builds
        return [], {}
    sources = sorted(glob.glob("cuda_ops/*.cpp"))
    plan = current_build_plan()
    if not sources or plan == NONE:
        return [], {}
    # -fno-math-errno: sqrt() need not set errno, so the optimizer's per-column loops vectorize (same results).
    # -ffp-contract=off: no a*b+c fused into an FMA even where the target has one: the CPU kernels round every
    # operation, as their CUDA twins do with the _rn intrinsics (the *_common.h headers).
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
    if plan == CUDA:
        ext = CUDAExtension(
            "lightning_sparse._C",
            sources + sorted(glob.glob("cuda_ops/*.cu")),
            extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "lightning_sparse._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": _loud_build(BuildExtension.with_options(no_python_abi_suffix=True), plan)}


def _loud_build(base: type, plan: str) -> type:
    """``base`` whose failure names the way out; the compiler's own message is printed above it."""

    class BuildNative(base):
        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as error:
                skip = "LS_NO_CUDA=1 builds the C++ kernels only, " if plan == CUDA else ""
                raise RuntimeError(
                    f"building the native extension lightning_sparse._C ({plan} build) failed: {error}\n"
                    f"The compiler's message is above. Fix the cause; {skip}LS_NO_NATIVE=1 installs without "
                    "native kernels (lightning_sparse then runs its slower PyTorch twins)."
                ) from error

    return BuildNative


if __name__ == "__main__":  # pip's build backend and `python setup.py ...` run it as __main__; tests import it
    ext_modules, cmdclass = native_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
