// Self-test of the CUDA emulation (csrc/emu): the semantics it implements and the bugs it must
// report, on small kernels written here, plus the launchers of csrc/cuda on edge cases the op
// wrappers never produce. Built by `python csrc/emu/build.py --selftest` and run by
// tests/cuda_emu/test_emulator.py; prints one line per case and exits 1 on any failure.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cuda/launch.h"

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

std::string last_report() { return dmf_emu::emu().last_error; }

// A launch that must fail with a report containing `needle`.
template <typename... P>
void expect_report(const char* what, const char* needle, void (*k)(P...), dim3 grid, dim3 block, void** args,
                   size_t shmem = 0) {
  const cudaError_t err = cudaLaunchKernel(k, grid, block, args, shmem, nullptr);
  const std::string r = last_report();
  const bool ok = err != cudaSuccess && r.find(needle) != std::string::npos;
  expect(ok, std::string(what) + (ok ? "" : " -- got error " + std::to_string(err) + ": " + r));
  cudaGetLastError();
}

// ---------------------------------------------------------------- conversions
void test_conversions() {
#if defined(__FLT16_MAX__)
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {  // every half -> float
    __half h;
    h.__x = static_cast<unsigned short>(b);
    _Float16 r;
    std::memcpy(&r, &h.__x, 2);
    const float a = __half2float(h), e = static_cast<float>(r);
    if (!(a == e || (std::isnan(a) && std::isnan(e))) || std::signbit(a) != std::signbit(e)) ++bad;
  }
  expect(bad == 0, "half -> float: all 65536 values exact (" + std::to_string(bad) + " wrong)");
  // float -> half: every half value, the midpoints between neighbours (ties to even) and
  // one ulp either side, plus random floats over the whole range
  std::vector<float> fs;
  for (uint32_t b = 0; b < 0x7c00; ++b) {
    __half lo, hi;
    lo.__x = static_cast<unsigned short>(b);
    hi.__x = static_cast<unsigned short>(b + 1);
    const float a = __half2float(lo), c = __half2float(hi), mid = static_cast<float>((double(a) + double(c)) / 2);
    for (float f : {a, mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)}) {
      fs.push_back(f);
      fs.push_back(-f);
    }
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    fs.push_back(f);
  }
  bad = 0;
  for (float f : fs) {
    const __half h = __float2half_rn(f);
    const _Float16 r = static_cast<_Float16>(f);
    uint16_t rb;
    std::memcpy(&rb, &r, 2);
    if (std::isnan(f) ? h.__x != 0x7fff : h.__x != rb) ++bad;
  }
  expect(bad == 0, "float -> half: " + std::to_string(fs.size()) + " values round to nearest even (" +
                       std::to_string(bad) + " wrong)");
#else
  expect(true, "float <-> half: no _Float16 reference on this compiler (skipped)");
#endif
  // bf16: against the nearest-even choice between the two neighbours, computed in double
  int bad16 = 0;
  std::mt19937 rng2(2);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = i < 65536 ? (uint32_t(i) << 16) | 0x8000u : rng2();  // exact midpoints, then random
    float f;
    std::memcpy(&f, &u, 4);
    const __nv_bfloat16 h = __float2bfloat16_rn(f);
    uint16_t want;
    if (std::isnan(f)) {
      want = 0x7fff;
    } else if (std::isinf(f)) {
      want = static_cast<uint16_t>(u >> 16);
    } else {  // lo: the magnitude truncated to bf16; hi: one bf16 ulp further (2^128 past the max)
      const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
      float flo, fhi;
      std::memcpy(&flo, &lo, 4);
      std::memcpy(&fhi, &hi, 4);
      const double vhi = std::isinf(fhi) ? std::copysign(std::ldexp(1.0, 128), double(f)) : double(fhi);
      const double dlo = std::fabs(double(f) - double(flo)), dhi = std::fabs(vhi - double(f));
      const bool up = dhi < dlo || (dhi == dlo && ((lo >> 16) & 1u));
      want = static_cast<uint16_t>((up ? hi : lo) >> 16);
    }
    if (h.__x != want) ++bad16;
  }
  expect(bad16 == 0, "float -> bf16: 2e6 values round to nearest even (" + std::to_string(bad16) + " wrong)");
}

// ---------------------------------------------------------------- warp intrinsics
struct ShflArgs {
  int* out;  // [4 kinds][32 lanes]
  int width, operand;
};

__global__ void shfl_kernel(ShflArgs a) {
  const int lane = threadIdx.x, v = 100 + lane;
  a.out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, a.operand, a.width);
  a.out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, a.operand, a.width);
  a.out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, a.operand, a.width);
  a.out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, a.operand, a.width);
}

