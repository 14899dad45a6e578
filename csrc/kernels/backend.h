// The kernel entry points one backend provides. ops.cpp validates inputs, allocates
// outputs, fills a params struct and calls the table of the input's device; the CPU
// table lives in csrc/cpu, the CUDA one is installed by csrc/cuda/cuda_backend.cpp when
// the extension is built with CUDA.
#pragma once
#include "params.h"

namespace dmf {

struct Backend {
  void (*norm_mod_fwd)(const NormModFwdParams&);
  void (*norm_mod_jvp)(const NormModJvpParams&);
  void (*norm_mod_bwd)(const NormModBwdParams&);
  void (*gated_residual_fwd)(const GatedResidualParams&);
  void (*gated_residual_jvp)(const GatedResidualParams&);  // out may be nullptr: tangent only
  void (*gated_residual_bwd)(const GatedResidualParams&);
  void (*rms_norm_fwd)(const RmsNormParams&);
  void (*rms_norm_jvp)(const RmsNormParams&);
  void (*rms_norm_bwd)(const RmsNormParams&);
  // swiglu, rope
  void (*swiglu_fwd)(const SwigluParams&);
  void (*swiglu_jvp)(const SwigluParams&);
  void (*swiglu_bwd)(const SwigluParams&);
  void (*rope_fwd)(const RopeParams&);
  void (*rope_jvp)(const RopeParams&);
  void (*rope_bwd)(const RopeParams&);
};

const Backend& cpu_backend();
// Set once at load time by the CUDA translation unit; nullptr when built without CUDA.
const Backend* cuda_backend();
void set_cuda_backend(const Backend* backend);
// A table that serves CPU tensors in place of cpu_backend(): the CUDA kernels under the CPU
// emulation (csrc/emu, dmf_kernels.cuda_emu) in tests. nullptr (the default) restores the CPU
// kernels.
const Backend* cpu_override();
void set_cpu_override(const Backend* backend);

}  // namespace dmf
