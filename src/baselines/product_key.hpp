// The product-key layers (pkm, peer): the backend halves behind pkm_* of kinds.hpp, and the
// pieces of the exact top-K that the CPU (pkm.cpp) and CUDA (pkm.cu) backends share.
//
// Retrieval, per token: s1 = keys_row q1 [Nr], s2 = keys_col q2 [Nc], S(i, j) = s1[i] + s2[j]
// (rounded in the compute type), e = i * Nc + j. The K selected cells are the K largest S,
// ties to the smaller e. Both backends find them the same way, without ever listing the
// N = Nr * Nc scores:
//   1. sort both axes (descending value, ascending id); along a sorted column list the sums
//      a + b[q] of a row never increase (rounding is monotone), so the number of cells of a
//      row with S >= u is a binary search;
//   2. tau = the largest u (on an order-preserving integer image of S) with
//      #{S >= u} >= K, by bisection over the integers; every cell above tau is selected;
//   3. of the cells equal to tau, the `need` smallest ids: `cap` = the smallest id E with
//      #{ties with id <= E} >= need (bisection again; only when there are more ties than
//      needed, which random inputs almost never produce).
// The selection {S > tau} + {S == tau, e <= cap} has exactly K cells. K may be anything up
// to N: no GPU buffer is sized by K (the CPU keeps the K cells of a token per thread, to
// sort them).
// A token with a non-finite sub-key score (NaN or inf in x or the weights) gets a NaN row
// and the ids 0 .. K-1 on both backends: its selection is undefined, and saying so beats
// a silently wrong row.
#pragma once

#include <cstdint>
#include <cstring>

#include "baselines/kinds.hpp"
#include "core/math.hpp"  // OMNIMOE_HD

namespace omnimoe::baselines {

// CUDA halves (pkm.cu; pkm_cuda_stub.cpp without a CUDA toolkit). cfg.kind picks pkm / peer.
Status pkm_workspace_size_cuda(const BaselineConfig& c, std::int64_t tokens, DType dtype, std::size_t* bytes);
Status pkm_forward_cuda(const ForwardArgs& a);

// Largest Nr and Nc the CUDA top-K serves (one thread block per token keeps both sorted
// axes in shared memory), and the largest H of its gather kernels.
inline constexpr std::int64_t kPkCudaMaxAxis = 4096;
inline constexpr std::int64_t kPkCudaMaxHidden = 2048;

namespace pk {

// Order-preserving map of a float / double to an unsigned integer (after folding -0 into
// +0): every comparison of the selection is an exact integer comparison, as in the OmniMoE
// router (src/cuda/route.cu, src/cpu/route.cpp).
OMNIMOE_HD std::uint32_t ord(float v) {
  v += 0.0f;
#if defined(__CUDA_ARCH__)
  const std::uint32_t b = __float_as_uint(v);
#else
  std::uint32_t b;
  std::memcpy(&b, &v, 4);
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
OMNIMOE_HD std::uint64_t ord(double v) {
  v += 0.0;
#if defined(__CUDA_ARCH__)
  const std::uint64_t b = static_cast<std::uint64_t>(__double_as_longlong(v));
#else
  std::uint64_t b;
  std::memcpy(&b, &v, 8);
#endif
  return (b >> 63) ? ~b : (b | (std::uint64_t{1} << 63));
}
OMNIMOE_HD float unord(std::uint32_t u) {
  const std::uint32_t b = (u & 0x80000000u) ? (u ^ 0x80000000u) : ~u;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, 4);
  return v;
#endif
}

// Number of q in [0, n) with ord(a + b[q]) >= u (strict: > u), for b sorted by descending
// value: the predicate holds on a prefix.
template <class C, class U>
OMNIMOE_HD int prefix_count(C a, const C* b, int n, U u, bool strict) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const U o = ord(static_cast<C>(a + b[mid]));
    if (strict ? o > u : o >= u) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// A cut of the sorted grid: the cells with ord(S) > tau, and those with ord(S) == tau and
// id <= cap. `empty`: no cell.
template <class U>
struct Cut {
  U tau = 0;
  std::uint32_t cap = 0xffffffffu;
  bool empty = false;
  OMNIMOE_HD bool contains(U o, std::uint32_t e) const { return !empty && (o > tau || (o == tau && e <= cap)); }
};

}  // namespace pk
}  // namespace omnimoe::baselines
