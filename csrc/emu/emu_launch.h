// Part of the CUDA emulation (dmf_emu.h): the scheduler (which ready fiber runs next), the
// shared-memory poisoning, running a block and a grid, and the launch API of cuda_runtime.h.
#pragma once
#include "emu_fibers.h"

namespace dmf_emu {

// --- the scheduler ----------------------------------------------------------------------
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline int pick_ready() {
  Emulator& e = emu();
  const int nslots = e.nthreads, words = (nslots + 63) / 64;
  int count = 0;
  for (int w = 0; w < words; ++w) count += __builtin_popcountll(e.ready[w]);
  if (count == 0) return -1;
  auto is_ready = [&](int s) { return (e.ready[s >> 6] >> (s & 63)) & 1u; };
  int slot = -1;
  switch (e.schedule) {
    case Schedule::kRoundRobin:
      for (int k = 1; k <= nslots && slot < 0; ++k)
        if (is_ready((e.cursor + k) % nslots)) slot = (e.cursor + k) % nslots;
      break;
    case Schedule::kReverse:
      for (int k = 1; k <= nslots && slot < 0; ++k)
        if (is_ready(((e.cursor - k) % nslots + nslots) % nslots)) slot = ((e.cursor - k) % nslots + nslots) % nslots;
      break;
    case Schedule::kRandom: {
      int k = static_cast<int>(e.rng() % static_cast<uint64_t>(count));
      for (int w = 0; w < words && slot < 0; ++w) {
        const int c = __builtin_popcountll(e.ready[w]);
        if (k >= c) {
          k -= c;
          continue;
        }
        uint64_t bits = e.ready[w];
        for (; k > 0; --k) bits &= bits - 1;
        slot = w * 64 + __builtin_ctzll(bits);
      }
      break;
    }
    case Schedule::kPriority:  // the highest rank
      for (int w = words - 1; w >= 0 && slot < 0; --w)
        if (e.ready[w]) slot = w * 64 + 63 - __builtin_clzll(e.ready[w]);
      break;
  }
  e.cursor = slot;
  return e.tid_of[slot];
}

inline std::string deadlock_report() {
  Emulator& e = emu();
  std::string r = "deadlock: no thread can run;";
  int shown = 0;
  for (const Thread& t : e.threads) {
    if (t.state == State::kExited) continue;
    if (++shown > 8) {
      r += " ...";
      break;
    }
    r += " " + where(t) + " waits at " +
         (t.state == State::kBarrier ? std::string("__syncthreads") : std::string(op_name(t.op)) + "(mask " + hex(t.mask) + ")") +
         " (" + at(t.loc) + ");";
  }
  return r;
}

// This module's TLS block for the calling thread, where the kernels' __shared__ variables
// live. Looked up again when a launch comes from another OS thread.
inline char* tls_anchor() {
  static thread_local char anchor;  // also makes sure the block is allocated for this thread
  *static_cast<volatile char*>(&anchor) = 0;
  return &anchor;
}

inline bool find_shared_memory() {
  Emulator& e = emu();
  struct Ctx {
    uintptr_t code;
    char* data;
    size_t size;
    bool found;
  } ctx{reinterpret_cast<uintptr_t>(&find_shared_memory), nullptr, 0, false};
  e.tls_thread = tls_anchor();
  dl_iterate_phdr(
      [](dl_phdr_info* pi, size_t, void* p) {
        Ctx* c = static_cast<Ctx*>(p);
        bool mine = false;  // the module whose loaded segments hold this function (PIE or not)
        for (int i = 0; i < pi->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = pi->dlpi_phdr[i];
          if (ph.p_type == PT_LOAD && c->code >= pi->dlpi_addr + ph.p_vaddr &&
              c->code < pi->dlpi_addr + ph.p_vaddr + ph.p_memsz)
            mine = true;
        }
        if (!mine) return 0;
        for (int i = 0; i < pi->dlpi_phnum; ++i)
          if (pi->dlpi_phdr[i].p_type == PT_TLS) {
            c->size = pi->dlpi_phdr[i].p_memsz;
            c->data = static_cast<char*>(pi->dlpi_tls_data);
          }
        c->found = true;
        return 1;
      },
      &ctx);
  e.tls = ctx.data;
  e.tls_size = ctx.size;
  return e.tls != nullptr && e.tls_size > 0;
}

inline cudaError_t run_block() {
  Emulator& e = emu();
  const int n = e.nthreads;
  std::memset(e.tls, 0xff, e.tls_size);  // shared memory starts as NaN bits
  const uint64_t block_linear =
      (uint64_t(e.block_idx.z) * e.grid_dim.y + e.block_idx.y) * e.grid_dim.x + e.block_idx.x;
  e.rng.seed(splitmix64(e.seed ^ splitmix64(block_linear)));
  for (int s = 0; s < n; ++s) e.tid_of[s] = s;
  if (e.schedule == Schedule::kPriority) std::shuffle(e.tid_of.begin(), e.tid_of.begin() + n, e.rng);
  for (int s = 0; s < n; ++s) e.slot_of[e.tid_of[s]] = s;
  std::fill(e.ready.begin(), e.ready.end(), 0);
  e.cursor = e.schedule == Schedule::kReverse ? 0 : -1;
  e.at_barrier = e.exited = 0;
  for (int t = 0; t < n; ++t) {
    Thread& th = e.threads[t];
    th = Thread{};
    th.tid = t;
    th.idx = uint3{unsigned(t) % e.block_dim.x, (unsigned(t) / e.block_dim.x) % e.block_dim.y,
                   unsigned(t) / (e.block_dim.x * e.block_dim.y)};
    th.lane = t & 31;
    th.warp = t >> 5;
    th.stack = e.stacks[t];
#if DMF_EMU_ASAN
    // the previous fiber on this stack ended inside fiber_entry/switch_to_scheduler, whose frames
    // (at the top of the stack) stay poisoned in ASan's shadow memory
    __asan_unpoison_memory_region(th.stack + kStackBytes - 16384, 16384);
#endif
    context_make(th.ctx, th.stack, kStackBytes, fiber_entry);
    set_ready(th);
  }
  while (!e.failed) {
    const int t = pick_ready();
    if (t < 0) {
      if (e.exited != n) {
        e.failed = true;
        e.report = deadlock_report();
      }
      break;
    }
    Thread& th = e.threads[t];
    e.cur = &th;
#if DMF_EMU_ASAN
    __sanitizer_start_switch_fiber(&e.sched_fake_stack, th.stack, kStackBytes);
#endif
    context_switch(e.sched_ctx, th.ctx);
#if DMF_EMU_ASAN
    __sanitizer_finish_switch_fiber(e.sched_fake_stack, nullptr, nullptr);
#endif
    e.cur = nullptr;
  }
  return e.failed ? cudaErrorLaunchFailure : cudaSuccess;
}

inline cudaError_t& last_error_code() {
  static cudaError_t err = cudaSuccess;
  return err;
}

inline cudaError_t launch_error(cudaError_t err, const std::string& msg) {
  emu().last_error = msg;
  last_error_code() = err;
  return err;
}

// Runs body(arg) as every thread of every block of the grid.
inline cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_shared, void (*body)(void*), void* arg) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return launch_error(cudaErrorInvalidConfiguration, "a block or grid dimension is 0");
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > kMaxThreadsPerBlock)
    return launch_error(cudaErrorInvalidConfiguration,
                        "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                            std::to_string(block.z) + ") exceeds CUDA's limits (x, y <= 1024, z <= 64, 1024 threads)");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return launch_error(cudaErrorInvalidConfiguration, "grid exceeds CUDA's limits (x < 2^31, y, z <= 65535)");
  if (dynamic_shared != 0)
    return launch_error(cudaErrorInvalidValue, "dynamic shared memory is not emulated");
  ++e.launches;
  if (e.stacks.size() < threads) {
    for (size_t t = e.stacks.size(); t < threads; ++t) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) return launch_error(cudaErrorLaunchOutOfResources, "could not map fiber stacks");
      mprotect(p, 4096, PROT_NONE);  // a guard page: an overflow faults instead of corrupting a neighbour
      e.stacks.push_back(static_cast<char*>(p));
    }
  }
  if (e.tls_thread != tls_anchor() && !find_shared_memory())
    return launch_error(cudaErrorLaunchFailure, "could not find the TLS block that holds __shared__ memory");
  e.nthreads = static_cast<int>(threads);
  e.threads.assign(threads, Thread{});
  e.ready.assign((threads + 63) / 64, 0);
  e.slot_of.assign(threads, 0);
  e.tid_of.assign(threads, 0);
  e.grid_dim = uint3{grid.x, grid.y, grid.z};
  e.block_dim = uint3{block.x, block.y, block.z};
  e.body = body;
  e.body_arg = arg;
  e.failed = false;
  e.report.clear();
