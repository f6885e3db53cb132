// CPU shared_mlp stage: the always-on SwiGLU, three BLAS products and one elementwise pass.
#include <algorithm>

#include "core/math.hpp"
#include "cpu/blas.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::cpu {

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
  for (i64 i = 0; i < T * I; ++i) u[i] = u[i] * sigmoid(u[i]) * v[i];  // m, in place of u
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
