// CUDA kernels of the LayerNorm-and-modulate family (adaln_modulate, gated_residual_adaln) and
// its RMS kind (rms_adaln_modulate, gated_residual_rms_adaln): p.rms makes the row mean 0 (one
// team reduction fewer, the mean(tangent) / mean(gradient) terms drop), p.weight multiplies the
// normalised row, and shift may be absent. All three are uniform per launch (params.h).
//
// One team (8, 16 or 32 lanes of a warp for rows of at most 128 vectors, else one block of
// up to 512 threads) per row; the row lives in registers (8, 16 or 32 elements per thread, see row_launch), so x is read from
// memory once per pass: fwd reads x (+ gate, y) and writes out (+ x_out); jvp additionally
// reads the tangents and writes out_dot. Statistics by the exact two-pass formula over
// the registers, in fp32 (fp64 for fp64). The backward gives each team a chunk of
// `chunk_rows` rows of one parameter group and keeps the shift/scale/gate sums of its
// columns in registers, then writes them as partials: deterministic, no atomics.
#include "cuda_common.cuh"
#include "launch.h"

namespace dmf {
namespace cuda {
namespace {

template <typename T, int VEC, int TEAM, typename A, int IT>
__device__ __forceinline__ void load_input(const NormModFwdParams& p, int64_t r, A (&xv)[IT][VEC], bool residual) {
  const int64_t D = p.dim;
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  const T* xr = static_cast<const T*>(p.x) + r * D;
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c < D) {
      load_vec<T, VEC>(xr + c, xv[it]);
      if (residual) {
        A gv[VEC], yv[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.gate.ptr) + (r / p.rows_per_group) * p.gate.row_stride + c, gv);
        load_vec<T, VEC>(static_cast<const T*>(p.y) + r * D + c, yv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv[it][k] = to_acc(from_acc<T>(xv[it][k] + gv[k] * yv[k]));
        store_vec<T, VEC>(static_cast<T*>(p.x_out) + r * D + c, xv[it]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) xv[it][k] = A(0);
    }
  }
}

template <typename T, int VEC, int TEAM, typename A, int IT>
__device__ __forceinline__ void row_stats(const A (&xv)[IT][VEC], int64_t D, double eps, bool rms, A* smem, A& mean,
                                          A& rstd) {
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  A s = 0, unused = 0;
  if (!rms) {  // uniform per launch: every lane of the team takes the same branch to the barrier
#pragma unroll
    for (int it = 0; it < IT; ++it)
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += xv[it][k];  // masked entries are 0
    team_sum2<TEAM>(s, unused, smem);
  }
  mean = s / A(D);
  unused = 0;
  A ss = 0;
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    if ((int64_t(it) * ts + lane) * VEC < D) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += (xv[it][k] - mean) * (xv[it][k] - mean);
    }
  }
  team_sum2<TEAM>(ss, unused, smem);
  rstd = A(1) / sqrt(ss / A(D) + A(eps));
}

// e = (1 + scale) (* weight) at columns [c, c + VEC), and the shift there (0 when absent).
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_modulation(const T* sc, const T* w, const T* sh, int64_t c, A (&e)[VEC],
                                                A (&shv)[VEC]) {
  load_vec<T, VEC>(sc + c, e);
#pragma unroll
  for (int k = 0; k < VEC; ++k) e[k] += A(1);
  if (w != nullptr) {
    A wv[VEC];
    load_vec<T, VEC>(w + c, wv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) e[k] *= wv[k];
  }
  if (sh != nullptr) {
    load_vec<T, VEC>(sh + c, shv);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) shv[k] = A(0);
  }
}

