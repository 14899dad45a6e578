// Device helpers shared by the CUDA kernels: storage/accumulation types, 16-byte vector
// loads, row-team reductions, and the launch configuration of a row.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

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

// At most 16-byte aligned: vec_ok checks 16 bytes, and a 32-byte Pack<float, 8> (the fp32
// partial sums of the bf16/fp16 backward) declared alignas(32) would be undefined behaviour at
// a 16- but not 32-byte aligned address. A 32-byte copy is two 16-byte accesses either way.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC < 16 ? sizeof(T) * VEC : 16) Pack {
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

// Sum over the TEAM lanes of a team inside one warp (TEAM = 8, 16 or 32, teams aligned to
// TEAM lanes). The mask names only the team's own lanes: a neighbouring team of the same
// warp may have returned early (past the last row) and must not be waited for.
template <int TEAM, typename A>
__device__ __forceinline__ A team_shfl_sum(A v) {
  static_assert(TEAM == 8 || TEAM == 16 || TEAM == 32, "sub-warp teams of 8, 16 or 32 lanes");
  const unsigned lane = (threadIdx.x + threadIdx.y * blockDim.x) & 31u;
  const unsigned mask = TEAM == 32 ? 0xffffffffu : ((1u << TEAM) - 1u) << (lane & ~unsigned(TEAM - 1));
#pragma unroll
  for (int o = TEAM / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, TEAM);
  return v;
}

// A row is processed by a team: TEAM > 0 lanes of one warp (short rows; blockDim = (TEAM,
// 128 / TEAM), so a warp holds 32 / TEAM rows: D=72 in bf16 is 9 vectors, 16 lanes, where a
// whole warp left 23 of 32 lanes idle), or TEAM = 0, one whole block (blockDim.x threads).
// Both sums are reduced in a fixed order, so results are bitwise reproducible run to run.
template <int TEAM, typename A>
__device__ __forceinline__ void team_sum2(A& a, A& b, A* smem /* 2 * 32 */) {
  a = team_shfl_sum<(TEAM > 0 ? TEAM : 32)>(a);  // a block team: each warp first
  b = team_shfl_sum<(TEAM > 0 ? TEAM : 32)>(b);
  if (TEAM > 0) return;
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

template <int TEAM>
__device__ __forceinline__ int team_lane() { return threadIdx.x; }
template <int TEAM>
__device__ __forceinline__ int team_size() { return TEAM > 0 ? TEAM : blockDim.x; }
// Index of this team among all teams of the launch.
template <int TEAM>
__device__ __forceinline__ int64_t team_index() {
  return TEAM > 0 ? int64_t(blockIdx.x) * blockDim.y + threadIdx.y : int64_t(blockIdx.x);
}

// Launch shape for rows of `dim` elements read `vec` at a time. Short rows (at most 128
// vectors and 512 elements) get a sub-warp or warp team of 8, 16 or 32 lanes, the smallest
// that gives every lane a vector (128-thread blocks, 128 / team rows each); longer rows one
// block of up to 512 threads (launch bound: 128 registers per thread). Each thread keeps EPT
// elements of the row in registers, the smallest of 8, 16, 32 that holds its share:
// per-thread arrays sized for 16 when 8 suffice cost registers and occupancy (norm_mod_bwd,
// bf16, D=1152: 160 threads hold 8 elements each; EPT=16 compiled to 128 registers, 3
// blocks/SM, so the 512 teams of B*N=16384 rows took two waves on 132 SMs; EPT=8 fits one).
constexpr int kRowThreads = 512;
constexpr int kTeamBlockThreads = 128;  // threads of a block of sub-warp / warp teams
// CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535. Launchers check before
// casting to unsigned (an unchecked cast would launch a wrapped, smaller grid).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

struct RowLaunch {
  int team;            // lanes per row team: 8, 16, 32, or 0 (one block per row)
  int ept;             // elements per thread: 8, 16 or 32
  int threads;         // threads per row team
  int rows_per_block;  // teams per block
};

inline int ept_for(int64_t per_thread) { return per_thread <= 8 ? 8 : per_thread <= 16 ? 16 : 32; }

inline RowLaunch row_launch(int64_t dim, int vec) {
  const int64_t nvec = ceil_div(dim, vec);
  if (nvec <= 32 * 4 && nvec * vec <= 32 * 16) {
    // a sub-warp team (8 or 16 lanes) holds one vector per lane, so its EPT is always 8
    const int team = nvec <= 8 ? 8 : nvec <= 16 ? 16 : 32;
    return RowLaunch{team, ept_for(ceil_div(nvec, team) * vec), team, kTeamBlockThreads / team};
  }
  int64_t threads = ceil_div(nvec, 32) * 32;
  if (threads > kRowThreads) threads = kRowThreads;
  return RowLaunch{0, ept_for(ceil_div(nvec, threads) * vec), static_cast<int>(threads), 1};
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

// Calls f(integral_constant<int, VEC>, integral_constant<int, TEAM>, integral_constant<int, EPT>).
// fp64 is never vectorised (exact checks only: fewer instantiations).
template <typename T, typename F>
void dispatch_shape(bool vectorise, const RowLaunch& L, F&& f) {
  constexpr int kVec = sizeof(T) == 8 ? 1 : 16 / sizeof(T);
  // sub-warp teams hold one vector per lane in EPT = 8: a 1-byte dtype (16-element vectors)
  // would need its own instantiations
  static_assert(kVec <= 8, "dispatch_shape: vectors of more than 8 elements need EPT > 8 for sub-warp teams");
  using I8 = std::integral_constant<int, 8>;
  using I16 = std::integral_constant<int, 16>;
  using I32 = std::integral_constant<int, 32>;
  using I0 = std::integral_constant<int, 0>;
  auto by_vec = [&](auto v) {
    switch (L.team) {
      case 8: f(v, I8{}, I8{}); break;     // row_launch: sub-warp teams always have EPT = 8
      case 16: f(v, I16{}, I8{}); break;
      case 32:
        if (L.ept == 8) f(v, I32{}, I8{});
        else f(v, I32{}, I16{});
        break;
      default:
        if (L.ept == 8) f(v, I0{}, I8{});
        else if (L.ept == 16) f(v, I0{}, I16{});
        else f(v, I0{}, I32{});
    }
  };
  if (vectorise && kVec > 1) by_vec(std::integral_constant<int, kVec>{});
  else by_vec(std::integral_constant<int, 1>{});
}

inline int row_vec(bool vectorise, int elem_size) { return vectorise && elem_size < 8 ? 16 / elem_size : 1; }

// Launches a row-team kernel: picks 16-byte vectors when every pointer and stride allows,
// the team shape for `dim`, and the instantiation make_kernel(T{}, VEC, TEAM, EPT) returns;
// `params` is the kernel's only argument, `teams` the number of row teams. The kernel goes to
// cudaLaunchKernel as a typed function pointer (cuda_runtime.h's template overload), so the
// CPU emulation (csrc/emu) knows the argument types.
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
      const dim3 block(L.threads, L.rows_per_block);  // (team lanes, teams) or (block threads, 1)
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
    return &kernel<decltype(t), decltype(v)::value, decltype(w)::value, decltype(e)::value>;    \
  }

}  // namespace cuda
}  // namespace dmf
