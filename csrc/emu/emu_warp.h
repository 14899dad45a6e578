// Part of the CUDA emulation (dmf_emu.h): __syncthreads barriers and the warp intrinsics'
// meeting of lanes, with the bugs they report.
#pragma once
#include "emu_fibers.h"

namespace dmf_emu {

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

}  // namespace dmf_emu
