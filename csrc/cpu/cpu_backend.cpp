// The CPU kernel table (see kernels/backend.h).
#include "../kernels/backend.h"

namespace dmf {
namespace cpu {
void norm_mod_fwd_cpu(const NormModFwdParams&);
void norm_mod_jvp_cpu(const NormModJvpParams&);
void norm_mod_bwd_cpu(const NormModBwdParams&);
void gated_residual_fwd_cpu(const GatedResidualParams&);
void gated_residual_jvp_cpu(const GatedResidualParams&);
void gated_residual_bwd_cpu(const GatedResidualParams&);
void rms_norm_fwd_cpu(const RmsNormParams&);
void rms_norm_jvp_cpu(const RmsNormParams&);
void rms_norm_bwd_cpu(const RmsNormParams&);
// swiglu, rope
void swiglu_fwd_cpu(const SwigluParams&);
void swiglu_jvp_cpu(const SwigluParams&);
void swiglu_bwd_cpu(const SwigluParams&);
void rope_fwd_cpu(const RopeParams&);
void rope_jvp_cpu(const RopeParams&);
void rope_bwd_cpu(const RopeParams&);
}  // namespace cpu

const Backend& cpu_backend() {
  static const Backend table{
      cpu::norm_mod_fwd_cpu,       cpu::norm_mod_jvp_cpu,       cpu::norm_mod_bwd_cpu,
      cpu::gated_residual_fwd_cpu, cpu::gated_residual_jvp_cpu, cpu::gated_residual_bwd_cpu,
      cpu::rms_norm_fwd_cpu,       cpu::rms_norm_jvp_cpu,       cpu::rms_norm_bwd_cpu,
      // swiglu, rope
      cpu::swiglu_fwd_cpu, cpu::swiglu_jvp_cpu, cpu::swiglu_bwd_cpu,
      cpu::rope_fwd_cpu, cpu::rope_jvp_cpu, cpu::rope_bwd_cpu,
  };
  return table;
}

namespace {
const Backend* g_cuda_backend = nullptr;
const Backend* g_cpu_override = nullptr;
}  // namespace
const Backend* cuda_backend() { return g_cuda_backend; }
void set_cuda_backend(const Backend* backend) { g_cuda_backend = backend; }
const Backend* cpu_override() { return g_cpu_override; }
void set_cpu_override(const Backend* backend) { g_cpu_override = backend; }

}  // namespace dmf
