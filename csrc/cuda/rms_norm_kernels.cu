// CUDA kernels of rms_norm (qk-norm). Same row-team scheme as norm_mod_kernels.cu: 8 or 16
// lanes per row for head dims (D = 64 / 72 in bf16: 8 / 9 vectors, so 4 / 2 rows per warp),
// the row in registers, and a
// backward that keeps the weight-gradient sums of a chunk of rows in registers and writes
// them as deterministic partials.
#include "cuda_common.cuh"
#include "launch.h"

namespace dmf {
namespace cuda {
namespace {

template <typename T, int VEC, int TEAM, typename A, int IT>
__device__ __forceinline__ void load_row(const T* base, int64_t D, A (&v)[IT][VEC]) {
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c < D) {
      load_vec<T, VEC>(base + c, v[it]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[it][k] = A(0);
    }
  }
}

template <typename T, int VEC, int TEAM, int EPT>
__global__ void __launch_bounds__(TEAM ? kTeamBlockThreads : kRowThreads) rms_norm_fwd_kernel(const RmsNormParams p) {
  using A = typename Acc<T>::type;
  constexpr int IT = EPT / VEC;
  __shared__ A smem[64];
  const int64_t r = team_index<TEAM>();
  if (r >= p.rows) return;
  const int64_t D = p.dim;
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  A xv[IT][VEC];
  load_row<T, VEC, TEAM>(static_cast<const T*>(p.x) + r * D, D, xv);
  A ss = 0, unused = 0;
#pragma unroll
  for (int it = 0; it < IT; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) ss += xv[it][k] * xv[it][k];
  team_sum2<TEAM>(ss, unused, smem);
  const A rstd = A(1) / sqrt(ss / A(D) + A(p.eps));
  if (lane == 0) static_cast<A*>(p.rstd)[r] = rstd;
  const T* w = static_cast<const T*>(p.weight);
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c >= D) continue;
    A wv[VEC], o[VEC];
    load_vec<T, VEC>(w + c, wv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = xv[it][k] * rstd * wv[k];
    store_vec<T, VEC>(static_cast<T*>(p.out) + r * D + c, o);
  }
}

// out_dot = w * (x_dot - x * rstd^2 * mean(x * x_dot)) * rstd + x * rstd * w_dot
template <typename T, int VEC, int TEAM, int EPT>
__global__ void __launch_bounds__(TEAM ? kTeamBlockThreads : kRowThreads) rms_norm_jvp_kernel(const RmsNormParams p) {
  using A = typename Acc<T>::type;
  constexpr int IT = EPT / VEC;
  __shared__ A smem[64];
  const int64_t r = team_index<TEAM>();
  if (r >= p.rows) return;
  const int64_t D = p.dim;
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  const T* w = static_cast<const T*>(p.weight);
  const T* wd = static_cast<const T*>(p.weight_dot);
  A xv[IT][VEC], xd[IT][VEC];
  load_row<T, VEC, TEAM>(static_cast<const T*>(p.x) + r * D, D, xv);
  if (p.x_dot != nullptr) load_row<T, VEC, TEAM>(static_cast<const T*>(p.x_dot) + r * D, D, xd);
  A ss = 0, m = 0;
#pragma unroll
  for (int it = 0; it < IT; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ss += xv[it][k] * xv[it][k];
      if (p.x_dot != nullptr) m += xv[it][k] * xd[it][k];
    }
  team_sum2<TEAM>(ss, m, smem);
  const A rstd = A(1) / sqrt(ss / A(D) + A(p.eps));
  if (lane == 0) static_cast<A*>(p.rstd)[r] = rstd;
  m /= A(D);
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c >= D) continue;
    A wv[VEC], od[VEC], o[VEC];
    load_vec<T, VEC>(w + c, wv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = xv[it][k] * rstd * wv[k];
    store_vec<T, VEC>(static_cast<T*>(p.out) + r * D + c, o);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      od[k] = p.x_dot != nullptr ? wv[k] * (xd[it][k] - xv[it][k] * rstd * rstd * m) * rstd : A(0);
    if (wd != nullptr) {
      load_vec<T, VEC>(wd + c, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) od[k] += xv[it][k] * rstd * wv[k];
    }
    store_vec<T, VEC>(static_cast<T*>(p.out_dot) + r * D + c, od);
  }
}

// dx = rstd * (g * w - x * rstd^2 * mean(g * w * x)); weight partials sum g * x * rstd.
template <typename T, int VEC, int TEAM, int EPT>
__global__ void __launch_bounds__(TEAM ? kTeamBlockThreads : kRowThreads) rms_norm_bwd_kernel(const RmsNormParams p) {
  using A = typename Acc<T>::type;
  constexpr int IT = EPT / VEC;
  __shared__ A smem[64];
  const int64_t item = team_index<TEAM>();
  if (item >= ceil_div(p.rows, p.chunk_rows)) return;
  const int64_t D = p.dim;
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  const T* w = static_cast<const T*>(p.weight);
  A pw[IT][VEC];
#pragma unroll
  for (int it = 0; it < IT; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) pw[it][k] = A(0);
  const int64_t r1 = min(p.rows, (item + 1) * p.chunk_rows);
  for (int64_t r = item * p.chunk_rows; r < r1; ++r) {
    const A rstd = static_cast<const A*>(p.rstd)[r];
    A xv[IT][VEC], gw[IT][VEC];
    A m = 0, unused = 0;
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int64_t c = (int64_t(it) * ts + lane) * VEC;
      if (c >= D) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv[it][k] = gw[it][k] = A(0);
        continue;
      }
      A gv[VEC], wv[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.x) + r * D + c, xv[it]);
      load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + r * D + c, gv);
      load_vec<T, VEC>(w + c, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        gw[it][k] = gv[k] * wv[k];
        pw[it][k] += gv[k] * xv[it][k] * rstd;
        m += gw[it][k] * xv[it][k];
      }
    }
    team_sum2<TEAM>(m, unused, smem);
    m /= A(D);
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int64_t c = (int64_t(it) * ts + lane) * VEC;
      if (c >= D) continue;
      A dx[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) dx[k] = rstd * (gw[it][k] - xv[it][k] * rstd * rstd * m);
      store_vec<T, VEC>(static_cast<T*>(p.grad_x) + r * D + c, dx);
    }
  }
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c < D) store_vec<A, VEC>(static_cast<A*>(p.part_weight) + item * D + c, pw[it]);
  }
}


}  // namespace

cudaError_t rms_norm_fwd(const RmsNormParams& p, cudaStream_t stream) {
  return launch_row_kernel(p.dtype, p.dim, {p.x, p.weight, p.out}, {}, p, p.rows, stream,
                           DMF_ROW_KERNEL(rms_norm_fwd_kernel));
}

cudaError_t rms_norm_jvp(const RmsNormParams& p, cudaStream_t stream) {
  return launch_row_kernel(p.dtype, p.dim, {p.x, p.weight, p.out, p.x_dot, p.weight_dot, p.out_dot}, {}, p, p.rows,
                           stream, DMF_ROW_KERNEL(rms_norm_jvp_kernel));
}

cudaError_t rms_norm_bwd(const RmsNormParams& p, cudaStream_t stream) {
  return launch_row_kernel(p.dtype, p.dim, {p.x, p.weight, p.grad_out, p.grad_x, p.part_weight}, {}, p,
                           ceil_div(p.rows, p.chunk_rows), stream, DMF_ROW_KERNEL(rms_norm_bwd_kernel));
}

}  // namespace cuda
}  // namespace dmf
