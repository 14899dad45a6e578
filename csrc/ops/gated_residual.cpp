// gated_residual: out = x + gate * y.
// Bindings of the gated_residual ops: validate, lay out, allocate, call the kernel table
// (kernels in csrc/cpu/gated_residual_cpu.cpp and csrc/cuda/gated_residual_kernels.cu; schemas in csrc/ops.cpp).
#include "common.h"

namespace dmf {
using namespace ops_common;

// ---------------------------------------------------------------- gated_residual

namespace {
struct GatedResidualCall {
  const char* op;
  Tensor ref;  // a tensor of x's shape: x, or y when x is not needed
  Layout l{0, 0, 1};
  Tensor gate_mat, gate_dot_mat;
  int64_t own_groups = 1;
  GatedResidualParams p;

  GatedResidualCall(const char* op_, const Tensor& ref_, const Tensor& gate, const Tensor* gate_dot) : op(op_) {
    check_x(ref_, op);
    ref = ref_.contiguous();
    own_groups = mod_groups(gate, "gate", ref, op);
    l = layout_of(ref, {own_groups});
    gate_mat = mod_matrix(gate, own_groups, l.groups, l.dim);
    if (gate_dot != nullptr) gate_dot_mat = mod_matrix(*gate_dot, own_groups, l.groups, l.dim);
    p.dtype = dtype_of(ref);
    p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.chunk_rows = kChunkRows;
    p.gate = as_param(gate_mat);
    if (gate_dot != nullptr) p.gate_dot = as_param(gate_dot_mat);
  }
};
}  // namespace

Tensor gated_residual_fwd(const Tensor& x, const Tensor& gate, const Tensor& y) {
  const c10::OptionalDeviceGuard guard(x.device());
  GatedResidualCall c("gated_residual", x, gate, nullptr);
  const Tensor yy = rows_like(y, "y", c.ref, c.op);
  Tensor out = at::empty_like(c.ref);
  if (c.l.rows == 0) return out;
  c.p.x = c.ref.data_ptr(), c.p.y = yy.data_ptr(), c.p.out = out.data_ptr();
  backend_for(c.ref).gated_residual_fwd(c.p);
  return out;
}

std::tuple<Tensor, Tensor> gated_residual_bwd(const Tensor& grad_out, const Tensor& gate, const Tensor& y) {
  const c10::OptionalDeviceGuard guard(y.device());
  GatedResidualCall c("gated_residual_bwd", y, gate, nullptr);
  const Tensor g = rows_like(grad_out, "grad_out", c.ref, c.op);
  Tensor dy = at::empty_like(c.ref);
  Tensor pg = at::empty({c.l.groups * c.l.chunks(), c.l.dim}, c.ref.options().dtype(acc_type(c.ref)));
  if (c.l.rows > 0) {
    c.p.y = c.ref.data_ptr(), c.p.grad_out = g.data_ptr(), c.p.grad_y = dy.data_ptr(), c.p.part_gate = pg.data_ptr();
    backend_for(c.ref).gated_residual_bwd(c.p);
  }
  return {reduce_partials(pg, c.l.chunks(), c.own_groups, c.l.groups, gate), dy};
}

std::tuple<Tensor, Tensor> gated_residual_jvp(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate,
                                              const optional<Tensor>& gate_dot, const Tensor& y,
                                              const optional<Tensor>& y_dot) {
  const char* op = "gated_residual_jvp";
  check_x(x, op);
  const c10::OptionalDeviceGuard guard(x.device());
  GatedResidualCall c(op, x, gate, mod_tangent(gate_dot, "gate_dot", gate, "gate", x, op));
  const Tensor yy = rows_like(y, "y", c.ref, op);
  const Tensor xd = opt(x_dot) ? rows_like(*x_dot, "x_dot", c.ref, op) : Tensor();
  const Tensor yd = opt(y_dot) ? rows_like(*y_dot, "y_dot", c.ref, op) : Tensor();
  Tensor out = at::empty_like(c.ref), out_dot = at::empty_like(c.ref);
  if (c.l.rows == 0) return {out, out_dot};
  c.p.x = c.ref.data_ptr(), c.p.y = yy.data_ptr(), c.p.out = out.data_ptr(), c.p.out_dot = out_dot.data_ptr();
  c.p.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
  c.p.y_dot = yd.defined() ? yd.data_ptr() : nullptr;
  backend_for(c.ref).gated_residual_jvp(c.p);
  return {out, out_dot};
}

}  // namespace dmf
