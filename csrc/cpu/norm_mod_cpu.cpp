// CPU kernels of the LayerNorm-and-modulate family (adaln_modulate, gated_residual_adaln):
// one task per block of rows, each row staged once in an L1-resident fp32 (fp64) buffer,
// statistics by the exact two-pass formula over that buffer, fp32 accumulation throughout.
#include "cpu_common.h"

namespace dmf {
namespace cpu {
namespace {

// Loads row r of the normalised input into xb: x, or x + gate * res (rounded to T and
// stored to x_out, since the backward and eager PyTorch both see the rounded x_out).
template <typename T, typename A>
inline void load_input_row(const NormModFwdParams& p, int64_t r, A* xb) {
  const int64_t D = p.dim;
  const T* xr = static_cast<const T*>(p.x) + r * D;
  if (p.gate.ptr == nullptr) {
    load_row(xr, xb, D);
    return;
  }
  const T* gr = mod_row<T>(p.gate, r / p.rows_per_group);
  const T* yr = static_cast<const T*>(p.res) + r * D;
  T* xo = static_cast<T*>(p.x_out) + r * D;
  for (int64_t j = 0; j < D; ++j) {
    const T v = static_cast<T>(static_cast<A>(xr[j]) + static_cast<A>(gr[j]) * static_cast<A>(yr[j]));
    xo[j] = v;
    xb[j] = static_cast<A>(v);
  }
}

template <typename A>
inline void row_stats(const A* xb, int64_t D, double eps, A& mean, A& rstd) {
  mean = row_sum(xb, D) / static_cast<A>(D);
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < D; ++j) ss += (xb[j] - mean) * (xb[j] - mean);
  rstd = A(1) / std::sqrt(ss / static_cast<A>(D) + static_cast<A>(eps));
}

template <typename T, typename A>
void fwd_impl(const NormModFwdParams& p) {
  const int64_t D = p.dim;
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(D);
    A* xb = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / p.rows_per_group;
      load_input_row<T, A>(p, r, xb);
      A mean, rstd;
      row_stats(xb, D, p.eps, mean, rstd);
      static_cast<A*>(p.mean)[r] = mean;
      static_cast<A*>(p.rstd)[r] = rstd;
      const T* sh = mod_row<T>(p.shift, g);
      const T* sc = mod_row<T>(p.scale, g);
      T* o = static_cast<T*>(p.out) + r * D;
      for (int64_t j = 0; j < D; ++j)
        o[j] = static_cast<T>((xb[j] - mean) * rstd * (A(1) + static_cast<A>(sc[j])) + static_cast<A>(sh[j]));
    }
  });
}

template <typename T, typename A>
void jvp_impl(const NormModJvpParams& q) {
  const NormModFwdParams& p = q.p;
  const int64_t D = p.dim;
  const bool residual = p.gate.ptr != nullptr;
  const bool res_tangent = residual && (q.gate_dot.ptr != nullptr || q.res_dot != nullptr);
  const bool x_tangent = q.x_dot != nullptr || res_tangent;
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(2 * D);
    A* xb = buf.data();
    A* td = buf.data() + D;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / p.rows_per_group;
      A mean, rstd;
      if (q.stats_given) {
        load_row(static_cast<const T*>(p.x) + r * D, xb, D);
        mean = static_cast<const A*>(p.mean)[r];
        rstd = static_cast<const A*>(p.rstd)[r];
      } else {
        load_input_row<T, A>(p, r, xb);
        row_stats(xb, D, p.eps, mean, rstd);
        static_cast<A*>(p.mean)[r] = mean;
        static_cast<A*>(p.rstd)[r] = rstd;
      }
      // xb <- xh, the normalised row.
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) xb[j] = (xb[j] - mean) * rstd;

      const T* sh = mod_row<T>(p.shift, g);
      const T* sc = mod_row<T>(p.scale, g);
      const T* shd = mod_row<T>(q.shift_dot, g);
      const T* scd = mod_row<T>(q.scale_dot, g);
      if (!q.stats_given) {
        T* o = static_cast<T*>(p.out) + r * D;
        for (int64_t j = 0; j < D; ++j)
          o[j] = static_cast<T>(xb[j] * (A(1) + static_cast<A>(sc[j])) + static_cast<A>(sh[j]));
      }

      // td <- tangent of the normalised input: x_dot + gate_dot * res + gate * res_dot.
      if (x_tangent) {
        if (q.x_dot != nullptr) load_row(static_cast<const T*>(q.x_dot) + r * D, td, D);
        else std::fill(td, td + D, A(0));
        if (res_tangent) {
          const T* gr = mod_row<T>(p.gate, g);
          const T* gd = mod_row<T>(q.gate_dot, g);
          const T* yr = static_cast<const T*>(p.res) + r * D;
          const T* yd = q.res_dot == nullptr ? nullptr : static_cast<const T*>(q.res_dot) + r * D;
          if (gd != nullptr)
            for (int64_t j = 0; j < D; ++j) td[j] += static_cast<A>(gd[j]) * static_cast<A>(yr[j]);
          if (yd != nullptr)
            for (int64_t j = 0; j < D; ++j) td[j] += static_cast<A>(gr[j]) * static_cast<A>(yd[j]);
        }
      }
      if (residual) {
        T* xod = static_cast<T*>(q.x_out_dot) + r * D;
        for (int64_t j = 0; j < D; ++j) xod[j] = x_tangent ? static_cast<T>(td[j]) : T(0);
      }

      // out_dot = xh_dot * (1 + scale) + xh * scale_dot + shift_dot,
      // xh_dot = (td - mean(td) - xh * mean(xh * td)) * rstd.
      A m1 = 0, m2 = 0;
      if (x_tangent) {
        m1 = row_sum(td, D) / static_cast<A>(D);
        m2 = row_dot(xb, td, D) / static_cast<A>(D);
      }
      T* od = static_cast<T*>(q.out_dot) + r * D;
      for (int64_t j = 0; j < D; ++j) {
        A v = 0;
        if (x_tangent) v = (td[j] - m1 - xb[j] * m2) * rstd * (A(1) + static_cast<A>(sc[j]));
        if (scd != nullptr) v += xb[j] * static_cast<A>(scd[j]);
        if (shd != nullptr) v += static_cast<A>(shd[j]);
        od[j] = static_cast<T>(v);
      }
    }
  });
}

