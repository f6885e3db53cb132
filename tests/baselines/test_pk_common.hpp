// Shared pieces of the pkm / peer tests: random and tie-heavy problems, an independent naive
// float64 reference (every one of the N scores computed and sorted), and direct calls of the
// per-kind entry points (src/baselines/kinds.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "baselines/kinds.hpp"
#include "cpu/test_helpers.hpp"
#include "omnimoe/baselines.hpp"

namespace pkt {

using namespace omt;
using omnimoe::baselines::BaselineConfig;
using omnimoe::baselines::BaselineParams;
using omnimoe::baselines::ForwardArgs;
using omnimoe::baselines::Kind;
using i64 = std::int64_t;

inline BaselineConfig pk_config(Kind kind, i64 H, i64 Nr, i64 Nc, i64 K) {
  BaselineConfig c;
  c.kind = kind;
  c.hidden = H;
  c.grid_rows = Nr;
  c.grid_cols = Nc;
  c.num_experts = Nr * Nc;
  c.top_k = K;
  return c;
}

inline std::string describe(const BaselineConfig& c, i64 T, DType dt) {
  return std::string(c.kind == Kind::pkm ? "pkm" : "peer") + " " + dtype_name(dt) + " T=" + std::to_string(T) +
         " H=" + std::to_string(c.hidden) + " grid=" + std::to_string(c.grid_rows) + "x" + std::to_string(c.grid_cols) +
         " K=" + std::to_string(c.top_k);
}

// normal: Gaussian entries scaled so that s1, s2 ~ N(0, 1). ties: small integers (x = +-1,
// query and keys in {-1, 0, 1}, mostly 0 for the keys), so every product and score is exact
// in every dtype and the grid is full of exact ties.
enum class Fill { normal, ties };

struct PkProblem {
  BaselineConfig cfg;
  i64 T = 0;
  DType dtype = DType::f64;
  HostTensor x, query, keys_row, keys_col, values, expert_in, expert_out;

  BaselineParams params() const {
    BaselineParams p;
    p.query = query.view();
    p.keys_row = keys_row.view();
    p.keys_col = keys_col.view();
    p.values = values.view();
    p.expert_in = expert_in.view();
    p.expert_out = expert_out.view();
    return p;
  }
};

inline void fill_ints(HostTensor& t, std::mt19937_64& rng, double p_zero) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (i64 i = 0; i < t.numel(); ++i) {
    const double r = u(rng);
    t.set(i, r < p_zero ? 0.0 : (r < p_zero + (1 - p_zero) / 2 ? -1.0 : 1.0));
  }
}

inline PkProblem make_pk(const BaselineConfig& c, i64 T, DType dt, std::uint64_t seed, Fill fill = Fill::normal) {
  PkProblem p;
  p.cfg = c;
  p.T = T;
  p.dtype = dt;
  const i64 H = c.hidden, Hh = H / 2, N = c.grid_rows * c.grid_cols;
  std::mt19937_64 rng(seed);
  p.x = HostTensor(dt, {T, H});
  p.query = HostTensor(dt, {H, H});
  p.keys_row = HostTensor(dt, {c.grid_rows, Hh});
  p.keys_col = HostTensor(dt, {c.grid_cols, Hh});
  if (fill == Fill::normal) {
    fill_normal(p.x, rng, 1.0);
    fill_normal(p.query, rng, 1.0 / std::sqrt(static_cast<double>(H)));
    fill_normal(p.keys_row, rng, 1.0 / std::sqrt(static_cast<double>(Hh)));
    fill_normal(p.keys_col, rng, 1.0 / std::sqrt(static_cast<double>(Hh)));
  } else {
    fill_ints(p.x, rng, 0.0);
    fill_ints(p.query, rng, 0.5);
    fill_ints(p.keys_row, rng, 0.8);
    fill_ints(p.keys_col, rng, 0.8);
  }
  const double sh = 1.0 / std::sqrt(static_cast<double>(H));
  if (c.kind == Kind::pkm) {
    p.values = HostTensor(dt, {N, H});
    fill_normal(p.values, rng, 1.0);
  } else {
    p.expert_in = HostTensor(dt, {N, H});
    fill_normal(p.expert_in, rng, sh);
    p.expert_out = HostTensor(dt, {N, H});
    fill_normal(p.expert_out, rng, 1.0);
  }
  return p;
}

