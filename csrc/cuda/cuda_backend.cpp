// Torch binding of the CUDA kernels: installs the CUDA kernel table (kernels/backend.h)
// and registers every op for the CUDA dispatch key. Launches go on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/backend.h"
#include "../ops.h"
#include "launch.h"

namespace dmf {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dmf_kernels: ", what, " launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename P>
void guard_dim(const P& p, const char* what) {
  TORCH_CHECK(p.dim <= cuda::kMaxDim, "dmf_kernels: ", what, " supports D <= ", cuda::kMaxDim, " on CUDA, got D = ",
              p.dim);
}

void norm_mod_fwd(const NormModFwdParams& p) {
  guard_dim(p, "adaln forward");
  check(cuda::norm_mod_fwd(p, stream()), "adaln forward");
}
void norm_mod_jvp(const NormModJvpParams& p) {
  guard_dim(p.p, "adaln jvp");
  check(cuda::norm_mod_jvp(p, stream()), "adaln jvp");
}
void norm_mod_bwd(const NormModBwdParams& p) {
  guard_dim(p, "adaln backward");
  check(cuda::norm_mod_bwd(p, stream()), "adaln backward");
}
void gated_residual_fwd(const GatedResidualParams& p) {
  check(cuda::gated_residual_fwd(p, stream()), "gated_residual forward");
}
void gated_residual_jvp(const GatedResidualParams& p) {
  check(cuda::gated_residual_jvp(p, stream()), "gated_residual jvp");
}
void gated_residual_bwd(const GatedResidualParams& p) {
  check(cuda::gated_residual_bwd(p, stream()), "gated_residual backward");
}
void rms_norm_fwd(const RmsNormParams& p) {
  guard_dim(p, "rms_norm forward");
  check(cuda::rms_norm_fwd(p, stream()), "rms_norm forward");
}
void rms_norm_jvp(const RmsNormParams& p) {
  guard_dim(p, "rms_norm jvp");
  check(cuda::rms_norm_jvp(p, stream()), "rms_norm jvp");
}
void rms_norm_bwd(const RmsNormParams& p) {
  guard_dim(p, "rms_norm backward");
  check(cuda::rms_norm_bwd(p, stream()), "rms_norm backward");
}

const Backend kCudaTable{norm_mod_fwd,       norm_mod_jvp,       norm_mod_bwd,
                         gated_residual_fwd, gated_residual_jvp, gated_residual_bwd,
                         rms_norm_fwd,       rms_norm_jvp,       rms_norm_bwd};

const bool kInstalled = (set_cuda_backend(&kCudaTable), true);

}  // namespace
}  // namespace dmf

TORCH_LIBRARY_IMPL(dmf_kernels, CUDA, m) { DMF_REGISTER_ALL_OPS(m) }
