// Stand-in for CUDA's cuda_fp16.h under the CPU emulation: __half as its 16 bits, with
// CUDA's conversions (round to nearest even; NaN becomes the canonical 0x7fff).
#pragma once
#include <cstdint>

#include "dmf_emu.h"

struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
  uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf, NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  return dmf_emu::bit_cast<float>(bits);
}

inline __half __float2half_rn(float f) {
  const uint32_t bits = dmf_emu::bit_cast<uint32_t>(f);
  const unsigned short sign = static_cast<unsigned short>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  unsigned short out;
  if (abs > 0x7f800000u) {
    out = 0x7fff;  // NaN
  } else if (abs >= 0x477ff000u) {
    out = sign | 0x7c00u;  // rounds to inf (65520 and above)
  } else if (abs >= 0x38800000u) {  // normal half (>= 2^-14)
    const uint32_t mant = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
    out = sign | static_cast<unsigned short>((mant - 0x38000000u) >> 13);
  } else {  // subnormal or zero: value / 2^-24 = sig >> (126 - exp), rounded to nearest even
    const int shift = 126 - int(abs >> 23);
    if (shift >= 25) {
      out = sign;  // below half of the smallest subnormal (float subnormals included)
    } else {
      const uint32_t sig = (abs & 0x7fffffu) | 0x800000u;
      const uint32_t q = sig >> shift, rem = sig & ((1u << shift) - 1u), half = 1u << (shift - 1);
      out = sign | static_cast<unsigned short>(q + (rem > half || (rem == half && (q & 1u))));
    }
  }
  __half h;
  h.__x = out;
  return h;
}
