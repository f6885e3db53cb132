// CPU shared_mlp stage: the always-on SwiGLU, three BLAS products and one elementwise pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/math.hpp"
#include "cpu/blas.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::cpu {
namespace {

// exp for the float SwiGLU pass, written so the compiler vectorises it (the libm call does
// not vectorise without -ffast-math, and made this one pass cost 10% of the layer).
// Cody-Waite reduction x = n ln2 + r, degree-6 polynomial on |r| <= ln2 / 2: about 2 ulp.
inline float exp_vec(float x) {
  x = std::clamp(x, -87.0f, 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
inline double exp_vec(double x) { return std::exp(x); }

template <class C> inline C silu_mul(C u, C v) { return u / (C(1) + exp_vec(-u)) * v; }

}  // namespace

template <class C>
void shared_mlp_forward(const Config& cfg, i64 T, const C* x, const C* gate, const C* up, const C* down, C* u, C* v,
                        C* y) {
  const i64 H = cfg.hidden, I = cfg.intermediate;
  if (I == 0) {
    std::fill(y, y + T * H, C(0));
    return;
  }
  gemm(false, true, T, I, H, C(1), x, H, gate, H, C(0), u, I);
  gemm(false, true, T, I, H, C(1), x, H, up, H, C(0), v, I);
#pragma omp parallel for simd schedule(static)
  for (i64 i = 0; i < T * I; ++i) u[i] = silu_mul(u[i], v[i]);  // m, in place of u
  gemm(false, true, T, H, I, C(1), u, I, down, I, C(0), y, H);
}

template <class C>
void shared_mlp_backward(const Config& cfg, i64 T, const C* x, const C* gate, const C* up, const C* down, const C* dy,
                         C* u, C* v, C* dm, C* dgate, C* dup, C* ddown, C* dx) {
  const i64 H = cfg.hidden, I = cfg.intermediate;
  if (I == 0) return;
  gemm(false, true, T, I, H, C(1), x, H, gate, H, C(0), u, I);
  gemm(false, true, T, I, H, C(1), x, H, up, H, C(0), v, I);
  gemm(false, false, T, I, H, C(1), dy, H, down, I, C(0), dm, I);  // dm = dy down
#pragma omp parallel for simd schedule(static)
  for (i64 i = 0; i < T * I; ++i) {
    const C s = sigmoid(u[i]), silu = u[i] * s;
    const C du = dm[i] * v[i] * s * (C(1) + u[i] * (C(1) - s));
    const C dv = dm[i] * silu;
    v[i] = silu * v[i];  // m, needed for ddown
    u[i] = du;
    dm[i] = dv;
  }
  gemm(true, false, H, I, T, C(1), dy, H, v, I, C(0), ddown, I);  // ddown = dyᵀ m
  gemm(true, false, I, H, T, C(1), u, I, x, H, C(0), dgate, H);   // dgate = duᵀ x
  gemm(true, false, I, H, T, C(1), dm, I, x, H, C(0), dup, H);    // dup = dvᵀ x
  gemm(false, false, T, H, I, C(1), u, I, gate, H, C(1), dx, H);  // dx += du gate
  gemm(false, false, T, H, I, C(1), dm, I, up, H, C(1), dx, H);   // dx += dv up
}

template void shared_mlp_forward<float>(const Config&, i64, const float*, const float*, const float*, const float*,
                                        float*, float*, float*);
template void shared_mlp_forward<double>(const Config&, i64, const double*, const double*, const double*,
                                         const double*, double*, double*, double*);
template void shared_mlp_backward<float>(const Config&, i64, const float*, const float*, const float*, const float*,
                                         const float*, float*, float*, float*, float*, float*, float*, float*);
template void shared_mlp_backward<double>(const Config&, i64, const double*, const double*, const double*,
                                          const double*, const double*, double*, double*, double*, double*, double*,
                                          double*, double*);

}  // namespace omnimoe::cpu
