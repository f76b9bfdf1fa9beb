#!/usr/bin/env bash
# Downloads, on a machine that reaches PyPI, what scripts/gpu_check.sh installs on a GPU machine that reaches
# nothing: the CUDA half of the version pairing for that machine's torch 2.11 (Python 3.12, CUDA 13),
#   fbgemm-gpu 1.6.0 (CUDA 13 wheel, 465 MB) <-> torchrec 1.6.1, with tensordict 0.15.3 and the pure-Python
#   packages torchrec 1.6 needs that the GPU image lacks (iopath, pyvers);
# and with --with-nvcc also NVIDIA's CUDA 13.0 compiler wheels, for a machine whose image has no nvcc.
#
# A call to the GPU machine carries at most 64 MiB, so the big wheel is cut into pieces sent one per call.
# It is first repacked as tar.xz (its files, as pip would unpack them): 176 MB instead of the wheel's 465 MB
# (its CUDA libraries compress far better with xz than in a zip), 3 calls instead of 8. Packing takes
# 10 to 30 minutes (2.5 GB through xz).
#
#   bash scripts/fetch_gpu_wheels.sh [--with-nvcc]        then follow the calls it prints (README, "GPU check")
#
# Output, in $GPU_WHEELS (default .gpu-wheels, git-ignored):
#   small/                      the small wheels and MANIFEST (bundle, sha256, pieces); carried in the first call
#   fbgemm/<bundle>.part-aa ... fbgemm_gpu-1.6.0.tar.xz (176 MB) in as few equal pieces of at most PIECE_MAX
#                               bytes as fit (default 58 MiB: 3 pieces), so that a piece, small/ and the
#                               working tree stay under 64 MiB
#   nvcc/<bundle>.part-aa ...   with --with-nvcc: pieces of the CUDA 13.0 compiler
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu-wheels}
PIECE_MAX=${PIECE_MAX:-$((58 << 20))}  # bytes; + small/ (2 MB) + the working tree (1 MB) < 64 MiB
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WITH_NVCC=0
[[ "${1:-}" == "--with-nvcc" ]] && WITH_NVCC=1

FBGEMM=${FBGEMM:-fbgemm-gpu==1.6.0}
SMALL=(torchrec==1.6.1 tensordict==0.15.3 pyvers==0.2.3 iopath==0.1.9)  # iopath 0.1.10 is a source archive only
NVCC=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*")
# The GPU machine: CPython 3.12 on x86-64 Linux; pure-Python wheels match any platform.
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST/small" "$DEST/download"
"$PY" -m pip download -q "${TARGET[@]}" -d "$DEST/small" "${SMALL[@]}"
"$PY" -m pip download -q "${TARGET[@]}" -d "$DEST/download" "$FBGEMM"

# bundle NAME DIR WHEEL...: unpacks the wheels into one tree, packs it as DIR/NAME.tar.xz, cuts it into
# pieces and records its sha256 and pieces in small/MANIFEST.
bundle() {
  local name=$1 dir=$2
  shift 2
  local tree
  tree=$(mktemp -d)
  for wheel in "$@"; do
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$tree"
  done
  mkdir -p "$DEST/$dir"
  tar -C "$tree" -cf - . | xz -6 -T2 > "$DEST/$dir/$name.tar.xz"
  rm -rf "$tree"
  local sum
  sum=$(sha256sum "$DEST/$dir/$name.tar.xz" | cut -d' ' -f1)
  local size pieces
  size=$(stat -c %s "$DEST/$dir/$name.tar.xz")
  pieces=$(((size + PIECE_MAX - 1) / PIECE_MAX))  # as few pieces as fit, of equal size
  (cd "$DEST/$dir" && split -n "$pieces" "$name.tar.xz" "$name.tar.xz.part-" && rm "$name.tar.xz")
  echo "$name $dir $sum $(cd "$DEST/$dir" && ls "$name".tar.xz.part-* | tr '\n' ' ')" >> "$DEST/small/MANIFEST"
}

wheel=$(ls "$DEST"/download/*.whl)
bundle "$(basename "$wheel" | cut -d- -f1-2)" fbgemm "$wheel"  # e.g. fbgemm_gpu-1.6.0
if [[ $WITH_NVCC == 1 ]]; then
  "$PY" -m pip download -q "${TARGET[@]}" -d "$DEST/download/nvcc" "${NVCC[@]}"
  bundle cuda-nvcc-13.0 nvcc "$DEST"/download/nvcc/*.whl
fi
rm -rf "$DEST/download"

echo "wheels in $DEST:"
(cd "$DEST" && du -h small/* */*.part-*)
echo
echo "GPU calls (device tool 'run'), one right after the other (a machine left idle 30 s is given back):"
first=1
pieces=()
while read -r name dir _ parts; do
  for part in $parts; do pieces+=("$DEST/$dir/$part"); done
done < "$DEST/small/MANIFEST"
last=$((${#pieces[@]} - 1))
for i in "${!pieces[@]}"; do
  carry="\"${pieces[$i]}\""
  [[ $first == 1 ]] && carry="\"$DEST/small\", $carry" && first=0
  if [[ $i == "$last" ]]; then
    echo "  run(carry=[$carry], command=\"bash scripts/gpu_check.sh\", timeout_s=600)"
  else
    echo "  run(carry=[$carry], command=\"ls -l $DEST/*\", timeout_s=60)"
  fi
done
