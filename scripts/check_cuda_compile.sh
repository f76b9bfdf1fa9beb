#!/usr/bin/env bash
# Compiles every cuda_ops/*.cu (whatever files exist) to an object file with nvcc, on a machine without a GPU or CUDA toolkit:
# a compile-only check of the CUDA kernels (syntax, types, templates) before they reach a GPU machine.
#
# nvcc comes from NVIDIA's CUDA 13 pip wheels (the CUDA 12 wheels ship ptxas but no nvcc), installed
# once into $CUDA_WHEELS (default .cache/cuda-wheels, ~270 MB). Headers are those of the project's torch,
# whose CPU wheel also ships ATen/cuda and c10/cuda; it lacks only the generated
# c10/cuda/impl/cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (real CUDA builds have it).
#   usage: scripts/check_cuda_compile.sh [extra nvcc flags, e.g. -gencode arch=compute_80,code=sm_80]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=${CUDA_WHEELS:-.cache/cuda-wheels}
CUDA_HOME_DIR="$WHEELS/nvidia/cu13"
if [[ ! -x "$CUDA_HOME_DIR/bin/nvcc" ]]; then
  "$PY" -m pip install --quiet --target "$WHEELS" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
read -r TORCH_INCLUDE PY_INCLUDE ABI < <("$PY" -c "
import sysconfig, torch
from torch.utils.cpp_extension import include_paths
print(include_paths()[0], sysconfig.get_paths()['include'], int(torch._C._GLIBCXX_USE_CXX11_ABI))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
SOURCES=(cuda_ops/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "error: no cuda_ops/*.cu to compile" >&2
  exit 1
fi
# Every source is compiled even after a failure, so one run lists all the broken files.
FAILED=()
for source in "${SOURCES[@]}"; do
  if "$CUDA_HOME_DIR/bin/nvcc" -c -std=c++20 -O3 -DWITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    --expt-relaxed-constexpr -Xcompiler -fPIC -I"$TORCH_INCLUDE" -I"$TORCH_INCLUDE/torch/csrc/api/include" \
    -I"$PY_INCLUDE" -gencode arch=compute_90,code=sm_90 "$@" "$source" -o "$OUT/$(basename "$source").o"; then
    echo "compiled $source"
  else
    echo "FAILED   $source" >&2
    FAILED+=("$source")
  fi
done
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "error: ${#FAILED[@]} of ${#SOURCES[@]} CUDA sources failed to compile: ${FAILED[*]}" >&2
  exit 1
fi
echo "all ${#SOURCES[@]} CUDA sources compiled: ${SOURCES[*]}"
