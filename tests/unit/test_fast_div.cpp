// FastDiv (src/core/fast_div.hpp) against the plain division, on the host: every divisor up
// to 4096 with dividends near its multiples, near the 32-bit limits and at random, and
// large divisors.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>

#include "core/fast_div.hpp"

namespace omnimoe {
namespace {

void expect_exact(std::uint32_t d, std::uint32_t n) {
  ASSERT_EQ(FastDiv(d).div(n), n / d) << n << " / " << d;
}

TEST(FastDiv, SmallDivisorsNearMultiplesAndLimits) {
  std::mt19937 rng(7);
  for (std::uint32_t d = 1; d <= 4096; ++d) {
    for (std::uint32_t q : {0u, 1u, 2u, 511u, 1000003u}) {
      const std::uint64_t base = std::uint64_t{q} * d;
      for (int off = -1; off <= 1; ++off) {
        const std::int64_t n = static_cast<std::int64_t>(base) + off;
        if (n >= 0 && n <= 0xffffffffLL) expect_exact(d, static_cast<std::uint32_t>(n));
      }
    }
    for (std::uint32_t n : {0x7ffffffeu, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu}) expect_exact(d, n);
    for (int i = 0; i < 64; ++i) expect_exact(d, rng());
  }
}

TEST(FastDiv, LargeDivisors) {
  std::mt19937 rng(11);
  for (std::uint32_t d : {65535u, 65536u, 65537u, 1u << 20, (1u << 31) - 1, 1u << 31, (1u << 31) + 1, 0xffffffffu}) {
    for (std::uint32_t n : {0u, d - 1, d, 0x7fffffffu, 0xffffffffu}) expect_exact(d, n);
    for (int i = 0; i < 4096; ++i) expect_exact(d, rng());
  }
}

}  // namespace
}  // namespace omnimoe
