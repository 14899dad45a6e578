#!/usr/bin/env bash
# Compiles every .cu with a bare nvcc for sm_80 and sm_90a (no torch involved), and
# syntax-checks the torch CUDA binding against the installed torch headers, so CUDA code
# cannot rot between sessions that have a GPU. Needs nvcc; PYTHON is the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_sources: nvcc not found" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for cu in $(awk '$1 == "cuda" && $2 ~ /\.cu$/ {print $2}' csrc/sources.txt); do
  for arch in 80 90a; do
    "$NVCC" -std=c++17 -O3 -c "$cu" -o "$out/$(basename "$cu").$arch.o" \
      -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -warn-spills 2>"$out/$(basename "$cu").$arch.log" &
    pids+=($!)
  done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [ $status -ne 0 ]; then cat "$out"/*.log >&2; echo "check_cuda_sources: nvcc failed" >&2; exit 1; fi
echo "nvcc: $(ls "$out"/*.o | wc -l) objects (sm_80, sm_90a)"

# The binding includes c10/cuda headers; a CPU torch ships them without one generated
# header, which a stub replaces for this syntax-only check.
stub="$out/stub/c10/cuda/impl"
mkdir -p "$stub" && echo "#pragma once" >"$stub/cuda_cmake_macros.h"
includes=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
for cpp in $(awk '$1 == "cuda" && $2 ~ /\.cpp$/ {print $2}' csrc/sources.txt); do
  # shellcheck disable=SC2086
  g++ -std=c++20 -fsyntax-only $includes -I"$out/stub" -I"$CUDA_HOME/include" "$cpp"
done
echo "CUDA sources OK"
