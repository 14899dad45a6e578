// Plain-C++ descriptions of one kernel launch, shared by the CPU kernels and the CUDA
// kernels. No torch headers here: the .cu files include this and must compile with a
// bare `nvcc -c` on machines without a CUDA build of torch.
//
// Conventions
// - x and every (rows, dim) tensor is row-major and contiguous: element (r, j) at r * dim + j.
// - A modulation parameter (shift, scale, gate; the rms weight) is a (groups, dim) matrix
//   with unit stride along dim and an arbitrary row stride, so the chunks of a fused
//   adaLN projection `c.chunk(6, dim=1)` are read in place. Row g applies to the
//   `rows_per_group` consecutive rows [g * T, (g + 1) * T) of x. All parameters of one
//   launch share T (the op wrappers expand coarser ones). `rows` need not be a multiple of T:
//   the last group may be partial, and partial-sum buffers have ceil(rows / T) * chunks rows.
// - Statistics (mean, rstd) and all accumulation are in `acc` precision: float for
//   fp32/fp16/bf16, double for fp64.
// - A nullptr tangent means a zero tangent: the kernels skip its loads and arithmetic.
#pragma once
#include <cstdint>

namespace dmf {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct ModParam {
  const void* ptr = nullptr;  // nullptr: absent (a zero tangent)
  int64_t row_stride = 0;     // in elements
};

// The LayerNorm-and-modulate family:
//   x_out = x + gate * y              (only when gate.ptr != nullptr: gated_residual_adaln)
//   out   = LN(x_out) * (1 + scale) + shift
// and its RMS kind (rms_adaln_modulate, gated_residual_rms_adaln; LightningDiT's adaLN):
//   out   = x_out / sqrt(mean(x_out^2) + eps) * weight * (1 + scale) + shift
// For rms the row mean is 0 by definition: `mean` is neither written nor read (nullptr), and
// the mean(tangent) / mean(gradient) terms of the LayerNorm rules vanish. `weight` is one row
// (row_stride 0; nullptr: 1) and shift.ptr may be nullptr (0: LightningDiT's wo_shift). The
// flags are uniform per launch, so the LayerNorm path only gains untaken uniform branches.
struct NormModFwdParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, dim = 0, rows_per_group = 1;
  double eps = 1e-6;
  bool rms = false;
  ModParam weight;  // rms only, (dim,), may be absent
  const void* x = nullptr;
  ModParam gate;
  const void* y = nullptr;  // the residual branch (gate.ptr != nullptr)
  void* x_out = nullptr;
  ModParam shift, scale;
  void* out = nullptr;
  void* mean = nullptr;  // (rows,) acc type
  void* rstd = nullptr;  // (rows,) acc type
};

// Primal and tangent in one pass: everything the forward writes, plus the tangents.
struct NormModJvpParams {
  NormModFwdParams p;
  const void* x_dot = nullptr;
  ModParam gate_dot;
  const void* y_dot = nullptr;
  void* x_out_dot = nullptr;  // written when p.gate.ptr (residual form)
  ModParam shift_dot, scale_dot;
  ModParam weight_dot;  // rms only, row_stride 0
  void* out_dot = nullptr;
};

// Backward. `x` is the normalised input (x_out for the residual form). Per-row gradients
// are written in the input dtype; the per-group parameter gradients are written as
// deterministic partial sums over chunks of `chunk_rows` rows in acc type, shape
// (groups * chunks_per_group, dim); the op wrapper sums the chunks in a fixed order.
// rms: `mean` is nullptr; part_scale holds sum(g * xh) without the weight, since within one
// partial (rows of one group) scale is constant, so the binding forms
// dscale = part_scale * weight and dweight = sum over partials of part_scale * (1 + scale):
// no third accumulator in the kernel's registers. part_shift may be nullptr (no shift).
struct NormModBwdParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, dim = 0, rows_per_group = 1, chunk_rows = 1;
  bool rms = false;
  ModParam weight;  // rms only, (dim,), may be absent
  const void* grad_out = nullptr;
  const void* grad_x_out = nullptr;  // residual form: gradient arriving at x_out, may be nullptr
  const void* x = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  ModParam scale;
  ModParam gate;
  const void* y = nullptr;  // the residual branch (gate.ptr != nullptr)
  void* grad_x = nullptr;
  void* grad_y = nullptr;         // residual form
  void* part_shift = nullptr;     // acc type
  void* part_scale = nullptr;
  void* part_gate = nullptr;      // residual form
};

