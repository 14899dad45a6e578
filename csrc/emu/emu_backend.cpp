// The emulated-CUDA test library: the real csrc/cuda/*.cu kernels, compiled by g++ against the
// stand-in headers of this folder, behind the same kernel table as a GPU build
// (launcher_table.h). Plain C++, no torch: dmf_kernels.cuda_emu loads it with ctypes and
// installs the table for CPU tensors (dmf_kernels._C._set_cpu_backend), so the op tests run
// against the CUDA kernels. Before each launch every output buffer is filled with NaN bits,
// so a value a kernel fails to write shows up in the numbers.
#include <cstring>
#include <stdexcept>

#include "../cuda/cuda_common.cuh"
#include "../cuda/launcher_table.h"

namespace dmf {
namespace {

size_t elem_size(DType t) { return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2; }
size_t acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

void poison(void* p, int64_t count, size_t size) {
  if (p != nullptr && count > 0) std::memset(p, 0xff, static_cast<size_t>(count) * size);
}

int64_t partial_rows(int64_t rows, int64_t rows_per_group, int64_t chunk_rows) {
  return ceil_div(rows, rows_per_group) * ceil_div(rows_per_group, chunk_rows);
}

struct EmuEnv {
  static cudaStream_t stream() { return nullptr; }
  [[noreturn]] static void fail(const std::string& message) { throw std::runtime_error(message); }

  static void before_launch(const NormModFwdParams& p) {
    const size_t es = elem_size(p.dtype), as = acc_size(p.dtype);
    poison(p.out, p.rows * p.dim, es);
    if (p.gate.ptr != nullptr) poison(p.x_out, p.rows * p.dim, es);
    poison(p.mean, p.rows, as);
    poison(p.rstd, p.rows, as);
  }
  static void before_launch(const NormModJvpParams& q) {
    const NormModFwdParams& p = q.p;
    before_launch(p);
    poison(q.out_dot, p.rows * p.dim, elem_size(p.dtype));
    if (p.gate.ptr != nullptr) poison(q.x_out_dot, p.rows * p.dim, elem_size(p.dtype));
  }
  static void before_launch(const NormModBwdParams& p) {
    const size_t es = elem_size(p.dtype), as = acc_size(p.dtype);
    const int64_t parts = partial_rows(p.rows, p.rows_per_group, p.chunk_rows) * p.dim;
    poison(p.grad_x, p.rows * p.dim, es);
    poison(p.part_shift, parts, as);
    poison(p.part_scale, parts, as);
    if (p.gate.ptr != nullptr) {
      poison(p.grad_y, p.rows * p.dim, es);
      poison(p.part_gate, parts, as);
    }
  }
  static void before_launch(const GatedResidualParams& p) {
    const size_t es = elem_size(p.dtype);
    poison(p.out, p.rows * p.dim, es);
    poison(p.out_dot, p.rows * p.dim, es);
    poison(p.grad_y, p.rows * p.dim, es);
    poison(p.part_gate, partial_rows(p.rows, p.rows_per_group, p.chunk_rows) * p.dim, acc_size(p.dtype));
  }
  static void before_launch(const RmsNormParams& p) {
    const size_t es = elem_size(p.dtype), as = acc_size(p.dtype);
    if (p.grad_out != nullptr) {  // backward
      poison(p.grad_x, p.rows * p.dim, es);
      poison(p.part_weight, ceil_div(p.rows, p.chunk_rows) * p.dim, as);
      return;
    }
    poison(p.out, p.rows * p.dim, es);
    poison(p.rstd, p.rows, as);
    poison(p.out_dot, p.rows * p.dim, es);
  }
  // swiglu, rope
  static void before_launch(const SwigluParams& p) {
    const size_t es = elem_size(p.dtype);
    poison(p.h, p.rows * p.dim, es);
    poison(p.h_dot, p.rows * p.dim, es);
    poison(p.grad_x, p.rows * 2 * p.dim, es);
  }
  static void before_launch(const RopeParams& p) {
    const size_t es = elem_size(p.dtype);
    poison(p.out, p.rows * p.dim, es);
    poison(p.out_dot, p.rows * p.dim, es);
  }
};

}  // namespace
}  // namespace dmf

extern "C" {

// The kernel table (dmf::Backend) for dmf_kernels._C._set_cpu_backend.
const void* dmf_emu_backend() { return &dmf::cuda::LauncherTable<dmf::EmuEnv>::table(); }

// schedule: 0 round-robin, 1 reverse, 2 seeded random, 3 seeded priority. Returns 0, or -1 for
// an unknown schedule.
int dmf_emu_set_schedule(int schedule, unsigned long long seed) {
  if (schedule < 0 || schedule > 3) return -1;
  dmf_emu::emu().schedule = static_cast<dmf_emu::Schedule>(schedule);
  dmf_emu::emu().seed = seed;
  return 0;
}

unsigned long long dmf_emu_launch_count() { return dmf_emu::emu().launches; }

// The launch shape row_launch() picks (cuda_common.cuh): team, ept, threads, rows per block.
void dmf_emu_row_launch(long long dim, int vec, int* out4) {
  const dmf::cuda::RowLaunch L = dmf::cuda::row_launch(dim, vec);
  out4[0] = L.team;
  out4[1] = L.ept;
  out4[2] = L.threads;
  out4[3] = L.rows_per_block;
}

}  // extern "C"
