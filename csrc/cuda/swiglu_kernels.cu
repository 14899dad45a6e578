// CUDA kernels of swiglu: h = silu(a) * b with [a, b] the two halves of each row of x (read in
// place through x's RowStrides), its tangent in the same pass, and its backward.
//
// Elementwise with no reduction, so the launch is flat: one thread per VEC columns of one row
// of h, rows * H / VEC threads in 256-thread blocks. Short rows (H = 72 in bf16 is 9 vectors)
// then fill every lane, where a team per row would leave most of a warp idle. a and b are
// H elements apart: with H % VEC == 0 both halves of a 16-byte-aligned row are 16-byte aligned.
#include "cuda_common.cuh"
#include "launch.h"

namespace dmf {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// 1 / (1 + exp(-a)): full-precision exp (the three-way bound compares with eager's sigmoid);
// NaN stays NaN, large |a| saturates to 0 / 1.
__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }
__device__ __forceinline__ double sigmoid(double a) { return 1.0 / (1.0 + exp(-a)); }

// h (when p.h) and h_dot (when p.h_dot) = silu'(a) a_dot b + silu(a) b_dot, x_dot nullptr: 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_jvp_kernel(const SwigluParams p) {
  using A = typename Acc<T>::type;
  const int64_t H = p.dim, nvec = H / VEC;  // VEC divides H (vec_ok) or is 1
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.rows * nvec) return;
  // (t % nvec) * VEC, not (t - r * nvec) * VEC: with the latter nvcc loses that c is a multiple of
  // VEC and splits the 16-byte stores into scalar ones (loads stay vectors)
  const int64_t r = t / nvec, c = (t % nvec) * VEC;
  const T* xa = static_cast<const T*>(p.x) + row_offset(p.x_rows, r) + c;
  A a[VEC], b[VEC], s[VEC], o[VEC];
  load_vec<T, VEC>(xa, a);
  load_vec<T, VEC>(xa + H, b);
#pragma unroll
  for (int k = 0; k < VEC; ++k) s[k] = sigmoid(a[k]);
  if (p.h != nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = a[k] * s[k] * b[k];
    store_vec<T, VEC>(static_cast<T*>(p.h) + r * H + c, o);
  }
  if (p.h_dot == nullptr) return;
  if (p.x_dot != nullptr) {
    const T* xda = static_cast<const T*>(p.x_dot) + row_offset(p.x_dot_rows, r) + c;
    A ad[VEC], bd[VEC];
    load_vec<T, VEC>(xda, ad);
    load_vec<T, VEC>(xda + H, bd);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      o[k] = s[k] * (A(1) + a[k] * (A(1) - s[k])) * ad[k] * b[k] + a[k] * s[k] * bd[k];
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = A(0);
  }
  store_vec<T, VEC>(static_cast<T*>(p.h_dot) + r * H + c, o);
}

// grad_x = [g b silu'(a), g silu(a)]
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(const SwigluParams p) {
  using A = typename Acc<T>::type;
  const int64_t H = p.dim, nvec = H / VEC;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.rows * nvec) return;
  // (t % nvec) * VEC, not (t - r * nvec) * VEC: with the latter nvcc loses that c is a multiple of
  // VEC and splits the 16-byte stores into scalar ones (loads stay vectors)
  const int64_t r = t / nvec, c = (t % nvec) * VEC;
  const T* xa = static_cast<const T*>(p.x) + row_offset(p.x_rows, r) + c;
  A a[VEC], b[VEC], g[VEC], da[VEC], db[VEC];
  load_vec<T, VEC>(xa, a);
  load_vec<T, VEC>(xa + H, b);
  load_vec<T, VEC>(static_cast<const T*>(p.grad_h) + r * H + c, g);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const A s = sigmoid(a[k]);
    da[k] = g[k] * b[k] * s * (A(1) + a[k] * (A(1) - s));
    db[k] = g[k] * a[k] * s;
  }
  T* dx = static_cast<T*>(p.grad_x) + r * 2 * H + c;
  store_vec<T, VEC>(dx, da);
  store_vec<T, VEC>(dx + H, db);
}

template <typename MakeKernel>
cudaError_t launch(const SwigluParams& p, std::initializer_list<const void*> ptrs, cudaStream_t stream,
                   MakeKernel&& make_kernel) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const bool vec = vec_ok(p.dim, sizeof(T), ptrs,
                            {p.x_rows.s0, p.x_rows.s1, p.x_rows.s2, p.x_dot_rows.s0, p.x_dot_rows.s1, p.x_dot_rows.s2});
    auto go = [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const int64_t blocks = ceil_div(p.rows * (p.dim / VEC), kThreads);
      if (blocks > kMaxGridX) {  // checked before the unsigned cast
        err = cudaErrorInvalidConfiguration;
        return;
      }
      void* args[] = {const_cast<SwigluParams*>(&p)};
      err = cudaLaunchKernel(make_kernel(t, v), dim3(static_cast<unsigned>(blocks)), dim3(kThreads), args, 0, stream);
    };
    if (vec && sizeof(T) < 8) go(std::integral_constant<int, 16 / sizeof(T)>{});
    else go(std::integral_constant<int, 1>{});
  });
  return err;
}

}  // namespace

cudaError_t swiglu_fwd(const SwigluParams& p, cudaStream_t stream) {
  SwigluParams q = p;  // the fused kernel: primal only
  q.h_dot = nullptr, q.x_dot = nullptr;
  return swiglu_jvp(q, stream);
}

cudaError_t swiglu_jvp(const SwigluParams& p, cudaStream_t stream) {
  return launch(p, {p.x, p.x_dot, p.h, p.h_dot}, stream,
                [](auto t, auto v) { return &swiglu_fwd_jvp_kernel<decltype(t), decltype(v)::value>; });
}

cudaError_t swiglu_bwd(const SwigluParams& p, cudaStream_t stream) {
  return launch(p, {p.x, p.grad_h, p.grad_x}, stream,
                [](auto t, auto v) { return &swiglu_bwd_kernel<decltype(t), decltype(v)::value>; });
}

}  // namespace cuda
}  // namespace dmf
