// CUDA kernels of gated_residual: out = x + gate * y, its tangent and its backward.
//
// Elementwise, so tiled by columns: VEC columns per thread, one block per (chunk of
// `chunk_rows` rows of one gate group, column tile). A tile is the whole row's vectors
// rounded up to a warp, at most kMaxThreads: D=1152 bf16 is 144 vectors, one 160-thread tile
// (fixed 128-thread tiles took two, the second 16/128 busy: 56% of lanes). The gate row is
// loaded once per chunk; the backward keeps the gate-gradient sum of its columns over the
// chunk in registers and writes one partial row: deterministic, no atomics.
#include <algorithm>

#include "cuda_common.cuh"
#include "launch.h"

namespace dmf {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;

struct Chunk {
  int64_t g, r0, r1, c;
  bool valid;
};

__device__ __forceinline__ Chunk chunk_of(const GatedResidualParams& p, int vec) {
  const int64_t chunks = ceil_div(p.rows_per_group, p.chunk_rows);
  const int64_t item = blockIdx.x;
  Chunk ch;
  ch.g = item / chunks;
  ch.r0 = ch.g * p.rows_per_group + (item % chunks) * p.chunk_rows;
  ch.r1 = min(min(ch.r0 + p.chunk_rows, (ch.g + 1) * p.rows_per_group), p.rows);  // the last group may be partial
  ch.c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * vec;
  ch.valid = ch.c < p.dim;
  return ch;
}

// out (when p.out) and out_dot (when p.out_dot) = x_dot + gate_dot * y + gate * y_dot.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gated_residual_fwd_jvp_kernel(const GatedResidualParams p) {
  using A = typename Acc<T>::type;
  const Chunk ch = chunk_of(p, VEC);
  if (!ch.valid) return;
  const int64_t D = p.dim;
  A gv[VEC], gd[VEC];
  load_vec<T, VEC>(static_cast<const T*>(p.gate.ptr) + ch.g * p.gate.row_stride + ch.c, gv);
  if (p.gate_dot.ptr != nullptr)
    load_vec<T, VEC>(static_cast<const T*>(p.gate_dot.ptr) + ch.g * p.gate_dot.row_stride + ch.c, gd);
  for (int64_t r = ch.r0; r < ch.r1; ++r) {
    const int64_t off = r * D + ch.c;
    A yv[VEC], v[VEC], o[VEC];
    load_vec<T, VEC>(static_cast<const T*>(p.y) + off, yv);
    if (p.out != nullptr) {
      load_vec<T, VEC>(static_cast<const T*>(p.x) + off, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = v[k] + gv[k] * yv[k];
      store_vec<T, VEC>(static_cast<T*>(p.out) + off, o);
    }
    if (p.out_dot != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = A(0);
      if (p.x_dot != nullptr) load_vec<T, VEC>(static_cast<const T*>(p.x_dot) + off, o);
      if (p.gate_dot.ptr != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] += gd[k] * yv[k];
      }
      if (p.y_dot != nullptr) {
        load_vec<T, VEC>(static_cast<const T*>(p.y_dot) + off, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] += gv[k] * v[k];
      }
      store_vec<T, VEC>(static_cast<T*>(p.out_dot) + off, o);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gated_residual_bwd_kernel(const GatedResidualParams p) {
  using A = typename Acc<T>::type;
  const Chunk ch = chunk_of(p, VEC);
  if (!ch.valid) return;
  const int64_t D = p.dim;
  A gv[VEC], acc[VEC];
  load_vec<T, VEC>(static_cast<const T*>(p.gate.ptr) + ch.g * p.gate.row_stride + ch.c, gv);
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = A(0);
  for (int64_t r = ch.r0; r < ch.r1; ++r) {
    const int64_t off = r * D + ch.c;
    A go[VEC], yv[VEC], dy[VEC];
    load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + off, go);
    load_vec<T, VEC>(static_cast<const T*>(p.y) + off, yv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dy[k] = go[k] * gv[k];
      acc[k] += go[k] * yv[k];
    }
    store_vec<T, VEC>(static_cast<T*>(p.grad_y) + off, dy);
  }
  store_vec<A, VEC>(static_cast<A*>(p.part_gate) + int64_t(blockIdx.x) * D + ch.c, acc);
}

template <typename MakeKernel>
cudaError_t launch(const GatedResidualParams& p, std::initializer_list<const void*> ptrs, cudaStream_t stream,
                   MakeKernel&& make_kernel) {
  if (p.rows == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const bool vec = vec_ok(p.dim, sizeof(T), ptrs, {p.gate.row_stride, p.gate_dot.row_stride});
    auto go = [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const int64_t items = ceil_div(p.rows, p.rows_per_group) * ceil_div(p.rows_per_group, p.chunk_rows);
      const int64_t nvec = ceil_div(p.dim, VEC);
      const int64_t threads = std::min<int64_t>(ceil_div(nvec, 32) * 32, kMaxThreads);
      const int64_t col_tiles = ceil_div(nvec, threads);
      if (items > kMaxGridX || col_tiles > kMaxGridY) {  // checked before the unsigned casts
        err = cudaErrorInvalidConfiguration;
        return;
      }
      const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(col_tiles));
      void* args[] = {const_cast<GatedResidualParams*>(&p)};
      err = cudaLaunchKernel(make_kernel(t, v), grid, dim3(static_cast<unsigned>(threads)), args, 0, stream);
    };
    if (vec && sizeof(T) < 8) go(std::integral_constant<int, 16 / sizeof(T)>{});
    else go(std::integral_constant<int, 1>{});
  });
  return err;
}

}  // namespace

cudaError_t gated_residual_fwd(const GatedResidualParams& p, cudaStream_t stream) {
  GatedResidualParams q = p;  // the fused kernel: primal only
  q.out_dot = nullptr;
  return gated_residual_jvp(q, stream);
}

// The forward / JVP writes no partials, so its chunks need not match the backward's: 4-row
// chunks (the gate row, an L2 hit, is read once per chunk) give 8x the blocks of 32-row ones
// (B*N=16384, D=1152 bf16: 4096 blocks of 160 threads, ~4 waves at 7 blocks/SM on 132 SMs,
// where 512 blocks left each SM a quarter full and each thread a serial 32-row loop).
constexpr int64_t kFwdChunkRows = 4;

cudaError_t gated_residual_jvp(const GatedResidualParams& p_in, cudaStream_t stream) {
  GatedResidualParams p = p_in;
  p.chunk_rows = std::min(p.chunk_rows, kFwdChunkRows);
  return launch(p, {p.x, p.y, p.out, p.x_dot, p.y_dot, p.out_dot, p.gate.ptr, p.gate_dot.ptr}, stream,
                [](auto t, auto v) { return &gated_residual_fwd_jvp_kernel<decltype(t), decltype(v)::value>; });
}

cudaError_t gated_residual_bwd(const GatedResidualParams& p, cudaStream_t stream) {
  return launch(p, {p.y, p.grad_out, p.grad_y, p.part_gate, p.gate.ptr}, stream,
                [](auto t, auto v) { return &gated_residual_bwd_kernel<decltype(t), decltype(v)::value>; });
}

}  // namespace cuda
}  // namespace dmf
