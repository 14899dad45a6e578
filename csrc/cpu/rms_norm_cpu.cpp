// CPU kernels of rms_norm (qk-norm): out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
#include "cpu_common.h"

namespace dmf {
namespace cpu {
namespace {

template <typename A>
inline A rms_rstd(const A* xb, int64_t D, double eps) {
  return A(1) / std::sqrt(row_dot(xb, xb, D) / static_cast<A>(D) + static_cast<A>(eps));
}

template <typename T, typename A>
void fwd_impl(const RmsNormParams& p) {
  const int64_t D = p.dim;
  const T* w = static_cast<const T*>(p.weight);
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(D);
    for (int64_t r = begin; r < end; ++r) {
      load_row(static_cast<const T*>(p.x) + r * D, buf.data(), D);
      const A rstd = rms_rstd(buf.data(), D, p.eps);
      static_cast<A*>(p.rstd)[r] = rstd;
      T* o = static_cast<T*>(p.out) + r * D;
      for (int64_t j = 0; j < D; ++j) o[j] = static_cast<T>(buf[j] * rstd * static_cast<A>(w[j]));
    }
  });
}

// out_dot = w * (x_dot * rstd - x * rstd^3 * mean(x * x_dot)) + x * rstd * w_dot; absent
// tangents read zero rows so the loops stay branch-free (vectorised).
template <typename T, typename A>
void jvp_impl(const RmsNormParams& p) {
  const int64_t D = p.dim;
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const std::vector<T> zero_row(D, T(0));
  const T* __restrict__ wd = p.weight_dot != nullptr ? static_cast<const T*>(p.weight_dot) : zero_row.data();
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(2 * D);
    A* __restrict__ xb = buf.data();
    A* __restrict__ xd = xb + D;
    for (int64_t r = begin; r < end; ++r) {
      load_row(static_cast<const T*>(p.x) + r * D, xb, D);
      A rstd;
      if (p.stats_given) {
        rstd = static_cast<const A*>(p.rstd)[r];
      } else {
        rstd = rms_rstd(xb, D, p.eps);
        static_cast<A*>(p.rstd)[r] = rstd;
        T* __restrict__ o = static_cast<T*>(p.out) + r * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) o[j] = static_cast<T>(xb[j] * rstd * static_cast<A>(w[j]));
      }
      if (p.x_dot != nullptr) load_row(static_cast<const T*>(p.x_dot) + r * D, xd, D);
      else std::fill(xd, xd + D, A(0));
      const A m = row_dot(xb, xd, D) / static_cast<A>(D);
      T* __restrict__ od = static_cast<T*>(p.out_dot) + r * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j)
        od[j] = static_cast<T>(static_cast<A>(w[j]) * (xd[j] - xb[j] * rstd * rstd * m) * rstd +
                               xb[j] * rstd * static_cast<A>(wd[j]));
    }
  });
}

// dx = rstd * (g * w - x * rstd^2 * mean(g * w * x)); the weight's gradient as partial
// sums of g * x * rstd over chunks of rows.
template <typename T, typename A>
void bwd_impl(const RmsNormParams& p) {
  const int64_t D = p.dim;
  const int64_t chunks = ceil_div(p.rows, p.chunk_rows);
  const T* w = static_cast<const T*>(p.weight);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(3 * D);
    A* xb = buf.data();
    A* gw = xb + D;
    A* acc = gw + D;
    for (int64_t c = begin; c < end; ++c) {
      std::fill(acc, acc + D, A(0));
      const int64_t r1 = std::min(p.rows, (c + 1) * p.chunk_rows);
      for (int64_t r = c * p.chunk_rows; r < r1; ++r) {
        const A rstd = static_cast<const A*>(p.rstd)[r];
        const T* xr = static_cast<const T*>(p.x) + r * D;
        const T* go = static_cast<const T*>(p.grad_out) + r * D;
        for (int64_t j = 0; j < D; ++j) {
          const A gv = static_cast<A>(go[j]);
          xb[j] = static_cast<A>(xr[j]);
          gw[j] = gv * static_cast<A>(w[j]);
          acc[j] += gv * xb[j] * rstd;
        }
        const A m = row_dot(gw, xb, D) / static_cast<A>(D);
        T* dx = static_cast<T*>(p.grad_x) + r * D;
        for (int64_t j = 0; j < D; ++j) dx[j] = static_cast<T>(rstd * (gw[j] - xb[j] * rstd * rstd * m));
      }
      std::copy(acc, acc + D, static_cast<A*>(p.part_weight) + c * D);
    }
  });
}

}  // namespace

void rms_norm_fwd_cpu(const RmsNormParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { fwd_impl<decltype(t), decltype(a)>(p); });
}
void rms_norm_jvp_cpu(const RmsNormParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { jvp_impl<decltype(t), decltype(a)>(p); });
}
void rms_norm_bwd_cpu(const RmsNormParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { bwd_impl<decltype(t), decltype(a)>(p); });
}

}  // namespace cpu
}  // namespace dmf