template <typename T, int VEC, int TEAM, int EPT>
__global__ void __launch_bounds__(TEAM ? kTeamBlockThreads : kRowThreads) norm_mod_fwd_kernel(const NormModFwdParams p) {
  using A = typename Acc<T>::type;
  constexpr int IT = EPT / VEC;
  __shared__ A smem[64];
  const int64_t r = team_index<TEAM>();
  if (r >= p.rows) return;  // uniform per team
  const int64_t D = p.dim, g = r / p.rows_per_group;
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  A xv[IT][VEC];
  load_input<T, VEC, TEAM>(p, r, xv, p.gate.ptr != nullptr);
  A mean, rstd;
  row_stats<T, VEC, TEAM>(xv, D, p.eps, p.rms, smem, mean, rstd);
  if (lane == 0) {
    if (!p.rms) static_cast<A*>(p.mean)[r] = mean;
    static_cast<A*>(p.rstd)[r] = rstd;
  }
  const T* sh = p.shift.ptr == nullptr ? nullptr : static_cast<const T*>(p.shift.ptr) + g * p.shift.row_stride;
  const T* sc = static_cast<const T*>(p.scale.ptr) + g * p.scale.row_stride;
  const T* w = static_cast<const T*>(p.weight.ptr);
  T* o = static_cast<T*>(p.out) + r * D;
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c < D) {
      A shv[VEC], e[VEC], ov[VEC];
      load_modulation<T, VEC>(sc, w, sh, c, e, shv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ov[k] = (xv[it][k] - mean) * rstd * e[k] + shv[k];
      store_vec<T, VEC>(o + c, ov);
    }
  }
}

template <typename T, int VEC, int TEAM, int EPT>
__global__ void __launch_bounds__(TEAM ? kTeamBlockThreads : kRowThreads) norm_mod_jvp_kernel(const NormModJvpParams q) {
  using A = typename Acc<T>::type;
  constexpr int IT = EPT / VEC;
  __shared__ A smem[64];
  const NormModFwdParams& p = q.p;
  const int64_t r = team_index<TEAM>();
  if (r >= p.rows) return;
  const int64_t D = p.dim, g = r / p.rows_per_group;
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  const bool residual = p.gate.ptr != nullptr;
  const bool residual_tangent = residual && (q.gate_dot.ptr != nullptr || q.y_dot != nullptr);
  const bool x_tangent = q.x_dot != nullptr || residual_tangent;

  A xv[IT][VEC];
  A mean, rstd;
  load_input<T, VEC, TEAM>(p, r, xv, residual);
  row_stats<T, VEC, TEAM>(xv, D, p.eps, p.rms, smem, mean, rstd);
  if (lane == 0) {
    if (!p.rms) static_cast<A*>(p.mean)[r] = mean;
    static_cast<A*>(p.rstd)[r] = rstd;
  }
  const T* sh = p.shift.ptr == nullptr ? nullptr : static_cast<const T*>(p.shift.ptr) + g * p.shift.row_stride;
  const T* sc = static_cast<const T*>(p.scale.ptr) + g * p.scale.row_stride;
  const T* w = static_cast<const T*>(p.weight.ptr);
  // xv <- xh; out; td <- tangent of the normalised input; partial sums for its projection.
  A td[IT][VEC];
  A m1 = 0, m2 = 0;
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) td[it][k] = A(0);
    if (c >= D) continue;
