// adaln_modulate and gated_residual_adaln: LayerNorm + adaLN modulation, optionally after a gated residual;
// rms_adaln_modulate and gated_residual_rms_adaln: the same with RMSNorm (optional weight, optional shift).
// Bindings of the norm_mod ops: validate, lay out, allocate, call the kernel table
// (kernels in csrc/cpu/norm_mod_cpu.cpp and csrc/cuda/norm_mod_kernels.cu; schemas in csrc/ops.cpp).
#include "common.h"

namespace dmf {
using namespace ops_common;

namespace {
// All four ops share each kernel: gate == nullptr means no residual; `rms` selects RMSNorm, whose
// shift (nullptr: 0) and weight (nullptr: 1) are optional. The LayerNorm ops always pass a shift.

// Checks the modulation parameters; returns (groups of shift/scale, groups of gate).
std::pair<int64_t, int64_t> check_mods(const Tensor& x, const Tensor* shift, const Tensor& scale, const Tensor* gate,
                                       const char* op) {
  if (shift != nullptr) mod_groups(*shift, "shift", x, op);
  const int64_t gm = mod_groups(scale, "scale", x, op);
  if (shift != nullptr) check_shift_scale(*shift, scale, op);
  return {gm, gate != nullptr ? mod_groups(*gate, "gate", x, op) : 1};
}

// The RMSNorm weight: exactly (D,), x's dtype and device (LightningDiT's nn.Parameter(torch.ones(D))).
void check_weight(const Tensor* w, const char* name, const Tensor& x, const char* op) {
  if (w == nullptr) return;
  check_like(*w, name, x, op);
  TORCH_CHECK(w->dim() == 1 && w->size(0) == x.size(-1), op, ": ", name, " must have shape (", x.size(-1),
              ",) (x's last dimension), got shape ", w->sizes());
}

// A weight of one row, read with row_stride 0 by every group.
ModParam weight_param(const Tensor& w) { return ModParam{w.data_ptr(), 0}; }

// -> (x_out (undefined without a gate), out, mean (undefined for rms), rstd)
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_mod_forward(const char* op, const Tensor& x_in, const Tensor* gate,
                                                            const Tensor* y, const Tensor* shift, const Tensor& scale,
                                                            double eps, bool rms = false,
                                                            const Tensor* weight = nullptr) {
  check_x(x_in, op);
  check_eps(eps, op);
  const auto [gm, gg] = check_mods(x_in, shift, scale, gate, op);
  check_weight(weight, "weight", x_in, op);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor yy = gate != nullptr ? rows_like(*y, "y", x, op) : Tensor();
  const Tensor w = weight != nullptr ? weight->contiguous() : Tensor();
  const Layout l = layout_of(x, {gm, gg});
  Tensor x_out = gate != nullptr ? at::empty_like(x) : Tensor(), out = at::empty_like(x);
  Tensor rstd = at::empty(stat_shape(x), x.options().dtype(acc_type(x)));
  Tensor mean = rms ? Tensor() : at::empty_like(rstd);
  if (l.rows == 0) return {x_out, out, mean, rstd};
  const Tensor sc = mod_matrix(scale, gm, l.groups, l.dim);
  const Tensor sh = shift != nullptr ? mod_matrix(*shift, gm, l.groups, l.dim) : Tensor();
  const Tensor ga = gate != nullptr ? mod_matrix(*gate, gg, l.groups, l.dim) : Tensor();
  NormModFwdParams p;
  p.dtype = dtype_of(x);
  p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.eps = eps;
  p.rms = rms;
  if (w.defined()) p.weight = weight_param(w);
  p.x = x.data_ptr(), p.scale = as_param(sc);
  if (sh.defined()) p.shift = as_param(sh);
  if (gate != nullptr) p.gate = as_param(ga), p.y = yy.data_ptr(), p.x_out = x_out.data_ptr();
  p.out = out.data_ptr(), p.rstd = rstd.data_ptr();
  if (!rms) p.mean = mean.data_ptr();
  backend_for(x).norm_mod_fwd(p);
  return {x_out, out, mean, rstd};
}

// -> (dx, dgate (undefined without a gate), dy (idem), dshift (undefined without a shift), dscale,
// dweight (undefined without a weight)); x_in is x_out with a gate; mean is undefined for rms.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> norm_mod_backward(
    const char* op, const Tensor* grad_x_out, const Tensor& grad_out, const Tensor& x_in, const Tensor* gate,
    const Tensor* y, const Tensor& scale, const Tensor& mean, const Tensor& rstd, bool rms = false,
    bool has_shift = true, const Tensor* weight = nullptr) {
  check_x(x_in, op, gate != nullptr ? "x_out" : "x");
  const int64_t gm = mod_groups(scale, "scale", x_in, op);
  const int64_t gg = gate != nullptr ? mod_groups(*gate, "gate", x_in, op) : 1;
  check_weight(weight, "weight", x_in, op);
  if (!rms) check_stats(mean, "mean", x_in, op);
  check_stats(rstd, "rstd", x_in, op);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor g = rows_like(grad_out, gate != nullptr ? "grad_h" : "grad_out", x, op);
  const Tensor gxo = gate != nullptr ? rows_like(*grad_x_out, "grad_x_out", x, op) : Tensor();
  const Tensor yy = gate != nullptr ? rows_like(*y, "y", x, op) : Tensor();
  const Layout l = layout_of(x, {gm, gg});
  Tensor dx = at::empty_like(x), dy = gate != nullptr ? at::empty_like(x) : Tensor();
  const auto acc = x.options().dtype(acc_type(x));
  // Uninitialised: the kernels write every partial whenever x has rows (no memset pass; for
  // per-token parameters these buffers are as large as x in fp32).
  Tensor ps = has_shift ? at::empty({l.groups * l.chunks(), l.dim}, acc) : Tensor();
  Tensor pc = at::empty({l.groups * l.chunks(), l.dim}, acc);
  Tensor pg = gate != nullptr ? at::empty_like(pc) : Tensor();
  const Tensor w = weight != nullptr ? weight->contiguous() : Tensor();
  const Tensor sc = l.rows > 0 ? mod_matrix(scale, gm, l.groups, l.dim) : Tensor();
  if (l.rows > 0) {
    const Tensor ga = gate != nullptr ? mod_matrix(*gate, gg, l.groups, l.dim) : Tensor();
    NormModBwdParams p;
    p.dtype = dtype_of(x);
    p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.chunk_rows = kChunkRows;
    p.rms = rms;
    if (w.defined()) p.weight = weight_param(w);
    p.grad_out = g.data_ptr(), p.x = x.data_ptr(), p.rstd = rstd.data_ptr();
    if (!rms) p.mean = mean.data_ptr();
    p.scale = as_param(sc);
    p.grad_x = dx.data_ptr(), p.part_scale = pc.data_ptr();
    if (has_shift) p.part_shift = ps.data_ptr();
    if (gate != nullptr) {
      p.grad_x_out = gxo.data_ptr(), p.gate = as_param(ga), p.y = yy.data_ptr();
      p.grad_y = dy.data_ptr(), p.part_gate = pg.data_ptr();
    }
    backend_for(x).norm_mod_bwd(p);
  }
  // pc holds sum(g * xh) per partial; all rows of one partial share one scale row (params.h), so
  // dscale = sum(pc) * w and dweight = sum over every partial of pc * (1 + scale).
  Tensor dweight;
  if (w.defined()) {
    if (l.rows == 0 || l.groups == 0) {
      dweight = at::zeros_like(w);
    } else {
      const Tensor s1 = sc.to(acc_type(x)).add(1.0).unsqueeze(1);  // (groups, 1, D)
      dweight = pc.view({l.groups, l.chunks(), l.dim}).mul(s1).sum({0, 1}).to(w.scalar_type());
    }
    pc.mul_(w.to(acc_type(x)));
  }
  return {dx, gate != nullptr ? reduce_partials(pg, l.chunks(), gg, l.groups, *gate) : Tensor(), dy,
          has_shift ? reduce_partials(ps, l.chunks(), gm, l.groups, scale) : Tensor(),
          reduce_partials(pc, l.chunks(), gm, l.groups, scale), dweight};
}
}  // namespace

