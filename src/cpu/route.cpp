// CPU route stage: router products, batchnorm, log_softmax, exact bounded top-K, gates,
// and their backward.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/math.hpp"
#include "cpu/blas.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::cpu {

template <class C>
void route_logits(const Config& cfg, i64 T, const C* x, const C* w_row, const C* w_col, C* lr, C* lc) {
  const i64 H = cfg.hidden;
  gemm(false, true, T, cfg.grid_rows, H, C(1), x, H, w_row, H, C(0), lr, cfg.grid_rows);
  gemm(false, true, T, cfg.grid_cols, H, C(1), x, H, w_col, H, C(0), lc, cfg.grid_cols);
}

template <class C>
void route_normalize(const Config& cfg, Mode mode, i64 T, i64 n, C* l, C* mean, C* rstd, C* running_mean,
                     C* running_var, double* acc) {
  if (cfg.router_norm == RouterNorm::none) return;
  if (mode == Mode::training) {
    // Batch statistics in double whatever C is: two row-major passes (contiguous reads),
    // biased variance.
    double* sq = acc + n;
    std::fill(acc, acc + 2 * n, 0.0);
    for (i64 t = 0; t < T; ++t)
      for (i64 c = 0; c < n; ++c) acc[c] += l[t * n + c];
    for (i64 c = 0; c < n; ++c) acc[c] /= static_cast<double>(T);
    for (i64 t = 0; t < T; ++t)
      for (i64 c = 0; c < n; ++c) {
        const double d = l[t * n + c] - acc[c];
        sq[c] += d * d;
      }
    for (i64 c = 0; c < n; ++c) {
      const double var = sq[c] / static_cast<double>(T);
      mean[c] = static_cast<C>(acc[c]);
      rstd[c] = static_cast<C>(1.0 / std::sqrt(var + kBatchnormEps));
      if (running_mean != nullptr) {  // the backward recomputes the statistics without updating
        const double unbiased = var * static_cast<double>(T) / static_cast<double>(T - 1);
        running_mean[c] = static_cast<C>((1 - kBatchnormMomentum) * running_mean[c] + kBatchnormMomentum * acc[c]);
        running_var[c] = static_cast<C>((1 - kBatchnormMomentum) * running_var[c] + kBatchnormMomentum * unbiased);
      }
    }
  } else {
    for (i64 c = 0; c < n; ++c) {
      mean[c] = running_mean[c];
      rstd[c] = static_cast<C>(1.0 / std::sqrt(static_cast<double>(running_var[c]) + kBatchnormEps));
    }
  }
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t)
    for (i64 c = 0; c < n; ++c) l[t * n + c] = (l[t * n + c] - mean[c]) * rstd[c];
}

template <class C>
void route_log_softmax(i64 T, i64 n, const C* l, C* logp) {
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    const C* row = l + t * n;
    C mx = row[0];
    for (i64 i = 1; i < n; ++i) mx = std::max(mx, row[i]);
    C s = 0;
    for (i64 i = 0; i < n; ++i) s += exp_c(row[i] - mx);
    const C lse = mx + log_c(s);
    for (i64 i = 0; i < n; ++i) logp[t * n + i] = row[i] - lse;
  }
}