void test_shuffles() {
  int bad = 0;
  std::vector<int> out(128);
  for (int width = 1; width <= 32; width *= 2) {
    for (int op = 0; op < 32; ++op) {
      ShflArgs a{out.data(), width, op};
      void* args[] = {&a};
      if (cudaLaunchKernel(shfl_kernel, dim3(1), dim3(32), args, 0, nullptr) != cudaSuccess) {
        ++bad;
        continue;
      }
      for (int lane = 0; lane < 32; ++lane) {  // the CUDA programming guide's definitions
        const int base = lane / width * width;
        const int idx = base + op % width;
        const int up = lane - op >= base ? lane - op : lane;
        const int down = lane + op < base + width ? lane + op : lane;
        const int x = (lane ^ op) < base + width ? (lane ^ op) : lane;
        bad += out[lane] != 100 + idx;
        bad += out[32 + lane] != 100 + up;
        bad += out[64 + lane] != 100 + down;
        bad += out[96 + lane] != 100 + x;
      }
    }
  }
  expect(bad == 0, "shuffles: idx/up/down/xor for every width and offset (" + std::to_string(bad) + " wrong)");
}

struct OutArgs {
  float* f;
  unsigned* u;
};

__global__ void ballot_and_outside_mask_kernel(OutArgs a) {
  const unsigned lane = threadIdx.x;
  a.u[lane] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  // lanes 0-15 shuffle among themselves but lane l reads l ^ 16, outside their mask
  if (lane < 16) a.f[lane] = __shfl_xor_sync(0x0000ffffu, 1.0f + lane, 16, 32);
  __syncwarp();
}

__global__ void nested_masks_kernel(OutArgs a) {
  // half the warp reduces among itself, then the whole warp: legal, whatever order lanes arrive in
  const unsigned lane = threadIdx.x;
  float v = 1.f;
  if (lane < 16) v += __shfl_xor_sync(0x0000ffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  a.f[lane] = v;
}

void test_nested_masks() {
  std::vector<float> f(32, 0.f);
  OutArgs a{f.data(), nullptr};
  void* args[] = {&a};
  bool ok = true;
  for (int s = 0; s < 4; ++s) {
    dmf_emu::emu().schedule = static_cast<dmf_emu::Schedule>(s);
    dmf_emu::emu().seed = 1;
    ok = ok && cudaLaunchKernel(nested_masks_kernel, dim3(1), dim3(32), args, 0, nullptr) == cudaSuccess;
    for (int l = 0; l < 32; ++l) ok = ok && f[l] == (l < 16 ? 4.f : 2.f);
  }
  dmf_emu::emu().schedule = dmf_emu::Schedule::kRoundRobin;
  dmf_emu::emu().seed = 0;
  expect(ok, "lanes of a sub-mask shuffle first, then the whole warp: no report under any schedule");
}

void test_ballot_and_poison() {
  std::vector<float> f(32, 0.f);
  std::vector<unsigned> u(32, 0);
  OutArgs a{f.data(), u.data()};
  void* args[] = {&a};
  dmf_emu::emu().schedule = dmf_emu::Schedule::kPriority;  // lanes 16-31 may reach __syncwarp first
  dmf_emu::emu().seed = 5;
  const bool ok = cudaLaunchKernel(ballot_and_outside_mask_kernel, dim3(1), dim3(32), args, 0, nullptr) == cudaSuccess;
  dmf_emu::emu().schedule = dmf_emu::Schedule::kRoundRobin;
  dmf_emu::emu().seed = 0;
  unsigned want = 0;
  for (int l = 0; l < 32; l += 3) want |= 1u << l;
  bool ballot = ok, poison = ok;
  for (int l = 0; l < 32; ++l) ballot = ballot && u[l] == want;
  for (int l = 0; l < 16; ++l) poison = poison && std::isnan(f[l]);
  expect(ballot, "__ballot_sync: the predicate bits of the mask's lanes");
  expect(poison, "a shuffle reading a lane outside its mask returns NaN bits");
}

// ---------------------------------------------------------------- reported bugs
struct Buf {
  float* out;
};

__global__ void divergent_barrier_kernel(Buf b) {
  if (threadIdx.x >= 40) return;  // warp 1's upper lanes leave before the barrier
  __syncthreads();
  b.out[threadIdx.x] = 1.f;
}

__global__ void two_barrier_sites_kernel(Buf b) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  b.out[threadIdx.x] = 1.f;
}

__global__ void caller_not_in_mask_kernel(Buf b) {
  // a team mask computed for the wrong team: lanes 8-15 name lanes 0-7
  b.out[threadIdx.x] = __shfl_xor_sync(0xffu, 1.f, 1, 8);
}

__global__ void bad_width_kernel(Buf b) { b.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1, 24); }

__global__ void exited_lane_kernel(Buf b) {
  if (threadIdx.x >= 20) return;  // the tail of the warp has no row
  b.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void missing_lane_kernel(Buf b) { b.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1); }