#pragma unroll
    for (int k = 0; k < VEC; ++k) xv[it][k] = (xv[it][k] - mean) * rstd;
    A shv[VEC], e[VEC], ov[VEC];
    load_modulation<T, VEC>(sc, w, sh, c, e, shv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) ov[k] = xv[it][k] * e[k] + shv[k];
    store_vec<T, VEC>(static_cast<T*>(p.out) + r * D + c, ov);
    if (q.x_dot != nullptr) load_vec<T, VEC>(static_cast<const T*>(q.x_dot) + r * D + c, td[it]);
    if (residual_tangent) {
      A yv[VEC], gv[VEC], v[VEC];
      if (q.gate_dot.ptr != nullptr) {
        load_vec<T, VEC>(static_cast<const T*>(q.gate_dot.ptr) + g * q.gate_dot.row_stride + c, gv);
        load_vec<T, VEC>(static_cast<const T*>(p.y) + r * D + c, yv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) td[it][k] += gv[k] * yv[k];
      }
      if (q.y_dot != nullptr) {
        load_vec<T, VEC>(static_cast<const T*>(p.gate.ptr) + g * p.gate.row_stride + c, gv);
        load_vec<T, VEC>(static_cast<const T*>(q.y_dot) + r * D + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) td[it][k] += gv[k] * v[k];
      }
    }
    if (residual) store_vec<T, VEC>(static_cast<T*>(q.x_out_dot) + r * D + c, td[it]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      m1 += td[it][k];
      m2 += xv[it][k] * td[it][k];
    }
  }
  if (x_tangent) {
    team_sum2<TEAM>(m1, m2, smem);
    m1 = p.rms ? A(0) : m1 / A(D);  // rms: no mean, so no mean(td) term
    m2 /= A(D);
  }
  const T* wd = static_cast<const T*>(q.weight_dot.ptr);  // only with a weight
  const T* shd = q.shift_dot.ptr == nullptr ? nullptr : static_cast<const T*>(q.shift_dot.ptr) + g * q.shift_dot.row_stride;
  const T* scd = q.scale_dot.ptr == nullptr ? nullptr : static_cast<const T*>(q.scale_dot.ptr) + g * q.scale_dot.row_stride;
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c >= D) continue;
    A scv[VEC], v[VEC], od[VEC];
    load_vec<T, VEC>(sc + c, scv);
    if (w == nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        od[k] = x_tangent ? (td[it][k] - m1 - xv[it][k] * m2) * rstd * (A(1) + scv[k]) : A(0);
      if (scd != nullptr) {
        load_vec<T, VEC>(scd + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) od[k] += xv[it][k] * v[k];
      }
    } else {
      // y = xh * w * (1 + scale): y_dot = xh_dot * w * (1 + scale) + xh * (w * scale_dot + w_dot * (1 + scale)).
      A wv[VEC];
      load_vec<T, VEC>(w + c, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        od[k] = x_tangent ? (td[it][k] - m1 - xv[it][k] * m2) * rstd * wv[k] * (A(1) + scv[k]) : A(0);
      if (scd != nullptr) {
        load_vec<T, VEC>(scd + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) od[k] += xv[it][k] * wv[k] * v[k];
      }
      if (wd != nullptr) {
        load_vec<T, VEC>(wd + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) od[k] += xv[it][k] * v[k] * (A(1) + scv[k]);
      }
    }
    if (shd != nullptr) {
      load_vec<T, VEC>(shd + c, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) od[k] += v[k];
    }
    store_vec<T, VEC>(static_cast<T*>(q.out_dot) + r * D + c, od);
  }
}

template <typename T, int VEC, int TEAM, int EPT>
__global__ void __launch_bounds__(TEAM ? kTeamBlockThreads : kRowThreads) norm_mod_bwd_kernel(const NormModBwdParams p) {
  using A = typename Acc<T>::type;
  constexpr int IT = EPT / VEC;
  __shared__ A smem[64];
  const int64_t chunks = ceil_div(p.rows_per_group, p.chunk_rows);
  const int64_t item = team_index<TEAM>();
  if (item >= ceil_div(p.rows, p.rows_per_group) * chunks) return;
  const int64_t D = p.dim, g = item / chunks;
  const int64_t r0 = g * p.rows_per_group + (item % chunks) * p.chunk_rows;
  const int64_t r1 = min(min(r0 + p.chunk_rows, (g + 1) * p.rows_per_group), p.rows);  // last group may be partial
  const int lane = team_lane<TEAM>(), ts = team_size<TEAM>();
  const bool residual = p.gate.ptr != nullptr;
  const T* sc = static_cast<const T*>(p.scale.ptr) + g * p.scale.row_stride;
  const T* w = static_cast<const T*>(p.weight.ptr);
  const T* gate = residual ? static_cast<const T*>(p.gate.ptr) + g * p.gate.row_stride : nullptr;

  A ps[IT][VEC], pc[IT][VEC], pg[IT][VEC];
#pragma unroll
  for (int it = 0; it < IT; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) ps[it][k] = pc[it][k] = pg[it][k] = A(0);

  for (int64_t r = r0; r < r1; ++r) {
    const A mean = p.rms ? A(0) : static_cast<const A*>(p.mean)[r];
    const A rstd = static_cast<const A*>(p.rstd)[r];
    A xh[IT][VEC], gh[IT][VEC];
    A c1 = 0, c2 = 0;
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int64_t c = (int64_t(it) * ts + lane) * VEC;
      if (c >= D) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xh[it][k] = gh[it][k] = A(0);
        continue;
      }
      A gv[VEC], scv[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.x) + r * D + c, xh[it]);
      load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + r * D + c, gv);
      load_vec<T, VEC>(sc + c, scv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) scv[k] += A(1);
      if (w != nullptr) {  // gh = g * w * (1 + scale); pc stays sum(g * xh) (params.h)
        A wv[VEC];
        load_vec<T, VEC>(w + c, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) scv[k] *= wv[k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xh[it][k] = (xh[it][k] - mean) * rstd;
        gh[it][k] = gv[k] * scv[k];
        ps[it][k] += gv[k];
        pc[it][k] += gv[k] * xh[it][k];
        c1 += gh[it][k];
        c2 += gh[it][k] * xh[it][k];
      }
    }
    team_sum2<TEAM>(c1, c2, smem);
    c1 = p.rms ? A(0) : c1 / A(D);  // rms: no mean, so no mean(gh) term
    c2 /= A(D);
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int64_t c = (int64_t(it) * ts + lane) * VEC;
      if (c >= D) continue;
      A d[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] = (gh[it][k] - c1 - xh[it][k] * c2) * rstd;
      if (p.grad_x_out != nullptr) {
        A v[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.grad_x_out) + r * D + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) d[k] += v[k];
      }
      store_vec<T, VEC>(static_cast<T*>(p.grad_x) + r * D + c, d);
      if (residual) {
        A gv[VEC], yv[VEC], dy[VEC];
        load_vec<T, VEC>(gate + c, gv);
        load_vec<T, VEC>(static_cast<const T*>(p.y) + r * D + c, yv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dy[k] = d[k] * gv[k];
          pg[it][k] += d[k] * yv[k];
        }
        store_vec<T, VEC>(static_cast<T*>(p.grad_y) + r * D + c, dy);
      }
    }
  }
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int64_t c = (int64_t(it) * ts + lane) * VEC;
    if (c >= D) continue;
    if (p.part_shift != nullptr) store_vec<A, VEC>(static_cast<A*>(p.part_shift) + item * D + c, ps[it]);
    store_vec<A, VEC>(static_cast<A*>(p.part_scale) + item * D + c, pc[it]);
    if (residual) store_vec<A, VEC>(static_cast<A*>(p.part_gate) + item * D + c, pg[it]);
  }
}

}  // namespace

