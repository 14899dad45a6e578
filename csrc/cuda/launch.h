// Launchers of the CUDA kernels. Plain CUDA: no torch headers, so every .cu compiles with
// a bare `nvcc -c`. Each returns cudaSuccess or the launch error; the torch binding
// (cuda_backend.cpp) turns errors into exceptions.
#pragma once
#include <cuda_runtime.h>

#include "../kernels/params.h"

namespace dmf {
namespace cuda {

// Rows are held in registers: at most 32 elements per thread and 512 threads per row
// (kRowThreads, cuda_common.cuh).
constexpr int64_t kMaxDim = 16384;

cudaError_t norm_mod_fwd(const NormModFwdParams& p, cudaStream_t stream);
cudaError_t norm_mod_jvp(const NormModJvpParams& p, cudaStream_t stream);
cudaError_t norm_mod_bwd(const NormModBwdParams& p, cudaStream_t stream);
cudaError_t gated_residual_fwd(const GatedResidualParams& p, cudaStream_t stream);
cudaError_t gated_residual_jvp(const GatedResidualParams& p, cudaStream_t stream);
cudaError_t gated_residual_bwd(const GatedResidualParams& p, cudaStream_t stream);
cudaError_t rms_norm_fwd(const RmsNormParams& p, cudaStream_t stream);
cudaError_t rms_norm_jvp(const RmsNormParams& p, cudaStream_t stream);
cudaError_t rms_norm_bwd(const RmsNormParams& p, cudaStream_t stream);
// swiglu, rope (elementwise: any D)
cudaError_t swiglu_fwd(const SwigluParams& p, cudaStream_t stream);
cudaError_t swiglu_jvp(const SwigluParams& p, cudaStream_t stream);
cudaError_t swiglu_bwd(const SwigluParams& p, cudaStream_t stream);
cudaError_t rope_fwd(const RopeParams& p, cudaStream_t stream);
cudaError_t rope_jvp(const RopeParams& p, cudaStream_t stream);
cudaError_t rope_bwd(const RopeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dmf
