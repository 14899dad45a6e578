// CUDA kernels of rope (interleaved pairs, LightningDiT / EVA rotate_half): for the pair
// (x0, x1) of row r at position n = r % seq, out = (x0 c0 - x1 s0, x1 c1 + x0 s1); with
// p.transpose (the backward) out = (x0 c0 + x1 s1, x1 c1 - x0 s0). The jvp rotates x and x_dot
// with one read of the tables.
//
// Elementwise over pairs, so the launch is flat: one thread per VEC elements (VEC / 2 whole
// pairs) of one row, rows * D / VEC threads in 256-thread blocks; head dims (64, 72) are 16 or
// 18 float vectors, which a row team would round up to a warp. With 16-byte alignment VEC is a
// 16-byte vector of x (4 fp32, 8 bf16/fp16, 2 fp64) and the fp32/fp64 table rows are read
// as 16-byte vectors too; otherwise VEC = 2 (one pair) with scalar loads. VEC is always even,
// so a pair never straddles two threads.
#include "cuda_common.cuh"
#include "launch.h"

namespace dmf {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC, bool VECTOR, typename A>
__device__ __forceinline__ void load_n(const T* p, A (&v)[VEC]) {
  if (VECTOR) {
    load_vec<T, VEC>(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_acc(p[k]);
  }
}

template <typename T, int VEC, bool VECTOR, typename A>
__device__ __forceinline__ void store_n(T* p, const A (&v)[VEC]) {
  if (VECTOR) {
    store_vec<T, VEC>(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = from_acc<T>(v[k]);
  }
}

// Rotates the VEC / 2 pairs of x; k ^ 1 is the partner of element k in its pair.
template <int VEC, typename A>
__device__ __forceinline__ void rotate(const A (&x)[VEC], const A (&c)[VEC], const A (&s)[VEC], bool transpose,
                                       A (&o)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int q = k ^ 1;
    if (!transpose) o[k] = x[k] * c[k] + ((k & 1) ? x[q] : -x[q]) * s[k];
    else o[k] = x[k] * c[k] + ((k & 1) ? -x[q] * s[q] : x[q] * s[q]);
  }
}

template <typename T, int VEC, bool VECTOR>
__global__ void __launch_bounds__(kThreads) rope_kernel(const RopeParams p) {
  using A = typename Acc<T>::type;
  const int64_t D = p.dim, nvec = D / VEC;  // D is even, VEC divides it
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.rows * nvec) return;
  // (t % nvec) * VEC, not (t - r * nvec) * VEC: with the latter nvcc loses that c is a multiple of
  // VEC and splits the 16-byte stores into scalar ones (loads stay vectors)
  const int64_t r = t / nvec, c = (t % nvec) * VEC;
  const int64_t tab = (r % p.seq) * D + c;
  A cv[VEC], sv[VEC], x[VEC], o[VEC];
  load_n<A, VEC, VECTOR>(static_cast<const A*>(p.cos) + tab, cv);
  load_n<A, VEC, VECTOR>(static_cast<const A*>(p.sin) + tab, sv);
  load_n<T, VEC, VECTOR>(static_cast<const T*>(p.x) + row_offset(p.x_rows, r) + c, x);
  rotate<VEC>(x, cv, sv, p.transpose, o);
  store_n<T, VEC, VECTOR>(static_cast<T*>(p.out) + r * D + c, o);
  if (p.out_dot == nullptr) return;
  if (p.x_dot != nullptr) {
    load_n<T, VEC, VECTOR>(static_cast<const T*>(p.x_dot) + row_offset(p.x_dot_rows, r) + c, x);
    rotate<VEC>(x, cv, sv, p.transpose, o);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = A(0);
  }
  store_n<T, VEC, VECTOR>(static_cast<T*>(p.out_dot) + r * D + c, o);
}

cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const bool vec = vec_ok(p.dim, sizeof(T), {p.x, p.x_dot, p.out, p.out_dot, p.cos, p.sin},
                            {p.x_rows.s0, p.x_rows.s1, p.x_rows.s2, p.x_dot_rows.s0, p.x_dot_rows.s1, p.x_dot_rows.s2});
    auto go = [&](auto v, auto vector) {
      constexpr int VEC = decltype(v)::value;
      const int64_t blocks = ceil_div(p.rows * (p.dim / VEC), kThreads);
      if (blocks > kMaxGridX) {  // checked before the unsigned cast
        err = cudaErrorInvalidConfiguration;
        return;
      }
      void* args[] = {const_cast<RopeParams*>(&p)};
      err = cudaLaunchKernel(&rope_kernel<T, VEC, decltype(vector)::value>, dim3(static_cast<unsigned>(blocks)),
                             dim3(kThreads), args, 0, stream);
    };
    if (vec) go(std::integral_constant<int, 16 / sizeof(T)>{}, std::true_type{});
    else go(std::integral_constant<int, 2>{}, std::false_type{});
  });
  return err;
}

}  // namespace

cudaError_t rope_fwd(const RopeParams& p, cudaStream_t stream) { return launch(p, stream); }
cudaError_t rope_jvp(const RopeParams& p, cudaStream_t stream) { return launch(p, stream); }
cudaError_t rope_bwd(const RopeParams& p, cudaStream_t stream) { return launch(p, stream); }

}  // namespace cuda
}  // namespace dmf
