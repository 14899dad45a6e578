// Part of the CUDA emulation (dmf_emu.h): CUDA's keywords, built-in variables and device
// functions (__syncthreads, the shuffles, atomics, min/max) for the kernels' source.
#pragma once
#include "emu_warp.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::dmf_emu::current_thread().idx)
#define blockIdx (::dmf_emu::emu().block_idx)
#define blockDim (::dmf_emu::emu().block_dim)
#define gridDim (::dmf_emu::emu().grid_dim)
#define warpSize 32

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  dmf_emu::barrier(dmf_emu::Loc{file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  dmf_emu::warp_op(dmf_emu::WarpOp::kSyncWarp, mask, 0, 0, 0, 32, dmf_emu::Loc{file, line});
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      dmf_emu::warp_op(dmf_emu::WarpOp::kBallot, mask, pred != 0, 4, 0, 32, dmf_emu::Loc{file, line}));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflIdx, mask, var, src_lane, width, dmf_emu::Loc{file, line});
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflUp, mask, var, static_cast<int>(delta), width, dmf_emu::Loc{file, line});
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflDown, mask, var, static_cast<int>(delta), width,
                       dmf_emu::Loc{file, line});
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflXor, mask, var, lane_mask, width, dmf_emu::Loc{file, line});
}

// Atomics: fibers switch only at sync points, so a read-modify-write is atomic as it is.
template <typename T>
inline T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}

// CUDA's min/max overloads for device code (same-type operands only, like std::min).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
using std::sqrt;  // float and double overloads, correctly rounded as nvcc's default -prec-sqrt=true
