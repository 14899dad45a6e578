import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  registers torch.ops.dmf_kernels.*
