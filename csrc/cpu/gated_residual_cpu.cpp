// CPU kernels of gated_residual: out = x + gate * y, its tangent and its backward.
#include "cpu_common.h"

namespace dmf {
namespace cpu {
namespace {

template <typename T, typename A>
void fwd_impl(const GatedResidualParams& p) {
  const int64_t D = p.dim;
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = static_cast<const T*>(p.x) + r * D;
      const T* yr = static_cast<const T*>(p.y) + r * D;
      const T* gr = mod_row<T>(p.gate, r / p.rows_per_group);
      T* o = static_cast<T*>(p.out) + r * D;
      for (int64_t j = 0; j < D; ++j)
        o[j] = static_cast<T>(static_cast<A>(xr[j]) + static_cast<A>(gr[j]) * static_cast<A>(yr[j]));
    }
  });
}

// out (when requested) and out_dot = x_dot + gate_dot * y + gate * y_dot; absent tangents
// read zero rows so the loop stays branch-free (vectorised).
template <typename T, typename A>
void jvp_impl(const GatedResidualParams& p) {
  const int64_t D = p.dim;
  const std::vector<T> zero_row(D, T(0));
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / p.rows_per_group;
      const T* __restrict__ xr = static_cast<const T*>(p.x) + r * D;
      const T* __restrict__ yr = static_cast<const T*>(p.y) + r * D;
      const T* __restrict__ gr = mod_row<T>(p.gate, g);
      const T* __restrict__ xd = p.x_dot != nullptr ? static_cast<const T*>(p.x_dot) + r * D : zero_row.data();
      const T* __restrict__ yd = p.y_dot != nullptr ? static_cast<const T*>(p.y_dot) + r * D : zero_row.data();
      const T* gdp = mod_row<T>(p.gate_dot, g);
      const T* __restrict__ gd = gdp != nullptr ? gdp : zero_row.data();
      T* __restrict__ od = static_cast<T*>(p.out_dot) + r * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j)
        od[j] = static_cast<T>(static_cast<A>(xd[j]) + static_cast<A>(gd[j]) * static_cast<A>(yr[j]) +
                               static_cast<A>(gr[j]) * static_cast<A>(yd[j]));
      if (p.out != nullptr) {
        T* __restrict__ o = static_cast<T*>(p.out) + r * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j)
          o[j] = static_cast<T>(static_cast<A>(xr[j]) + static_cast<A>(gr[j]) * static_cast<A>(yr[j]));
      }
    }
  });
}

// grad_y = grad_out * gate; gate's gradient as partial sums of grad_out * y per chunk.
template <typename T, typename A>
void bwd_impl(const GatedResidualParams& p) {
  const int64_t D = p.dim;
  const int64_t T_rows = p.rows_per_group;
  const int64_t chunks = ceil_div(T_rows, p.chunk_rows);
  const int64_t groups = ceil_div(p.rows, T_rows);  // the last group may be partial
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / chunks;
      const int64_t r0 = g * T_rows + (item % chunks) * p.chunk_rows;
      const int64_t r1 = std::min({r0 + p.chunk_rows, (g + 1) * T_rows, p.rows});
      const T* gr = mod_row<T>(p.gate, g);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t r = r0; r < r1; ++r) {
        const T* go = static_cast<const T*>(p.grad_out) + r * D;
        const T* yr = static_cast<const T*>(p.y) + r * D;
        T* dy = static_cast<T*>(p.grad_y) + r * D;
        for (int64_t j = 0; j < D; ++j) {
          const A gv = static_cast<A>(go[j]);
          dy[j] = static_cast<T>(gv * static_cast<A>(gr[j]));
          acc[j] += gv * static_cast<A>(yr[j]);
        }
      }
      std::copy(acc.begin(), acc.end(), static_cast<A*>(p.part_gate) + item * D);
    }
  });
}

}  // namespace

void gated_residual_fwd_cpu(const GatedResidualParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { fwd_impl<decltype(t), decltype(a)>(p); });
}
void gated_residual_jvp_cpu(const GatedResidualParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { jvp_impl<decltype(t), decltype(a)>(p); });
}
void gated_residual_bwd_cpu(const GatedResidualParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { bwd_impl<decltype(t), decltype(a)>(p); });
}

}  // namespace cpu
}  // namespace dmf
