#!/usr/bin/env bash
# The GPU check in one call, on a machine with an NVIDIA GPU and no network whose python3 already has torch
# 2.11 (CUDA 13), lightning, torchmetrics and pytest: the device machine of README's "GPU check".
#
#   1 env     the GPU, python, torch and its CUDA
#   2 wheels  installs what scripts/fetch_gpu_wheels.sh brought (fbgemm-gpu, torchrec, tensordict, ...) into
#             $GPU_SITE with pip --no-index --no-deps --target (fbgemm-gpu: its pieces joined, checked
#             against their sha256 and unpacked there); PYTHONPATH points at it from then on
#   3 build   compiles lightning_sparse._C with its CUDA kernels (nvcc of the machine's CUDA toolkit, else of
#             the carried compiler wheels; with none it says so and builds the C++ kernels only), then
#             scripts/check_native.py
#   4 tests   pytest -m gpu over every tests/test_*.py that has GPU tests (in parallel where pytest-xdist is)
#   5 bench   benchmarks/gpu_quick.py
# and prints one summary at the end. Each stage runs under `timeout`, all of them within $GPU_CHECK_BUDGET
# seconds (default 470), so a hang costs one stage, not the call. Logs go to $OUT (the device tool's
# folder that comes back) or .gpu-check/. Exit status 0 only when every stage passed.
#
#   bash scripts/gpu_check.sh [stage ...]        (default: all five, in order)
set -uo pipefail
cd "$(dirname "$0")/.."
export REPO=$PWD
export W=${GPU_WHEELS:-$REPO/.gpu-wheels}
export SITE=${GPU_SITE:-/tmp/lightning-sparse-site}
export NVCC_DIR=${GPU_NVCC_DIR:-/tmp/lightning-sparse-nvcc}
export PY=${PY:-python3}
export LOGS=${OUT:-$REPO/.gpu-check}
export NOTES
NOTES=$(mktemp -d)
BUDGET=${GPU_CHECK_BUDGET:-470}
DEADLINE=$(($(date +%s) + BUDGET))
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

note() { echo "$*" >> "$NOTES/$STAGE"; }  # one line for the summary
export -f note

unxz_stream() {  # xz -d, multi-threaded where xz is installed, else Python's lzma
  if command -v xz > /dev/null; then xz -dc -T0; else "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; fi
}
export -f unxz_stream

stage_env() {
  set -o pipefail
  nvidia-smi -L || { note "nvidia-smi sees no GPU"; exit 1; }
  "$PY" - <<'EOF' || exit 1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
  note "$("$PY" -c "import sys, torch; print(f'{torch.cuda.get_device_name()}, python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}')")"
}

stage_wheels() {
  set -eo pipefail
  if [[ ! -f $W/small/MANIFEST ]]; then
    note "no $W/small/MANIFEST: run scripts/fetch_gpu_wheels.sh on a machine with PyPI and carry $W/small"
    exit 1
  fi
  rm -rf "$SITE" "$NVCC_DIR"
  mkdir -p "$SITE" "$NVCC_DIR"
  while read -r name dir sum parts; do
    missing=""
    for part in $parts; do [[ -f $W/$dir/$part ]] || missing+=" $part"; done
    if [[ -n $missing ]]; then
      note "$name: pieces not on this machine:$missing (each is carried in its own call, the machine kept warm)"
      exit 1
    fi
    got=$(cd "$W/$dir" && cat $parts | sha256sum | cut -d' ' -f1)
    if [[ $got != "$sum" ]]; then
      note "$name: sha256 of the joined pieces is $got, expected $sum (a piece is stale or cut short)"
      exit 1
    fi
    target=$SITE
    [[ $dir == nvcc ]] && target=$NVCC_DIR
    (cd "$W/$dir" && cat $parts) | unxz_stream | tar -x -C "$target"
    echo "unpacked $name into $target"
  done < "$W/small/MANIFEST"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$W"/small/*.whl
  local versions
  versions=$(PYTHONPATH=$SITE "$PY" -c "
import fbgemm_gpu, tensordict, torchrec, importlib.metadata as m
print(', '.join(f'{p} {m.version(p)}' for p in ('fbgemm_gpu', 'torchrec', 'tensordict')))")
  echo "$versions"
  note "$versions"
}

find_nvcc() {
  local torch_home pip_home
  torch_home=$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2> /dev/null)
  pip_home=$("$PY" -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))" 2> /dev/null)
  for candidate in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc "$torch_home/bin/nvcc" \
    "$(command -v nvcc)" "$pip_home/bin/nvcc" "$NVCC_DIR/nvidia/cu13/bin/nvcc"; do
    if [[ -n $candidate && -x $candidate ]]; then echo "$candidate"; return 0; fi
  done
  return 1
}

