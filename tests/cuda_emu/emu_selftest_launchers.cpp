// Self-test of the CUDA emulation: the launchers of csrc/cuda on edge cases the op wrappers never
// produce (see emu_selftest.h).
#include "emu_selftest.h"
#include "../../csrc/cuda/launch.h"

namespace selftest {

// ---------------------------------------------------------------- launchers on edge cases
// rows not a multiple of rows_per_group (a partial last group), which the op wrappers never
// pass: every row must still be written, the partial sums must cover the partial group.
void test_partial_groups() {
  using namespace dmf;
  const int64_t rows = 5, D = 24, T = 2, groups = 3;
  std::vector<float> x(rows * D), y(rows * D), gate(groups * D), out(rows * D), go(rows * D), gy(rows * D);
  std::vector<float> part(groups * D);
  std::mt19937 rng(3);
  std::normal_distribution<float> n01;
  for (auto* v : {&x, &y, &gate, &go})
    for (float& f : *v) f = n01(rng);
  GatedResidualParams p;
  p.dtype = DType::kFloat32;
  p.rows = rows;
  p.dim = D;
  p.rows_per_group = T;
  p.chunk_rows = 32;
  p.x = x.data();
  p.gate = ModParam{gate.data(), D};
  p.y = y.data();
  p.out = out.data();
  std::fill(out.begin(), out.end(), NAN);
  bool ok = cuda::gated_residual_fwd(p, nullptr) == cudaSuccess;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < D; ++j)
      ok = ok && std::fabs(out[r * D + j] - (x[r * D + j] + gate[r / T * D + j] * y[r * D + j])) < 1e-6f;
  expect(ok, "gated_residual forward: every row of a partial last group is written");
  p.out = nullptr;
  p.grad_out = go.data();
  p.grad_y = gy.data();
  p.part_gate = part.data();
  std::fill(gy.begin(), gy.end(), NAN);
  std::fill(part.begin(), part.end(), NAN);
  ok = cuda::gated_residual_bwd(p, nullptr) == cudaSuccess;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < D; ++j) {
      double want = 0;
      for (int64_t r = g * T; r < std::min(rows, (g + 1) * T); ++r) want += double(go[r * D + j]) * y[r * D + j];
      ok = ok && std::fabs(part[g * D + j] - want) < 1e-5;
    }
  for (int64_t i = 0; i < rows * D; ++i) ok = ok && std::fabs(gy[i] - go[i] * gate[i / D / T * D + i % D]) < 1e-6f;
  expect(ok, "gated_residual backward: the partial last group's gradient rows and gate sums");

  // adaln backward over the same partial group: shift's gradient is the plain sum of grad_out
  std::vector<float> mean(rows, 0.f), rstd(rows, 1.f), scale(groups * D, 0.f), gx(rows * D);
  std::vector<float> ps(groups * D), pc(groups * D);
  NormModBwdParams b;
  b.dtype = DType::kFloat32;
  b.rows = rows;
  b.dim = D;
  b.rows_per_group = T;
  b.chunk_rows = 32;
  b.grad_out = go.data();
  b.x = x.data();
  b.mean = mean.data();
  b.rstd = rstd.data();
  b.scale = ModParam{scale.data(), D};
  b.grad_x = gx.data();
  b.part_shift = ps.data();
  b.part_scale = pc.data();
  std::fill(ps.begin(), ps.end(), NAN);
  ok = cuda::norm_mod_bwd(b, nullptr) == cudaSuccess;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < D; ++j) {
      double want = 0;
      for (int64_t r = g * T; r < std::min(rows, (g + 1) * T); ++r) want += go[r * D + j];
      ok = ok && std::fabs(ps[g * D + j] - want) < 1e-5;
    }
  expect(ok, "adaln backward: the partial last group's shift gradient");
}

}  // namespace selftest
