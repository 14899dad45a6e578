// rms_norm: RMSNorm with a weight.
// Bindings of the rms_norm ops: validate, lay out, allocate, call the kernel table
// (kernels in csrc/cpu/rms_norm_cpu.cpp and csrc/cuda/rms_norm_kernels.cu; schemas in csrc/ops.cpp).
#include "common.h"

namespace dmf {
using namespace ops_common;

// ---------------------------------------------------------------- rms_norm

namespace {
struct RmsNormCall {
  const char* op;
  Tensor x, w;
  RmsNormParams p;
  int64_t chunks = 0;

  RmsNormCall(const char* op_, const Tensor& x_in, const Tensor& weight) : op(op_) {
    check_x(x_in, op);
    check_like(weight, "weight", x_in, op);
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x_in.size(-1), op, ": weight must have shape (",
                x_in.size(-1), ",) (x's last dim), got ", weight.sizes());
    x = x_in.contiguous();
    w = weight.contiguous();
    p.dtype = dtype_of(x);
    p.rows = x.numel() / x.size(-1), p.dim = x.size(-1), p.chunk_rows = kChunkRows;
    p.x = x.data_ptr(), p.weight = w.data_ptr();
    chunks = ceil_div(p.rows, p.chunk_rows);
  }
  const Tensor* weight_tangent(const optional<Tensor>& weight_dot) const {
    return mod_tangent(weight_dot, "weight_dot", w, "weight", x, op);
  }
};
}  // namespace

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const Tensor& weight, double eps) {
  check_eps(eps, "rms_norm");
  const c10::OptionalDeviceGuard guard(x.device());
  RmsNormCall c("rms_norm", x, weight);
  Tensor out = at::empty_like(c.x);
  Tensor rstd = at::empty(stat_shape(c.x), c.x.options().dtype(acc_type(c.x)));
  if (c.p.rows == 0) return {out, rstd};
  c.p.eps = eps, c.p.out = out.data_ptr(), c.p.rstd = rstd.data_ptr();
  backend_for(c.x).rms_norm_fwd(c.p);
  return {out, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                        const Tensor& rstd) {
  const c10::OptionalDeviceGuard guard(x.device());
  RmsNormCall c("rms_norm_bwd", x, weight);
  check_stats(rstd, "rstd", c.x, c.op);
  const Tensor g = rows_like(grad_out, "grad_out", c.x, c.op);
  Tensor dx = at::empty_like(c.x);
  Tensor pw = at::empty({c.chunks, c.p.dim}, c.x.options().dtype(acc_type(c.x)));
  if (c.p.rows > 0) {
    c.p.rstd = const_cast<void*>(rstd.data_ptr()), c.p.grad_out = g.data_ptr();
    c.p.grad_x = dx.data_ptr(), c.p.part_weight = pw.data_ptr();
    backend_for(c.x).rms_norm_bwd(c.p);
  }
  if (c.p.rows == 0) return {dx, at::zeros(weight.sizes(), weight.options())};
  return {dx, reduce_partials(pw, c.chunks, 1, 1, weight)};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_jvp(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& weight,
                                                const optional<Tensor>& weight_dot, double eps) {
  check_eps(eps, "rms_norm_jvp");
  const c10::OptionalDeviceGuard guard(x.device());
  RmsNormCall c("rms_norm_jvp", x, weight);
  const Tensor* wd = c.weight_tangent(weight_dot);
  const Tensor xd = opt(x_dot) ? rows_like(*x_dot, "x_dot", c.x, c.op) : Tensor();
  Tensor out = at::empty_like(c.x), out_dot = at::empty_like(c.x);
  Tensor rstd = at::empty(stat_shape(c.x), c.x.options().dtype(acc_type(c.x)));
  if (c.p.rows == 0) return {out, out_dot, rstd};
  const Tensor wdc = wd ? wd->contiguous() : Tensor();
  c.p.eps = eps, c.p.out = out.data_ptr(), c.p.out_dot = out_dot.data_ptr(), c.p.rstd = rstd.data_ptr();
  c.p.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
  c.p.weight_dot = wdc.defined() ? wdc.data_ptr() : nullptr;
  backend_for(c.x).rms_norm_jvp(c.p);
  return {out, out_dot, rstd};
}

}  // namespace dmf
