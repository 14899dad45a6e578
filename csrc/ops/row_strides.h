// Input rows read in place (swiglu, rope): the RowStrides of
// kernels/params.h for a tensor whose last dim has unit stride and whose leading dims fold
// into at most three groups of uniform stride. Anything else is copied (contiguous()).
#pragma once
#include "common.h"

namespace dmf {
namespace ops_common {

// Fills `rs` with t's row layout over its leading dims (all but the last `row_dims` dims,
// whose elements form one row: they must be contiguous among themselves), or returns false.
inline bool fold_rows(const Tensor& t, int64_t row_dims, RowStrides& rs) {
  rs = RowStrides{};
  if (t.numel() == 0) return true;  // no rows to read (an empty batch's strides may be anything)
  const int64_t n = t.dim();
  // the row itself: unit stride, and the last row_dims dims dense
  int64_t expect = 1;
  for (int64_t i = n - 1; i >= n - row_dims; --i) {
    if (t.size(i) != 1 && t.stride(i) != expect) return false;
    expect *= t.size(i);
  }
  // leading dims, innermost first, folded into groups (size, stride)
  int64_t sizes[3] = {1, 1, 1}, strides[3] = {0, 0, 0};
  int groups = 0;
  for (int64_t i = n - row_dims - 1; i >= 0; --i) {
    const int64_t sz = t.size(i), st = t.stride(i);
    if (sz == 1) continue;
    if (groups > 0 && st == strides[groups - 1] * sizes[groups - 1]) {
      sizes[groups - 1] *= sz;
      continue;
    }
    if (groups == 3) return false;
    sizes[groups] = sz, strides[groups] = st;
    ++groups;
  }
  // groups[0] is the innermost: RowStrides' inner group (n2, s2), then middle, then outer.
  rs.n2 = sizes[0], rs.s2 = strides[0];
  rs.n1 = sizes[1], rs.s1 = strides[1];
  rs.s0 = strides[2];
  return true;
}

// t itself when its rows fold, else a contiguous copy; rs describes the returned tensor.
inline Tensor in_place_rows(const Tensor& t, int64_t row_dims, RowStrides& rs) {
  if (fold_rows(t, row_dims, rs)) return t;
  Tensor c = t.contiguous();
  const bool ok = fold_rows(c, row_dims, rs);
  TORCH_CHECK(ok, "in_place_rows: a contiguous tensor must fold");
  return c;
}

}  // namespace ops_common
}  // namespace dmf
