// Torch binding of the CUDA kernels: installs the CUDA kernel table (launcher_table.h) and
// registers every op for the CUDA dispatch key. Launches go on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "launcher_table.h"

namespace dmf {
namespace {

struct TorchEnv {
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static void fail(const std::string& message) { TORCH_CHECK(false, message); }
  template <typename P>
  static void before_launch(const P&) {}
};

const bool kInstalled = (set_cuda_backend(&cuda::LauncherTable<TorchEnv>::table()), true);

}  // namespace
}  // namespace dmf

TORCH_LIBRARY_IMPL(dmf_kernels, CUDA, m) { DMF_REGISTER_ALL_OPS(m) }
