#!/usr/bin/env bash
# One call on a machine with a CUDA GPU and no network (e.g. the lent H100/H200):
#   1. builds dmf_kernels with its CUDA kernels against the installed torch,
#   2. runs the CUDA variants of the test suite,
#   3. runs the benchmark suite at DiT shapes and writes benchmarks/results/<gpu>_<date>.*
# With $OUT set (the device tool returns it), logs and results come back as $OUT/gpu_check.tar.gz.
# GPU_CHECK_TUNE=1 adds a sweep of the attention kernels' launch configs (tune_attention.py);
# GPU_CHECK_MODELS=1 the whole-model benchmarks (bench_dit), best as a second call.
# Budget: under 8 minutes on an H100 with 16 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
# Build only for the GPU that is here (minutes saved); override with TORCH_CUDA_ARCH_LIST.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cc=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}' + ('a' if p[0] == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST=$cc
fi
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
script_start=$SECONDS
# $OUT returns at most 8 files: everything goes into one tarball, written on exit (also
# after a failure), plus the main results table for a quick read.
saved=()
save() { saved+=("$@"); }
pack() {
  [ -n "$OUT" ] || return 0
  ls "${saved[@]}" >/dev/null 2>&1
  tar czf "$OUT/gpu_check.tar.gz" $(ls -d "${saved[@]}" 2>/dev/null) 2>/dev/null
  cp benchmarks/results/*"$(date +%Y-%m-%d)".md "$OUT/" 2>/dev/null
  true
}
trap pack EXIT
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

# The issues' targets first (attention, adaLN); the other suites only while the budget
# lasts (every torch.compile baseline costs seconds of compile time).
log "benchmarks"
start=$SECONDS
gpu=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
stem="${gpu}_$(date +%Y-%m-%d)"
$PY -m benchmarks.run --device cuda --quick --only bench_attention bench_adaln --stem "$stem" 2>&1 \
  | grep -v -E "^(USDT|\s*warnings.warn)" | tee bench.log | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ $((SECONDS - script_start)) -lt 330 ]; then
  $PY -m benchmarks.run --device cuda --quick --only bench_rms_norm bench_gated_residual --stem "${stem}_more" 2>&1 \
    | grep -v -E "^(USDT|\s*warnings.warn)" | tee -a bench.log | tail -30
else
  log "skipping bench_rms_norm and bench_gated_residual: over budget"
fi
save bench.log benchmarks/results/"$stem"*
log "benchmarks took $((SECONDS - start)) s"

# Achieved bandwidth of each attention kernel against inspect_kernels.py's bytes-moved
# estimate (compulsory traffic at B=32, H=16, N=256): how far each kernel is from the
# memory roofline, next to the machine-code tables in benchmarks/results/inspect_*.md.
log "attention bandwidth vs. bytes estimate"
start=$SECONDS
$PY benchmarks/inspect_kernels.py --bandwidth 2>&1 | tee bandwidth.log | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
save bandwidth.log benchmarks/results/bandwidth_*.md
log "bandwidth took $((SECONDS - start)) s"

# Optional, best as a second device call (torch.compile of whole-model baselines takes
# minutes): DiT blocks and DMFTs (B/2, XL/2), fwd / fwd+bwd / fwd+jvp / jvp+bwd, with
# model_jvp against eager torch.func.jvp and torch.compile (issue targets: XL/2 model_jvp at
# most 2.3x a forward, the MeanFlow step at most 1.5x a forward+backward step).
if [ "${GPU_CHECK_MODELS:-0}" = "1" ]; then
  log "model benchmarks"
  $PY -m benchmarks.run --device cuda --quick --only bench_dit --stem "${stem}_models" 2>&1 \
    | grep -v -E "^(USDT|\s*warnings.warn)" | tee models.log | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  save models.log benchmarks/results/"${stem}_models"*
fi

# Optional (about 3 more minutes): sweep the attention kernels' launch configs.
if [ "${GPU_CHECK_TUNE:-0}" = "1" ]; then
  log "tuning attention launch configs"
  $PY -m benchmarks.tune_attention 2>&1 | tee tune.log | grep -E "^best|wrote"
  save tune.log benchmarks/results/*attention_tuning.json
fi
log "exit $status"
exit $status
