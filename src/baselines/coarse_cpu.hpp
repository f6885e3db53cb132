// CPU helpers shared by the dense and gshard references: operands converted to the compute
// type C (double for f64 layers, float otherwise), storage dispatch, a total order on
// floats for top-K selection, and the per-thread plan size.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/half.hpp"
#include "core/workspace.hpp"
#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::baselines::cpu_ref {

using i64 = std::int64_t;
using i32 = std::int32_t;

// A converted copy in C when the storage type S differs (null in the counting arena too).
template <class C, class S>
C* take_copy(Arena& a, i64 n) {
  if constexpr (std::is_same_v<C, S>) {
    (void)a;
    (void)n;
    return nullptr;
  } else {
    return a.take<C>(static_cast<std::size_t>(n));
  }
}

// `n` elements of S at src, as C: the caller's memory when S == C, else converted into copy.
template <class C, class S>
const C* as_compute(const void* src, i64 n, C* copy) {
  if constexpr (std::is_same_v<C, S>) {
    (void)n;
    (void)copy;
    return static_cast<const C*>(src);
  } else {
    const S* s = static_cast<const S*>(src);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (i64 i = 0; i < n; ++i) copy[i] = load_as<C>(s, static_cast<std::size_t>(i));
    return copy;
  }
}
template <class C, class S>
const C* as_compute(const TensorView& v, C* copy) {
  return as_compute<C, S>(v.data, v.numel(), copy);
}

// Writes y (in C) to the caller's tensor of storage S (nothing to do when S == C and y is
// already the caller's memory).
template <class C, class S>
void store_output(const C* y, const TensorView& out) {
  if constexpr (std::is_same_v<C, S>) {
    if (out.as<C>() != y) std::memcpy(out.data, y, out.bytes());
  } else {
    S* d = out.as<S>();
    const i64 n = out.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (i64 i = 0; i < n; ++i) store_as(d, static_cast<std::size_t>(i), y[i]);
  }
}

// Calls f.template operator()<C, S>() for the layer dtype: C = double for f64, float otherwise.
template <class F>
Status dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::f64: return f.template operator()<double, double>();
    case DType::f32: return f.template operator()<float, float>();
    case DType::f16: return f.template operator()<float, f16_t>();
    case DType::bf16: return f.template operator()<float, bf16_t>();
    default: return invalid_argument(std::string("dtype: ") + dtype_name(dt) + " is not a float dtype");
  }
}

// An unsigned key whose order is a total order on the values (NaN above +inf, -NaN below
// -inf), so a selection on it is well defined for any input.
inline std::uint64_t ordered_key(double v) {
  std::uint64_t u;
  std::memcpy(&u, &v, 8);
  return (u >> 63) ? ~u : (u | (std::uint64_t{1} << 63));
}
inline std::uint64_t ordered_key(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u >> 31) ? ~u : (u | 0x80000000u);
}

// Per-thread scratch is planned for every processor (as the OmniMoE CPU backend does), so a
// size queried on one thread stays valid on another.
inline int planned_threads() { return omp_get_num_procs(); }

}  // namespace omnimoe::baselines::cpu_ref