namespace {
// Scores are compared through an order-preserving integer image (as on the GPU): a strict
// total order even when the input holds NaN (no undefined behaviour in the sorts, never
// fewer than K ids), with -0 folded into +0.
inline std::uint32_t ord(float v) {
  v += 0.0f;
  std::uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline std::uint64_t ord(double v) {
  v += 0.0;
  std::uint64_t b;
  std::memcpy(&b, &v, 8);
  return (b >> 63) ? ~b : (b | (std::uint64_t{1} << 63));
}

// Total order of the selection: higher score first, then smaller expert id.
template <class C>
bool better(C sa, i32 ea, C sb, i32 eb) {
  const auto a = ord(sa), b = ord(sb);
  return a > b || (a == b && ea < eb);
}

// Indices 0..n-1 of the best `keep` values of v (descending, ties by ascending index).
template <class C>
void best_indices(const C* v, i64 n, i64 keep, i32* idx) {
  for (i64 i = 0; i < n; ++i) idx[i] = static_cast<i32>(i);
  std::partial_sort(idx, idx + keep, idx + n, [v](i32 a, i32 b) { return better(v[a], a, v[b], b); });
}
}  // namespace

template <class C>
void route_topk(const Config& cfg, i64 T, const C* pr, const C* pc, TopkScratch<C> scratch, i32* ids, C* scores) {
  const i64 Nr = cfg.grid_rows, Nc = cfg.grid_cols, K = cfg.top_k;
  // The K-th largest value lies in the block of the best min(K, Nr) rows x min(K, Nc) columns.
  const i64 rk = std::min(K, Nr), ck = std::min(K, Nc);
  auto by_score = [](const TopkEntry<C>& a, const TopkEntry<C>& b) { return ord(a.score) < ord(b.score); };
  auto by_e = [](const TopkEntry<C>& a, const TopkEntry<C>& b) { return a.e < b.e; };
  auto in_order = [](const TopkEntry<C>& a, const TopkEntry<C>& b) { return better(a.score, a.e, b.score, b.e); };
#pragma omp parallel num_threads(scratch.threads)
  {
    const int tid = omp_get_thread_num();
    i32* rows = scratch.index + static_cast<i64>(tid) * (Nr + Nc);
    i32* cols = rows + Nr;
    TopkEntry<C>* heap = scratch.heap + static_cast<i64>(tid) * (3 * K + 1);  // [K + 1]
    TopkEntry<C>* sel = heap + K + 1;                                         // [K]
    TopkEntry<C>* ties = sel + K;                                             // [K]
#pragma omp for schedule(static)
    for (i64 t = 0; t < T; ++t) {
      const C* r = pr + t * Nr;
      const C* c = pc + t * Nc;
      best_indices(r, Nr, rk, rows);
      best_indices(c, Nc, ck, cols);
      // 1. tau = the K-th largest value of S. Best-first walk of the sorted block: cell (p, q)
      //    has the single parent (p, q-1), or (p-1, 0) when q = 0, whose value is never
      //    smaller (fp addition is monotone), so the K-th pop has the K-th largest value.
      auto cell = [&](i32 p, i32 q) {
        const i32 i = rows[p], j = cols[q];
        return TopkEntry<C>{r[i] + c[j], static_cast<i32>(i * Nc + j), p, q};
      };
      i64 size = 0;
      heap[size++] = cell(0, 0);
      auto tau = ord(C(0));
      for (i64 k = 0; k < K; ++k) {
        std::pop_heap(heap, heap + size, by_score);
        const TopkEntry<C> top = heap[--size];
        tau = ord(top.score);
        if (top.q + 1 < ck) {
          heap[size++] = cell(top.p, top.q + 1);
          std::push_heap(heap, heap + size, by_score);
        }
        if (top.q == 0 && top.p + 1 < rk) {
          heap[size++] = cell(top.p + 1, 0);
          std::push_heap(heap, heap + size, by_score);
        }
      }
      // 2. Every cell with S > tau (fewer than K), and of the cells with S == tau the
      //    smallest ids. Ties of rounded sums can sit outside the block, so candidates are
      //    all rows / columns whose best possible sum reaches tau.
      const C rmax = r[rows[0]], cmax = c[cols[0]];
      i64 ncols = 0;
      for (i64 j = 0; j < Nc; ++j)
        if (ord(rmax + c[j]) >= tau) cols[ncols++] = static_cast<i32>(j);
      std::sort(cols, cols + ncols, [c](i32 a, i32 b) { return better(c[a], a, c[b], b); });
      i64 nsel = 0, nties = 0;
      for (i64 i = 0; i < Nr; ++i) {
        if (ord(r[i] + cmax) < tau) continue;
        for (i64 q = 0; q < ncols; ++q) {
          const i32 j = cols[q];
          const TopkEntry<C> e{r[i] + c[j], static_cast<i32>(i * Nc + j), 0, 0};
          const auto o = ord(e.score);
          if (o < tau) break;  // columns are sorted: the rest of the row is smaller
          if (o > tau) {
            sel[nsel++] = e;
          } else if (nties < K) {  // keep the K smallest ids among the ties (max-heap by id)
            ties[nties++] = e;
            std::push_heap(ties, ties + nties, by_e);
          } else if (e.e < ties[0].e) {
            std::pop_heap(ties, ties + nties, by_e);
            ties[nties - 1] = e;
            std::push_heap(ties, ties + nties, by_e);
          }
        }
      }
      std::sort_heap(ties, ties + nties, by_e);
      for (i64 k = 0; nsel < K && k < nties; ++k) sel[nsel++] = ties[k];
      // Only NaN scores (where sums stop being monotone) can leave the selection short: fill
      // it with the smallest unused ids, so every id stays in range.
      for (i32 e = 0; nsel < K; ++e)
        if (std::none_of(sel, sel + nsel, [e](const TopkEntry<C>& x) { return x.e == e; }))
          sel[nsel++] = TopkEntry<C>{r[e / Nc] + c[e % Nc], e, 0, 0};
      // 3. Output order: descending score, ties by ascending id.
      std::sort(sel, sel + K, in_order);
      for (i64 k = 0; k < K; ++k) {
        ids[t * K + k] = sel[k].e;
        scores[t * K + k] = sel[k].score;
      }
    }
  }
}

template <class C>
void route_gates(const Config& cfg, i64 T, const C* scores, C* gates) {
  const i64 K = cfg.top_k;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    const C* s = scores + t * K;
    C* g = gates + t * K;
    if (cfg.gate == GateKind::exp) {
      for (i64 k = 0; k < K; ++k) g[k] = exp_c(s[k]);
    } else {
      const C mx = s[0];  // scores are sorted: the first is the largest
      C sum = 0;
      for (i64 k = 0; k < K; ++k) sum += (g[k] = exp_c(s[k] - mx));
      for (i64 k = 0; k < K; ++k) g[k] /= sum;
    }
  }
}

