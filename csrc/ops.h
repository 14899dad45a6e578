// The op implementations (csrc/ops/<family>.cpp) registered for each backend (CPU in ops.cpp,
// CUDA in cuda/cuda_backend.cpp). They validate, allocate and call the device's kernel table.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace dmf {
using at::Tensor;
using c10::optional;

std::tuple<Tensor, Tensor, Tensor> adaln_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                      double eps);
std::tuple<Tensor, Tensor, Tensor> adaln_modulate_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& scale,
                                                      const Tensor& mean, const Tensor& rstd);
std::tuple<Tensor, Tensor, Tensor, Tensor> adaln_modulate_jvp(const Tensor& x, const optional<Tensor>& x_dot,
                                                              const Tensor& shift, const optional<Tensor>& shift_dot,
                                                              const Tensor& scale, const optional<Tensor>& scale_dot,
                                                              double eps);

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_fwd(const Tensor& x, const Tensor& gate,
                                                                    const Tensor& y, const Tensor& shift,
                                                                    const Tensor& scale, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_bwd(
    const Tensor& grad_x_out, const Tensor& grad_h, const Tensor& x_out, const Tensor& gate, const Tensor& y,
    const Tensor& scale, const Tensor& mean, const Tensor& rstd);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
    const Tensor& y, const optional<Tensor>& y_dot, const Tensor& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, double eps);

Tensor gated_residual_fwd(const Tensor& x, const Tensor& gate, const Tensor& y);
std::tuple<Tensor, Tensor> gated_residual_bwd(const Tensor& grad_out, const Tensor& gate, const Tensor& y);
std::tuple<Tensor, Tensor> gated_residual_jvp(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate,
                                              const optional<Tensor>& gate_dot, const Tensor& y,
                                              const optional<Tensor>& y_dot);

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const Tensor& weight, double eps);
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                        const Tensor& rstd);
std::tuple<Tensor, Tensor, Tensor> rms_norm_jvp(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& weight,
                                                const optional<Tensor>& weight_dot, double eps);

// norm_mod, RMS kind (csrc/ops/norm_mod.cpp)
std::tuple<Tensor, Tensor> rms_adaln_modulate_fwd(const Tensor& x, const optional<Tensor>& shift,
                                                  const Tensor& scale, const optional<Tensor>& weight, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor> rms_adaln_modulate_bwd(const Tensor& grad_out, const Tensor& x,
                                                                  const optional<Tensor>& shift, const Tensor& scale,
                                                                  const optional<Tensor>& weight, const Tensor& rstd);
std::tuple<Tensor, Tensor, Tensor> rms_adaln_modulate_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const optional<Tensor>& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, const optional<Tensor>& weight,
    const optional<Tensor>& weight_dot, double eps);
std::tuple<Tensor, Tensor, Tensor> gated_residual_rms_adaln_fwd(const Tensor& x, const Tensor& gate, const Tensor& y,
                                                                const optional<Tensor>& shift, const Tensor& scale,
                                                                const optional<Tensor>& weight, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_rms_adaln_bwd(
    const Tensor& grad_x_out, const Tensor& grad_h, const Tensor& x_out, const Tensor& gate, const Tensor& y,
    const optional<Tensor>& shift, const Tensor& scale, const optional<Tensor>& weight, const Tensor& rstd);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_rms_adaln_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
    const Tensor& y, const optional<Tensor>& y_dot, const optional<Tensor>& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, const optional<Tensor>& weight,
    const optional<Tensor>& weight_dot, double eps);
// swiglu, rope
Tensor swiglu_fwd(const Tensor& x);
Tensor swiglu_bwd(const Tensor& grad_h, const Tensor& x);
std::tuple<Tensor, Tensor> swiglu_jvp(const Tensor& x, const optional<Tensor>& x_dot);
Tensor rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin);
Tensor rope_bwd(const Tensor& grad_out, const Tensor& cos, const Tensor& sin);
std::tuple<Tensor, Tensor> rope_jvp(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& cos,
                                    const Tensor& sin);

}  // namespace dmf

// Registers every op above for one dispatch key: TORCH_LIBRARY_IMPL(dmf_kernels, KEY, m) { DMF_REGISTER_ALL_OPS(m) }
#define DMF_REGISTER_ALL_OPS(m)                                              \
  m.impl("adaln_modulate_fwd", &dmf::adaln_modulate_fwd);                   \
  m.impl("adaln_modulate_bwd", &dmf::adaln_modulate_bwd);                   \
  m.impl("adaln_modulate_jvp", &dmf::adaln_modulate_jvp);                   \
  m.impl("gated_residual_adaln_fwd", &dmf::gated_residual_adaln_fwd);       \
  m.impl("gated_residual_adaln_bwd", &dmf::gated_residual_adaln_bwd);       \
  m.impl("gated_residual_adaln_jvp", &dmf::gated_residual_adaln_jvp);       \
  m.impl("gated_residual_fwd", &dmf::gated_residual_fwd);                   \
  m.impl("gated_residual_bwd", &dmf::gated_residual_bwd);                   \
  m.impl("gated_residual_jvp", &dmf::gated_residual_jvp);                   \
  m.impl("rms_norm_fwd", &dmf::rms_norm_fwd);                               \
  m.impl("rms_norm_bwd", &dmf::rms_norm_bwd);                               \
  m.impl("rms_norm_jvp", &dmf::rms_norm_jvp);                               \
  m.impl("rms_adaln_modulate_fwd", &dmf::rms_adaln_modulate_fwd);           \
  m.impl("rms_adaln_modulate_bwd", &dmf::rms_adaln_modulate_bwd);           \
  m.impl("rms_adaln_modulate_jvp", &dmf::rms_adaln_modulate_jvp);           \
  m.impl("gated_residual_rms_adaln_fwd", &dmf::gated_residual_rms_adaln_fwd); \
  m.impl("gated_residual_rms_adaln_bwd", &dmf::gated_residual_rms_adaln_bwd); \
  m.impl("gated_residual_rms_adaln_jvp", &dmf::gated_residual_rms_adaln_jvp); \
  m.impl("swiglu_fwd", &dmf::swiglu_fwd);                                   \
  m.impl("swiglu_bwd", &dmf::swiglu_bwd);                                   \
  m.impl("swiglu_jvp", &dmf::swiglu_jvp);                                   \
  m.impl("rope_fwd", &dmf::rope_fwd);                                       \
  m.impl("rope_bwd", &dmf::rope_bwd);                                       \
  m.impl("rope_jvp", &dmf::rope_jvp);
