// A deliberately simple float64 implementation of DESIGN.md section 1, written ONLY for the
// tests. It shares no code with src/: it forms all N scores of every token, sorts them fully
// (descending score, ties by ascending expert id) and evaluates every formula literally.
// Speed is irrelevant; clarity is the point.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "omnimoe/config.hpp"

namespace naive {

using omnimoe::Activation;
using omnimoe::Config;
using omnimoe::GateKind;
using omnimoe::Mode;
using omnimoe::RouterNorm;

// Every parameter as float64, row-major, shapes as in DESIGN.md section 1.
struct Weights {
  std::vector<double> router_row;  // [Nr, H]
  std::vector<double> router_col;  // [Nc, H]
  std::vector<double> expert_in;   // [N, H]
  std::vector<double> expert_out;  // [N, H]
  std::vector<double> gate;        // [I, H]
  std::vector<double> up;          // [I, H]
  std::vector<double> down;        // [H, I]
  std::vector<double> running_mean_row, running_var_row;  // [Nr] (batchnorm only)
  std::vector<double> running_mean_col, running_var_col;  // [Nc] (batchnorm only)
};

// Route stage up to the log-probabilities, plus the running statistics after the call.
struct LogProbs {
  std::vector<double> pr;  // [T, Nr] log_softmax of the (normalised) row logits
  std::vector<double> pc;  // [T, Nc] log_softmax of the (normalised) column logits
  std::vector<double> running_mean_row, running_var_row, running_mean_col, running_var_col;
};

struct ForwardResult {
  std::vector<double> y;              // [T, H]
  std::vector<std::int64_t> ids;      // [T, K] selected experts, descending score, ties ascending e
  std::vector<double> scores;         // [T, K]
  std::vector<double> gates;          // [T, K]
  std::vector<double> all_scores;     // [T, N] S(e) for every expert
  std::vector<std::int64_t> order;    // [T, N] every expert, fully sorted like ids
  LogProbs lp;
};

// ---- scalar functions -------------------------------------------------------------------

inline double silu(double h) { return h / (1.0 + std::exp(-h)); }
inline double gelu(double h) { return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0))); }
inline double relu(double h) { return h > 0.0 ? h : 0.0; }
inline double activation(Activation a, double h) {
  switch (a) {
    case Activation::silu: return silu(h);
    case Activation::gelu: return gelu(h);
    case Activation::relu: return relu(h);
  }
  return std::nan("");
}

// ---- building blocks --------------------------------------------------------------------

// out[t, r] = sum_h x[t, h] * w[r, h]
inline std::vector<double> matmul_nt(const std::vector<double>& x, std::int64_t T, std::int64_t H,
                                     const std::vector<double>& w, std::int64_t R) {
  std::vector<double> out(static_cast<std::size_t>(T * R), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t r = 0; r < R; ++r) {
      double s = 0.0;
      for (std::int64_t h = 0; h < H; ++h) s += x[t * H + h] * w[r * H + h];
      out[t * R + r] = s;
    }
  return out;
}

// In-place batchnorm (no affine) of logits l [T, C] per column. Training: batch mean and
// biased variance, and the running statistics are updated (momentum 0.1, unbiased variance
// var * T / (T - 1), evaluated literally). Inference: the running statistics.
inline void batchnorm(std::vector<double>& l, std::int64_t T, std::int64_t C, Mode mode,
                      std::vector<double>& running_mean, std::vector<double>& running_var) {
  const double eps = 1e-5, momentum = 0.1;
  for (std::int64_t c = 0; c < C; ++c) {
    double mean, var;
    if (mode == Mode::training) {
      mean = 0.0;
      for (std::int64_t t = 0; t < T; ++t) mean += l[t * C + c];
      mean /= static_cast<double>(T);
      var = 0.0;
      for (std::int64_t t = 0; t < T; ++t) var += (l[t * C + c] - mean) * (l[t * C + c] - mean);
      var /= static_cast<double>(T);
      const double unbiased = var * static_cast<double>(T) / static_cast<double>(T - 1);
      running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean;
      running_var[c] = (1.0 - momentum) * running_var[c] + momentum * unbiased;
    } else {
      mean = running_mean[c];
      var = running_var[c];
    }
    const double inv = 1.0 / std::sqrt(var + eps);
    for (std::int64_t t = 0; t < T; ++t) l[t * C + c] = (l[t * C + c] - mean) * inv;
  }
}

// In-place log_softmax over each row of l [T, C].
inline void log_softmax_rows(std::vector<double>& l, std::int64_t T, std::int64_t C) {
  for (std::int64_t t = 0; t < T; ++t) {
    double m = l[t * C];
    for (std::int64_t c = 1; c < C; ++c) m = std::max(m, l[t * C + c]);
    double s = 0.0;
    for (std::int64_t c = 0; c < C; ++c) s += std::exp(l[t * C + c] - m);
    const double lse = m + std::log(s);
    for (std::int64_t c = 0; c < C; ++c) l[t * C + c] -= lse;
  }
}

// Route up to pr / pc (and the running statistics after the call).
inline LogProbs log_probs(const Config& cfg, Mode mode, std::int64_t T, const std::vector<double>& x,
                          const Weights& w) {
  const std::int64_t H = cfg.hidden, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  LogProbs lp;
  lp.pr = matmul_nt(x, T, H, w.router_row, Nr);
  lp.pc = matmul_nt(x, T, H, w.router_col, Nc);
  if (cfg.router_norm == RouterNorm::batchnorm) {
    lp.running_mean_row = w.running_mean_row;
    lp.running_var_row = w.running_var_row;
    lp.running_mean_col = w.running_mean_col;
    lp.running_var_col = w.running_var_col;
    batchnorm(lp.pr, T, Nr, mode, lp.running_mean_row, lp.running_var_row);
    batchnorm(lp.pc, T, Nc, mode, lp.running_mean_col, lp.running_var_col);
  }
  log_softmax_rows(lp.pr, T, Nr);
  log_softmax_rows(lp.pc, T, Nc);
  return lp;
}