// ---------------------------------------------------------------- adaln_modulate

std::tuple<Tensor, Tensor, Tensor> adaln_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                      double eps) {
  auto [x_out, out, mean, rstd] = norm_mod_forward("adaln_modulate", x, nullptr, nullptr, &shift, scale, eps);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> adaln_modulate_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& scale,
                                                      const Tensor& mean, const Tensor& rstd) {
  auto [dx, dgate, dy, dshift, dscale, dweight] =
      norm_mod_backward("adaln_modulate_bwd", nullptr, grad_out, x, nullptr, nullptr, scale, mean, rstd);
  return {dx, dshift, dscale};
}

namespace {
// The one-pass jvp of all four ops (gate == nullptr: no residual). A None tangent stays null in
// the params struct, and the kernels skip its work. The constructor checks x and eps; run()
// checks the rest, under x's device guard.
struct NormModJvpCall {
  const char* op;
  const Tensor& x_in;
  Tensor x;  // x_in, contiguous (set by run)
  const Tensor *x_dot = nullptr, *gate = nullptr, *gate_dot = nullptr, *y = nullptr, *y_dot = nullptr;
  const Tensor *shift = nullptr, *shift_dot = nullptr, *scale = nullptr, *scale_dot = nullptr;
  const Tensor *weight = nullptr, *weight_dot = nullptr;  // rms only
  bool rms = false;
  double eps = 1e-6;
  // outputs
  Tensor x_out, x_out_dot, out, out_dot, mean, rstd;

