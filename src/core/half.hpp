// Host-side fp16 / bf16 storage types and conversions (round to nearest even), so the CPU
// backend can read and write half-precision tensors without a device toolkit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace omnimoe {

struct f16_t { std::uint16_t bits; };
struct bf16_t { std::uint16_t bits; };

inline float bits_to_float(std::uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline std::uint32_t float_to_bits(float f) { std::uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(bf16_t v) { return bits_to_float(std::uint32_t{v.bits} << 16); }
inline bf16_t to_bf16(float f) {
  std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<std::uint16_t>(u >> 16)};
}

inline float to_float(f16_t v) {
  std::uint32_t sign = std::uint32_t{static_cast<std::uint32_t>(v.bits & 0x8000u)} << 16;
  std::uint32_t exp = (v.bits >> 10) & 0x1fu;
  std::uint32_t man = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    float m = std::ldexp(static_cast<float>(man), -24);  // subnormal or zero
    return sign ? -m : m;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline f16_t to_f16(float f) {
  std::uint32_t u = float_to_bits(f);
  std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<std::uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {  // result is subnormal or zero: round |f| * 2^24 to an integer
    float m = std::nearbyint(bits_to_float(a) * 16777216.0f);  // default mode: nearest even
    return {static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(m))};
  }
  std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits, nearest even
  return {static_cast<std::uint16_t>(sign | ((r - 0x38000000u) >> 13))};
}

// Uniform load/store through a compute type C (float or double).
template <class C> inline C load_as(const float* p, std::size_t i) { return static_cast<C>(p[i]); }
template <class C> inline C load_as(const double* p, std::size_t i) { return static_cast<C>(p[i]); }
template <class C> inline C load_as(const f16_t* p, std::size_t i) { return static_cast<C>(to_float(p[i])); }
template <class C> inline C load_as(const bf16_t* p, std::size_t i) { return static_cast<C>(to_float(p[i])); }

template <class C> inline void store_as(float* p, std::size_t i, C v) { p[i] = static_cast<float>(v); }
template <class C> inline void store_as(double* p, std::size_t i, C v) { p[i] = static_cast<double>(v); }
template <class C> inline void store_as(f16_t* p, std::size_t i, C v) { p[i] = to_f16(static_cast<float>(v)); }
template <class C> inline void store_as(bf16_t* p, std::size_t i, C v) { p[i] = to_bf16(static_cast<float>(v)); }

}  // namespace omnimoe