__global__ void mixed_intrinsics_kernel(Buf b) {
  if (threadIdx.x & 1) b.out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
  else b.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void shuffle_vs_barrier_kernel(Buf b) {
  if (threadIdx.x == 5) __syncthreads();
  else b.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void noop_kernel(Buf) {}

__global__ void uninitialised_shared_kernel(Buf b) {
  __shared__ float s[64];
  if (threadIdx.x == 0) s[1] = 2.f;
  __syncthreads();
  b.out[threadIdx.x] = s[threadIdx.x & 1];  // s[0] was never written
}

void test_reports() {
  std::vector<float> out(2048, 0.f);
  Buf b{out.data()};
  void* args[] = {&b};
  expect_report("a barrier some threads never reach", "exited", divergent_barrier_kernel, dim3(1), dim3(64), args);
  expect_report("threads released from different __syncthreads call sites", "different __syncthreads call sites",
                two_barrier_sites_kernel, dim3(1), dim3(64), args);
  expect_report("a shuffle whose caller is not in its mask", "is not in its mask", caller_not_in_mask_kernel,
                dim3(1), dim3(16), args);
  expect_report("a shuffle with an illegal width", "not a power of 2", bad_width_kernel, dim3(1), dim3(32), args);
  expect_report("a shuffle mask naming an exited lane", "exited", exited_lane_kernel, dim3(1), dim3(32), args);
  expect_report("a shuffle mask naming a lane the block does not have", "does not exist", missing_lane_kernel,
                dim3(1), dim3(16), args);
  expect_report("lanes meeting at different intrinsics", "different intrinsics", mixed_intrinsics_kernel, dim3(1),
                dim3(32), args);
  expect_report("a shuffle waiting for a lane held at a barrier", "deadlock", shuffle_vs_barrier_kernel, dim3(1),
                dim3(32), args);
  expect_report("more than 1024 threads per block", "exceeds CUDA's limits", noop_kernel, dim3(1), dim3(1025), args);
  expect_report("block z over 64", "exceeds CUDA's limits", noop_kernel, dim3(1), dim3(1, 1, 65), args);
  expect_report("grid y over 65535", "grid exceeds", noop_kernel, dim3(1, 65536), dim3(32), args);
  expect_report("dynamic shared memory", "dynamic shared memory", noop_kernel, dim3(1), dim3(32), args, 16);
  // every schedule: shared memory starts as NaN bits
  bool poisoned = cudaLaunchKernel(uninitialised_shared_kernel, dim3(2), dim3(64), args, 0, nullptr) == cudaSuccess;
  for (int t = 0; t < 64; ++t) poisoned = poisoned && (t & 1 ? out[t] == 2.f : std::isnan(out[t]));
  expect(poisoned, "shared memory starts as NaN bits in every block");
}

// ---------------------------------------------------------------- schedules
struct OrderArgs {
  int* order;
  int* counter;
};

__global__ void order_kernel(OrderArgs a) {
  __syncthreads();
  a.order[(*a.counter)++] = threadIdx.x;  // fibers switch only at sync points: no race here
}

std::vector<int> order_under(dmf_emu::Schedule s, uint64_t seed) {
  dmf_emu::emu().schedule = s;
  dmf_emu::emu().seed = seed;
  std::vector<int> order(64, -1);
  int counter = 0;
  OrderArgs a{order.data(), &counter};
  void* args[] = {&a};
  cudaLaunchKernel(order_kernel, dim3(1), dim3(64), args, 0, nullptr);
  return order;
}

void test_schedules() {
  using S = dmf_emu::Schedule;
  std::vector<int> rr = order_under(S::kRoundRobin, 0), rev = order_under(S::kReverse, 0);
  bool ok_rr = true, ok_rev = true;
  for (int i = 0; i < 64; ++i) {
    ok_rr = ok_rr && rr[i] == i;
    ok_rev = ok_rev && rev[i] == 63 - i;
  }
  expect(ok_rr, "round-robin runs threads in index order after a barrier");
  expect(ok_rev, "reverse runs threads in reverse index order");
  for (S s : {S::kRandom, S::kPriority}) {
    const auto a = order_under(s, 7), b = order_under(s, 7), c = order_under(s, 8);
    expect(a == b && a != c && a != rr, std::string(s == S::kRandom ? "random" : "priority") +
                                            ": the same seed gives the same order, another seed another");
  }
  dmf_emu::emu().schedule = S::kRoundRobin;
  dmf_emu::emu().seed = 0;
}

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

}  // namespace

int main() {
  test_conversions();
  test_shuffles();
  test_ballot_and_poison();
  test_nested_masks();
  test_reports();
  test_schedules();
  test_partial_groups();
  std::printf("%d failed\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