inline HostTensor convert(const HostTensor& t, DType dt) {
  if (!t.defined()) return HostTensor();
  HostTensor r(dt, t.shape());
  r.from_f64(t.to_f64());
  return r;
}

// Same values in another storage dtype (rounded when narrower).
inline PkProblem convert_pk(const PkProblem& s, DType dt) {
  PkProblem p = s;
  p.dtype = dt;
  for (auto [dst, src] : {std::pair{&p.x, &s.x}, {&p.query, &s.query}, {&p.keys_row, &s.keys_row},
                          {&p.keys_col, &s.keys_col}, {&p.values, &s.values}, {&p.expert_in, &s.expert_in},
                          {&p.expert_out, &s.expert_out}})
    *dst = convert(*src, dt);
  return p;
}

// ---- naive float64 reference --------------------------------------------------------------

struct Scores {
  std::vector<double> s1, s2;  // [T, Nr], [T, Nc]
  std::vector<double> bound;   // [T]: max_i sum_h |keys_row[i, h] q1[h]| + the same for the columns
  std::vector<double> l2;      // [T]: max_i sqrt(sum_h (keys_row[i, h] q1[h])^2) + the same for the columns
};

inline Scores naive_scores(const PkProblem& p) {
  const BaselineConfig& c = p.cfg;
  const i64 T = p.T, H = c.hidden, Hh = H / 2, Nr = c.grid_rows, Nc = c.grid_cols;
  const auto x = p.x.to_f64(), Wq = p.query.to_f64(), kr = p.keys_row.to_f64(), kc = p.keys_col.to_f64();
  Scores s;
  s.s1.assign(T * Nr, 0.0);
  s.s2.assign(T * Nc, 0.0);
  s.bound.assign(T, 0.0);
  s.l2.assign(T, 0.0);
  std::vector<double> q(H);
  for (i64 t = 0; t < T; ++t) {
    for (i64 h = 0; h < H; ++h) {
      double v = 0;
      for (i64 i = 0; i < H; ++i) v += Wq[h * H + i] * x[t * H + i];
      q[h] = v;
    }
    double br = 0, bc = 0, qr = 0, qc = 0;
    for (i64 i = 0; i < Nr; ++i) {
      double v = 0, a = 0, a2 = 0;
      for (i64 h = 0; h < Hh; ++h) {
        const double m = kr[i * Hh + h] * q[h];
        v += m;
        a += std::abs(m);
        a2 += m * m;
      }
      s.s1[t * Nr + i] = v;
      br = std::max(br, a);
      qr = std::max(qr, std::sqrt(a2));
    }
    for (i64 j = 0; j < Nc; ++j) {
      double v = 0, a = 0, a2 = 0;
      for (i64 h = 0; h < Hh; ++h) {
        const double m = kc[j * Hh + h] * q[Hh + h];
        v += m;
        a += std::abs(m);
        a2 += m * m;
      }
      s.s2[t * Nc + j] = v;
      bc = std::max(bc, a);
      qc = std::max(qc, std::sqrt(a2));
    }
    s.bound[t] = br + bc;
    s.l2[t] = qr + qc;
  }
  return s;
}

inline double score_of(const Scores& s, const BaselineConfig& c, i64 t, i64 e) {
  return s.s1[t * c.grid_rows + e / c.grid_cols] + s.s2[t * c.grid_cols + e % c.grid_cols];
}

