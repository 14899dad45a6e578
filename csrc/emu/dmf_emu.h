// SIMT emulation of the CUDA subset our kernels use, for running csrc/cuda/*.cu on the CPU.
//
// The real .cu files compile with g++ against the stand-in headers of this folder
// (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h -> this file). A launch runs its blocks one
// after another on the calling OS thread; inside a block every CUDA thread is a fiber
// that runs until it reaches a sync point (__syncthreads or a warp intrinsic),
// then the schedule picks the next ready thread: round-robin, reverse, seeded random, or
// seeded priority order. The emulation reports GPU bugs instead of hiding them:
// - a barrier some threads never reach (one exited, or waits at a warp intrinsic), threads
//   released from different __syncthreads call sites, a deadlock (file:line of each waiter);
// - a warp intrinsic whose caller is not in its mask, with an illegal width, whose mask names
//   a lane that exited or does not exist, or whose lanes meet at different intrinsics, masks or
//   widths; a shuffle that reads a lane outside the mask returns NaN bits (undefined on a GPU).
//   Stricter than PTX on one point, by policy: shfl.sync only waits for non-exited lanes, but
//   our team masks name exactly the lanes that take part, so a mask naming an exited lane is a
//   bug here; likewise a barrier after some threads exited (undefined per the CUDA guide);
// - CUDA's launch limits (threads per block, block and grid dims, dynamic shared memory).
// Shared memory starts as NaN bits in every block (so do outputs: see emu_backend.cpp).
// Not emulated: timing, occupancy, the memory model between sync points (a thread's writes
// are seen at once by the next fiber), dynamic `extern __shared__` memory, <<<>>> launches
// (use the typed cudaLaunchKernel), and FMA contraction as nvcc does it.
//
// __shared__ variables are `static thread_local`: all fibers of a block share the OS thread
// and so the variable, and the emulator poisons this library's whole TLS block (found with
// dl_iterate_phdr) before each block. The emulator's own state is therefore not thread_local:
// launches are serialised by a mutex.
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

// --- barriers -------------------------------------------------------------------------
inline void barrier(Loc loc) {
  Emulator& e = emu();
  Thread& me = current_thread();
  me.state = State::kBarrier;
  me.loc = loc;
  clear_ready(me);
  ++e.at_barrier;
  if (e.exited > 0)
    fail("__syncthreads at " + at(loc) + " reached by " + where(me) + " after " + std::to_string(e.exited) +
         " threads of its block exited: a barrier inside divergent code never completes");
  // a lane that waits for this thread at a warp intrinsic can never be released
  const int base = me.warp * 32;
  for (int l = 0; l < 32 && base + l < e.nthreads; ++l) {
    const Thread& t = e.threads[base + l];
    if (t.state == State::kWarp && (t.mask >> me.lane & 1u))
      fail("deadlock: " + where(me) + " waits at __syncthreads (" + at(loc) + ") while lane " + std::to_string(l) +
           " waits for it at " + op_name(t.op) + "(mask " + hex(t.mask) + ") at " + at(t.loc));
  }
  if (e.at_barrier == e.nthreads) {
    for (const Thread& t : e.threads)
      if (t.loc.line != loc.line || std::strcmp(t.loc.file, loc.file) != 0)
        fail("threads released from different __syncthreads call sites: " + where(me) + " at " + at(loc) + ", " +
             where(t) + " at " + at(t.loc));
    for (Thread& t : e.threads) set_ready(t);
    e.at_barrier = 0;
  }
  yield();
}

// --- warp intrinsics (Volta+ semantics: the mask's lanes converge at the intrinsic) ------
inline bool lane_exists(int warp, int lane) { return warp * 32 + lane < emu().nthreads; }

// The lane a shuffle reads, by PTX's shfl.sync definition (c = ((32 - width) << 8) | clamp).
inline int shfl_source(WarpOp op, int lane, int b, int width) {
  const int segmask = 32 - width;
  const int clamp = op == WarpOp::kShflUp ? 0 : 31;
  const int min_lane = lane & segmask;
  const int max_lane = min_lane | (clamp & ~segmask & 31);
  const int bval = b & 31;
  int j = lane;
  bool pval = true;
  switch (op) {
    case WarpOp::kShflUp: j = lane - bval; pval = j >= max_lane; break;
    case WarpOp::kShflDown: j = lane + bval; pval = j <= max_lane; break;
    case WarpOp::kShflXor: j = lane ^ bval; pval = j <= max_lane; break;
    case WarpOp::kShflIdx: j = min_lane | (bval & ~segmask & 31); pval = j <= max_lane; break;
    default: break;
  }
  return pval ? j : lane;
}