template <typename T, typename A>
void bwd_impl(const NormModBwdParams& p) {
  const int64_t D = p.dim;
  const int64_t T_rows = p.rows_per_group;
  const int64_t chunks = ceil_div(T_rows, p.chunk_rows);
  const int64_t groups = p.rows / T_rows;
  const bool residual = p.gate.ptr != nullptr;
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(5 * D);
    A* xh = buf.data();
    A* gh = xh + D;
    A* ps = gh + D;
    A* pc = ps + D;
    A* pg = pc + D;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / chunks;
      const int64_t r0 = g * T_rows + (item % chunks) * p.chunk_rows;
      const int64_t r1 = std::min(r0 + p.chunk_rows, (g + 1) * T_rows);
      std::fill(ps, ps + 3 * D, A(0));
      const T* sc = mod_row<T>(p.scale, g);
      const T* gate = mod_row<T>(p.gate, g);
      for (int64_t r = r0; r < r1; ++r) {
        const A mean = static_cast<const A*>(p.mean)[r];
        const A rstd = static_cast<const A*>(p.rstd)[r];
        const T* xr = static_cast<const T*>(p.x) + r * D;
        const T* gr = static_cast<const T*>(p.grad_out) + r * D;
        for (int64_t j = 0; j < D; ++j) {
          const A gv = static_cast<A>(gr[j]);
          xh[j] = (static_cast<A>(xr[j]) - mean) * rstd;
          gh[j] = gv * (A(1) + static_cast<A>(sc[j]));
          ps[j] += gv;
          pc[j] += gv * xh[j];
        }
        const A c1 = row_sum(gh, D) / static_cast<A>(D);
        const A c2 = row_dot(gh, xh, D) / static_cast<A>(D);
        T* dx = static_cast<T*>(p.grad_x) + r * D;
        const T* gxo = p.grad_x_out == nullptr ? nullptr : static_cast<const T*>(p.grad_x_out) + r * D;
        if (!residual) {
          for (int64_t j = 0; j < D; ++j) dx[j] = static_cast<T>((gh[j] - c1 - xh[j] * c2) * rstd);
          continue;
        }
        const T* yr = static_cast<const T*>(p.res) + r * D;
        T* dy = static_cast<T*>(p.grad_res) + r * D;
        for (int64_t j = 0; j < D; ++j) {
          A d = (gh[j] - c1 - xh[j] * c2) * rstd;
          if (gxo != nullptr) d += static_cast<A>(gxo[j]);
          dx[j] = static_cast<T>(d);
          dy[j] = static_cast<T>(d * static_cast<A>(gate[j]));
          pg[j] += d * static_cast<A>(yr[j]);
        }
      }
      A* out_s = static_cast<A*>(p.part_shift) + item * D;
      A* out_c = static_cast<A*>(p.part_scale) + item * D;
      std::copy(ps, ps + D, out_s);
      std::copy(pc, pc + D, out_c);
      if (residual) std::copy(pg, pg + D, static_cast<A*>(p.part_gate) + item * D);
    }
  });
}

}  // namespace

void norm_mod_fwd_cpu(const NormModFwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { fwd_impl<decltype(t), decltype(a)>(p); });
}
void norm_mod_jvp_cpu(const NormModJvpParams& p) {
  dispatch_dtype(p.p.dtype, [&](auto t, auto a) { jvp_impl<decltype(t), decltype(a)>(p); });
}
void norm_mod_bwd_cpu(const NormModBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { bwd_impl<decltype(t), decltype(a)>(p); });
}

}  // namespace cpu
}  // namespace dmf