template <class C>
void route_scores_of(const Config& cfg, i64 T, const C* pr, const C* pc, const i32* ids, C* scores) {
  const i64 K = cfg.top_k, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t)
    for (i64 k = 0; k < K; ++k) {
      const i32 e = ids[t * K + k];
      scores[t * K + k] = pr[t * Nr + e / Nc] + pc[t * Nc + e % Nc];
    }
}

template <class C>
void route_gates_backward(const Config& cfg, i64 T, const C* gates, C* d) {
  const i64 K = cfg.top_k;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    const C* g = gates + t * K;
    C* dg = d + t * K;
    if (cfg.gate == GateKind::exp) {
      for (i64 k = 0; k < K; ++k) dg[k] *= g[k];  // d exp(S) / dS = exp(S)
    } else {
      C dot = 0;
      for (i64 k = 0; k < K; ++k) dot += g[k] * dg[k];
      for (i64 k = 0; k < K; ++k) dg[k] = g[k] * (dg[k] - dot);
    }
  }
}

template <class C>
void route_scores_backward(const Config& cfg, i64 T, const i32* ids, const C* dscores, C* dpr, C* dpc) {
  const i64 K = cfg.top_k, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    C* r = dpr + t * Nr;
    C* c = dpc + t * Nc;
    std::fill(r, r + Nr, C(0));
    std::fill(c, c + Nc, C(0));
    for (i64 k = 0; k < K; ++k) {
      const i32 e = ids[t * K + k];
      r[e / Nc] += dscores[t * K + k];
      c[e % Nc] += dscores[t * K + k];
    }
  }
}

template <class C>
void route_log_softmax_backward(i64 T, i64 n, const C* logp, C* d) {
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    C* row = d + t * n;
    C sum = 0;
    for (i64 i = 0; i < n; ++i) sum += row[i];
    for (i64 i = 0; i < n; ++i) row[i] -= exp_c(logp[t * n + i]) * sum;
  }
}

template <class C>
void route_normalize_backward(const Config& cfg, Mode mode, i64 T, i64 n, const C* lhat, const C* rstd, C* d,
                              double* acc) {
  if (cfg.router_norm == RouterNorm::none) return;
  if (mode == Mode::inference) {  // running statistics are constants
#pragma omp parallel for schedule(static)
    for (i64 t = 0; t < T; ++t)
      for (i64 c = 0; c < n; ++c) d[t * n + c] *= rstd[c];
    return;
  }
  // Through the batch statistics: dl = rstd * (d - mean(d) - lhat * mean(d * lhat)).
  double *s = acc, *sx = acc + n;
  std::fill(acc, acc + 2 * n, 0.0);
  for (i64 t = 0; t < T; ++t)
    for (i64 c = 0; c < n; ++c) {
      s[c] += d[t * n + c];
      sx[c] += static_cast<double>(d[t * n + c]) * lhat[t * n + c];
    }
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t)
    for (i64 c = 0; c < n; ++c) {
      const C md = static_cast<C>(s[c] / T), mdx = static_cast<C>(sx[c] / T);
      d[t * n + c] = rstd[c] * (d[t * n + c] - md - lhat[t * n + c] * mdx);
    }
}

template <class C>
void route_weights_backward(const Config& cfg, i64 T, const C* x, const C* w_row, const C* w_col, const C* dlr,
                            const C* dlc, C* dw_row, C* dw_col, C* dx) {
  const i64 H = cfg.hidden, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  gemm(true, false, Nr, H, T, C(1), dlr, Nr, x, H, C(0), dw_row, H);
  gemm(true, false, Nc, H, T, C(1), dlc, Nc, x, H, C(0), dw_col, H);
  gemm(false, false, T, H, Nr, C(1), dlr, Nr, w_row, H, C(1), dx, H);
  gemm(false, false, T, H, Nc, C(1), dlc, Nc, w_col, H, C(1), dx, H);
}

#define OMNIMOE_ROUTE_INSTANTIATE(C)                                                                              \
  template void route_logits<C>(const Config&, i64, const C*, const C*, const C*, C*, C*);                       \
  template void route_normalize<C>(const Config&, Mode, i64, i64, C*, C*, C*, C*, C*, double*);                         \
  template void route_log_softmax<C>(i64, i64, const C*, C*);                                                     \
  template void route_topk<C>(const Config&, i64, const C*, const C*, TopkScratch<C>, i32*, C*);                 \
  template void route_gates<C>(const Config&, i64, const C*, C*);                                                 \
  template void route_scores_of<C>(const Config&, i64, const C*, const C*, const i32*, C*);                      \
  template void route_gates_backward<C>(const Config&, i64, const C*, C*);                                        \
  template void route_scores_backward<C>(const Config&, i64, const i32*, const C*, C*, C*);                      \
  template void route_log_softmax_backward<C>(i64, i64, const C*, C*);                                            \
  template void route_normalize_backward<C>(const Config&, Mode, i64, i64, const C*, const C*, C*, double*);           \
  template void route_weights_backward<C>(const Config&, i64, const C*, const C*, const C*, const C*, const C*, \
                                          C*, C*, C*);
OMNIMOE_ROUTE_INSTANTIATE(float)
OMNIMOE_ROUTE_INSTANTIATE(double)

}  // namespace omnimoe::cpu
