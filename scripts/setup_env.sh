#!/usr/bin/env bash
# Creates the virtual environment and installs a matching torch / fbgemm-gpu / torchrec triple.
#
# Version pairing (fbgemm-gpu and torchrec are built against one torch release):
#   torch 2.13 <-> fbgemm-gpu(-cpu) 1.8.0 <-> torchrec 1.8.0   (default, CPU machines)
#   torch 2.11 <-> fbgemm-gpu 1.6.0       <-> torchrec 1.6.1   (CUDA 13 machines; PyPI has no torchrec 1.6.0)
# Override with TORCH_VERSION / FBGEMM_PACKAGE / TORCHREC_VERSION.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_VERSION=${TORCH_VERSION:-2.11.0}
    FBGEMM_PACKAGE=${FBGEMM_PACKAGE:-fbgemm-gpu==1.6.0}
    TORCHREC_VERSION=${TORCHREC_VERSION:-1.6.1}
    TORCHREC_EXTRA_DEPS="iopath==0.1.9"  # torchrec 1.6 imports iopath in torchrec.datasets.utils (1.8 does not)
else
    TORCH_VERSION=${TORCH_VERSION:-2.13.0}
    FBGEMM_PACKAGE=${FBGEMM_PACKAGE:-fbgemm-gpu-cpu==1.8.0}
    TORCHREC_VERSION=${TORCHREC_VERSION:-1.8.0}
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=23" setuptools wheel ninja
# torch first and pinned, so nothing below can replace it with another (CUDA) build.
$PIP install -q "torch==$TORCH_VERSION"
$PIP install -q "torch==$TORCH_VERSION" "$FBGEMM_PACKAGE"
# torchrec's metadata asks for the CUDA fbgemm-gpu and pins torchmetrics: install it alone,
# its real runtime dependencies come from our pyproject.
$PIP install -q --no-deps "torchrec==$TORCHREC_VERSION"
[ -z "${TORCHREC_EXTRA_DEPS:-}" ] || $PIP install -q $TORCHREC_EXTRA_DEPS
# The package itself (editable) with its runtime, test and dev (lint, types, docs, wheel) dependencies.
# The native extension is built just after, in place, against the torch installed above: an editable
# install would compile it in a throw-away directory, while build_ext keeps its objects in build/temp.*,
# so a later `make install` recompiles only the changed cuda_ops/ files and the wheel that
# tests/test_packaging.py builds only links them.
LS_NO_NATIVE=1 $PIP install -q "torch==$TORCH_VERSION" -e ".[test,dev]" --no-build-isolation
# The native extension from cuda_ops/ (with the CUDA sources when a CUDA toolkit is found). A failed
# compile stops here with the compiler's message (setup.py); the check below also refuses an extension
# without CUDA kernels where a toolkit is present.
"$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" scripts/check_native.py
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"
