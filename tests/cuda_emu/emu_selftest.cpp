// Self-test of the CUDA emulation: main, and the half/bfloat16 conversions (see emu_selftest.h).
#include "emu_selftest.h"

namespace selftest {

// ---------------------------------------------------------------- conversions
void test_conversions() {
#if defined(__FLT16_MAX__)
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {  // every half -> float
    __half h;
    h.__x = static_cast<unsigned short>(b);
    _Float16 r;
    std::memcpy(&r, &h.__x, 2);
    const float a = __half2float(h), e = static_cast<float>(r);
    if (!(a == e || (std::isnan(a) && std::isnan(e))) || std::signbit(a) != std::signbit(e)) ++bad;
  }
  expect(bad == 0, "half -> float: all 65536 values exact (" + std::to_string(bad) + " wrong)");
  // float -> half: every half value, the midpoints between neighbours (ties to even) and
  // one ulp either side, plus random floats over the whole range
  std::vector<float> fs;
  for (uint32_t b = 0; b < 0x7c00; ++b) {
    __half lo, hi;
    lo.__x = static_cast<unsigned short>(b);
    hi.__x = static_cast<unsigned short>(b + 1);
    const float a = __half2float(lo), c = __half2float(hi), mid = static_cast<float>((double(a) + double(c)) / 2);
    for (float f : {a, mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)}) {
      fs.push_back(f);
      fs.push_back(-f);
    }
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    fs.push_back(f);
  }
  bad = 0;
  for (float f : fs) {
    const __half h = __float2half_rn(f);
    const _Float16 r = static_cast<_Float16>(f);
    uint16_t rb;
    std::memcpy(&rb, &r, 2);
    if (std::isnan(f) ? h.__x != 0x7fff : h.__x != rb) ++bad;
  }
  expect(bad == 0, "float -> half: " + std::to_string(fs.size()) + " values round to nearest even (" +
                       std::to_string(bad) + " wrong)");
#else
  expect(true, "float <-> half: no _Float16 reference on this compiler (skipped)");
#endif
  // bf16: against the nearest-even choice between the two neighbours, computed in double
  int bad16 = 0;
  std::mt19937 rng2(2);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = i < 65536 ? (uint32_t(i) << 16) | 0x8000u : rng2();  // exact midpoints, then random
    float f;
    std::memcpy(&f, &u, 4);
    const __nv_bfloat16 h = __float2bfloat16_rn(f);
    uint16_t want;
    if (std::isnan(f)) {
      want = 0x7fff;
    } else if (std::isinf(f)) {
      want = static_cast<uint16_t>(u >> 16);
    } else {  // lo: the magnitude truncated to bf16; hi: one bf16 ulp further (2^128 past the max)
      const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
      float flo, fhi;
      std::memcpy(&flo, &lo, 4);
      std::memcpy(&fhi, &hi, 4);
      const double vhi = std::isinf(fhi) ? std::copysign(std::ldexp(1.0, 128), double(f)) : double(fhi);
      const double dlo = std::fabs(double(f) - double(flo)), dhi = std::fabs(vhi - double(f));
      const bool up = dhi < dlo || (dhi == dlo && ((lo >> 16) & 1u));
      want = static_cast<uint16_t>((up ? hi : lo) >> 16);
    }
    if (h.__x != want) ++bad16;
  }
  expect(bad16 == 0, "float -> bf16: 2e6 values round to nearest even (" + std::to_string(bad16) + " wrong)");
}

}  // namespace selftest

int main() {
  selftest::test_conversions();
  selftest::test_shuffles();
  selftest::test_ballot_and_poison();
  selftest::test_nested_masks();
  selftest::test_reports();
  selftest::test_schedules();
  selftest::test_partial_groups();
  std::printf("%d failed\n", selftest::g_failures);
  return selftest::g_failures == 0 ? 0 : 1;
}