  NormModJvpCall(const char* op_name, const Tensor& x_, const optional<Tensor>& x_dot_, double eps_)
      : op(op_name), x_in(x_), x_dot(opt(x_dot_)), eps(eps_) {
    check_x(x_in, op);
    check_eps(eps, op);
  }

  void run() {
    const c10::OptionalDeviceGuard guard(x_in.device());
    x = x_in.contiguous();
    const bool residual = gate != nullptr;
    const auto [gm, gg] = check_mods(x, shift, *scale, gate, op);
    check_weight(weight, "weight", x, op);
    const Layout l = layout_of(x, {gm, gg});
    auto mat = [&](const Tensor* t, int64_t own) {
      return t == nullptr ? Tensor() : mod_matrix(*t, own, l.groups, l.dim);
    };
    const Tensor sh = mat(shift, gm), shd = mat(shift_dot, gm), sc = mat(scale, gm), scd = mat(scale_dot, gm);
    const Tensor ga = mat(gate, gg), gad = mat(gate_dot, gg);
    const Tensor xd = x_dot ? rows_like(*x_dot, "x_dot", x, op) : Tensor();
    const Tensor yy = y ? rows_like(*y, "y", x, op) : Tensor();
    const Tensor yd = y_dot ? rows_like(*y_dot, "y_dot", x, op) : Tensor();

    out = at::empty_like(x), out_dot = at::empty_like(x);
    if (residual) x_out = at::empty_like(x), x_out_dot = at::empty_like(x);
    rstd = at::empty(stat_shape(x), x.options().dtype(acc_type(x)));
    if (!rms) mean = at::empty_like(rstd);
    const Tensor w = weight != nullptr ? weight->contiguous() : Tensor();
    const Tensor wd = weight_dot != nullptr ? weight_dot->contiguous() : Tensor();
    if (l.rows == 0) return;
    NormModJvpParams q;
    NormModFwdParams& p = q.p;
    p.dtype = dtype_of(x);
    p.rows = l.rows, p.dim = l.dim, p.rows_per_group = l.rows_per_group(), p.eps = eps;
    p.rms = rms;
    if (w.defined()) p.weight = weight_param(w);
    if (wd.defined()) q.weight_dot = weight_param(wd);
    p.x = x.data_ptr(), p.scale = as_param(sc);
    if (sh.defined()) p.shift = as_param(sh);
    p.out = out.data_ptr(), p.rstd = rstd.data_ptr();
    if (!rms) p.mean = mean.data_ptr();
    q.x_dot = xd.defined() ? xd.data_ptr() : nullptr;
    if (residual) {
      p.gate = as_param(ga), p.y = yy.data_ptr(), p.x_out = x_out.data_ptr();
      q.gate_dot = gad.defined() ? as_param(gad) : ModParam{};
      q.y_dot = yd.defined() ? yd.data_ptr() : nullptr;
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
  NormModJvpCall c("adaln_modulate_jvp", x, x_dot, eps);
  c.shift = &shift, c.scale = &scale;
  c.shift_dot = mod_tangent(shift_dot, "shift_dot", shift, "shift", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.run();
  return {c.out, c.out_dot, c.mean, c.rstd};
}

// ---------------------------------------------------------------- gated_residual_adaln

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_fwd(const Tensor& x, const Tensor& gate,
                                                                    const Tensor& y, const Tensor& shift,
                                                                    const Tensor& scale, double eps) {
  return norm_mod_forward("gated_residual_adaln", x, &gate, &y, &shift, scale, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_bwd(
    const Tensor& grad_x_out, const Tensor& grad_h, const Tensor& x_out, const Tensor& gate, const Tensor& y,
    const Tensor& scale, const Tensor& mean, const Tensor& rstd) {
  auto [dx, dgate, dy, dshift, dscale, dweight] =
      norm_mod_backward("gated_residual_adaln_bwd", &grad_x_out, grad_h, x_out, &gate, &y, scale, mean, rstd);
  return {dx, dgate, dy, dshift, dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
    const Tensor& y, const optional<Tensor>& y_dot, const Tensor& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, double eps) {
  NormModJvpCall c("gated_residual_adaln_jvp", x, x_dot, eps);
  c.gate = &gate, c.y = &y, c.y_dot = opt(y_dot), c.shift = &shift, c.scale = &scale;
  c.gate_dot = mod_tangent(gate_dot, "gate_dot", gate, "gate", x, c.op);
  c.shift_dot = mod_tangent(shift_dot, "shift_dot", shift, "shift", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.run();
  return {c.x_out, c.x_out_dot, c.out, c.out_dot, c.mean, c.rstd};
}

// ---------------------------------------------------------------- rms_adaln_modulate

namespace {
// A tangent of an optional input: none without its primal.
const Tensor* optional_tangent(const optional<Tensor>& t, const char* name, const Tensor* primal,
                               const char* primal_name, const char* op) {
  TORCH_CHECK(primal != nullptr || opt(t) == nullptr, op, ": ", name, " given without ", primal_name,
              " (an absent ", primal_name, " has no tangent)");
  return opt(t);
}

// A tangent of an optional modulation parameter: none without its primal, else its primal's shape.
const Tensor* optional_mod_tangent(const optional<Tensor>& t, const char* name, const Tensor* primal,
                                   const char* primal_name, const Tensor& x, const char* op) {
  const Tensor* p = optional_tangent(t, name, primal, primal_name, op);
  return p == nullptr ? nullptr : mod_tangent(t, name, *primal, primal_name, x, op);
}

// Checks weight_dot like weight (shape (D,)).
const Tensor* weight_tangent(const optional<Tensor>& t, const Tensor* weight, const Tensor& x, const char* op) {
  const Tensor* wd = optional_tangent(t, "weight_dot", weight, "weight", op);
  check_weight(wd, "weight_dot", x, op);
  return wd;
}
}  // namespace

std::tuple<Tensor, Tensor> rms_adaln_modulate_fwd(const Tensor& x, const optional<Tensor>& shift,
                                                  const Tensor& scale, const optional<Tensor>& weight, double eps) {
  auto [x_out, out, mean, rstd] =
      norm_mod_forward("rms_adaln_modulate", x, nullptr, nullptr, opt(shift), scale, eps, true, opt(weight));
  return {out, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rms_adaln_modulate_bwd(const Tensor& grad_out, const Tensor& x,
                                                                  const optional<Tensor>& shift, const Tensor& scale,
                                                                  const optional<Tensor>& weight, const Tensor& rstd) {
  auto [dx, dgate, dy, dshift, dscale, dweight] =
      norm_mod_backward("rms_adaln_modulate_bwd", nullptr, grad_out, x, nullptr, nullptr, scale, Tensor(), rstd,
                        true, opt(shift) != nullptr, opt(weight));
  return {dx, dshift, dscale, dweight};
}

std::tuple<Tensor, Tensor, Tensor> rms_adaln_modulate_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const optional<Tensor>& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, const optional<Tensor>& weight,
    const optional<Tensor>& weight_dot, double eps) {
  NormModJvpCall c("rms_adaln_modulate_jvp", x, x_dot, eps);
  c.rms = true, c.shift = opt(shift), c.scale = &scale, c.weight = opt(weight);
  c.shift_dot = optional_mod_tangent(shift_dot, "shift_dot", c.shift, "shift", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.weight_dot = weight_tangent(weight_dot, c.weight, x, c.op);
  c.run();
  return {c.out, c.out_dot, c.rstd};
}

// ---------------------------------------------------------------- gated_residual_rms_adaln

std::tuple<Tensor, Tensor, Tensor> gated_residual_rms_adaln_fwd(const Tensor& x, const Tensor& gate, const Tensor& y,
                                                                const optional<Tensor>& shift, const Tensor& scale,
                                                                const optional<Tensor>& weight, double eps) {
  auto [x_out, out, mean, rstd] =
      norm_mod_forward("gated_residual_rms_adaln", x, &gate, &y, opt(shift), scale, eps, true, opt(weight));
  return {x_out, out, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_rms_adaln_bwd(
    const Tensor& grad_x_out, const Tensor& grad_h, const Tensor& x_out, const Tensor& gate, const Tensor& y,
    const optional<Tensor>& shift, const Tensor& scale, const optional<Tensor>& weight, const Tensor& rstd) {
  return norm_mod_backward("gated_residual_rms_adaln_bwd", &grad_x_out, grad_h, x_out, &gate, &y, scale, Tensor(),
                           rstd, true, opt(shift) != nullptr, opt(weight));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_rms_adaln_jvp(
    const Tensor& x, const optional<Tensor>& x_dot, const Tensor& gate, const optional<Tensor>& gate_dot,
    const Tensor& y, const optional<Tensor>& y_dot, const optional<Tensor>& shift, const optional<Tensor>& shift_dot,
    const Tensor& scale, const optional<Tensor>& scale_dot, const optional<Tensor>& weight,
    const optional<Tensor>& weight_dot, double eps) {
  NormModJvpCall c("gated_residual_rms_adaln_jvp", x, x_dot, eps);
  c.rms = true, c.gate = &gate, c.y = &y, c.y_dot = opt(y_dot);
  c.shift = opt(shift), c.scale = &scale, c.weight = opt(weight);
  c.gate_dot = mod_tangent(gate_dot, "gate_dot", gate, "gate", x, c.op);
  c.shift_dot = optional_mod_tangent(shift_dot, "shift_dot", c.shift, "shift", x, c.op);
  c.scale_dot = mod_tangent(scale_dot, "scale_dot", scale, "scale", x, c.op);
  c.weight_dot = weight_tangent(weight_dot, c.weight, x, c.op);
  c.run();
  return {c.x_out, c.x_out_dot, c.out, c.out_dot, c.rstd};
}

}  // namespace dmf
