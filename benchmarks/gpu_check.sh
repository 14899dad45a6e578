#!/usr/bin/env bash
# One call on a machine with a CUDA GPU and no network (e.g. the lent H100/H200), in stages
# by value, each under a shared deadline:
#   1. build dmf_kernels with its CUDA kernels against the installed torch (never `make`:
#      the Makefile pins the CPU wheel of torch, which that machine cannot download);
#   2. the CUDA variants of the test suite (parallel when pytest-xdist is installed);
#   3. the kernel benchmarks at DiT shapes (attention, adaLN) -> benchmarks/results/<gpu>_<date>.*;
#   4. achieved bandwidth of each attention kernel against inspect_kernels.py's bytes estimate;
#   5. DMF training steps (bench_dmf_train: B/2, XL/2, ours vs the official way);
#   6. whole-model benchmarks (bench_dit, then bench_lightningdit: LightningDiT-XL/1 with
#      RMSNorm-adaLN, SwiGLU and RoPE, bf16) and the other kernel suites, while time is left.
# GPU_CHECK_BUDGET_S (default 540) is the whole run's deadline: call it with the device
# tool's timeout at 600 s, so the script ends by itself and a timeout never loses results.
# GPU_CHECK_COMPILE=1 adds the torch.compile baselines to stages 5-6 (minutes of compile);
# GPU_CHECK_TUNE=1 runs only the build and a sweep of the attention launch configs (cold
# compiles; it stops at the deadline and keeps what it measured): a call of its own. With $OUT set (the device tool returns it), the console streams to
# $OUT/console.log and logs + results are packed into $OUT/gpu_check.tar.gz after every stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
DEADLINE=$((SECONDS + BUDGET))
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
[ -n "$OUT" ] && exec > >(tee -a "$OUT/console.log") 2>&1
log() { echo "[gpu_check $(date +%H:%M:%S) +$((SECONDS))s] $*"; }
# Build only for the GPU that is here (minutes saved); override with TORCH_CUDA_ARCH_LIST.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cc=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}' + ('a' if p[0] == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST=$cc
fi
mkdir -p benchmarks/results
# $OUT returns at most 8 files: everything goes into one tarball, repacked after every stage
# (a kill skips the EXIT trap), plus this run's results tables for a quick read.
saved=()
save() { saved+=("$@"); }
pack() {
  [ -n "$OUT" ] || return 0
  # this run's results files (globbed now: they appear stage by stage) and the logs
  tar czf "$OUT/gpu_check.tar.gz" $(ls -d "${saved[@]}" benchmarks/results/*"$(date +%F)"* \
    benchmarks/results/bandwidth_*.md benchmarks/results/*attention_tuning.json 2>/dev/null) 2>/dev/null
  cp benchmarks/results/*"$(date +%F)"*.md "$OUT/" 2>/dev/null
  true
}
trap pack EXIT
# run_stage NAME LOG CMD...: runs CMD under what is left of the deadline (minus a margin for
# packing), tees its output to LOG, packs afterwards. Returns 1 when skipped or failed.
status=0
run_stage() {
  local name=$1 logf=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))
  if [ $left -lt 30 ]; then log "SKIP $name: ${left}s left of the ${BUDGET}s budget"; return 1; fi
  log "$name (at most ${left}s)"
  local t0=$SECONDS
  timeout -k 5 $left "$@" 2>&1 | grep --line-buffered -v -E "^(USDT|\s*warnings.warn)" | tee "$logf"
  local rc=${PIPESTATUS[0]}
  save "$logf"
  [ "$rc" -eq 124 ] && log "$name: TIMED OUT after $((SECONDS - t0)) s (partial results kept)"
  log "$name: rc $rc in $((SECONDS - t0)) s"
  pack
  [ "$rc" -eq 0 ] || { status=1; return 1; }
}

log "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'), archs $TORCH_CUDA_ARCH_LIST"
log "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -1); CUDA_HOME=${CUDA_HOME:-unset}"
save build.log
PIP="$PY -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -q"
if ! run_stage "build (CUDA)" build.log env DMF_KERNELS_FORCE_CUDA=1 $PIP -e .; then
  # Keep going: the Triton kernels do not need the CUDA extension, so a CPU-only build still
  # lets their tests and benchmarks run (the adaLN CUDA cases then fail, loudly). pip -e can
  # also fail for a read-only site-packages: build in place then.
  log "CUDA BUILD FAILED (tail of build.log above); trying an in-place build, then a CPU-only one"
  if ! run_stage "build in place (CUDA)" build_inplace.log env DMF_KERNELS_FORCE_CUDA=1 $PY setup.py build_ext --inplace; then
    run_stage "build (CPU only)" build_cpu.log env DMF_KERNELS_SKIP_CUDA=1 $PIP -e . || \
      run_stage "build in place (CPU only)" build_cpu_inplace.log env DMF_KERNELS_SKIP_CUDA=1 $PY setup.py build_ext --inplace
  fi
  export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import dmf_kernels as d; print(d.build_info())" || { log "dmf_kernels does not import"; exit 1; }

gpu=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
stem="${gpu}_$(date +%F)"

# GPU_CHECK_TUNE=1: a call of its own, the launch-config sweep only (after the build).
if [ "${GPU_CHECK_TUNE:-0}" = "1" ]; then
  run_stage "tuning attention launch configs" tune.log $PY -m benchmarks.tune_attention \
    --budget-s $((DEADLINE - SECONDS - 60))
  pack
  log "exit $status (tuning only; budget ${BUDGET}s, used $SECONDS s)"
  exit $status
fi

# Correctness first: nothing measured means much if the kernels are wrong on this GPU.
# Tests get at most 240 s of the budget; xdist spreads the Triton/Inductor compiles.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadfile")
tests_budget=$((DEADLINE - SECONDS - 10 < 240 ? DEADLINE - SECONDS - 10 : 240))
run_stage "CUDA tests" cuda_tests.log timeout -k 5 $tests_budget \
  $PY -m pytest tests -q -m cuda -p no:cacheprovider $xdist --durations 15

# The issues' kernel targets: attention fwd >= 0.9x SDPA, JVP <= 3x own fwd; adaLN bandwidth.
run_stage "bench attention + adaLN" bench.log $PY -m benchmarks.run --device cuda --quick \
  --only bench_attention bench_adaln --stem "$stem" --stream "benchmarks/results/${stem}.rows.jsonl"
run_stage "attention bandwidth vs bytes estimate" bandwidth.log $PY benchmarks/inspect_kernels.py --bandwidth

providers="dmf eager"
[ "${GPU_CHECK_COMPILE:-0}" = "1" ] && providers="dmf eager compile"
# Issue 7's GPU numbers: DMF step / flow-matching step and MF / FM branch at B/2 and XL/2,
# ours against the official way (eager torch.func.jvp, math attention).
run_stage "bench DMF training steps" dmf_train.log $PY -m benchmarks.run --device cuda --quick \
  --only bench_dmf_train --providers $providers --stem "${stem}_dmf_train" \
  --stream "benchmarks/results/${stem}_dmf_train.rows.jsonl"
run_stage "bench whole models" models.log $PY -m benchmarks.run --device cuda --quick --only bench_dit \
  --providers $providers --stem "${stem}_models" --stream "benchmarks/results/${stem}_models.rows.jsonl"
run_stage "bench LightningDiT-XL/1" lightningdit.log $PY -m benchmarks.run --device cuda --quick \
  --only bench_lightningdit --providers $providers --stem "${stem}_lightningdit" \
  --stream "benchmarks/results/${stem}_lightningdit.rows.jsonl"
run_stage "bench rms_norm + gated_residual" bench_more.log $PY -m benchmarks.run --device cuda --quick \
  --only bench_rms_norm bench_gated_residual --stem "${stem}_more" --stream "benchmarks/results/${stem}_more.rows.jsonl"

pack
log "exit $status (budget ${BUDGET}s, used $SECONDS s)"
exit $status
