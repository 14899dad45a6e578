// Self-test of the CUDA emulation: shuffle semantics, every bug class the emulation must report,
// and the schedules (see emu_selftest.h).
#include "emu_selftest.h"

namespace selftest {

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

}  // namespace selftest
