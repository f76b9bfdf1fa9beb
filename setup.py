"""Builds the optional native extension `lightning_sparse._C` from `cuda_ops/`.

The C++ sources (CPU, OpenMP) are always compiled; the CUDA sources only when torch was built
with CUDA and a CUDA toolkit is found. The extension is optional: when it cannot be built,
`lightning_sparse.ops` falls back to pure-PyTorch implementations with identical results.
"""

import glob
import os

from setuptools import setup


def native_extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only builds
        return [], {}
    sources = sorted(glob.glob("cuda_ops/*.cpp"))
    if not sources:
        return [], {}
    # -fno-math-errno: sqrt() need not set errno, so the optimizer's per-column loops vectorize (same results).
    # -ffp-contract=off: no a*b+c fused into an FMA even where the target has one (-march=native): the CPU
    # kernels round every operation, as their CUDA twins do with the _rn intrinsics (the *_common.h headers).
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("LS_NO_CUDA") != "1"
    if with_cuda:
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
    ext.optional = True
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
