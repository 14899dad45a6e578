// The dmf_kernels C++ library: every op schema (one TORCH_LIBRARY block), the choice of kernel
// table for a tensor's device (backend_for, the one place that chooses) and the CPU registration.
// The bindings live in csrc/ops/<family>.cpp, the shared checks and layout in csrc/ops/common.h;
// the Python declaration of each op is dmf_kernels/<family>.py (dmf_kernels._op.Op).
#include <torch/library.h>

#include "ops.h"
#include "ops/common.h"

namespace dmf {

const Backend& backend_for(const Tensor& x) {
  if (x.is_cuda()) {
    const Backend* b = cuda_backend();
    TORCH_CHECK(b != nullptr, "dmf_kernels: got CUDA tensors but this build has no CUDA kernels ",
                "(see dmf_kernels.build_info(); rebuild with a CUDA torch and nvcc)");
    return *b;
  }
  const Backend* emulated = cpu_override();  // tests: the CUDA kernels under the CPU emulation
  return emulated != nullptr ? *emulated : cpu_backend();
}

}  // namespace dmf

// All schemas in one place. `_fwd` returns the outputs, then the statistics the backward needs;
// `_jvp` computes primals and tangents in one pass and returns each output followed by its
// tangent, then the statistics; `_bwd` the input gradients. Python finds arguments by these
// names (dmf_kernels/_op.py checks them at import): inputs, their tangents `<input>_dot`, params.
TORCH_LIBRARY(dmf_kernels, m) {
  m.def("adaln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_bwd(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_jvp(Tensor x, Tensor? x_dot, Tensor shift, Tensor? shift_dot, Tensor scale, "
        "Tensor? scale_dot, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_fwd(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_bwd(Tensor grad_x_out, Tensor grad_h, Tensor x_out, Tensor gate, Tensor y, "
        "Tensor scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_jvp(Tensor x, Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, "
        "Tensor? y_dot, Tensor shift, Tensor? shift_dot, Tensor scale, Tensor? scale_dot, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_fwd(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad_out, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  m.def("gated_residual_jvp(Tensor x, Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, Tensor? y_dot) "
        "-> (Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("rms_norm_jvp(Tensor x, Tensor? x_dot, Tensor weight, Tensor? weight_dot, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  // norm_mod, RMS kind: shift and weight optional (None: 0 and 1); the _bwd returns
  // undefined (None) gradients for absent ones. Statistics: rstd only (the mean is 0).
  m.def("rms_adaln_modulate_fwd(Tensor x, Tensor? shift, Tensor scale, Tensor? weight, float eps) "
        "-> (Tensor, Tensor)");
  m.def("rms_adaln_modulate_bwd(Tensor grad_out, Tensor x, Tensor? shift, Tensor scale, Tensor? weight, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_adaln_modulate_jvp(Tensor x, Tensor? x_dot, Tensor? shift, Tensor? shift_dot, Tensor scale, "
        "Tensor? scale_dot, Tensor? weight, Tensor? weight_dot, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual_rms_adaln_fwd(Tensor x, Tensor gate, Tensor y, Tensor? shift, Tensor scale, "
        "Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual_rms_adaln_bwd(Tensor grad_x_out, Tensor grad_h, Tensor x_out, Tensor gate, Tensor y, "
        "Tensor? shift, Tensor scale, Tensor? weight, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_rms_adaln_jvp(Tensor x, Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, "
        "Tensor? y_dot, Tensor? shift, Tensor? shift_dot, Tensor scale, Tensor? scale_dot, Tensor? weight, "
        "Tensor? weight_dot, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // swiglu (h = silu(x[..., :H]) * x[..., H:]) and rope (interleaved pairs; cos and sin
  // are constant tables: no tangent, no gradient)
  m.def("swiglu_fwd(Tensor x) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_h, Tensor x) -> Tensor");
  m.def("swiglu_jvp(Tensor x, Tensor? x_dot) -> (Tensor, Tensor)");
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_bwd(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_jvp(Tensor x, Tensor? x_dot, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dmf_kernels, CPU, m) { DMF_REGISTER_ALL_OPS(m) }
