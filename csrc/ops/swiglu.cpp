// swiglu: h = silu(x[..., :H]) * x[..., H:] (LightningDiT's SwiGLUFFN after its w12 projection).
// Bindings of the swiglu ops: validate, lay out, allocate, call the kernel table
// (kernels in csrc/cpu/swiglu_cpu.cpp and csrc/cuda/swiglu_kernels.cu; schemas in csrc/ops.cpp).
// x's rows are read in place when its leading dims fold into strided groups (row_strides.h);
// the halves are never copied out.
#include "row_strides.h"

namespace dmf {
using namespace ops_common;

namespace {
struct SwigluCall {
  const char* op;
  Tensor x;
  SwigluParams p;

  SwigluCall(const char* op_, const Tensor& x_in) : op(op_) {
    check_x(x_in, op);
    TORCH_CHECK(x_in.size(-1) % 2 == 0, op, ": x's last dim must be even (the two halves [a, b] of 2H), got ",
                x_in.size(-1), " in shape ", x_in.sizes());
    x = in_place_rows(x_in, 1, p.x_rows);
    p.dtype = dtype_of(x);
    p.dim = x.size(-1) / 2;
    p.rows = x.numel() / x.size(-1);
    p.x = x.data_ptr();
  }
  std::vector<int64_t> h_shape() const {
    std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
    s.back() = p.dim;
    return s;
  }
  Tensor new_h() const { return at::empty(h_shape(), x.options()); }
};
}  // namespace

Tensor swiglu_fwd(const Tensor& x) {
  const c10::OptionalDeviceGuard guard(x.device());
  SwigluCall c("swiglu", x);
  Tensor h = c.new_h();
  if (c.p.rows == 0) return h;
  c.p.h = h.data_ptr();
  backend_for(c.x).swiglu_fwd(c.p);
  return h;
}

std::tuple<Tensor, Tensor> swiglu_jvp(const Tensor& x, const optional<Tensor>& x_dot) {
  const c10::OptionalDeviceGuard guard(x.device());
  SwigluCall c("swiglu_jvp", x);
  Tensor xd;
  if (const Tensor* t = opt(x_dot)) {
    check_like(*t, "x_dot", x, c.op);
    TORCH_CHECK(t->sizes() == x.sizes(), c.op, ": x_dot must have x's shape ", x.sizes(), ", got ", t->sizes());
    xd = in_place_rows(*t, 1, c.p.x_dot_rows);
  }
  Tensor h = c.new_h(), h_dot = c.new_h();
  if (c.p.rows == 0) return {h, h_dot};
  c.p.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
  c.p.h = h.data_ptr(), c.p.h_dot = h_dot.data_ptr();
  backend_for(c.x).swiglu_jvp(c.p);
  return {h, h_dot};
}

Tensor swiglu_bwd(const Tensor& grad_h, const Tensor& x) {
  const c10::OptionalDeviceGuard guard(x.device());
  SwigluCall c("swiglu_bwd", x);
  check_like(grad_h, "grad_h", x, c.op);
  TORCH_CHECK(grad_h.sizes() == at::IntArrayRef(c.h_shape()), c.op, ": grad_h must have shape ",
              at::IntArrayRef(c.h_shape()), " (x's with the last dim halved), got ", grad_h.sizes());
  const Tensor g = grad_h.contiguous();
  Tensor dx = at::empty(x.sizes(), x.options());
  if (c.p.rows == 0) return dx;
  c.p.grad_h = g.data_ptr(), c.p.grad_x = dx.data_ptr();
  backend_for(c.x).swiglu_bwd(c.p);
  return dx;
}

}  // namespace dmf