cudaError_t norm_mod_fwd(const NormModFwdParams& p, cudaStream_t stream) {
  return launch_row_kernel(p.dtype, p.dim,
                           {p.x, p.y, p.x_out, p.out, p.shift.ptr, p.scale.ptr, p.gate.ptr, p.weight.ptr},
                           {p.shift.row_stride, p.scale.row_stride, p.gate.row_stride}, p, p.rows, stream,
                           DMF_ROW_KERNEL(norm_mod_fwd_kernel));
}

cudaError_t norm_mod_jvp(const NormModJvpParams& q, cudaStream_t stream) {
  const NormModFwdParams& p = q.p;
  return launch_row_kernel(p.dtype, p.dim,
                           {p.x, p.y, p.x_out, p.out, p.shift.ptr, p.scale.ptr, p.gate.ptr, q.x_dot, q.y_dot,
                            q.x_out_dot, q.out_dot, q.gate_dot.ptr, q.shift_dot.ptr, q.scale_dot.ptr, p.weight.ptr,
                            q.weight_dot.ptr},
                           {p.shift.row_stride, p.scale.row_stride, p.gate.row_stride, q.gate_dot.row_stride,
                            q.shift_dot.row_stride, q.scale_dot.row_stride},
                           q, p.rows, stream, DMF_ROW_KERNEL(norm_mod_jvp_kernel));
}

cudaError_t norm_mod_bwd(const NormModBwdParams& p, cudaStream_t stream) {
  const int64_t items = ceil_div(p.rows, p.rows_per_group) * ceil_div(p.rows_per_group, p.chunk_rows);
  return launch_row_kernel(p.dtype, p.dim,
                           {p.grad_out, p.grad_x_out, p.x, p.y, p.grad_x, p.grad_y, p.scale.ptr, p.gate.ptr,
                            p.part_shift, p.part_scale, p.part_gate, p.weight.ptr},
                           {p.scale.row_stride, p.gate.row_stride}, p, items, stream,
                           DMF_ROW_KERNEL(norm_mod_bwd_kernel));
}

}  // namespace cuda
}  // namespace dmf
