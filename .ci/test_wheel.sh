#!/usr/bin/env bash
# The binary wheel as a user gets it (make test-wheel): a fresh venv with only the CUDA torch the
# wheel was built for, `pip install <wheel>`, no compiler on PATH (.ci/smoke_wheel.py checks);
# then the same wheel unpacked beside another torch (OTHER_PYTHON, the CPU venv's torch 2.13) must
# refuse to import with one line naming both versions.
# usage: .ci/test_wheel.sh TORCH_REQUIREMENT WHEEL CUDA_ARCHS [OTHER_PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
torch_req=$1 wheel=$(realpath "$2") archs=$3 other=${4:-}
venv=$root/build-cu/venv-wheel
work=$(mktemp -d)
trap 'rm -rf "$venv" "$work"' EXIT
rm -rf "$venv"
start=$(date +%s)
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "$torch_req"
"$venv/bin/python" -m pip install -q "$wheel"
echo "test_wheel: venv with $torch_req and $(basename "$wheel") in $(( $(date +%s) - start )) s"
# Outside the checkout (whose dmf_kernels would shadow the installed one), with a PATH of the venv alone.
(cd "$work" && env -i HOME="$HOME" PATH="$venv/bin" "$venv/bin/python" "$root/.ci/smoke_wheel.py" "$archs")

if [ -n "$other" ]; then
  mkdir "$work/other" && unzip -q "$wheel" 'dmf_kernels/*' -d "$work/other"
  built=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
  installed=$("$other" -c "import torch; print(torch.__version__)")
  if out=$(cd "$work/other" && "$other" -c "import dmf_kernels" 2>&1); then
    echo "test_wheel: the wheel for torch $built imported under torch $installed" >&2; exit 1
  fi
  last=$(printf '%s\n' "$out" | tail -n 1)
  case "$last" in
    "ImportError: dmf_kernels was built for torch $built but torch $installed is installed: "*)
      echo "test_wheel: refused under torch $installed: $last" ;;
    *) printf 'test_wheel: unexpected failure under torch %s:\n%s\n' "$installed" "$out" >&2; exit 1 ;;
  esac
fi
echo "test_wheel: OK in $(( $(date +%s) - start )) s"
