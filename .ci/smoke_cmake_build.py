"""Loads the CMake-built extension (not the pip-installed one) and runs one op against the
eager reference: the second build path must produce a working module."""
import importlib.util
import sys

import torch

path = sys.argv[1]
spec = importlib.util.spec_from_file_location("_C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
assert info["build_tool"] == "cmake", info
x, shift, scale = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 24)
out, _, _ = torch.ops.dmf_kernels.adaln_modulate_fwd(x, shift, scale, 1e-6)
ref = torch.nn.functional.layer_norm(x, (24,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
torch.testing.assert_close(out, ref)
print("cmake build OK:", info)
