"""Checks that the installed native extension matches what setup.py was asked to build; exits 1 if not.

    python scripts/check_native.py       (run by scripts/setup_env.sh after the install, and by gpu_check.sh)

With a CUDA toolkit present (setup.py's plan "cuda") the extension must load and register CUDA kernels;
with plan "cpu" it must load; with LS_NO_NATIVE=1 (plan "none") there is nothing to check. This catches a
stale `_C.so` built before a toolkit was installed, or built elsewhere, which the install would not notice.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "lightning_sparse"


def _setup_module():
    spec = importlib.util.spec_from_file_location("lightning_sparse_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ops_with_kernel(dispatch_key: str) -> list[str]:
    """Names of the extension's ops that have a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    import torch

    names = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{NAMESPACE}::")]
    return sorted(n.split("::", 1)[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key))


def main() -> int:
    sys.path.insert(0, str(REPO))
    plan = _setup_module().current_build_plan()
    print(f"build plan (setup.py): {plan}")
    if plan == "none":
        print("native extension: not built (LS_NO_NATIVE=1); lightning_sparse runs the PyTorch twins")
        return 0
    from lightning_sparse.ops import require_native

    path = require_native()
    cpu_ops = ops_with_kernel("CPU")
    print(f"native extension: {path}\n  CPU kernels:  {', '.join(cpu_ops) or 'none'}")
    if not cpu_ops:
        print("error: the extension registers no CPU kernel; rebuild it: python setup.py build_ext --inplace")
        return 1
    if plan == "cuda":
        cuda_ops = ops_with_kernel("CUDA")
        print(f"  CUDA kernels: {', '.join(cuda_ops) or 'none'}")
        if not cuda_ops:
            print(
                "error: a CUDA toolkit is present but the extension has no CUDA kernel (built without it?). "
                "Rebuild: python setup.py build_ext --inplace (or set LS_NO_CUDA=1 to build for the CPU only)"
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