#if defined(__x86_64__)
  // IEEE denormals as on a GPU without fast-math, whatever the caller set
  // (torch.set_flush_denormal sets FTZ/DAZ); restored on return
  struct Mxcsr {
    unsigned saved = __builtin_ia32_stmxcsr();
    Mxcsr() { __builtin_ia32_ldmxcsr(0x1f80); }
    ~Mxcsr() { __builtin_ia32_ldmxcsr(saved); }
  } mxcsr;
#endif
  // blocks in order (reverse order under the reverse schedule)
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t b = e.schedule == Schedule::kReverse ? nblocks - 1 - k : k;
    e.block_idx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    if (run_block() != cudaSuccess) {
#if DMF_EMU_ASAN
      // the fibers still waiting at sync points are abandoned; their frames stay poisoned in
      // ASan's shadow memory: clear it before the stacks are reused
      for (int t = 0; t < e.nthreads; ++t) __asan_unpoison_memory_region(e.stacks[t], kStackBytes);
#endif
      return launch_error(cudaErrorLaunchFailure, e.report);
    }
  }
  return cudaSuccess;
}

template <typename... P>
struct KernelCall {
  using Args = std::tuple<std::decay_t<P>...>;
  void (*kernel)(P...);
  void** args;
  template <size_t... I>
  void run(std::index_sequence<I...>) const {
    Args values{*static_cast<std::tuple_element_t<I, Args>*>(args[I])...};  // by value, per thread
    std::apply(kernel, values);
  }
  static void body(void* self) { static_cast<KernelCall*>(self)->run(std::index_sequence_for<P...>{}); }
};
}  // namespace dmf_emu

