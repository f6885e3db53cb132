// Scalar math shared by the CPU and CUDA backends, so both compute the same function:
// activations and their derivatives, in the compute type C (float or double).
#pragma once

#include <cmath>

#include "omnimoe/config.hpp"

#if defined(__CUDACC__)
#define OMNIMOE_HD __host__ __device__ __forceinline__
#else
#define OMNIMOE_HD inline
#endif

namespace omnimoe {

template <class C> OMNIMOE_HD C exp_c(C v) { if constexpr (sizeof(C) == 4) return expf(v); else return exp(v); }
template <class C> OMNIMOE_HD C erf_c(C v) { if constexpr (sizeof(C) == 4) return erff(v); else return erf(v); }
template <class C> OMNIMOE_HD C log_c(C v) { if constexpr (sizeof(C) == 4) return logf(v); else return log(v); }

template <class C> OMNIMOE_HD C sigmoid(C h) { return C(1) / (C(1) + exp_c(-h)); }

// The formulas once, from the shared sigmoid s = sigmoid(h) (SiLU) or e = erf(h / sqrt 2)
// (GELU), so that activate, activate_grad and activate_with_grad give the same values bit
// for bit.
template <class C>
OMNIMOE_HD C silu_act(C h, C s) {
  return h * s;
}
template <class C>
OMNIMOE_HD C silu_grad(C h, C s) {
  return s * (C(1) + h * (C(1) - s));
}
template <class C>
OMNIMOE_HD C gelu_erf(C h) {
  return erf_c(h * C(0.70710678118654752440));
}
template <class C>
OMNIMOE_HD C gelu_act(C h, C e) {
  return C(0.5) * h * (C(1) + e);
}
template <class C>
OMNIMOE_HD C gelu_grad(C h, C e) {
  const C cdf = C(0.5) * (C(1) + e);
  const C pdf = C(0.39894228040143267794) * exp_c(C(-0.5) * h * h);
  return cdf + h * pdf;
}

// act(h): SiLU h*sigmoid(h); GELU exact erf form 0.5*h*(1+erf(h/sqrt 2)); ReLU max(h, 0).
template <class C> OMNIMOE_HD C activate(Activation a, C h) {
  switch (a) {
    case Activation::silu:
      return silu_act(h, sigmoid(h));
    case Activation::gelu:
      return gelu_act(h, gelu_erf(h));
    default: return h > C(0) ? h : C(0);
  }
}

// d act / dh. ReLU: 0 at h = 0 (as PyTorch).
template <class C> OMNIMOE_HD C activate_grad(Activation a, C h) {
  switch (a) {
    case Activation::silu:
      return silu_grad(h, sigmoid(h));
    case Activation::gelu:
      return gelu_grad(h, gelu_erf(h));
    default: return h > C(0) ? C(1) : C(0);
  }
}

// Both at once, the sigmoid or erf evaluated once (the CUDA backward's per-task chains
// computed it twice).
template <class C>
OMNIMOE_HD void activate_with_grad(Activation a, C h, C& act, C& grad) {
  switch (a) {
    case Activation::silu: {
      const C s = sigmoid(h);
      act = silu_act(h, s);
      grad = silu_grad(h, s);
      return;
    }
    case Activation::gelu: {
      const C e = gelu_erf(h);
      act = gelu_act(h, e);
      grad = gelu_grad(h, e);
      return;
    }
    default:
      act = h > C(0) ? h : C(0);
      grad = h > C(0) ? C(1) : C(0);
  }
}

}  // namespace omnimoe
