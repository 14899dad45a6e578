// Device helpers shared by the CUDA kernels: storage/accumulation types, 16-byte vector
// loads, row-team reductions, and the launch configuration of a row.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/params.h"

namespace dmf {
namespace cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return v; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_acc(pk.v[k]);
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A row is processed by a team: one warp (WARP, for short rows; blockDim = (32, rows per
// block)) or one whole block (blockDim.x threads). Both sums are reduced in a fixed order,
// so results are bitwise reproducible run to run.
template <bool WARP, typename A>
__device__ __forceinline__ void team_sum2(A& a, A& b, A* smem /* 2 * 32 */) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (WARP) return;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // smem may still be read from the previous reduction
  if (lane == 0) {
    smem[wid] = a;
    smem[32 + wid] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
  for (int i = 0; i < nw; ++i) {
    a += smem[i];
    b += smem[32 + i];
  }
}

template <bool WARP>
__device__ __forceinline__ int team_lane() { return threadIdx.x; }
template <bool WARP>
__device__ __forceinline__ int team_size() { return WARP ? 32 : blockDim.x; }
// Index of this team among all teams of the launch.
template <bool WARP>
__device__ __forceinline__ int64_t team_index() {
  return WARP ? int64_t(blockIdx.x) * blockDim.y + threadIdx.y : int64_t(blockIdx.x);
}

// Launch shape for rows of `dim` elements read `vec` at a time. Short rows (at most 128
// vectors) get one warp each, 4 rows per 128-thread block; longer rows one block of up to
// 512 threads (launch bound: 128 registers per thread). Each thread keeps EPT elements of
// the row in registers, the smallest of 8, 16, 32 that holds its share: per-thread arrays
// sized for 16 when 8 suffice cost registers and occupancy (norm_mod_bwd, bf16, D=1152:
// 160 threads hold 8 elements each; EPT=16 compiled to 128 registers, 3 blocks/SM, so the
// 512 teams of B*N=16384 rows took two waves on 132 SMs; EPT=8 fits one).
constexpr int kRowThreads = 512;
// CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535. Launchers check before
// casting to unsigned (an unchecked cast would launch a wrapped, smaller grid).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

struct RowLaunch {
  bool warp;
  int ept;             // elements per thread: 8, 16 or 32
  int threads;         // threads per row team
  int rows_per_block;  // teams per block
};

inline int ept_for(int64_t per_thread) { return per_thread <= 8 ? 8 : per_thread <= 16 ? 16 : 32; }

inline RowLaunch row_launch(int64_t dim, int vec) {
  const int64_t nvec = ceil_div(dim, vec);
  if (nvec <= 32 * 4 && nvec * vec <= 32 * 16)
    return RowLaunch{true, ept_for(ceil_div(nvec, 32) * vec), 32, 4};
  int64_t threads = ceil_div(nvec, 32) * 32;
  if (threads > kRowThreads) threads = kRowThreads;
  return RowLaunch{false, ept_for(ceil_div(nvec, threads) * vec), static_cast<int>(threads), 1};
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte vectors are used when every row start is 16-byte aligned.
inline bool vec_ok(int64_t dim, int elem_size, std::initializer_list<const void*> ptrs,
                   std::initializer_list<int64_t> strides) {
  const int64_t vec = 16 / elem_size;
  if (dim % vec != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  for (int64_t s : strides)
    if (s % vec != 0) return false;
  return true;
}

// Calls f(T{}) with T the CUDA storage type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat64: f(double{}); break;
  }
}

// Calls f(integral_constant<int, VEC>, integral_constant<bool, WARP>, integral_constant<int, EPT>).
// fp64 is never vectorised (exact checks only: fewer instantiations).
template <typename T, typename F>
void dispatch_shape(bool vectorise, const RowLaunch& L, F&& f) {
  constexpr int kVec = sizeof(T) == 8 ? 1 : 16 / sizeof(T);
  auto by_vec = [&](auto v) {
    if (L.warp) {
      if (L.ept == 8) f(v, std::true_type{}, std::integral_constant<int, 8>{});
      else f(v, std::true_type{}, std::integral_constant<int, 16>{});
    } else if (L.ept == 8) f(v, std::false_type{}, std::integral_constant<int, 8>{});
    else if (L.ept == 16) f(v, std::false_type{}, std::integral_constant<int, 16>{});
    else f(v, std::false_type{}, std::integral_constant<int, 32>{});
  };
  if (vectorise && kVec > 1) by_vec(std::integral_constant<int, kVec>{});
  else by_vec(std::integral_constant<int, 1>{});
}

inline int row_vec(bool vectorise, int elem_size) { return vectorise && elem_size < 8 ? 16 / elem_size : 1; }

// Launches a row-team kernel: picks 16-byte vectors when every pointer and stride allows,
// the team shape for `dim`, and the instantiation make_kernel(T{}, VEC, WARP, EPT) returns;
// `params` is the kernel's only argument, `teams` the number of row teams.
template <typename Params, typename MakeKernel>
cudaError_t launch_row_kernel(DType dtype, int64_t dim, std::initializer_list<const void*> ptrs,
                              std::initializer_list<int64_t> strides, const Params& params, int64_t teams,
                              cudaStream_t stream, MakeKernel&& make_kernel) {
  if (teams == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const bool vec = vec_ok(dim, sizeof(T), ptrs, strides);
    const RowLaunch L = row_launch(dim, row_vec(vec, sizeof(T)));
    const int64_t blocks = ceil_div(teams, L.rows_per_block);
    if (blocks > kMaxGridX) {
      err = cudaErrorInvalidConfiguration;
      return;
    }
    dispatch_shape<T>(vec, L, [&](auto v, auto w, auto e) {
      const dim3 block(L.threads, L.rows_per_block);
      const dim3 grid(static_cast<unsigned>(blocks));
      void* args[] = {const_cast<Params*>(&params)};
      err = cudaLaunchKernel(make_kernel(t, v, w, e), grid, block, args, 0, stream);
    });
  });
  return err;
}

// The kernel template instantiation for launch_row_kernel's make_kernel arguments.
#define DMF_ROW_KERNEL(kernel)                                                                  \
  [](auto t, auto v, auto w, auto e) {                                                          \
    return reinterpret_cast<const void*>(                                                       \
        kernel<decltype(t), decltype(v)::value, decltype(w)::value, decltype(e)::value>);       \
  }

}  // namespace cuda
}  // namespace dmf