// gated_residual: out = x + gate * y (and its tangent).
struct GatedResidualParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, dim = 0, rows_per_group = 1, chunk_rows = 1;
  const void* x = nullptr;
  ModParam gate;
  const void* y = nullptr;
  void* out = nullptr;
  // tangent (jvp / tangent ops)
  const void* x_dot = nullptr;
  ModParam gate_dot;
  const void* y_dot = nullptr;
  void* out_dot = nullptr;
  // backward
  const void* grad_out = nullptr;
  void* grad_y = nullptr;
  void* part_gate = nullptr;  // acc type, (groups * chunks_per_group, dim)
};

// rms_norm: out = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps); w of shape (dim,).
struct RmsNormParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, dim = 0, chunk_rows = 1;
  double eps = 1e-6;
  const void* x = nullptr;
  const void* weight = nullptr;
  void* out = nullptr;
  void* rstd = nullptr;  // (rows,) acc type
  const void* x_dot = nullptr;
  const void* weight_dot = nullptr;
  void* out_dot = nullptr;
  const void* grad_out = nullptr;
  void* grad_x = nullptr;
  void* part_weight = nullptr;  // acc type, (chunks, dim)
};

// Issue 15's row ops read their input rows in place through a RowStrides: row r of the
// flattened leading dims sits at row_offset(s, r) elements from the base (unit stride along
// the row). Up to three leading groups of any stride, so e.g. q = qkv.permute(...)[0] of shape
// (B, H, N, D) or the first chunk of a wider projection need no copy. A contiguous (rows, cols)
// tensor is {n1 = 1, n2 = rows, s0 = 0, s1 = 0, s2 = cols}.
struct RowStrides {
  int64_t n1 = 1, n2 = 1;        // sizes of the two inner groups (the outer one is rows / (n1 * n2))
  int64_t s0 = 0, s1 = 0, s2 = 0;  // strides of the outer, middle and inner group, in elements
};

// swiglu: x (rows, 2H) -> h (rows, H) = silu(x[:, :H]) * x[:, H:], the halves read in place.
// jvp: h_dot = silu'(a) a_dot b + silu(a) b_dot from x_dot (nullptr: zero, h_dot = 0).
// bwd: grad_x (rows, 2H) = [g b silu'(a), g silu(a)] from grad_h (rows, H) and x.
// h, h_dot, grad_h and grad_x are contiguous; x and x_dot are read through their RowStrides.
struct SwigluParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, dim = 0;  // dim = H, half of x's last dim
  const void* x = nullptr;
  RowStrides x_rows;
  const void* x_dot = nullptr;
  RowStrides x_dot_rows;
  void* h = nullptr;      // fwd / jvp
  void* h_dot = nullptr;  // jvp
  const void* grad_h = nullptr;  // bwd
  void* grad_x = nullptr;        // bwd
};

// rope (interleaved pairs, LightningDiT / EVA rotate_half): for the pair (x0, x1) = (x[2i],
// x[2i+1]) of row r at position n = r % seq:
//   out = (x0 c0 - x1 s0, x1 c1 + x0 s1)          c = cos[n], s = sin[n] (tables (seq, dim))
// and with `transpose` (the backward: dx from grad_out, read through x / x_rows)
//   out = (x0 c0 + x1 s1, x1 c1 - x0 s0).
// x_dot (jvp, nullptr: none) gets the same rotation into out_dot. Tables are contiguous in acc
// type (float; double for fp64 x); out / out_dot contiguous (rows, dim).
struct RopeParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, seq = 0, dim = 0;
  bool transpose = false;
  const void* x = nullptr;
  RowStrides x_rows;
  const void* x_dot = nullptr;
  RowStrides x_dot_rows;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
  void* out_dot = nullptr;
};

#if defined(__CUDACC__)
#define DMF_HOST_DEVICE __host__ __device__
#else
#define DMF_HOST_DEVICE
#endif

DMF_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element offset of row r (see RowStrides).
DMF_HOST_DEVICE inline int64_t row_offset(const RowStrides& s, int64_t r) {
  const int64_t inner = r % s.n2, t = r / s.n2;
  return (t / s.n1) * s.s0 + (t % s.n1) * s.s1 + inner * s.s2;
}

}  // namespace dmf
