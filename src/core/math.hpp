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

// act(h): SiLU h*sigmoid(h); GELU exact erf form 0.5*h*(1+erf(h/sqrt 2)); ReLU max(h, 0).
template <class C> OMNIMOE_HD C activate(Activation a, C h) {
  switch (a) {
    case Activation::silu: return h * sigmoid(h);
    case Activation::gelu: return C(0.5) * h * (C(1) + erf_c(h * C(0.70710678118654752440)));
    default: return h > C(0) ? h : C(0);
  }
}

// d act / dh. ReLU: 0 at h = 0 (as PyTorch).
template <class C> OMNIMOE_HD C activate_grad(Activation a, C h) {
  switch (a) {
    case Activation::silu: {
      C s = sigmoid(h);
      return s * (C(1) + h * (C(1) - s));
    }
    case Activation::gelu: {
      C cdf = C(0.5) * (C(1) + erf_c(h * C(0.70710678118654752440)));
      C pdf = C(0.39894228040143267794) * exp_c(C(-0.5) * h * h);
      return cdf + h * pdf;
    }
    default: return h > C(0) ? C(1) : C(0);
  }
}

// Both at once: the same expressions as activate and activate_grad, so the same values bit
// for bit, with the shared sigmoid or erf evaluated once (the CUDA backward's per-task chains
// computed each twice).
template <class C>
OMNIMOE_HD void activate_with_grad(Activation a, C h, C& act, C& grad) {
  switch (a) {
    case Activation::silu: {
      const C s = sigmoid(h);
      act = h * s;
      grad = s * (C(1) + h * (C(1) - s));
      return;
    }
    case Activation::gelu: {
      const C e = erf_c(h * C(0.70710678118654752440));
      act = C(0.5) * h * (C(1) + e);
      const C cdf = C(0.5) * (C(1) + e);
      const C pdf = C(0.39894228040143267794) * exp_c(C(-0.5) * h * h);
      grad = cdf + h * pdf;
      return;
    }
    default:
      act = h > C(0) ? h : C(0);
      grad = h > C(0) ? C(1) : C(0);
  }
}

}  // namespace omnimoe
