// Test helpers for the coarse baselines (dense, gshard, deepseekmoe): seeded random
// problems in any storage dtype, an independent naive float64 implementation written from
// the specification in include/omnimoe/baselines.hpp, and comparisons. Public API only.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/test_helpers.hpp"
#include "omnimoe/baselines.hpp"

namespace omt::coarse {

using namespace omnimoe;
using namespace omnimoe::baselines;
using i64 = std::int64_t;

inline BaselineConfig dense_config(i64 H, i64 I) {
  BaselineConfig c;
  c.kind = Kind::dense;
  c.hidden = H;
  c.width = I;
  return c;
}
inline BaselineConfig moe_config(Kind kind, i64 H, i64 N, i64 W, i64 K, i64 shared = 0) {
  BaselineConfig c;
  c.kind = kind;
  c.hidden = H;
  c.width = W;
  c.num_experts = N;
  c.top_k = K;
  c.shared_width = shared;
  return c;
}
inline std::string describe(const BaselineConfig& c, i64 T) {
  return std::string(name(c.kind)) + " T=" + std::to_string(T) + " H=" + std::to_string(c.hidden) +
         " W=" + std::to_string(c.width) + " N=" + std::to_string(c.num_experts) + " K=" + std::to_string(c.top_k) +
         " shared=" + std::to_string(c.shared_width);
}

// ---- problem -----------------------------------------------------------------------------

struct CoarseProblem {
  BaselineConfig cfg;
  i64 T = 0;
  DType dtype = DType::f64;
  HostTensor x, gate, up, down, router, expert_gate, expert_up, expert_down;

