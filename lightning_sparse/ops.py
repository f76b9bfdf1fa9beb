"""Access to the native kernels built from ``cuda_ops/`` (the optional extension ``lightning_sparse._C``).

Every native op has a pure-PyTorch twin with identical results, kept next to the code that uses it
(``lightning_sparse/optim/reference.py``, ``lightning_sparse/dynamic/reference.py``). Callers ask
:func:`native_op` for the compiled op and fall back to the twin when it returns ``None``: that happens
when the extension was not built, or when ``LIGHTNING_SPARSE_NATIVE=0`` forces the fallback (tests use
this to compare both paths).
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Callable, Optional

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
NAMESPACE = "lightning_sparse"


@functools.lru_cache(maxsize=None)
def _load_library() -> Optional[str]:
    """Loads ``_C*.so`` once; returns its path, or None when the extension is not built."""
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")))
    if not candidates:
        return None
    torch.ops.load_library(candidates[0])
    return candidates[0]


def native_enabled() -> bool:
    """True when native kernels are allowed (``LIGHTNING_SPARSE_NATIVE`` unset or not ``0``)."""
    return os.environ.get("LIGHTNING_SPARSE_NATIVE", "1") != "0"


def native_available() -> bool:
    """True when the compiled extension is present and loadable."""
    return _load_library() is not None


def native_op(name: str) -> Optional[Callable]:
    """The compiled op ``torch.ops.lightning_sparse.<name>``, or None when it must fall back to PyTorch."""
    if not native_enabled() or _load_library() is None:
        return None
    namespace = getattr(torch.ops, NAMESPACE)
    return getattr(namespace, name) if hasattr(namespace, name) else None


def native_op_for(name: str, device: torch.device) -> Optional[Callable]:
    """:func:`native_op`, but None also when the extension has no kernel of it for ``device``.

    The CUDA kernels are compiled only when the extension was built with a CUDA toolkit; without them an
    op given CUDA tensors would fail inside the dispatcher, so callers check first and fall back.
    """
    op = native_op(name)
    if op is None:
        return None
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key):
        return None
    return op


def require_native() -> str:
    """Path of the loaded extension; raises a clear error if it was not built."""
    path = _load_library()
    if path is None:
        raise RuntimeError(
            "lightning_sparse native extension (_C.so) is not built. Build it with "
            "`pip install -e . --no-build-isolation` (or `make install`), which compiles cuda_ops/."
        )
    return path