// S(e) for expert e = i * Nc + j of token t.
inline double score(const Config& cfg, const LogProbs& lp, std::int64_t t, std::int64_t e) {
  const std::int64_t Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  return lp.pr[t * Nr + e / Nc] + lp.pc[t * Nc + e % Nc];
}

// Gates of the K selected scores of one token.
inline std::vector<double> gates_of(GateKind g, const std::vector<double>& s) {
  std::vector<double> out(s.size());
  if (g == GateKind::exp) {
    for (std::size_t k = 0; k < s.size(); ++k) out[k] = std::exp(s[k]);
  } else {
    const double m = *std::max_element(s.begin(), s.end());
    double z = 0.0;
    for (double v : s) z += std::exp(v - m);
    for (std::size_t k = 0; k < s.size(); ++k) out[k] = std::exp(s[k] - m) / z;
  }
  return out;
}

// Shared SwiGLU, added into y.
inline void add_shared_mlp(const Config& cfg, std::int64_t T, const std::vector<double>& x, const Weights& w,
                           std::vector<double>& y) {
  const std::int64_t H = cfg.hidden, I = cfg.intermediate;
  if (I == 0) return;
  const auto g = matmul_nt(x, T, H, w.gate, I);
  const auto u = matmul_nt(x, T, H, w.up, I);
  std::vector<double> m(static_cast<std::size_t>(T * I));
  for (std::int64_t k = 0; k < T * I; ++k) m[k] = silu(g[k]) * u[k];
  const auto ys = matmul_nt(m, T, I, w.down, H);
  for (std::int64_t k = 0; k < T * H; ++k) y[k] += ys[k];
}

// Experts and shared MLP for given ids [T, K] and the route's log-probabilities.
inline std::vector<double> experts_and_shared(const Config& cfg, std::int64_t T, const std::vector<double>& x,
                                              const Weights& w, const LogProbs& lp,
                                              const std::vector<std::int64_t>& ids,
                                              std::vector<double>* scores_out = nullptr,
                                              std::vector<double>* gates_out = nullptr) {
  const std::int64_t H = cfg.hidden, K = cfg.top_k;
  std::vector<double> y(static_cast<std::size_t>(T * H), 0.0);
  if (scores_out) scores_out->assign(static_cast<std::size_t>(T * K), 0.0);
  if (gates_out) gates_out->assign(static_cast<std::size_t>(T * K), 0.0);
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> s(static_cast<std::size_t>(K));
    for (std::int64_t k = 0; k < K; ++k) s[k] = score(cfg, lp, t, ids[t * K + k]);
    const auto g = gates_of(cfg.gate, s);
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t e = ids[t * K + k];
      double h = 0.0;
      for (std::int64_t d = 0; d < H; ++d) h += x[t * H + d] * w.expert_in[e * H + d];
      const double a = g[k] * activation(cfg.activation, h);
      for (std::int64_t d = 0; d < H; ++d) y[t * H + d] += a * w.expert_out[e * H + d];
      if (scores_out) (*scores_out)[t * K + k] = s[k];
      if (gates_out) (*gates_out)[t * K + k] = g[k];
    }
  }
  add_shared_mlp(cfg, T, x, w, y);
  return y;
}

// ---- the layer ---------------------------------------------------------------------------

// Full forward: all N scores per token, full sort, top-K. Running statistics after the call
// are in result.lp (the input weights are not modified).
inline ForwardResult forward(const Config& cfg, Mode mode, std::int64_t T, const std::vector<double>& x,
                             const Weights& w) {
  const std::int64_t N = cfg.num_experts(), K = cfg.top_k;
  ForwardResult r;
  r.lp = log_probs(cfg, mode, T, x, w);
  r.all_scores.resize(static_cast<std::size_t>(T * N));
  r.order.resize(static_cast<std::size_t>(T * N));
  r.ids.resize(static_cast<std::size_t>(T * K));
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t e = 0; e < N; ++e) r.all_scores[t * N + e] = score(cfg, r.lp, t, e);
    std::vector<std::int64_t> idx(static_cast<std::size_t>(N));
    std::iota(idx.begin(), idx.end(), std::int64_t{0});
    const double* s = &r.all_scores[t * N];
    std::sort(idx.begin(), idx.end(), [s](std::int64_t a, std::int64_t b) {
      if (s[a] != s[b]) return s[a] > s[b];
      return a < b;
    });
    for (std::int64_t e = 0; e < N; ++e) r.order[t * N + e] = idx[e];
    for (std::int64_t k = 0; k < K; ++k) r.ids[t * K + k] = idx[k];
  }
  r.y = experts_and_shared(cfg, T, x, w, r.lp, r.ids, &r.scores, &r.gates);
  return r;
}

// y for the given expert ids [T, K] (selected indices are constants): the function whose
// gradient omnimoe::backward computes. Running statistics are not reported.
inline std::vector<double> forward_fixed_ids(const Config& cfg, Mode mode, std::int64_t T,
                                             const std::vector<double>& x, const Weights& w,
                                             const std::vector<std::int64_t>& ids) {
  const LogProbs lp = log_probs(cfg, mode, T, x, w);
  return experts_and_shared(cfg, T, x, w, lp, ids);
}

}  // namespace naive
