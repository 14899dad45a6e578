// Helpers shared by the CPU kernels: dtype dispatch and per-row float loops.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "../kernels/params.h"

namespace dmf {
namespace cpu {

// Calls f(T{}, A{}) with T the storage type and A the accumulation type.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}, float{}); break;
    case DType::kFloat16: f(c10::Half{}, float{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case DType::kFloat64: f(double{}, double{}); break;
  }
}

template <typename T>
inline const T* mod_row(const ModParam& m, int64_t group) {
  return m.ptr == nullptr ? nullptr : static_cast<const T*>(m.ptr) + group * m.row_stride;
}

template <typename T, typename A>
inline void load_row(const T* __restrict__ src, A* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(src[j]);
}

template <typename A>
inline A row_sum(const A* __restrict__ v, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += v[j];
  return s;
}

template <typename A>
inline A row_dot(const A* __restrict__ a, const A* __restrict__ b, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Rows per parallel task: about 64 KiB of row data, so small rows are not one task each.
inline int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

}  // namespace cpu
}  // namespace dmf
