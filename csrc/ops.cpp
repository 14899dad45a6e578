// Schemas of every dmf_kernels op (one TORCH_LIBRARY block), their device-independent
// implementations (validation, layout, allocation) and the CPU registration.
//
// Modulation parameters (shift, scale, gate) may have shape
//   (D,)                    one row for all of x;
//   (B, D) with x.dim() >= 3   one row per sample, broadcast over tokens (the DiT layout);
//   x.shape[:k] + (1,) * (x.dim() - 1 - k) + (D,)   e.g. (B, 1, D) or x's full shape.
// Any stride along the leading dims is read in place (chunks of a fused adaLN projection
// need no copy); x and the other row tensors are made contiguous.
#include "ops.h"

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "kernels/backend.h"

namespace dmf {
namespace {

constexpr int64_t kChunkRows = 32;  // rows per deterministic partial sum of a parameter gradient

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

DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_x(const Tensor& x, const char* op, const char* name = "x") {
  TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have at least one dimension, got a 0-d tensor");
  TORCH_CHECK(x.size(-1) > 0, op, ": ", name, " must have a non-empty last dimension, got shape ", x.sizes());
}

void check_like(const Tensor& t, const char* name, const Tensor& x, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " like x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

// A tensor that must have x's shape, made contiguous.
Tensor rows_like(const Tensor& t, const char* name, const Tensor& x, const char* op) {
  check_like(t, name, x, op);
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  return t.contiguous();
}

const Tensor* opt(const optional<Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// Number of parameter rows (groups) of a modulation parameter for x; see the top comment.
int64_t mod_groups(const Tensor& p, const char* name, const Tensor& x, const char* op) {
  check_like(p, name, x, op);
  const int64_t n = x.dim();
  const int64_t D = x.size(-1);
  TORCH_CHECK(p.dim() >= 1 && p.size(-1) == D, op, ": ", name, " must have last dimension ", D,
              " (x's), got shape ", p.sizes());
  if (p.dim() == 1) return 1;
  if (p.dim() == 2 && n >= 3) {
    TORCH_CHECK(p.size(0) == x.size(0), op, ": ", name, " of shape (B, D) must have B = ", x.size(0),
                " (x's first dim), got shape ", p.sizes());
    return p.size(0);
  }
  TORCH_CHECK(p.dim() == n, op, ": ", name, " must have shape (D,), (B, D), (B, 1, ..., D) or x's shape ",
              x.sizes(), ", got ", p.sizes());
  int64_t k = 0;
  while (k < n - 1 && p.size(k) == x.size(k)) ++k;
  int64_t groups = 1;
  for (int64_t i = 0; i < n - 1; ++i) {
    if (i < k) {
      groups *= x.size(i);
    } else {
      TORCH_CHECK(p.size(i) == 1, op, ": ", name, " of shape ", p.sizes(), " does not broadcast over x of shape ",
                  x.sizes(), " as a prefix of x's leading dims followed by ones");
    }
  }
  return groups;
}

// The (groups, D) matrix of p, whose own grouping `own` divides `groups`: a strided view
// when own == groups, else p's rows repeated (materialised) to the finer grouping.
Tensor mod_matrix(const Tensor& p, int64_t own, int64_t groups, int64_t D) {
  Tensor m = p.reshape({own, D});
  if (m.stride(1) != 1) m = m.contiguous();
  if (own != groups && own > 0) m = m.unsqueeze(1).expand({own, groups / own, D}).reshape({groups, D});
  return m;
}

ModParam as_param(const Tensor& m) { return ModParam{m.data_ptr(), m.stride(0)}; }
ModParam as_param(const Tensor* m) { return m == nullptr ? ModParam{} : as_param(*m); }

// Sums per-chunk partial gradients (groups * chunks, D) in a fixed order into the
// parameter's own grouping, cast and shaped like `like`.
Tensor reduce_partials(const Tensor& part, int64_t chunks, int64_t own, int64_t groups, const Tensor& like) {
  // No rows in x (an empty batch): the parameter's gradient is zero (or empty itself).
  if (own == 0 || groups == 0 || part.numel() == 0) return at::zeros(like.sizes(), like.options());
  const int64_t D = part.size(1);
  Tensor t = part.view({own, (groups / own) * chunks, D});
  Tensor r = t.size(1) == 1 ? t.select(1, 0) : t.sum(1);
  return r.to(like.scalar_type()).reshape(like.sizes());
}

std::vector<int64_t> stat_shape(const Tensor& x) { return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1); }

void check_stats(const Tensor& s, const char* name, const Tensor& x, const char* op) {
  TORCH_CHECK(s.scalar_type() == acc_type(x), op, ": ", name, " must be ", acc_type(x), ", got ", s.scalar_type());
  TORCH_CHECK(s.device() == x.device(), op, ": ", name, " must be on x's device");
  TORCH_CHECK(s.numel() * x.size(-1) == x.numel(), op, ": ", name, " must have one entry per row of x (",
              x.numel() / x.size(-1), "), got shape ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The modulation layout shared by the parameters of one call: the finest grouping.
struct Layout {
  int64_t rows, dim, groups;
  int64_t rows_per_group() const { return groups == 0 ? 1 : rows / groups; }
  int64_t chunks() const { return ceil_div(rows_per_group(), kChunkRows); }
};

Layout layout_of(const Tensor& x, std::initializer_list<int64_t> own_groups) {
  Layout l{x.numel() / x.size(-1), x.size(-1), 1};
  for (int64_t g : own_groups) l.groups = std::max(l.groups, g);
  return l;
}

// Tangent of a modulation parameter: same shape as its primal.
const Tensor* mod_tangent(const optional<Tensor>& t, const char* name, const Tensor& primal, const char* primal_name,
                          const Tensor& x, const char* op) {
  const Tensor* p = opt(t);
  if (p == nullptr) return nullptr;
  check_like(*p, name, x, op);
  TORCH_CHECK(p->sizes() == primal.sizes(), op, ": ", name, " must have the shape of ", primal_name, " ",
              primal.sizes(), ", got ", p->sizes());
  return p;
}

void check_shift_scale(const Tensor& shift, const Tensor& scale, const char* op) {
  TORCH_CHECK(shift.sizes() == scale.sizes(), op, ": shift and scale must have the same shape, got ", shift.sizes(),
              " and ", scale.sizes());
}

void check_eps(double eps, const char* op) { TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps); }

}  // namespace

// ---------------------------------------------------------------- adaln_modulate

std::tuple<Tensor, Tensor, Tensor> adaln_modulate_fwd(const Tensor& x_in, const Tensor& shift, const Tensor& scale,
                                                      double eps) {
  const char* op = "adaln_modulate";
  check_x(x_in, op);
  check_eps(eps, op);
  const int64_t gs = mod_groups(shift, "shift", x_in, op);
  mod_groups(scale, "scale", x_in, op);
  check_shift_scale(shift, scale, op);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Layout l = layout_of(x, {gs});
  Tensor out = at::empty_like(x);
  Tensor mean = at::empty(stat_shape(x), x.options().dtype(acc_type(x)));
  Tensor rstd = at::empty_like(mean);
  if (l.rows == 0) return {out, mean, rstd};
  const Tensor sh = mod_matrix(shift, gs, l.groups, l.dim), sc = mod_matrix(scale, gs, l.groups, l.dim);
  NormModFwdParams p;
  p.dtype = dtype_of(x);
  p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.eps = eps;
  p.x = x.data_ptr();
  p.shift = as_param(sh), p.scale = as_param(sc);
  p.out = out.data_ptr(), p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
  backend_for(x).norm_mod_fwd(p);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> adaln_modulate_bwd(const Tensor& grad_out, const Tensor& x_in, const Tensor& scale,
                                                      const Tensor& mean, const Tensor& rstd) {
  const char* op = "adaln_modulate_bwd";
  check_x(x_in, op);
  const int64_t gs = mod_groups(scale, "scale", x_in, op);
  check_stats(mean, "mean", x_in, op);
  check_stats(rstd, "rstd", x_in, op);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor g = rows_like(grad_out, "grad_out", x, op);
  const Layout l = layout_of(x, {gs});
  Tensor dx = at::empty_like(x);
  const auto acc = x.options().dtype(acc_type(x));
  // Uninitialised: the kernels write every partial whenever x has rows (no memset pass; for
  // per-token parameters these buffers are as large as x in fp32).
  Tensor ps = at::empty({l.groups * l.chunks(), l.dim}, acc), pc = at::empty_like(ps);
  if (l.rows > 0) {
    const Tensor sc = mod_matrix(scale, gs, l.groups, l.dim);
    NormModBwdParams p;
    p.dtype = dtype_of(x);
    p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.chunk_rows = kChunkRows;
    p.grad_out = g.data_ptr(), p.x = x.data_ptr(), p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
    p.scale = as_param(sc);
    p.grad_x = dx.data_ptr(), p.part_shift = ps.data_ptr(), p.part_scale = pc.data_ptr();
    backend_for(x).norm_mod_bwd(p);
  }
  return {dx, reduce_partials(ps, l.chunks(), gs, l.groups, scale),
          reduce_partials(pc, l.chunks(), gs, l.groups, scale)};
}

namespace {
// Shared by adaln_modulate_jvp / _tangent and the gated_residual_adaln ones.
struct NormModJvpCall {
  const char* op;
  Tensor x;  // contiguous; the normalised input itself when stats are given
  const Tensor *x_dot = nullptr, *gate = nullptr, *gate_dot = nullptr, *y = nullptr, *y_dot = nullptr;
  const Tensor *shift = nullptr, *shift_dot = nullptr, *scale = nullptr, *scale_dot = nullptr;
  const Tensor *mean_in = nullptr, *rstd_in = nullptr;
  double eps = 1e-6;
  // outputs
  Tensor x_out, x_out_dot, out, out_dot, mean, rstd;

  void run() {
    const bool stats_given = mean_in != nullptr;
    const bool residual = gate != nullptr;
    const Tensor& mod_ref = *scale;
    const int64_t gm = mod_groups(mod_ref, "scale", x, op);
    if (shift != nullptr) {
      mod_groups(*shift, "shift", x, op);
      check_shift_scale(*shift, *scale, op);
    }
    const int64_t gg = residual ? mod_groups(*gate, "gate", x, op) : 1;
    const Layout l = layout_of(x, {gm, gg});
    auto mat = [&](const Tensor* t, int64_t own) { return t == nullptr ? Tensor() : mod_matrix(*t, own, l.groups, l.dim); };
    const Tensor sh = mat(shift, gm), shd = mat(shift_dot, gm), sc = mat(scale, gm), scd = mat(scale_dot, gm);
    const Tensor ga = mat(gate, gg), gad = mat(gate_dot, gg);
    const Tensor xd = x_dot ? rows_like(*x_dot, "x_dot", x, op) : Tensor();
    const Tensor yy = y ? rows_like(*y, "y", x, op) : Tensor();
    const Tensor yd = y_dot ? rows_like(*y_dot, "y_dot", x, op) : Tensor();

    out_dot = at::empty_like(x);
    if (residual) x_out_dot = at::empty_like(x);
    if (stats_given) {
      check_stats(*mean_in, "mean", x, op);
      check_stats(*rstd_in, "rstd", x, op);
    } else {
      out = at::empty_like(x);
      if (residual) x_out = at::empty_like(x);
      mean = at::empty(stat_shape(x), x.options().dtype(acc_type(x)));
      rstd = at::empty_like(mean);
    }
    if (l.rows == 0) return;
    NormModJvpParams q;
    NormModFwdParams& p = q.p;
    p.dtype = dtype_of(x);
    p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.eps = eps;
    p.x = x.data_ptr();
    if (residual) p.gate = as_param(ga), p.res = yy.data_ptr();
    if (shift != nullptr) p.shift = as_param(sh);
    p.scale = as_param(sc);
    if (stats_given) {
      p.mean = mean_in->data_ptr(), p.rstd = rstd_in->data_ptr();
    } else {
      p.out = out.data_ptr(), p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
      if (residual) p.x_out = x_out.data_ptr();
    }
    q.stats_given = stats_given;
    q.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
    if (residual) {
      q.gate_dot = gad.defined() ? as_param(gad) : ModParam{};
      q.res_dot = yd.defined() ? yd.data_ptr() : nullptr;
      q.x_out_dot = x_out_dot.data_ptr();
    }
    q.shift_dot = shd.defined() ? as_param(shd) : ModParam{};
    q.scale_dot = scd.defined() ? as_param(scd) : ModParam{};
    q.out_dot = out_dot.data_ptr();
    backend_for(x).norm_mod_jvp(q);
  }
};
}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> adaln_modulate_jvp(const Tensor& x, const optional<Tensor>& x_dot,
                                                              const Tensor& shift, const optional<Tensor>& shift_dot,
                                                              const Tensor& scale, const optional<Tensor>& scale_dot,
                                                              double eps) {
  NormModJvpCall c;
  c.op = "adaln_modulate_jvp";
  check_x(x, c.op);
  check_eps(eps, c.op);
  const c10::OptionalDeviceGuard guard(x.device());
  c.x = x.contiguous();
  c.x_dot = opt(x_dot);
  c.shift = &shift, c.scale = &scale, c.eps = eps;
  c.shift_dot = mod_tangent(shift_dot, "shift_dot", shift, "shift", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.run();
  return {c.out, c.out_dot, c.mean, c.rstd};
}

Tensor adaln_modulate_tangent(const Tensor& x, const optional<Tensor>& x_dot, const optional<Tensor>& shift_dot,
                              const Tensor& scale, const optional<Tensor>& scale_dot, const Tensor& mean,
                              const Tensor& rstd) {
  NormModJvpCall c;
  c.op = "adaln_modulate_tangent";
  check_x(x, c.op);
  const c10::OptionalDeviceGuard guard(x.device());
  c.x = x.contiguous();
  c.x_dot = opt(x_dot);
  c.scale = &scale;
  c.shift_dot = mod_tangent(shift_dot, "shift_dot", scale, "scale", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.mean_in = &mean, c.rstd_in = &rstd;
  c.run();
  return c.out_dot;
}

// ---------------------------------------------------------------- gated_residual_adaln

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_fwd(const Tensor& x_in, const Tensor& gate,
                                                                    const Tensor& y, const Tensor& shift,
                                                                    const Tensor& scale, double eps) {
  const char* op = "gated_residual_adaln";
  check_x(x_in, op);
  check_eps(eps, op);
  const int64_t gm = mod_groups(scale, "scale", x_in, op);
  mod_groups(shift, "shift", x_in, op);
  check_shift_scale(shift, scale, op);
  const int64_t gg = mod_groups(gate, "gate", x_in, op);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor yy = rows_like(y, "y", x, op);
  const Layout l = layout_of(x, {gm, gg});
  Tensor x_out = at::empty_like(x), h = at::empty_like(x);
  Tensor mean = at::empty(stat_shape(x), x.options().dtype(acc_type(x)));
  Tensor rstd = at::empty_like(mean);
  if (l.rows == 0) return {x_out, h, mean, rstd};
  const Tensor sh = mod_matrix(shift, gm, l.groups, l.dim), sc = mod_matrix(scale, gm, l.groups, l.dim);
  const Tensor ga = mod_matrix(gate, gg, l.groups, l.dim);
  NormModFwdParams p;
  p.dtype = dtype_of(x);
  p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.eps = eps;
  p.x = x.data_ptr(), p.gate = as_param(ga), p.res = yy.data_ptr(), p.x_out = x_out.data_ptr();
  p.shift = as_param(sh), p.scale = as_param(sc);
  p.out = h.data_ptr(), p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
  backend_for(x).norm_mod_fwd(p);
  return {x_out, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_bwd(
    const Tensor& grad_x_out, const Tensor& grad_h, const Tensor& x_out_in, const Tensor& gate, const Tensor& y,
    const Tensor& scale, const Tensor& mean, const Tensor& rstd) {
  const char* op = "gated_residual_adaln_bwd";
  check_x(x_out_in, op, "x_out");
  const int64_t gm = mod_groups(scale, "scale", x_out_in, op);
  const int64_t gg = mod_groups(gate, "gate", x_out_in, op);
  check_stats(mean, "mean", x_out_in, op);
  check_stats(rstd, "rstd", x_out_in, op);
  const c10::OptionalDeviceGuard guard(x_out_in.device());
  const Tensor x = x_out_in.contiguous();
  const Tensor gxo = rows_like(grad_x_out, "grad_x_out", x, op);
  const Tensor gh = rows_like(grad_h, "grad_h", x, op);
  const Tensor yy = rows_like(y, "y", x, op);
  const Layout l = layout_of(x, {gm, gg});
  Tensor dx = at::empty_like(x), dy = at::empty_like(x);
  const auto acc = x.options().dtype(acc_type(x));
  Tensor ps = at::empty({l.groups * l.chunks(), l.dim}, acc), pc = at::empty_like(ps), pg = at::empty_like(ps);
  if (l.rows > 0) {
    const Tensor sc = mod_matrix(scale, gm, l.groups, l.dim), ga = mod_matrix(gate, gg, l.groups, l.dim);
    NormModBwdParams p;
    p.dtype = dtype_of(x);
    p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.chunk_rows = kChunkRows;
    p.grad_out = gh.data_ptr(), p.grad_x_out = gxo.data_ptr(), p.x = x.data_ptr();
    p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
    p.scale = as_param(sc), p.gate = as_param(ga), p.res = yy.data_ptr();
    p.grad_x = dx.data_ptr(), p.grad_res = dy.data_ptr();
    p.part_shift = ps.data_ptr(), p.part_scale = pc.data_ptr(), p.part_gate = pg.data_ptr();
    backend_for(x).norm_mod_bwd(p);
  }
  return {dx, reduce_partials(pg, l.chunks(), gg, l.groups, gate), dy,
          reduce_partials(ps, l.chunks(), gm, l.groups, scale), reduce_partials(pc, l.chunks(), gm, l.groups, scale)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
    const Tensor& y, const optional<Tensor>& y_dot, const Tensor& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, double eps) {
  NormModJvpCall c;
  c.op = "gated_residual_adaln_jvp";
  check_x(x, c.op);
  check_eps(eps, c.op);
  const c10::OptionalDeviceGuard guard(x.device());
  c.x = x.contiguous();
  c.x_dot = opt(x_dot), c.y = &y, c.y_dot = opt(y_dot), c.eps = eps;
  c.gate = &gate, c.shift = &shift, c.scale = &scale;
  c.gate_dot = mod_tangent(gate_dot, "gate_dot", gate, "gate", x, c.op);
  c.shift_dot = mod_tangent(shift_dot, "shift_dot", shift, "shift", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.run();
  return {c.x_out, c.x_out_dot, c.out, c.out_dot, c.mean, c.rstd};
}

std::tuple<Tensor, Tensor> gated_residual_adaln_tangent(
    const Tensor& x_out, const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
    const Tensor& y, const optional<Tensor>& y_dot, const optional<Tensor>& shift_dot, const Tensor& scale,
    const optional<Tensor>& scale_dot, const Tensor& mean, const Tensor& rstd) {
  NormModJvpCall c;
  c.op = "gated_residual_adaln_tangent";
  check_x(x_out, c.op, "x_out");
  const c10::OptionalDeviceGuard guard(x_out.device());
  c.x = x_out.contiguous();
  c.x_dot = opt(x_dot), c.y = &y, c.y_dot = opt(y_dot);
  c.gate = &gate, c.scale = &scale;
  c.gate_dot = mod_tangent(gate_dot, "gate_dot", gate, "gate", x_out, c.op);
  c.shift_dot = mod_tangent(shift_dot, "shift_dot", scale, "scale", x_out, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x_out, c.op);
  c.mean_in = &mean, c.rstd_in = &rstd;
  c.run();
  return {c.x_out_dot, c.out_dot};
}

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

Tensor gated_residual_tangent(const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
                              const Tensor& y, const optional<Tensor>& y_dot) {
  const char* op = "gated_residual_tangent";
  check_x(y, op, "y");
  const c10::OptionalDeviceGuard guard(y.device());
  GatedResidualCall c(op, y, gate, mod_tangent(gate_dot, "gate_dot", gate, "gate", y, op));
  const Tensor xd = opt(x_dot) ? rows_like(*x_dot, "x_dot", c.ref, op) : Tensor();
  const Tensor yd = opt(y_dot) ? rows_like(*y_dot, "y_dot", c.ref, op) : Tensor();
  Tensor out_dot = at::empty_like(c.ref);
  if (c.l.rows == 0) return out_dot;
  c.p.x = c.ref.data_ptr(), c.p.y = c.ref.data_ptr(), c.p.out_dot = out_dot.data_ptr();
  c.p.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
  c.p.y_dot = yd.defined() ? yd.data_ptr() : nullptr;
  backend_for(c.ref).gated_residual_jvp(c.p);
  return out_dot;
}

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

Tensor rms_norm_tangent(const Tensor& x, const optional<Tensor>& x_dot, const Tensor& weight,
                        const optional<Tensor>& weight_dot, const Tensor& rstd) {
  const c10::OptionalDeviceGuard guard(x.device());
  RmsNormCall c("rms_norm_tangent", x, weight);
  check_stats(rstd, "rstd", c.x, c.op);
  const Tensor* wd = c.weight_tangent(weight_dot);
  const Tensor xd = opt(x_dot) ? rows_like(*x_dot, "x_dot", c.x, c.op) : Tensor();
  Tensor out_dot = at::empty_like(c.x);
  if (c.p.rows == 0) return out_dot;
  const Tensor wdc = wd ? wd->contiguous() : Tensor();
  c.p.stats_given = true, c.p.rstd = const_cast<void*>(rstd.data_ptr()), c.p.out_dot = out_dot.data_ptr();
  c.p.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
  c.p.weight_dot = wdc.defined() ? wdc.data_ptr() : nullptr;
  backend_for(c.x).rms_norm_jvp(c.p);
  return out_dot;
}

}  // namespace dmf

// All schemas in one place. `_fwd` returns the statistics the backward and the tangent
// need; `_jvp` computes primal and tangent in one pass; `_tangent` computes only the
// tangent from saved statistics (what autograd.Function.jvp calls after a forward).
TORCH_LIBRARY(dmf_kernels, m) {
  m.def("adaln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_bwd(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_jvp(Tensor x, Tensor? x_dot, Tensor shift, Tensor? shift_dot, Tensor scale, "
        "Tensor? scale_dot, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_tangent(Tensor x, Tensor? x_dot, Tensor? shift_dot, Tensor scale, Tensor? scale_dot, "
        "Tensor mean, Tensor rstd) -> Tensor");
  m.def("gated_residual_adaln_fwd(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_bwd(Tensor grad_x_out, Tensor grad_h, Tensor x_out, Tensor gate, Tensor y, "
        "Tensor scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_jvp(Tensor x, Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, "
        "Tensor? y_dot, Tensor shift, Tensor? shift_dot, Tensor scale, Tensor? scale_dot, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_tangent(Tensor x_out, Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, "
        "Tensor? y_dot, Tensor? shift_dot, Tensor scale, Tensor? scale_dot, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor)");
  m.def("gated_residual_fwd(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad_out, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  m.def("gated_residual_jvp(Tensor x, Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, Tensor? y_dot) "
        "-> (Tensor, Tensor)");
  m.def("gated_residual_tangent(Tensor? x_dot, Tensor gate, Tensor? gate_dot, Tensor y, Tensor? y_dot) -> Tensor");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("rms_norm_jvp(Tensor x, Tensor? x_dot, Tensor weight, Tensor? weight_dot, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_tangent(Tensor x, Tensor? x_dot, Tensor weight, Tensor? weight_dot, Tensor rstd) -> Tensor");
}

TORCH_LIBRARY_IMPL(dmf_kernels, CPU, m) { DMF_REGISTER_ALL_OPS(m) }