  BaselineParams params() const {
    BaselineParams p;
    p.gate = gate.view();
    p.up = up.view();
    p.down = down.view();
    p.router = router.view();
    p.expert_gate = expert_gate.view();
    p.expert_up = expert_up.view();
    p.expert_down = expert_down.view();
    return p;
  }
  std::vector<HostTensor*> all() { return {&x, &gate, &up, &down, &router, &expert_gate, &expert_up, &expert_down}; }
};

// Random problem: x ~ N(0, 1), weights scaled by 1 / sqrt(fan-in) so activations stay O(1);
// the router is scaled by `router_scale` (larger: sharper, better separated probabilities).
inline CoarseProblem make_problem(const BaselineConfig& c, i64 T, DType dtype, std::uint64_t seed,
                                  double router_scale = 3.0) {
  CoarseProblem p;
  p.cfg = c;
  p.T = T;
  p.dtype = dtype;
  std::mt19937_64 rng(seed);
  const i64 H = c.hidden, W = c.width, N = c.num_experts, S = c.shared_width;
  const double sh = 1.0 / std::sqrt(static_cast<double>(H));
  p.x = HostTensor(dtype, {T, H});
  fill_normal(p.x, rng, 1.0);
  auto mlp = [&](HostTensor& g, HostTensor& u, HostTensor& d, i64 rows, i64 width, i64 count) {
    g = HostTensor(dtype, {rows, H});
    fill_normal(g, rng, sh);
    u = HostTensor(dtype, {rows, H});
    fill_normal(u, rng, sh);
    d = HostTensor(dtype, {count * H, width});
    fill_normal(d, rng, 1.0 / std::sqrt(static_cast<double>(width)));
  };
  if (c.kind == Kind::dense) {
    mlp(p.gate, p.up, p.down, W, W, 1);
    return p;
  }
  p.router = HostTensor(dtype, {N, H});
  fill_normal(p.router, rng, router_scale * sh);
  mlp(p.expert_gate, p.expert_up, p.expert_down, N * W, W, N);
  if (c.kind == Kind::deepseekmoe && S > 0) mlp(p.gate, p.up, p.down, S, S, 1);
  return p;
}

// Same values in another storage dtype.
inline CoarseProblem convert(const CoarseProblem& src, DType dtype) {
  CoarseProblem p = src;
  p.dtype = dtype;
  for (HostTensor* t : p.all()) {
    if (!t->defined()) continue;
    HostTensor r(dtype, t->shape());
    r.from_f64(t->to_f64());
    *t = r;
  }
  return p;
}

// A routing given by the caller: ids [T, K] i32 (distinct per token unless `duplicates`),
// gates [T, K] f32 in (0.05, 1).
struct Routing {
  HostTensor ids, gates;
};
inline Routing random_routing(i64 T, i64 K, i64 N, std::uint64_t seed, bool duplicates = false) {
  Routing r{HostTensor(DType::i32, {T, K}), HostTensor(DType::f32, {T, K})};
  std::mt19937_64 rng(seed);
  std::vector<i64> perm(static_cast<std::size_t>(N));
  std::iota(perm.begin(), perm.end(), 0);
  std::uniform_real_distribution<double> g(0.05, 1.0);
  for (i64 t = 0; t < T; ++t) {
    for (i64 k = 0; k < K; ++k) {
      i64 e;
      if (duplicates) {
        e = static_cast<i64>(rng() % static_cast<std::uint64_t>(N));
      } else {
        const i64 j = k + static_cast<i64>(rng() % static_cast<std::uint64_t>(N - k));
        std::swap(perm[k], perm[j]);
        e = perm[k];
      }
      r.ids.set(t * K + k, static_cast<double>(e));
      r.gates.set(t * K + k, g(rng));
    }
  }
  return r;
}

// ---- naive float64 reference -------------------------------------------------------------

struct NaiveResult {
  std::vector<double> y;      // [T, H]
  std::vector<i64> ids;       // [T, K] (routed kinds)
  std::vector<double> gates;  // [T, K]
  std::vector<double> probs;  // [T, N] router probabilities (router only)
  std::vector<i64> order;     // [T, N] experts by (p descending, id ascending)
};

// SwiGLU of one row: down (silu(gate x) * (up x)), weights row-major [W, H], [W, H], [H, W].
inline void naive_swiglu(const double* x, i64 H, i64 W, const double* g, const double* u, const double* d,
                         double scale, double* y) {
  std::vector<double> m(static_cast<std::size_t>(W));
  for (i64 j = 0; j < W; ++j) {
    double a = 0, b = 0;
    for (i64 h = 0; h < H; ++h) {
      a += g[j * H + h] * x[h];
      b += u[j * H + h] * x[h];
    }
    m[j] = a / (1.0 + std::exp(-a)) * b;
  }
  for (i64 h = 0; h < H; ++h) {
    double s = 0;
    for (i64 j = 0; j < W; ++j) s += d[h * W + j] * m[j];
    y[h] += scale * s;
  }
}

// The layer on the stored values of `p`; `routing` (ids, gates) replaces the router.
inline NaiveResult naive_forward(const CoarseProblem& p, const Routing* routing = nullptr) {
  const BaselineConfig& c = p.cfg;
  const i64 T = p.T, H = c.hidden, W = c.width, N = c.num_experts, K = c.top_k, S = c.shared_width;
  NaiveResult r;
  r.y.assign(static_cast<std::size_t>(T * H), 0.0);
  const std::vector<double> x = p.x.to_f64();
  if (c.kind == Kind::dense) {
    const auto g = p.gate.to_f64(), u = p.up.to_f64(), d = p.down.to_f64();
    for (i64 t = 0; t < T; ++t) naive_swiglu(&x[t * H], H, W, g.data(), u.data(), d.data(), 1.0, &r.y[t * H]);
    return r;
  }
  r.ids.assign(static_cast<std::size_t>(T * K), 0);
  r.gates.assign(static_cast<std::size_t>(T * K), 0.0);
  if (routing) {
    for (i64 i = 0; i < T * K; ++i) {
      r.ids[i] = routing->ids.get_int(i);
      r.gates[i] = routing->gates.get(i);
    }
  } else {
    const auto w = p.router.to_f64();
    r.probs.assign(static_cast<std::size_t>(T * N), 0.0);
    r.order.assign(static_cast<std::size_t>(T * N), 0);
    for (i64 t = 0; t < T; ++t) {
      std::vector<double> l(static_cast<std::size_t>(N));
      for (i64 e = 0; e < N; ++e) {
        double s = 0;
        for (i64 h = 0; h < H; ++h) s += w[e * H + h] * x[t * H + h];
        l[e] = s;
      }
      const double m = *std::max_element(l.begin(), l.end());
      double z = 0;
      for (double v : l) z += std::exp(v - m);
      double* pr = &r.probs[t * N];
      for (i64 e = 0; e < N; ++e) pr[e] = std::exp(l[e] - m) / z;
      i64* o = &r.order[t * N];
      std::iota(o, o + N, i64{0});
      std::stable_sort(o, o + N, [&](i64 a, i64 b) { return pr[a] > pr[b]; });  // stable: ties by id
      double chosen = 0;
      for (i64 k = 0; k < K; ++k) chosen += pr[o[k]];
      for (i64 k = 0; k < K; ++k) {
        r.ids[t * K + k] = o[k];
        r.gates[t * K + k] = c.kind == Kind::gshard ? pr[o[k]] / chosen : pr[o[k]];
      }
    }
  }
  const auto eg = p.expert_gate.to_f64(), eu = p.expert_up.to_f64(), ed = p.expert_down.to_f64();
  for (i64 t = 0; t < T; ++t) {
    if (c.kind == Kind::deepseekmoe && S > 0) {
      const auto g = p.gate.to_f64(), u = p.up.to_f64(), d = p.down.to_f64();
      naive_swiglu(&x[t * H], H, S, g.data(), u.data(), d.data(), 1.0, &r.y[t * H]);
    }
    for (i64 k = 0; k < K; ++k) {
      const i64 e = r.ids[t * K + k];
      naive_swiglu(&x[t * H], H, W, &eg[e * W * H], &eu[e * W * H], &ed[e * H * W], r.gates[t * K + k],
                   &r.y[t * H]);
    }
  }
  return r;
}

// Smallest gap between consecutive probabilities over sorted positions 0 .. K of token t
// (the choice and order of the K experts are well defined when it is well above rounding).
inline double routing_gap(const NaiveResult& r, i64 N, i64 K, i64 t) {
  double g = std::numeric_limits<double>::infinity();
  const i64 last = std::min(K, N - 1);
  for (i64 k = 0; k < last; ++k) g = std::min(g, r.probs[t * N + r.order[t * N + k]] - r.probs[t * N + r.order[t * N + k + 1]]);
  return g;
}

// ---- running the library ------------------------------------------------------------------

inline std::size_t workspace_bytes(const BaselineConfig& c, i64 T, DType dt, Device dev) {
  std::size_t bytes = 0;
  const Status s = workspace_size(c, T, dt, dev, &bytes);
  EXPECT_TRUE(s.ok()) << s.message();
  return bytes;
}

struct CpuRun {
  HostTensor y, ids;
  Status status;
};
// The CPU forward (routing null) or forward_routed, outputs and workspace poisoned first.
inline CpuRun run_cpu(const CoarseProblem& p, const Routing* routing = nullptr) {
  CpuRun r;
  r.y = HostTensor(p.dtype, {p.T, p.cfg.hidden});
  r.y.poison();
  HostWorkspace ws(workspace_bytes(p.cfg, p.T, p.dtype, Device::cpu));
  if (routing) {
    r.status = forward_routed(p.cfg, p.x.view(), p.params(), routing->ids.view(), routing->gates.view(), r.y.view(),
                              ws.ws());
  } else {
    if (p.cfg.kind != Kind::dense) {
      r.ids = HostTensor(DType::i32, {p.T, p.cfg.top_k});
      r.ids.poison();
    }
    r.status = forward(p.cfg, p.x.view(), p.params(), r.y.view(), ws.ws(), nullptr, r.ids.view());
  }
  return r;
}

// Rows of token t of a [T, H] vector.
inline std::vector<double> row(const std::vector<double>& v, i64 H, i64 t) {
  return {v.begin() + t * H, v.begin() + (t + 1) * H};
}

}  // namespace omt::coarse