cuda_home_of() {  # the toolkit an nvcc belongs to, as nvcc itself reports it (PATH may hold a wrapper script)
  local top
  top=$("$1" -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  if [[ -n $top ]]; then readlink -f "$top"; else dirname "$(dirname "$(readlink -f "$1")")"; fi
}

stage_build() {
  set -eo pipefail
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  export TORCH_CUDA_ARCH_LIST  # this GPU's architecture only: a shorter build
  local no_nvcc=0
  if nvcc=$(find_nvcc); then
    CUDA_HOME=$(cuda_home_of "$nvcc")
    export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
    # NVIDIA's pip wheels ship libcudart.so.13 without the libcudart.so that -lcudart links against.
    for lib in "$CUDA_HOME"/lib/libcudart.so.*; do
      [[ -e $lib && ! -e $CUDA_HOME/lib/libcudart.so ]] && ln -s "$(basename "$lib")" "$CUDA_HOME/lib/libcudart.so"
    done
    "$nvcc" --version | tail -2
    note "nvcc $("$nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2) (CUDA_HOME $CUDA_HOME), sm_${TORCH_CUDA_ARCH_LIST/./}"
  else
    echo "NO NVCC: no CUDA compiler on this machine (CUDA_HOME, PATH, /usr/local/cuda, torch's CUDA_HOME, pip's nvidia/cu13,"
    echo "$NVCC_DIR); the CUDA kernels cannot be built. Bring them: scripts/fetch_gpu_wheels.sh --with-nvcc, carry .gpu-wheels/nvcc."
    note "NO NVCC found: CUDA kernels NOT built; C++ kernels only (bring nvcc: fetch_gpu_wheels.sh --with-nvcc)"
    export LS_NO_CUDA=1
    no_nvcc=1
  fi
  rm -rf build lightning_sparse/_C*.so
  "$PY" setup.py build_ext --inplace
  local report
  report=$(PYTHONPATH=$SITE:$REPO "$PY" scripts/check_native.py) || { echo "$report"; note "check_native.py: $(tail -1 <<< "$report")"; exit 1; }
  echo "$report"
  note "$(grep -o "build plan.*" <<< "$report"); $(grep -o "CUDA kernels:.*" <<< "$report" || echo "no CUDA kernels")"
  [[ $no_nvcc == 0 ]] || exit 3
  if ! grep -q "build plan (setup.py): cuda" <<< "$report"; then
    echo "nvcc was found but setup.py did not plan a CUDA build (torch without CUDA? LS_NO_CUDA set?)"
    exit 1
  fi
}

stage_tests() {
  set -o pipefail
  local files args=()
  files=$(grep -l "pytest.mark.gpu" tests/test_*.py | paste -sd' ')
  "$PY" -c "import xdist" 2> /dev/null && args+=(-n "${GPU_CHECK_WORKERS:-6}")
  "$PY" -c "import pytest_timeout" 2> /dev/null && args+=(--timeout 180)
  echo "pytest -m gpu $files ${args[*]}"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONPATH=$SITE:$REPO "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider "${args[@]}" --junitxml="$LOGS/tests.xml" $files
  local rc=$? counts
  counts=$(grep -aE '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$LOGS/tests.log" | tail -1 | tr -d '=')
  note "$files:$counts"
  if [[ $rc == 0 && ! $counts =~ [0-9]+\ passed ]]; then
    echo "no GPU test passed: all of them skipped (no CUDA device seen, or no CUDA kernels built?)"
    exit 4
  fi
  exit $rc
}

stage_bench() {
  set -o pipefail
  local budget=$1
  PYTHONPATH=$SITE:$REPO "$PY" benchmarks/gpu_quick.py --json "$LOGS/gpu_quick.json" --budget-s "$((budget - 5))"
}

export -f stage_env stage_wheels find_nvcc cuda_home_of stage_build stage_tests stage_bench

declare -A CAP=([env]=45 [wheels]=120 [build]=200 [tests]=240 [bench]=200)
RESULTS=()
run_stage() {
  local name=$1 left limit start rc status
  left=$((DEADLINE - $(date +%s)))
  limit=$((CAP[$name] < left ? CAP[$name] : left))
  if ((limit < 15)); then
    RESULTS+=("$(printf '%-8s %-9s %6s   %s' "$name" SKIPPED - "out of time (GPU_CHECK_BUDGET=$BUDGET s)")")
    return 1
  fi
  echo "=== $name (at most $limit s) ==="
  start=$(date +%s)
  STAGE=$name timeout --kill-after=10 "$limit" bash -c "stage_$name $limit" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    3) status=NO-NVCC ;;
    124 | 137) status=TIMEOUT; echo "timed out after $limit s" >> "$NOTES/$name" ;;
    *) status=FAIL ;;
  esac
  if [[ $rc != 0 ]]; then
    [[ -s $NOTES/$name ]] || grep -av '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-200 > "$NOTES/$name"
    echo "--- $name: exit $rc, last lines of $LOGS/$name.log ---"
    tail -n 25 "$LOGS/$name.log"
  fi
  RESULTS+=("$(printf '%-8s %-9s %6s   %s' "$name" "$status" "$(($(date +%s) - start))" "$(paste -sd';' "$NOTES/$name" 2> /dev/null)")")
  [[ $status == ok ]]
}

STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(env wheels build tests bench)
FAILED=0
for name in "${STAGES[@]}"; do
  [[ -n ${CAP[$name]:-} ]] || { echo "unknown stage '$name'; stages: env wheels build tests bench"; exit 2; }
  if ! run_stage "$name"; then
    FAILED=1
    if [[ $name == env || $name == wheels ]]; then  # nothing after them can run
      RESULTS+=("later stages not run: $name failed")
      break
    fi
  fi
done

{
  echo
  echo "=================== lightning_sparse GPU check ($(date -u +%FT%TZ)) ==================="
  printf '%-8s %-9s %6s   %s\n' stage result seconds note
  printf '%s\n' "${RESULTS[@]}"
  if [[ -f $LOGS/bench.log ]] && grep -q "^gpu_quick on" "$LOGS/bench.log"; then
    echo
    sed -n '/^gpu_quick on/,$p' "$LOGS/bench.log"
  fi
  echo "logs: $LOGS"
} | tee "$LOGS/summary.txt"
rm -rf "$NOTES"
exit $FAILED
