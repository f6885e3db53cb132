// Division of 32-bit unsigned integers by a fixed divisor d >= 1 with one multiply-high, a
// subtraction, an addition and two shifts (Granlund and Montgomery, "Division by invariant
// integers using multiplication", 1994, section 4). d = 0 is undefined (K >= 1 is checked
// by validate(Config), core/config.cpp). The expert rows pass divides every task index by K to
// find its token; a full 32-bit division there is ~25 instructions of a task's ~700
// (session n's SASS count). Exact for every dividend below 2^32 (tests/unit/test_fast_div.cpp).
#pragma once

#include <cstdint>

#include "core/math.hpp"  // OMNIMOE_HD

namespace omnimoe {

// Built on the host and passed to a kernel by value (the constructor's 64-bit division is
// then not repeated by every thread).
struct FastDiv {
  std::uint32_t m;   // multiplier: floor(2^32 (2^l - d) / d) + 1, l = ceil(log2 d), d the divisor
  std::uint32_t s1;  // min(l, 1)
  std::uint32_t s2;  // max(l - 1, 0)

  OMNIMOE_HD explicit FastDiv(std::uint32_t divisor) {
    std::uint32_t l = 0;
    while (l < 32 && (std::uint64_t{1} << l) < divisor) ++l;
    m = static_cast<std::uint32_t>((((std::uint64_t{1} << l) - divisor) << 32) / divisor + 1);
    s1 = l < 1 ? l : 1;
    s2 = l > 1 ? l - 1 : 0;
  }
  OMNIMOE_HD std::uint32_t div(std::uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const std::uint32_t t = __umulhi(m, n);
#else
    const std::uint32_t t = static_cast<std::uint32_t>((std::uint64_t{m} * n) >> 32);
#endif
    return (t + ((n - t) >> s1)) >> s2;
  }
};

}  // namespace omnimoe
