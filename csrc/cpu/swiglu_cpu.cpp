// CPU kernels of swiglu: h = silu(a) * b with [a, b] the two halves of each row of x, its
// tangent in the same pass and its backward. The halves are read in place (x's rows through
// their RowStrides), in acc precision.
#include "cpu_common.h"

namespace dmf {
namespace cpu {
namespace {

// sigmoid in acc precision; 1 / (1 + exp(-a)) keeps NaN (exp(NaN) = NaN) and saturates to 0 / 1.
template <typename A>
inline A sigmoid(A a) {
  return A(1) / (A(1) + std::exp(-a));
}

// h (when p.h) and h_dot (when p.h_dot; x_dot nullptr: zero) = silu'(a) a_dot b + silu(a) b_dot.
template <typename T, typename A>
void fwd_jvp_impl(const SwigluParams& p) {
  const int64_t H = p.dim;
  at::parallel_for(0, p.rows, row_grain(2 * H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ a = static_cast<const T*>(p.x) + row_offset(p.x_rows, r);
      const T* __restrict__ b = a + H;
      if (p.h != nullptr) {
        T* __restrict__ h = static_cast<T*>(p.h) + r * H;
        for (int64_t j = 0; j < H; ++j) {
          const A av = static_cast<A>(a[j]);
          h[j] = static_cast<T>(av * sigmoid(av) * static_cast<A>(b[j]));
        }
      }
      if (p.h_dot == nullptr) continue;
      T* __restrict__ hd = static_cast<T*>(p.h_dot) + r * H;
      if (p.x_dot == nullptr) {
        std::fill(hd, hd + H, T(0));
        continue;
      }
      const T* __restrict__ ad = static_cast<const T*>(p.x_dot) + row_offset(p.x_dot_rows, r);
      const T* __restrict__ bd = ad + H;
      for (int64_t j = 0; j < H; ++j) {
        const A av = static_cast<A>(a[j]), s = sigmoid(av);
        const A silu = av * s, dsilu = s * (A(1) + av * (A(1) - s));
        hd[j] = static_cast<T>(dsilu * static_cast<A>(ad[j]) * static_cast<A>(b[j]) + silu * static_cast<A>(bd[j]));
      }
    }
  });
}

// grad_x = [g b silu'(a), g silu(a)]
template <typename T, typename A>
void bwd_impl(const SwigluParams& p) {
  const int64_t H = p.dim;
  at::parallel_for(0, p.rows, row_grain(2 * H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ a = static_cast<const T*>(p.x) + row_offset(p.x_rows, r);
      const T* __restrict__ b = a + H;
      const T* __restrict__ g = static_cast<const T*>(p.grad_h) + r * H;
      T* __restrict__ da = static_cast<T*>(p.grad_x) + r * 2 * H;
      T* __restrict__ db = da + H;
      for (int64_t j = 0; j < H; ++j) {
        const A av = static_cast<A>(a[j]), s = sigmoid(av), gv = static_cast<A>(g[j]);
        da[j] = static_cast<T>(gv * static_cast<A>(b[j]) * s * (A(1) + av * (A(1) - s)));
        db[j] = static_cast<T>(gv * av * s);
      }
    }
  });
}

}  // namespace

void swiglu_fwd_cpu(const SwigluParams& p) {
  SwigluParams q = p;
  q.h_dot = nullptr;
  dispatch_dtype(p.dtype, [&](auto t, auto a) { fwd_jvp_impl<decltype(t), decltype(a)>(q); });
}
void swiglu_jvp_cpu(const SwigluParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { fwd_jvp_impl<decltype(t), decltype(a)>(p); });
}
void swiglu_bwd_cpu(const SwigluParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto a) { bwd_impl<decltype(t), decltype(a)>(p); });
}

}  // namespace cpu
}  // namespace dmf
