#!/usr/bin/env bash
# One call on a machine with a CUDA GPU and no network (e.g. the lent H100/H200):
#   1. builds dmf_kernels with its CUDA kernels against the installed torch,
#   2. runs the CUDA variants of the test suite,
#   3. runs the benchmark suite at DiT shapes and writes benchmarks/results/<gpu>_<date>.*
# Logs and results are also copied to $OUT when it is set (the device tool returns $OUT).
# GPU_CHECK_TUNE=1 adds a sweep of the attention kernels' launch configs (tune_attention.py).
# Budget: under 8 minutes on an H100 with 16 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Build only for the GPU that is here (minutes saved); override with TORCH_CUDA_ARCH_LIST.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cc=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}' + ('a' if p[0] == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST=$cc
fi
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
save() { [ -n "$OUT" ] && cp "$@" "$OUT/" 2>/dev/null; true; }
status=0

log "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'), archs $TORCH_CUDA_ARCH_LIST"
log "building"
start=$SECONDS
if ! DMF_KERNELS_FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -q -e . >build.log 2>&1; then
  # Keep going: the Triton attention kernels do not need the CUDA extension, so a CPU-only
  # build still lets their tests and benchmarks run (the adaLN CUDA cases then fail, loudly).
  tail -60 build.log; save build.log; status=1
  log "CUDA BUILD FAILED; continuing with a CPU-only extension for the Triton parts"
  DMF_KERNELS_SKIP_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -q -e . >>build.log 2>&1 || exit 1
fi
$PY -c "import dmf_kernels as d; print(d.build_info())" || exit 1
log "built in $((SECONDS - start)) s"

log "CUDA tests"
start=$SECONDS
$PY -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tee cuda_tests.log | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save cuda_tests.log
log "tests took $((SECONDS - start)) s"

log "benchmarks"
start=$SECONDS
$PY -m benchmarks.run --device cuda 2>&1 | grep -v -E "^(USDT|\s*warnings.warn)" | tee bench.log | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save bench.log benchmarks/results/*"$(date +%Y-%m-%d)"*
log "benchmarks took $((SECONDS - start)) s"

# Optional (about 3 more minutes): sweep the attention kernels' launch configs.
if [ "${GPU_CHECK_TUNE:-0}" = "1" ]; then
  log "tuning attention launch configs"
  $PY -m benchmarks.tune_attention 2>&1 | tee tune.log | grep -E "^best|wrote"
  save tune.log benchmarks/results/*attention_tuning.json
fi
log "exit $status"
exit $status
