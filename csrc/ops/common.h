// Shared by the op binding files (csrc/ops/<family>.cpp): validation, the modulation-parameter
// layout, partial-sum reduction and the choice of kernel table. Every binding follows one shape:
// check -> device guard -> layout -> allocate outputs -> fill the params struct -> backend call.
//
// Modulation parameters (shift, scale, gate) may have shape
//   (D,)                    one row for all of x;
//   (B, D) with x.dim() >= 3   one row per sample, broadcast over tokens (the DiT layout);
//   x.shape[:k] + (1,) * (x.dim() - 1 - k) + (D,)   e.g. (B, 1, D) or x's full shape.
// Any stride along the leading dims is read in place (chunks of a fused adaLN projection
// need no copy); x and the other row tensors are made contiguous.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <vector>

#include "../kernels/backend.h"
#include "../ops.h"

namespace dmf {

// The kernel table that serves x's device (defined in csrc/ops.cpp: the one place that chooses).
const Backend& backend_for(const Tensor& x);

namespace ops_common {
inline constexpr int64_t kChunkRows = 32;  // rows per deterministic partial sum of a parameter gradient

inline DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

inline at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_x(const Tensor& x, const char* op, const char* name = "x") {
  TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have at least one dimension, got a 0-d tensor");
  TORCH_CHECK(x.size(-1) > 0, op, ": ", name, " must have a non-empty last dimension, got shape ", x.sizes());
}

inline void check_like(const Tensor& t, const char* name, const Tensor& x, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " like x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

// A tensor that must have x's shape, made contiguous.
inline Tensor rows_like(const Tensor& t, const char* name, const Tensor& x, const char* op) {
  check_like(t, name, x, op);
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  return t.contiguous();
}

inline const Tensor* opt(const optional<Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// Number of parameter rows (groups) of a modulation parameter for x; see the top comment.
inline int64_t mod_groups(const Tensor& p, const char* name, const Tensor& x, const char* op) {
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
inline Tensor mod_matrix(const Tensor& p, int64_t own, int64_t groups, int64_t D) {
  Tensor m = p.reshape({own, D});
  if (m.stride(1) != 1) m = m.contiguous();
  if (own != groups && own > 0) m = m.unsqueeze(1).expand({own, groups / own, D}).reshape({groups, D});
  return m;
}

inline ModParam as_param(const Tensor& m) { return ModParam{m.data_ptr(), m.stride(0)}; }
inline ModParam as_param(const Tensor* m) { return m == nullptr ? ModParam{} : as_param(*m); }

// Sums per-chunk partial gradients (groups * chunks, D) in a fixed order into the
// parameter's own grouping, cast and shaped like `like`.
inline Tensor reduce_partials(const Tensor& part, int64_t chunks, int64_t own, int64_t groups, const Tensor& like) {
  // No rows in x (an empty batch): the parameter's gradient is zero (or empty itself).
  if (own == 0 || groups == 0 || part.numel() == 0) return at::zeros(like.sizes(), like.options());
  const int64_t D = part.size(1);
  Tensor t = part.view({own, (groups / own) * chunks, D});
  Tensor r = t.size(1) == 1 ? t.select(1, 0) : t.sum(1);
  return r.to(like.scalar_type()).reshape(like.sizes());
}

inline std::vector<int64_t> stat_shape(const Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

inline void check_stats(const Tensor& s, const char* name, const Tensor& x, const char* op) {
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

inline Layout layout_of(const Tensor& x, std::initializer_list<int64_t> own_groups) {
  Layout l{x.numel() / x.size(-1), x.size(-1), 1};
  for (int64_t g : own_groups) l.groups = std::max(l.groups, g);
  return l;
}

// Tangent of a modulation parameter: same shape as its primal.
inline const Tensor* mod_tangent(const optional<Tensor>& t, const char* name, const Tensor& primal,
                                 const char* primal_name, const Tensor& x, const char* op) {
  const Tensor* p = opt(t);
  if (p == nullptr) return nullptr;
  check_like(*p, name, x, op);
  TORCH_CHECK(p->sizes() == primal.sizes(), op, ": ", name, " must have the shape of ", primal_name, " ",
              primal.sizes(), ", got ", p->sizes());
  return p;
}

inline void check_shift_scale(const Tensor& shift, const Tensor& scale, const char* op) {
  TORCH_CHECK(shift.sizes() == scale.sizes(), op, ": shift and scale must have the same shape, got ", shift.sizes(),
              " and ", scale.sizes());
}

inline void check_eps(double eps, const char* op) { TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps); }
}  // namespace ops_common
}  // namespace dmf
