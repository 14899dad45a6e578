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
// The parts, in dependency order:
#include "emu_fibers.h"  // cuda_runtime.h types, launch state, fibers, error reporting
#include "emu_warp.h"    // barriers and warp intrinsics (emulator side)
#include "emu_launch.h"  // scheduler, blocks and grids, cudaLaunchKernel and the error API
#include "emu_device.h"  // keywords, built-ins and device functions seen by the kernels