inline void complete_warp_op(int warp, unsigned mask) {
  Emulator& e = emu();
  Thread* lanes = &e.threads[warp * 32];
  const Thread& first = lanes[__builtin_ctz(mask)];
  if (first.op == WarpOp::kBallot) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && lanes[l].value != 0) bits |= 1u << l;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) lanes[l].result = bits;
  } else if (first.op != WarpOp::kSyncWarp) {
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const int j = shfl_source(first.op, l, lanes[l].operand, first.width);
      // reading a lane outside the mask is undefined: NaN bits make it show in the numbers
      lanes[l].result = (mask >> j & 1u) && lane_exists(warp, j) ? lanes[j].value : ~uint64_t(0);
    }
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) set_ready(lanes[l]);
}

inline uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int size, int operand, int width, Loc loc) {
  Emulator& e = emu();
  Thread& me = current_thread();
  const char* name = op_name(op);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(name) + " at " + at(loc) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32] (" +
         where(me) + ")");
  if (!(mask >> me.lane & 1u))
    fail(std::string(name) + " at " + at(loc) + ": the calling lane " + std::to_string(me.lane) + " is not in its mask " +
         hex(mask) + " (" + where(me) + ")");
  me.state = State::kWarp;
  me.loc = loc;
  me.op = op;
  me.mask = mask;
  me.width = width;
  me.size = size;
  me.operand = operand;
  me.value = value;
  clear_ready(me);
  bool complete = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (!lane_exists(me.warp, l))
      fail(std::string(name) + " at " + at(loc) + ": mask " + hex(mask) + " names lane " + std::to_string(l) +
           ", which does not exist in a block of " + std::to_string(e.nthreads) + " threads (" + where(me) + ")");
    const Thread& t = e.threads[me.warp * 32 + l];
    switch (t.state) {
      case State::kExited:
        fail(std::string(name) + " at " + at(loc) + ": mask " + hex(mask) + " names lane " + std::to_string(l) +
             ", which has exited (" + where(me) + ")");
      case State::kBarrier:
        fail("deadlock: " + where(me) + " waits at " + name + "(mask " + hex(mask) + ") at " + at(loc) + " for lane " +
             std::to_string(l) + ", which waits at __syncthreads (" + at(t.loc) + ")");
      case State::kWarp:
        // A lane waiting at another intrinsic whose mask leaves this lane out will come here
        // next; one whose mask names this lane waits for it: a mismatch either way round.
        if (t.mask != mask && !(t.mask >> me.lane & 1u)) {
          complete = false;
          break;
        }
        if (t.op != op || t.mask != mask || t.width != width || t.size != size)
          fail("lanes meeting at different intrinsics: lane " + std::to_string(me.lane) + " at " + name + "(mask " +
               hex(mask) + ", width " + std::to_string(width) + ", " + std::to_string(size) + " bytes) at " + at(loc) +
               ", lane " + std::to_string(l) + " at " + op_name(t.op) + "(mask " + hex(t.mask) + ", width " +
               std::to_string(t.width) + ", " + std::to_string(t.size) + " bytes) at " + at(t.loc) + " (" + where(me) +
               ")");
        break;
      case State::kReady: complete = false; break;
    }
  }
  if (complete) complete_warp_op(me.warp, mask);
  yield();
  return me.result;
}

template <typename T>
inline T shfl(WarpOp op, unsigned mask, T var, int operand, int width, Loc loc) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_op(op, mask, bits, sizeof(T), operand, width, loc);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

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

}  // namespace dmf_emu

namespace dmf_emu {
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

// ----------------------------------------------------------------------------------------
// Keywords, built-in variables and device functions
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::dmf_emu::current_thread().idx)
#define blockIdx (::dmf_emu::emu().block_idx)
#define blockDim (::dmf_emu::emu().block_dim)
#define gridDim (::dmf_emu::emu().grid_dim)
#define warpSize 32

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  dmf_emu::barrier(dmf_emu::Loc{file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  dmf_emu::warp_op(dmf_emu::WarpOp::kSyncWarp, mask, 0, 0, 0, 32, dmf_emu::Loc{file, line});
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      dmf_emu::warp_op(dmf_emu::WarpOp::kBallot, mask, pred != 0, 4, 0, 32, dmf_emu::Loc{file, line}));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflIdx, mask, var, src_lane, width, dmf_emu::Loc{file, line});
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflUp, mask, var, static_cast<int>(delta), width, dmf_emu::Loc{file, line});
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflDown, mask, var, static_cast<int>(delta), width,
                       dmf_emu::Loc{file, line});
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return dmf_emu::shfl(dmf_emu::WarpOp::kShflXor, mask, var, lane_mask, width, dmf_emu::Loc{file, line});
}

// Atomics: fibers switch only at sync points, so a read-modify-write is atomic as it is.
template <typename T>
inline T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}

// CUDA's min/max overloads for device code (same-type operands only, like std::min).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
using std::sqrt;  // float and double overloads, correctly rounded as nvcc's default -prec-sqrt=true
