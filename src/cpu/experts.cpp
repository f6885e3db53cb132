// CPU experts stage. Token-centric on the CPU: each token's K expert rows are read straight
// from the tables (converted on the fly from f16/bf16), which is what a cache-based CPU
// does best; the gradient rows of the tables are reduced per expert over the schedule.
#include <omp.h>

#include <algorithm>

#include "core/math.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::cpu {
namespace {

template <class C, class S>
C dot(const C* a, const S* b, i64 n) {
  C s = 0;
#pragma omp simd reduction(+ : s)
  for (i64 i = 0; i < n; ++i) s += a[i] * load_as<C>(b, i);
  return s;
}

template <class C, class S>
void axpy(C alpha, const S* x, C* y, i64 n) {
#pragma omp simd
  for (i64 i = 0; i < n; ++i) y[i] += alpha * load_as<C>(x, i);
}

}  // namespace

template <class C, class S>
void experts_forward(const Config& cfg, i64 T, const C* x, const S* w_in, const S* w_out, const i32* ids,
                     const C* gates, C* y) {
  const i64 H = cfg.hidden, K = cfg.top_k;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    for (i64 k = 0; k < K; ++k) {
      const i64 e = ids[t * K + k];
      const C h = dot(x + t * H, w_in + e * H, H);
      axpy(gates[t * K + k] * activate(cfg.activation, h), w_out + e * H, y + t * H, H);
    }
  }
}

template <class C, class S>
void experts_backward_tokens(const Config& cfg, i64 T, const C* x, const S* w_in, const S* w_out, const i32* ids,
                             const C* gates, const C* dy, C* a, C* dh, C* dgates, C* dx) {
  const i64 H = cfg.hidden, K = cfg.top_k;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    for (i64 k = 0; k < K; ++k) {
      const i64 task = t * K + k, e = ids[task];
      const C h = dot(x + t * H, w_in + e * H, H);
      const C da = dot(dy + t * H, w_out + e * H, H);
      const C act = activate(cfg.activation, h), g = gates[task];
      a[task] = g * act;
      dgates[task] = da * act;
      dh[task] = da * g * activate_grad(cfg.activation, h);
      axpy(dh[task], w_in + e * H, dx + t * H, H);
    }
  }
}

template <class C, class S>
void experts_backward_weights(const Config& cfg, const C* x, const C* dy, Schedule s, const C* a, const C* dh,
                              int threads, C* rows, ExpertRows<S> out) {
  const i64 H = cfg.hidden, K = cfg.top_k, N = cfg.num_experts();
  const bool sparse = out.ids != nullptr;
  // Sparse: slot of each active expert = its rank among the active ones (ascending ids).
  i64 active = 0;
  if (sparse) {
    for (i64 e = 0; e < N; ++e)
      if (s.offsets[e + 1] > s.offsets[e]) out.ids[active++] = static_cast<i32>(e);
    *out.count = static_cast<i32>(active);
    std::fill(out.ids + active, out.ids + out.capacity, i32{-1});
    std::fill(out.dw_in + active * H, out.dw_in + out.capacity * H, S{});
    std::fill(out.dw_out + active * H, out.dw_out + out.capacity * H, S{});
  }
  const i64 n_rows = sparse ? active : N;
#pragma omp parallel num_threads(threads)
  {
    // One row of each gradient in C while it is summed, stored once at the end.
    C* gin = rows + static_cast<i64>(omp_get_thread_num()) * 2 * H;
    C* gout = gin + H;
#pragma omp for schedule(dynamic, 64)
    for (i64 r = 0; r < n_rows; ++r) {
      const i64 e = sparse ? out.ids[r] : r;
      std::fill(gin, gin + H, C(0));
      std::fill(gout, gout + H, C(0));
      for (i64 i = s.offsets[e]; i < s.offsets[e + 1]; ++i) {
        const i64 task = s.order[i], t = task / K;
        axpy(dh[task], x + t * H, gin, H);
        axpy(a[task], dy + t * H, gout, H);
      }
      for (i64 h = 0; h < H; ++h) {
        store_as(out.dw_in + r * H, h, gin[h]);
        store_as(out.dw_out + r * H, h, gout[h]);
      }
    }
  }
}

#define OMNIMOE_EXPERTS_INSTANTIATE(C, S)                                                                         \
  template void experts_forward<C, S>(const Config&, i64, const C*, const S*, const S*, const i32*, const C*,  \
                                      C*);                                                                        \
  template void experts_backward_tokens<C, S>(const Config&, i64, const C*, const S*, const S*, const i32*,     \
                                              const C*, const C*, C*, C*, C*, C*);                                \
  template void experts_backward_weights<C, S>(const Config&, const C*, const C*, Schedule, const C*, const C*, \
                                               int, C*, ExpertRows<S>);
OMNIMOE_EXPERTS_INSTANTIATE(double, double)
OMNIMOE_EXPERTS_INSTANTIATE(float, float)
OMNIMOE_EXPERTS_INSTANTIATE(float, f16_t)
OMNIMOE_EXPERTS_INSTANTIATE(float, bf16_t)

}  // namespace omnimoe::cpu
