// The kernel table (kernels/backend.h) over the CUDA launchers (launch.h), shared by the torch
// binding (cuda_backend.cpp) and the emulated-CUDA test library (csrc/emu/emu_backend.cpp), so
// the emulation runs the same glue as a GPU build: the D limit and the launch error check.
// No torch headers. Env provides
//   static cudaStream_t stream();
//   static void fail(const std::string& message);   // throws
//   static void before_launch(const P& params);   // for every params type P of launch.h
#pragma once
#include <string>

#include "../kernels/backend.h"
#include "launch.h"

namespace dmf {
namespace cuda {

template <typename Env>
struct LauncherTable {
  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      Env::fail(std::string("dmf_kernels: ") + what + " launch failed: " + cudaGetErrorString(err));
  }
  static void guard_dim(int64_t dim, const char* what) {
    if (dim > kMaxDim)
      Env::fail(std::string("dmf_kernels: ") + what + " supports D <= " + std::to_string(kMaxDim) +
                " on CUDA, got D = " + std::to_string(dim));
  }
  // One entry: the D limit (row kernels only), the hook, the launch, the error check.
  template <typename P, cudaError_t (*Launch)(const P&, cudaStream_t)>
  static void run(const P& p, int64_t dim_limited, const char* what) {
    if (dim_limited > 0) guard_dim(dim_limited, what);
    Env::before_launch(p);
    check(Launch(p, Env::stream()), what);
  }
  static void norm_mod_fwd(const NormModFwdParams& p) { run<NormModFwdParams, cuda::norm_mod_fwd>(p, p.dim, "adaln forward"); }
  static void norm_mod_jvp(const NormModJvpParams& p) { run<NormModJvpParams, cuda::norm_mod_jvp>(p, p.p.dim, "adaln jvp"); }
  static void norm_mod_bwd(const NormModBwdParams& p) { run<NormModBwdParams, cuda::norm_mod_bwd>(p, p.dim, "adaln backward"); }
  // gated_residual is elementwise (column tiles): any D
  static void gated_residual_fwd(const GatedResidualParams& p) {
    run<GatedResidualParams, cuda::gated_residual_fwd>(p, 0, "gated_residual forward");
  }
  static void gated_residual_jvp(const GatedResidualParams& p) {
    run<GatedResidualParams, cuda::gated_residual_jvp>(p, 0, "gated_residual jvp");
  }
  static void gated_residual_bwd(const GatedResidualParams& p) {
    run<GatedResidualParams, cuda::gated_residual_bwd>(p, 0, "gated_residual backward");
  }
  static void rms_norm_fwd(const RmsNormParams& p) { run<RmsNormParams, cuda::rms_norm_fwd>(p, p.dim, "rms_norm forward"); }
  static void rms_norm_jvp(const RmsNormParams& p) { run<RmsNormParams, cuda::rms_norm_jvp>(p, p.dim, "rms_norm jvp"); }
  static void rms_norm_bwd(const RmsNormParams& p) { run<RmsNormParams, cuda::rms_norm_bwd>(p, p.dim, "rms_norm backward"); }
  // swiglu, rope (elementwise, flat launches: any D)
  static void swiglu_fwd(const SwigluParams& p) { run<SwigluParams, cuda::swiglu_fwd>(p, 0, "swiglu forward"); }
  static void swiglu_jvp(const SwigluParams& p) { run<SwigluParams, cuda::swiglu_jvp>(p, 0, "swiglu jvp"); }
  static void swiglu_bwd(const SwigluParams& p) { run<SwigluParams, cuda::swiglu_bwd>(p, 0, "swiglu backward"); }
  static void rope_fwd(const RopeParams& p) { run<RopeParams, cuda::rope_fwd>(p, 0, "rope forward"); }
  static void rope_jvp(const RopeParams& p) { run<RopeParams, cuda::rope_jvp>(p, 0, "rope jvp"); }
  static void rope_bwd(const RopeParams& p) { run<RopeParams, cuda::rope_bwd>(p, 0, "rope backward"); }

  static const Backend& table() {
    static const Backend t{norm_mod_fwd,       norm_mod_jvp,       norm_mod_bwd,
                           gated_residual_fwd, gated_residual_jvp, gated_residual_bwd,
                           rms_norm_fwd,       rms_norm_jvp,       rms_norm_bwd,
                           // swiglu, rope
                           swiglu_fwd, swiglu_jvp, swiglu_bwd,
                           rope_fwd, rope_jvp, rope_bwd};
    return t;
  }
};

}  // namespace cuda
}  // namespace dmf
