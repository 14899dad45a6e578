// rope: rotary embedding on interleaved pairs (LightningDiT / EVA VisionRotaryEmbeddingFast:
// t * cos + rotate_half(t) * sin, rotate_half (x0, x1) -> (-x1, x0)).
// Bindings of the rope ops: validate, lay out, allocate, call the kernel table
// (kernels in csrc/cpu/rope_cpu.cpp and csrc/cuda/rope_kernels.cu; schemas in csrc/ops.cpp).
// x's rows are read in place when its leading dims fold into strided groups (row_strides.h:
// q = qkv.permute(2, 0, 3, 1, 4)[0] of shape (B, H, N, D) does); cos and sin are constant
// (N, D) tables of any float dtype, used in acc precision (float; double for fp64 x).
#include "row_strides.h"

namespace dmf {
using namespace ops_common;

namespace {
struct RopeCall {
  const char* op;
  Tensor x, cos, sin;
  RopeParams p;

  RopeCall(const char* op_, const Tensor& x_in, const char* x_name, const Tensor& cos_in, const Tensor& sin_in)
      : op(op_) {
    check_x(x_in, op, x_name);
    TORCH_CHECK(x_in.dim() >= 2, op, ": ", x_name, " must have shape (..., N, D), got ", x_in.sizes());
    const int64_t N = x_in.size(-2), D = x_in.size(-1);
    TORCH_CHECK(D % 2 == 0, op, ": the head dim D (", x_name, "'s last dim) must be even (interleaved pairs), got ",
                D, " in shape ", x_in.sizes());
    cos = table(cos_in, "cos", x_in, N, D);
    sin = table(sin_in, "sin", x_in, N, D);
    x = in_place_rows(x_in, 1, p.x_rows);
    p.dtype = dtype_of(x);
    p.rows = x.numel() / D, p.seq = N, p.dim = D;
    p.x = x.data_ptr(), p.cos = cos.data_ptr(), p.sin = sin.data_ptr();
  }
  Tensor table(const Tensor& t, const char* name, const Tensor& x_in, int64_t N, int64_t D) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point table, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x_in.device(), op, ": ", name, " must be on x's device ", x_in.device(), ", got ",
                t.device());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, op, ": ", name, " must have shape (N, D) = (", N,
                ", ", D, ") (x's last two dims), got ", t.sizes());
    return t.to(acc_type(x_in)).contiguous();
  }
  Tensor new_out() const { return at::empty(x.sizes(), x.options()); }
};
}  // namespace

Tensor rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const c10::OptionalDeviceGuard guard(x.device());
  RopeCall c("rope", x, "x", cos, sin);
  Tensor out = c.new_out();
  if (c.p.rows == 0) return out;
  c.p.out = out.data_ptr();
  backend_for(c.x).rope_fwd(c.p);
  return out;
}

std::tuple<Tensor, Tensor> rope_jvp(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& cos,
                                    const Tensor& sin) {
  const c10::OptionalDeviceGuard guard(x.device());
  RopeCall c("rope_jvp", x, "x", cos, sin);
  Tensor xd;
  if (const Tensor* t = opt(x_dot)) {
    check_like(*t, "x_dot", x, c.op);
    TORCH_CHECK(t->sizes() == x.sizes(), c.op, ": x_dot must have x's shape ", x.sizes(), ", got ", t->sizes());
    xd = in_place_rows(*t, 1, c.p.x_dot_rows);
  }
  Tensor out = c.new_out(), out_dot = c.new_out();
  if (c.p.rows == 0) return {out, out_dot};
  c.p.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
  c.p.out = out.data_ptr(), c.p.out_dot = out_dot.data_ptr();
  backend_for(c.x).rope_jvp(c.p);
  return {out, out_dot};
}

// The transpose of the rotation (the inverse rotation when cos^2 + sin^2 = 1 per pair).
Tensor rope_bwd(const Tensor& grad_out, const Tensor& cos, const Tensor& sin) {
  const c10::OptionalDeviceGuard guard(grad_out.device());
  RopeCall c("rope_bwd", grad_out, "grad_out", cos, sin);
  c.p.transpose = true;
  Tensor dx = c.new_out();
  if (c.p.rows == 0) return dx;
  c.p.out = dx.data_ptr();
  backend_for(c.x).rope_bwd(c.p);
  return dx;
}

}  // namespace dmf
