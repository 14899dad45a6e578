// Stand-in for CUDA's cuda_bf16.h under the CPU emulation: __nv_bfloat16 as its 16 bits,
// with CUDA's conversions (round to nearest even; NaN becomes the canonical 0x7fff).
#pragma once
#include <cstdint>

#include "dmf_emu.h"

struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 h) { return dmf_emu::bit_cast<float>(uint32_t(h.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t bits = dmf_emu::bit_cast<uint32_t>(f);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    h.__x = 0x7fff;
  } else {
    h.__x = static_cast<unsigned short>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  return h;
}