// y for given ids and gates, in float64 (pkm: sum g v[e]; peer: sum g gelu(x . in[e]) out[e]).
inline std::vector<double> naive_routed(const PkProblem& p, const std::vector<i64>& ids, const std::vector<double>& gates) {
  const BaselineConfig& c = p.cfg;
  const i64 T = p.T, H = c.hidden, K = c.top_k;
  const auto x = p.x.to_f64();
  const bool peer = c.kind == Kind::peer;
  const auto wa = peer ? p.expert_in.to_f64() : p.values.to_f64();
  const auto wb = peer ? p.expert_out.to_f64() : std::vector<double>{};
  std::vector<double> y(T * H, 0.0);
  for (i64 t = 0; t < T; ++t)
    for (i64 k = 0; k < K; ++k) {
      const i64 e = ids[t * K + k];
      double a = gates[t * K + k];
      if (peer) {
        double h = 0;
        for (i64 i = 0; i < H; ++i) h += x[t * H + i] * wa[e * H + i];
        a *= 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0)));
        for (i64 i = 0; i < H; ++i) y[t * H + i] += a * wb[e * H + i];
      } else {
        for (i64 i = 0; i < H; ++i) y[t * H + i] += a * wa[e * H + i];
      }
    }
  return y;
}

// softmax over the given ids' float64 scores (ids in any order).
inline std::vector<double> softmax_gates(const Scores& s, const BaselineConfig& c, i64 T, const std::vector<i64>& ids) {
  const i64 K = c.top_k;
  std::vector<double> g(T * K);
  for (i64 t = 0; t < T; ++t) {
    double mx = -std::numeric_limits<double>::infinity();
    for (i64 k = 0; k < K; ++k) mx = std::max(mx, score_of(s, c, t, ids[t * K + k]));
    double z = 0;
    for (i64 k = 0; k < K; ++k) z += (g[t * K + k] = std::exp(score_of(s, c, t, ids[t * K + k]) - mx));
    for (i64 k = 0; k < K; ++k) g[t * K + k] /= z;
  }
  return g;
}

// The (K+1)-th largest float64 score of each token (-inf when K = N).
inline std::vector<double> next_scores(const Scores& s, const BaselineConfig& c, i64 T) {
  const i64 N = c.grid_rows * c.grid_cols, K = c.top_k;
  std::vector<double> next(T, -std::numeric_limits<double>::infinity());
  if (K >= N) return next;
  std::vector<double> all(N);
  for (i64 t = 0; t < T; ++t) {
    for (i64 e = 0; e < N; ++e) all[e] = score_of(s, c, t, e);
    std::nth_element(all.begin(), all.begin() + K, all.end(), std::greater<double>());
    next[t] = all[K];
  }
  return next;
}

struct Reference {
  Scores scores;
  std::vector<i64> ids;      // [T, K]: every N score sorted (descending, ties by ascending id)
  std::vector<double> next;  // [T]: the (K+1)-th score (-inf when K = N)
  std::vector<double> y;     // [T, H]
};

inline Reference naive_forward(const PkProblem& p) {
  const BaselineConfig& c = p.cfg;
  const i64 T = p.T, N = c.grid_rows * c.grid_cols, K = c.top_k;
  Reference r;
  r.scores = naive_scores(p);
  r.ids.resize(T * K);
  r.next.assign(T, -std::numeric_limits<double>::infinity());
  std::vector<i64> order(N);
  for (i64 t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](i64 a, i64 b) {
      const double sa = score_of(r.scores, c, t, a), sb = score_of(r.scores, c, t, b);
      return sa > sb || (sa == sb && a < b);
    });
    for (i64 k = 0; k < K; ++k) r.ids[t * K + k] = order[k];
    if (K < N) r.next[t] = score_of(r.scores, c, t, order[K]);
  }
  r.y = naive_routed(p, r.ids, softmax_gates(r.scores, c, T, r.ids));
  return r;
}

// ---- checks -------------------------------------------------------------------------------

