#!/usr/bin/env bash
# The source distribution builds a working extension (make test-sdist): pip builds a wheel from it
# against PYTHON's torch (CPU kernels only, DMF_KERNELS_SKIP_CUDA=1: the CUDA compile is what
# make wheel already pays for), and that wheel, unpacked outside the checkout, imports and runs an op
# against the eager reference.
# usage: .ci/test_sdist.sh SDIST PYTHON
set -euo pipefail
sdist=$(realpath "$1") py=$(realpath -s "$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
DMF_KERNELS_SKIP_CUDA=1 MAX_JOBS=2 "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$sdist"
unzip -q "$work"/wheel/*.whl -d "$work/site"
cd "$work/site" && "$py" - <<'PY'
import torch

import dmf_kernels
from dmf_kernels import reference

assert dmf_kernels.__file__.startswith(__import__("os").getcwd()), dmf_kernels.__file__
info = dmf_kernels.build_info()
assert not info["cuda"] and info["build_tool"] == "setuptools", info
x, w = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
torch.testing.assert_close(dmf_kernels.rms_norm(x.float(), w.float()), reference.rms_norm(x, w).float())
print("sdist OK:", info)
PY
echo "test_sdist: $(basename "$sdist") built and ran in $(( $(date +%s) - start )) s"
