// Part of the CUDA emulation (umbrella header and overview: dmf_emu.h): the types of
// cuda_runtime.h, the emulator's launch state, the fibers (one per CUDA thread) and how a
// fiber reports a bug and ends.
#pragma once
#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define DMF_EMU_ASAN 1
#else
#define DMF_EMU_ASAN 0
#endif

#define DMF_CUDA_EMU 1

// ----------------------------------------------------------------------------------------
// Types and launch API of cuda_runtime.h
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

namespace dmf_emu {

// The bits of `from` read as a To of the same size (std::bit_cast before C++20): the stand-in
// cuda_fp16.h / cuda_bf16.h conversions work on the float's bits.
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

enum class Schedule : int { kRoundRobin = 0, kReverse = 1, kRandom = 2, kPriority = 3 };

struct Loc {
  const char* file;
  int line;
};

enum class State : uint8_t { kReady, kBarrier, kWarp, kExited };
enum class WarpOp : uint8_t { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kSyncWarp };

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

// --- fibers ---------------------------------------------------------------------------
// On x86-64 a fiber switch saves the six callee-saved registers and the stack pointer
// (about 20x faster than swapcontext, which also makes a sigprocmask system call per switch:
// 0.4 us, most of an emulated launch's time); elsewhere ucontext.
#if defined(__x86_64__) && !defined(DMF_EMU_UCONTEXT)
#define DMF_EMU_FAST_SWITCH 1
// void dmf_emu_switch(void** save_sp, void* load_sp)
__asm__(
    ".text\n"
    ".weak dmf_emu_switch\n"
    ".hidden dmf_emu_switch\n"
    ".type dmf_emu_switch, @function\n"
    "dmf_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size dmf_emu_switch, .-dmf_emu_switch\n");
extern "C" void dmf_emu_switch(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void context_switch(Context& from, Context& to) { dmf_emu_switch(&from.sp, to.sp); }
// A new fiber's stack: six zero registers, then `entry` as the return address, aligned so
// that entry starts as if called (rsp + 8 a multiple of 16).
inline void context_make(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                               // entry's own return address: never used
  *--sp = reinterpret_cast<void*>(entry);        // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;   // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
#else
#define DMF_EMU_FAST_SWITCH 0
struct Context {
  ucontext_t uc;
};
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void context_make(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Thread {
  uint3 idx;
  int tid = 0, lane = 0, warp = 0;
  State state = State::kReady;
  Loc loc{nullptr, 0};  // the sync point it waits at
  // the warp intrinsic it waits at
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0;
  int width = 32, operand = 0, size = 0;
  uint64_t value = 0, result = 0;
  Context ctx;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's per-fiber fake stack
};

// Stack per fiber: the kernels keep their rows in small arrays (at most 3 x 32 accumulators);
// AddressSanitizer's redzones need more.
constexpr size_t kStackBytes = DMF_EMU_ASAN ? (512u << 10) : (64u << 10);
constexpr int kMaxThreadsPerBlock = 1024;

// The state of the launch in progress. One launch at a time (mutex), so plain globals: a
// thread_local would live in the TLS block that is poisoned as shared memory.
struct Emulator {
  std::mutex mutex;
  Schedule schedule = Schedule::kRoundRobin;
  uint64_t seed = 0;
  uint64_t launches = 0;
  // current block
  uint3 grid_dim{1, 1, 1}, block_dim{1, 1, 1}, block_idx{0, 0, 0};
  int nthreads = 0;
  std::vector<Thread> threads;
  std::vector<char*> stacks;
  Thread* cur = nullptr;
  Context sched_ctx;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  // schedule: a bit per slot; slot = tid, or the priority rank under kPriority
  std::vector<uint64_t> ready;
  std::vector<int> slot_of, tid_of;
  int cursor = -1;
  std::mt19937_64 rng;
  int at_barrier = 0, exited = 0;
  bool failed = false;
  std::string report;      // the first error of the launch in progress
  std::string last_error;  // the report of the last failed launch
  // shared memory: this library's TLS block, for the OS thread whose anchor is tls_thread
  char* tls = nullptr;
  size_t tls_size = 0;
  const char* tls_thread = nullptr;
};

inline Emulator& emu() {
  static Emulator e;
  return e;
}

inline Thread& current_thread() {
  Thread* t = emu().cur;
  if (t == nullptr) {
    std::fprintf(stderr, "dmf_emu: threadIdx/blockIdx or a device intrinsic used outside a kernel\n");
    std::abort();
  }
  return *t;
}

inline std::string where(const Thread& t) {
  const Emulator& e = emu();
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]", e.block_idx.x,
                e.block_idx.y, e.block_idx.z, t.idx.x, t.idx.y, t.idx.z, t.warp, t.lane);
  return buf;
}

inline std::string at(Loc l) { return std::string(l.file ? l.file : "?") + ":" + std::to_string(l.line); }

inline std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

inline void switch_to_scheduler(Thread& me, bool exiting) {
  Emulator& e = emu();
#if DMF_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &me.fake_stack, e.sched_stack_bottom, e.sched_stack_size);
#else
  (void)exiting;
#endif
  context_switch(me.ctx, e.sched_ctx);
#if DMF_EMU_ASAN
  __sanitizer_finish_switch_fiber(me.fake_stack, nullptr, nullptr);
#endif
}

inline void set_ready(Thread& t) {
  Emulator& e = emu();
  t.state = State::kReady;
  const int s = e.slot_of[t.tid];
  e.ready[s >> 6] |= uint64_t(1) << (s & 63);
}

inline void clear_ready(Thread& t) {
  Emulator& e = emu();
  const int s = e.slot_of[t.tid];
  e.ready[s >> 6] &= ~(uint64_t(1) << (s & 63));
}

// Unwinds a fiber after an error (caught in fiber_entry, on the fiber's own stack, so the
// temporaries of the failing frames are destroyed).
struct FiberAbort {};

// Records the first error of the launch and ends the calling fiber; the launch stops.
[[noreturn]] inline void fail(const std::string& msg) {
  Emulator& e = emu();
  if (!e.failed) {
    e.failed = true;
    e.report = msg;
  }
  clear_ready(current_thread());
  throw FiberAbort{};
}

inline void yield() { switch_to_scheduler(current_thread(), false); }

// Threads waiting at a barrier can never be released once another thread has exited.
inline void check_exit_against_waiters(Thread& me) {
  Emulator& e = emu();
  if (e.at_barrier > 0) {
    for (const Thread& t : e.threads)
      if (t.state == State::kBarrier)
        fail(where(me) + " exited while " + std::to_string(e.at_barrier) + " threads wait at __syncthreads (" +
             at(t.loc) + "), e.g. " + where(t) + ": a barrier inside divergent code never completes");
  }
  const int base = me.warp * 32;
  for (int l = 0; l < 32 && base + l < e.nthreads; ++l) {
    const Thread& t = e.threads[base + l];
    if (t.state == State::kWarp && (t.mask >> me.lane & 1u))
      fail(where(me) + " exited while lane " + std::to_string(l) + " waits for it at " + op_name(t.op) + "(mask " +
           hex(t.mask) + ") at " + at(t.loc));
  }
}

inline void fiber_entry() {
  Emulator& e = emu();
  Thread& me = *e.cur;
#if DMF_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &e.sched_stack_bottom, &e.sched_stack_size);
#endif
  try {
    e.body(e.body_arg);
    me.state = State::kExited;
    ++e.exited;
    clear_ready(me);
    check_exit_against_waiters(me);
  } catch (const FiberAbort&) {
  } catch (...) {  // e.g. bad_alloc: end the launch, never unwind off the fiber's stack
    if (!e.failed) {
      e.failed = true;
      e.report = "an exception escaped a kernel (" + where(me) + ")";
    }
  }
  switch_to_scheduler(me, true);
  std::abort();  // never resumed
}
}  // namespace dmf_emu