// A selection `got` [T, K] against the float64 scores: ids distinct and in range; in order
// (descending score within tol); every chosen score at least the reference's K-th best minus
// tol and, where `want` is given, the k-th chosen score within tol of the reference's k-th;
// and ids equal to `want` wherever the reference scores around position k are separated by
// more than tol (then the choice is forced). tol[t] is the rounding allowance of token t.
// Returns "" or the first problem.
inline std::string check_selection(const PkProblem& p, const Scores& s, const std::vector<i64>& got,
                                   const std::vector<i64>& want, const std::vector<double>& next,
                                   const std::vector<double>& tol, i64* flips = nullptr) {
  const BaselineConfig& c = p.cfg;
  const i64 T = p.T, K = c.top_k, N = c.grid_rows * c.grid_cols;
  i64 n_flips = 0;
  for (i64 t = 0; t < T; ++t) {
    std::vector<char> seen(N, 0);
    const std::string at = "token " + std::to_string(t) + ": ";
    for (i64 k = 0; k < K; ++k) {
      const i64 e = got[t * K + k];
      if (e < 0 || e >= N) return at + "id " + std::to_string(e) + " out of range at k=" + std::to_string(k);
      if (seen[e]) return at + "id " + std::to_string(e) + " chosen twice";
      seen[e] = 1;
      const double se = score_of(s, c, t, e), sw = score_of(s, c, t, want[t * K + k]);
      if (std::abs(se - sw) > tol[t])
        return at + "k=" + std::to_string(k) + " score " + std::to_string(se) + " (id " + std::to_string(e) +
               ") vs reference " + std::to_string(sw) + " (id " + std::to_string(want[t * K + k]) + ")";
      if (k > 0 && se > score_of(s, c, t, got[t * K + k - 1]) + tol[t]) return at + "out of order at k=" + std::to_string(k);
      if (e != want[t * K + k]) {
        // Forced choice: the reference's neighbours (k-1, k+1, and the (K+1)-th for the last)
        // are all further than tol from the k-th.
        const double lo = k + 1 < K ? score_of(s, c, t, want[t * K + k + 1]) : next[t];
        const double hi = k > 0 ? score_of(s, c, t, want[t * K + k - 1]) : std::numeric_limits<double>::infinity();
        if (sw - lo > tol[t] && hi - sw > tol[t])
          return at + "k=" + std::to_string(k) + " id " + std::to_string(e) + " != reference " +
                 std::to_string(want[t * K + k]) + " although the scores are separated by more than " +
                 std::to_string(tol[t]);
        ++n_flips;
      }
    }
  }
  if (flips) *flips = n_flips;
  return "";
}

// ---- running the entry points directly ----------------------------------------------------

// pkm_forward on the CPU. ids_out / ids_in / gates_in may be null.
inline Status run_pk_cpu(const PkProblem& p, HostTensor& y, HostTensor* ids_out, const HostTensor* ids_in = nullptr,
                         const HostTensor* gates_in = nullptr) {
  std::size_t bytes = 0;
  const Status s = omnimoe::baselines::pkm_workspace_size(p.cfg, p.T, p.dtype, Device::cpu, &bytes);
  if (!s.ok()) return s;
  HostWorkspace ws(bytes);
  y.poison();
  if (ids_out) ids_out->poison();
  const BaselineParams params = p.params();
  const ForwardArgs a{&p.cfg,
                      p.x.view(),
                      &params,
                      ids_in ? ids_in->view() : TensorView{},
                      gates_in ? gates_in->view() : TensorView{},
                      ids_out ? ids_out->view() : TensorView{},
                      y.view(),
                      ws.ws(),
                      nullptr};
  return omnimoe::baselines::pkm_forward(a);
}

inline std::vector<double> rows_of(const std::vector<double>& v, i64 H, const std::vector<char>& keep) {
  std::vector<double> r;
  for (std::size_t t = 0; t < keep.size(); ++t)
    if (keep[t]) r.insert(r.end(), v.begin() + t * H, v.begin() + (t + 1) * H);
  return r;
}

}  // namespace pkt
