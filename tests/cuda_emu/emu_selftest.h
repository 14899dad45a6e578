// Shared by the self-test of the CUDA emulation (csrc/emu), emu_selftest*.cpp: the semantics it
// implements and the bugs it must report, on small kernels written here, plus the launchers of
// csrc/cuda on edge cases the op wrappers never produce. Built by `python csrc/emu/build.py
// --selftest` into one program, run by tests/cuda_emu/test_emulator.py; it prints one line per
// case and exits 1 on any failure.
//   emu_selftest.cpp            main, half/bfloat16 conversions
//   emu_selftest_sync.cpp       warp intrinsics, every reported bug class, schedules
//   emu_selftest_launchers.cpp  csrc/cuda launchers on edge cases
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace selftest {

inline int g_failures = 0;

inline void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

inline std::string last_report() { return dmf_emu::emu().last_error; }

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

void test_conversions();        // emu_selftest.cpp
void test_shuffles();           // emu_selftest_sync.cpp
void test_ballot_and_poison();  // emu_selftest_sync.cpp
void test_nested_masks();       // emu_selftest_sync.cpp
void test_reports();            // emu_selftest_sync.cpp
void test_schedules();          // emu_selftest_sync.cpp
void test_partial_groups();     // emu_selftest_launchers.cpp

}  // namespace selftest
