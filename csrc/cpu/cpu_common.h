// Helpers shared by the CPU kernels: dtype dispatch, parameter rows, task grain.
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

// Rows per parallel task: about 64 KiB of row data, so small rows are not one task each.
inline int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

}  // namespace cpu
}  // namespace dmf