// A typed launch: the argument types come from the kernel's signature, as with the
// cudaLaunchKernel template of the real cuda_runtime.h. (The `const void*` form is not
// provided: it throws the types away.)
template <typename... P>
inline cudaError_t cudaLaunchKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                                    size_t shared_mem = 0, cudaStream_t stream = nullptr) {
  (void)stream;
  dmf_emu::KernelCall<P...> call{kernel, args};
  return dmf_emu::run_grid(grid, block, shared_mem, &dmf_emu::KernelCall<P...>::body, &call);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = dmf_emu::last_error_code();
  dmf_emu::last_error_code() = cudaSuccess;
  return err;
}
inline cudaError_t cudaPeekAtLastError() { return dmf_emu::last_error_code(); }

// The report of a failed emulated launch rides on the error string.
inline const char* cudaGetErrorString(cudaError_t err) {
  static std::string msg;
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: msg = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: msg = "invalid configuration argument"; break;
    case cudaErrorLaunchOutOfResources: msg = "too many resources requested for launch"; break;
    case cudaErrorLaunchFailure: msg = "unspecified launch failure"; break;
    default: msg = "unknown error"; break;
  }
  if (!dmf_emu::emu().last_error.empty()) msg += " (emulated CUDA: " + dmf_emu::emu().last_error + ")";
  return msg.c_str();
}
