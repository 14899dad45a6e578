// CPU kernels of rope (interleaved pairs, LightningDiT / EVA rotate_half): for the pair
// (x0, x1) at position n, out = (x0 c0 - x1 s0, x1 c1 + x0 s1); with p.transpose (the backward)
// out = (x0 c0 + x1 s1, x1 c1 - x0 s0). The tables (seq, dim) are in acc precision; the jvp
// rotates x and x_dot with one read of the tables.
#include "cpu_common.h"

namespace dmf {
namespace cpu {
namespace {

template <typename T, typename A>
inline void rotate_row(const T* __restrict__ x, const A* __restrict__ c, const A* __restrict__ s, T* __restrict__ o,
                       int64_t D, bool transpose) {
  if (!transpose) {
    for (int64_t j = 0; j < D; j += 2) {
      const A x0 = static_cast<A>(x[j]), x1 = static_cast<A>(x[j + 1]);
      o[j] = static_cast<T>(x0 * c[j] - x1 * s[j]);
      o[j + 1] = static_cast<T>(x1 * c[j + 1] + x0 * s[j + 1]);
    }
  } else {
    for (int64_t j = 0; j < D; j += 2) {
      const A x0 = static_cast<A>(x[j]), x1 = static_cast<A>(x[j + 1]);
      o[j] = static_cast<T>(x0 * c[j] + x1 * s[j + 1]);
      o[j + 1] = static_cast<T>(x1 * c[j + 1] - x0 * s[j]);
    }
  }
}

template <typename T, typename A>
void rope_impl(const RopeParams& p) {
  const int64_t D = p.dim;
  at::parallel_for(0, p.rows, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r % p.seq;
      const A* c = static_cast<const A*>(p.cos) + n * D;
      const A* s = static_cast<const A*>(p.sin) + n * D;
      rotate_row<T, A>(static_cast<const T*>(p.x) + row_offset(p.x_rows, r), c, s, static_cast<T*>(p.out) + r * D, D,
                       p.transpose);
      if (p.out_dot == nullptr) continue;
      T* od = static_cast<T*>(p.out_dot) + r * D;
      if (p.x_dot == nullptr) {
        std::fill(od, od + D, T(0));
      } else {
        rotate_row<T, A>(static_cast<const T*>(p.x_dot) + row_offset(p.x_dot_rows, r), c, s, od, D, p.transpose);
      }
    }
  });
}

}  // namespace

void rope_fwd_cpu(const RopeParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { rope_impl<decltype(t), decltype(a)>(p); });
}
void rope_jvp_cpu(const RopeParams& p) { rope_fwd_cpu(p); }
void rope_bwd_cpu(const RopeParams& p) { rope_fwd_cpu(p); }

}  // namespace cpu
}  // namespace dmf
