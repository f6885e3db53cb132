// Routing (DESIGN.md section 1, step 1): the library's expert_ids / scores / gates against the
// naive full-sort reference (tests/cpu/naive_reference.hpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "cpu/naive_reference.hpp"
#include "cpu/test_helpers.hpp"

namespace {

using namespace omt;

// Below this reference gap the f64 selection order is decided by rounding, not by the spec.
constexpr double kF64TieGap = 1e-11;
// Score/gate agreement in f64 (scores are log-probabilities of magnitude ~1-20).
constexpr double kF64ScoreTol = 1e-12;

struct Grid {
  std::int64_t Nr, Nc;
};

// Structural checks on the library's routing of one token, valid for every dtype: ids in
// range and distinct, scores non-increasing, equal scores ordered by ascending id.
void check_structure(const Outputs& out, std::int64_t N, std::int64_t K, std::int64_t t, const std::string& ctx,
                     bool check_tie_order = true) {
  std::set<std::int64_t> seen;
  for (std::int64_t k = 0; k < K; ++k) {
    const std::int64_t e = out.ids.get_int(t * K + k);
    ASSERT_GE(e, 0) << ctx << " t=" << t << " k=" << k;
    ASSERT_LT(e, N) << ctx << " t=" << t << " k=" << k;
    EXPECT_TRUE(seen.insert(e).second) << ctx << " duplicate expert " << e << " t=" << t;
    if (k + 1 < K && out.scores.defined()) {
      const double a = out.scores.get(t * K + k), b = out.scores.get(t * K + k + 1);
      EXPECT_GE(a, b) << ctx << " scores not descending t=" << t << " k=" << k;
      if (a == b && check_tie_order) {
        EXPECT_LT(e, out.ids.get_int(t * K + k + 1)) << ctx << " tie not by ascending e, t=" << t;
      }
    }
  }
}

// Compares the library's f64 routing with the reference. Tokens whose reference top-(K+1)
// has a gap below kF64TieGap that is not an exact tie are skipped (counted in *skipped).
void compare_f64_routing(const Problem& p, Mode mode, const Outputs& out, const naive::ForwardResult& ref,
                         int* skipped, int* compared) {
  const Config& c = p.cfg;
  const std::int64_t N = c.num_experts(), K = c.top_k;
  const std::string ctx = describe(c, p.T) + " mode=" + name(mode);
  for (std::int64_t t = 0; t < p.T; ++t) {
    check_structure(out, N, K, t, ctx);
    // scores are S = pr[i] + pc[j] of the library's own ids; gates follow from them.
    std::vector<double> s(K);
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t e = out.ids.get_int(t * K + k);
      if (e < 0 || e >= N) return;  // reported by check_structure
      s[k] = naive::score(c, ref.lp, t, e);
      EXPECT_NEAR(out.scores.get(t * K + k), s[k], kF64ScoreTol * (1 + std::abs(s[k])))
          << ctx << " t=" << t << " k=" << k << " e=" << e;
    }
    const auto g = naive::gates_of(c.gate, s);
    for (std::int64_t k = 0; k < K; ++k)
      EXPECT_NEAR(out.gates.get(t * K + k), g[k], kF64ScoreTol * std::abs(g[k]) + 1e-300)
          << ctx << " t=" << t << " k=" << k;
    // ids: exactly the reference's, in its order.
    bool exact_ties_only = true;
    const std::int64_t last = std::min(K, N - 1);
    for (std::int64_t k = 0; k < last; ++k) {
      const double a = ref.all_scores[t * N + ref.order[t * N + k]];
      const double b = ref.all_scores[t * N + ref.order[t * N + k + 1]];
      if (a != b && a - b < kF64TieGap) exact_ties_only = false;
    }
    if (!exact_ties_only) {
      ++*skipped;
      continue;
    }
    ++*compared;
    for (std::int64_t k = 0; k < K; ++k)
      EXPECT_EQ(out.ids.get_int(t * K + k), ref.ids[t * K + k]) << ctx << " t=" << t << " k=" << k;
  }
}

// Many random configurations: rectangular grids, K = 1, K = N and between, T = 1..9, both
// norms (batchnorm in both modes), both gates, i32 and i64 ids.
TEST(Route, MatchesNaiveFullSortF64) {
  const Grid grids[] = {{3, 7}, {7, 3}, {1, 9}, {9, 1}, {1, 1}, {4, 4}, {2, 5}, {5, 2}, {6, 6}, {1, 2}, {2, 1}};
  const NormMode norms[] = {NormMode::bn_training, NormMode::bn_inference, NormMode::none};
  const GateKind gates[] = {GateKind::exp, GateKind::softmax};
  const Activation acts[] = {Activation::silu, Activation::gelu, Activation::relu};
  int skipped = 0, compared = 0, cases = 0;
  std::uint64_t salt = 0;
  for (const Grid& gr : grids) {
    const std::int64_t N = gr.Nr * gr.Nc;
    std::set<std::int64_t> ks = {1, N, std::max<std::int64_t>(1, N / 2), std::min<std::int64_t>(N, 3),
                                 std::max<std::int64_t>(1, N - 1)};
    for (std::int64_t K : ks)
      for (NormMode nm : norms)
        for (GateKind gk : gates)
          for (int rep = 0; rep < 2; ++rep) {
            ++salt;
            // T cycles through 1..9 (training batchnorm needs T >= 2:
            // see Forward.BatchnormTrainingSingleToken).
            std::int64_t T = 1 + static_cast<std::int64_t>((salt * 7) % 9);
            if (nm == NormMode::bn_training && T == 1) T = 2;
            const std::int64_t H = 3 + static_cast<std::int64_t>(salt % 5);
            const std::int64_t I = (salt % 3 == 0) ? 0 : 2;
            Config c = make_config(H, I, gr.Nr, gr.Nc, K, norm_of(nm), gk, acts[salt % 3]);
            // A wide range of router scales: flat and peaked score distributions.
            const double rs = (salt % 4 == 0) ? 4.0 : (salt % 4 == 1 ? 0.3 : 1.0);
            Problem p = make_problem(c, T, DType::f64, test_seed(salt), rs);
            Outputs out = make_outputs(c, T, DType::f64, salt % 2 ? DType::i32 : DType::i64);
            const Status s = run_forward(p, mode_of(nm), out);
            ASSERT_TRUE(s.ok()) << describe(c, T) << ": " << s.message();
            const auto ref = naive::forward(c, mode_of(nm), T, p.x64(), p.weights());
            compare_f64_routing(p, mode_of(nm), out, ref, &skipped, &compared);
            ++cases;
            if (HasFailure()) return;
          }
  }
  // Random data must essentially never hit a rounding-level near tie.
  EXPECT_LE(skipped, compared / 1000 + 1) << "too many near-tie tokens skipped";
  EXPECT_GT(compared, 1500);
  std::printf("[ INFO     ] %d configs, %d tokens compared exactly, %d near-tie tokens skipped\n", cases, compared,
              skipped);
}

// Exact ties, constructed: duplicated router rows / columns make S(i1, j) == S(i2, j)
// (and S(i, j1) == S(i, j2)) bit for bit. x and the router use dyadic values with few bits,
// so every logit is exact whatever the summation order. Every K from 1 to N cuts through
// the tie groups; the smaller e must win and come first.
TEST(Route, ExactTiesGoToSmallerExpert) {
  const NormMode norms[] = {NormMode::bn_training, NormMode::bn_inference, NormMode::none};
  int tie_straddles = 0, compared = 0, skipped = 0;
  std::uint64_t salt = 0;
  struct TieCase {
    std::int64_t Nr, Nc;
    std::vector<std::pair<int, int>> dup_rows, dup_cols;  // (copy to, copy from)
  };
  const TieCase tcs[] = {
      {4, 3, {{2, 0}}, {}},
      {3, 4, {}, {{3, 1}}},
      {4, 4, {{3, 1}}, {{2, 0}}},
      {5, 3, {{1, 0}, {4, 0}}, {{2, 1}}},
      {1, 5, {}, {{4, 0}, {3, 0}}},
      {5, 1, {{2, 0}, {3, 0}}, {}},
  };
  for (const TieCase& tc : tcs)
    for (NormMode nm : norms)
      for (std::int64_t T : {2, 3, 6})
        for (std::int64_t K = 1; K <= tc.Nr * tc.Nc; ++K) {
          ++salt;
          const std::int64_t H = 6, N = tc.Nr * tc.Nc;
          Config c = make_config(H, 0, tc.Nr, tc.Nc, K, norm_of(nm), salt % 2 ? GateKind::exp : GateKind::softmax);
          Problem p = make_problem(c, T, DType::f64, test_seed(salt));
          std::mt19937_64 rng(test_seed(1000 + salt));
          std::uniform_int_distribution<int> xi(-64, 64), ri(-1024, 1024);
          for (std::int64_t i = 0; i < p.x.numel(); ++i) {
            int v;
            do v = xi(rng); while (v == 0);
            p.x.set(i, v / 64.0);
          }
          for (HostTensor* r : {&p.router_row, &p.router_col})
            for (std::int64_t i = 0; i < r->numel(); ++i) {
              int v;
              do v = ri(rng); while (v == 0);
              r->set(i, v / 2048.0);
            }
          // Duplicate rows / columns, with their running statistics.
          auto dup = [&](HostTensor& r, HostTensor& rm, HostTensor& rv, int to, int from) {
            for (std::int64_t h = 0; h < H; ++h) r.set(to * H + h, r.get(from * H + h));
            if (rm.defined()) rm.set(to, rm.get(from)), rv.set(to, rv.get(from));
          };
          for (auto [to, from] : tc.dup_rows) dup(p.router_row, p.running_mean_row, p.running_var_row, to, from);
          for (auto [to, from] : tc.dup_cols) dup(p.router_col, p.running_mean_col, p.running_var_col, to, from);

          Outputs out = make_outputs(c, T, DType::f64);
          const Status s = run_forward(p, mode_of(nm), out);
          ASSERT_TRUE(s.ok()) << describe(c, T) << ": " << s.message();
          const auto ref = naive::forward(c, mode_of(nm), T, p.x64(), p.weights());
          for (std::int64_t t = 0; t < T; ++t)
            if (K < N && ref.all_scores[t * N + ref.order[t * N + K - 1]] ==
                             ref.all_scores[t * N + ref.order[t * N + K]])
              ++tie_straddles;
          compare_f64_routing(p, mode_of(nm), out, ref, &skipped, &compared);
          if (HasFailure()) return;
        }
  EXPECT_EQ(skipped, 0) << "constructed data produced inexact near ties";
  // The construction must really put exact ties across the K boundary, many times.
  EXPECT_GT(tie_straddles, 100);
  std::printf("[ INFO     ] %d tokens compared, %d with an exact tie across the K boundary\n", compared,
              tie_straddles);
}

// All N scores of a token equal (x rows orthogonal to every router row): ids must be
// 0, 1, ..., K-1 and every exp gate 1/N.
TEST(Route, AllScoresTiedSelectsFirstK) {
  for (NormMode nm : {NormMode::bn_inference, NormMode::none}) {
    const std::int64_t H = 4, Nr = 3, Nc = 5, T = 3;
    for (std::int64_t K : {1, 4, 7, 15}) {
      Config c = make_config(H, 0, Nr, Nc, K, norm_of(nm), GateKind::exp);
      Problem p = make_problem(c, T, DType::f64, test_seed(K));
      // Router rows live in dims 0..1, x in dims 2..3: every logit is exactly 0.
      for (HostTensor* r : {&p.router_row, &p.router_col})
        for (std::int64_t i = 0; i < r->numel(); ++i)
          if (i % H >= 2) r->set(i, 0.0);
      for (std::int64_t i = 0; i < p.x.numel(); ++i)
        if (i % H < 2) p.x.set(i, 0.0);
      if (nm == NormMode::bn_inference) {  // identical running statistics per axis
        for (std::int64_t i = 0; i < Nr; ++i) p.running_mean_row.set(i, 0.25), p.running_var_row.set(i, 1.5);
        for (std::int64_t i = 0; i < Nc; ++i) p.running_mean_col.set(i, -0.5), p.running_var_col.set(i, 0.75);
      }
      Outputs out = make_outputs(c, T, DType::f64);
      const Status s = run_forward(p, Mode::inference, out);
      ASSERT_TRUE(s.ok()) << s.message();
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t k = 0; k < K; ++k) {
          EXPECT_EQ(out.ids.get_int(t * K + k), k) << name(nm) << " K=" << K << " t=" << t;
          EXPECT_NEAR(out.gates.get(t * K + k), 1.0 / 15.0, 1e-15);
          EXPECT_NEAR(out.scores.get(t * K + k), -std::log(15.0), 1e-14);
        }
    }
  }
}

// f32 storage and arithmetic: selection equals the f64 reference (on the same rounded inputs)
// wherever the K-th / (K+1)-th gap exceeds 1e-4; order equal where neighbouring gaps do;
// scores and gates to f32 accuracy.
TEST(Route, F32MatchesF64SelectionAboveGap) {
  const Grid grids[] = {{3, 7}, {7, 3}, {1, 9}, {9, 1}, {4, 4}, {6, 5}, {16, 16}};
  const NormMode norms[] = {NormMode::bn_training, NormMode::bn_inference, NormMode::none};
  int set_checked = 0, set_skipped = 0;
  std::uint64_t salt = 0;
  for (const Grid& gr : grids) {
    const std::int64_t N = gr.Nr * gr.Nc;
    for (std::int64_t K : std::set<std::int64_t>{1, std::min<std::int64_t>(N, 5), std::max<std::int64_t>(1, N / 2), N})
      for (NormMode nm : norms)
        for (GateKind gk : {GateKind::exp, GateKind::softmax})
          for (std::int64_t T : {2, 5, 9}) {
            ++salt;
            Config c = make_config(8, 0, gr.Nr, gr.Nc, K, norm_of(nm), gk);
            Problem p = make_problem(c, T, DType::f32, test_seed(salt));
            Outputs out = make_outputs(c, T, DType::f32, DType::i32);
            const Status s = run_forward(p, mode_of(nm), out);
            ASSERT_TRUE(s.ok()) << s.message();
            const auto ref = naive::forward(c, mode_of(nm), T, p.x64(), p.weights());
            const std::string ctx = describe(c, T);
            for (std::int64_t t = 0; t < T; ++t) {
              // Tie order on the library's own f32 scores: Route.F32RoundingTiesGoToSmallerExpert.
              check_structure(out, N, K, t, ctx, /*check_tie_order=*/false);
              if (HasFailure()) return;
              std::vector<double> sc(K);
              for (std::int64_t k = 0; k < K; ++k) {
                const std::int64_t e = out.ids.get_int(t * K + k);
                sc[k] = naive::score(c, ref.lp, t, e);
                EXPECT_NEAR(out.scores.get(t * K + k), sc[k], 2e-5 * (1 + std::abs(sc[k]))) << ctx << " t=" << t;
              }
              const auto g = naive::gates_of(c.gate, sc);
              for (std::int64_t k = 0; k < K; ++k)
                EXPECT_NEAR(out.gates.get(t * K + k), g[k], 3e-5 * g[k] + 1e-30) << ctx << " t=" << t;
              if (boundary_gap(ref, N, K, t) > 1e-4) {
                ++set_checked;
                std::set<std::int64_t> a, b;
                for (std::int64_t k = 0; k < K; ++k) a.insert(out.ids.get_int(t * K + k)), b.insert(ref.ids[t * K + k]);
                EXPECT_EQ(a, b) << ctx << " t=" << t;
              } else {
                ++set_skipped;
              }
              for (std::int64_t k = 0; k < K; ++k) {
                const double above = k == 0 ? 1.0 : ref.scores[t * K + k - 1] - ref.scores[t * K + k];
                const double below = k + 1 < N ? ref.scores[t * K + k] - ref.all_scores[t * N + ref.order[t * N + k + 1]]
                                               : 1.0;
                if (above > 1e-4 && below > 1e-4) {
                  EXPECT_EQ(out.ids.get_int(t * K + k), ref.ids[t * K + k]) << ctx << " t=" << t << " k=" << k;
                }
              }
            }
            if (HasFailure()) return;
          }
  }
  EXPECT_GT(set_checked, 20 * set_skipped + 100);
  std::printf("[ INFO     ] f32: %d token selections compared, %d within 1e-4 of a tie skipped\n", set_checked,
              set_skipped);
}

// Ties created by fp32 rounding: pc[1] exceeds pc[0] by one ulp, but pr[0] + pc[0] and
// pr[0] + pc[1] round to the same fp32 score S. The spec's order is on S itself: equal S,
// smaller e first, and the K-th place of a tie goes to the smaller e. Checked on the
// library's own scores (K = N gives all of them), over consecutive fp32 values of router_col.
TEST(Route, F32RoundingTiesGoToSmallerExpert) {
  Problem p = make_problem(make_config(1, 0, 2, 2, 4, RouterNorm::none), 1, DType::f32, test_seed());
  p.x.from_f64({1.0});
  p.router_row.from_f64({0.0, 1.3});
  int ties = 0, cases = 0;
  float a = 0.1f;
  for (int step = 0; step < 64; ++step, a = std::nextafter(a, 1.0f)) {
    p.router_col.from_f64({a, std::nextafter(a, 1.0f)});
    p.cfg.top_k = 4;
    Outputs all = make_outputs(p.cfg, 1, DType::f32, DType::i32);
    ASSERT_TRUE(run_forward(p, Mode::inference, all).ok());
    // The spec order of the library's own scores.
    std::vector<std::int64_t> order = {0, 1, 2, 3};
    std::vector<double> s(4);
    for (std::int64_t k = 0; k < 4; ++k) s[all.ids.get_int(k)] = all.scores.get(k);
    std::sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) { return s[x] != s[y] ? s[x] > s[y] : x < y; });
    ties += s[0] == s[1];
    ++cases;
    for (std::int64_t K = 1; K <= 4; ++K) {
      p.cfg.top_k = K;
      Outputs out = make_outputs(p.cfg, 1, DType::f32, DType::i32);
      ASSERT_TRUE(run_forward(p, Mode::inference, out).ok());
      for (std::int64_t k = 0; k < K; ++k)
        EXPECT_EQ(out.ids.get_int(k), order[k]) << "router_col[0] = " << std::hexfloat << a << std::defaultfloat
                                                << " K=" << K << " k=" << k << " scores of e=0,1: " << s[0] << ", "
                                                << s[1];
    }
    if (HasFailure()) break;
  }
  EXPECT_GT(ties, 0) << "the construction produced no rounding tie";
  std::printf("[ INFO     ] equal fp32 scores of e = 0, 1 in %d of %d cases\n", ties, cases);
}

// The grid Nr = 1, Nc = N is a dense N-way softmax router (the training example's ablation):
// the single row's log-probability is 0, so S(e) = log_softmax over the N column logits.
// Computed here directly in that form: ids are exactly its top K (descending, ties by the
// smaller id), scores those log-probabilities, exp gates the softmax over all N at those ids.
// The row router gets no gradient (a one-entry log_softmax is constant).
TEST(Route, SingleRowGridIsDenseSoftmaxRouter) {
  const std::int64_t H = 64, N = 4096, K = 32, T = 64;
  int compared = 0, skipped = 0;
  for (NormMode nm : {NormMode::none, NormMode::bn_inference, NormMode::bn_training}) {
    const Config c = make_config(H, 16, 1, N, K, norm_of(nm), GateKind::exp);
    const Problem p = make_problem(c, T, DType::f64, test_seed(static_cast<std::uint64_t>(nm)));
    Outputs out = make_outputs(c, T, DType::f64);
    const Status st = run_forward(p, mode_of(nm), out);
    ASSERT_TRUE(st.ok()) << st.message();

    // Column logits and their normalisation, from the spec.
    const auto x = p.x.to_f64(), w = p.router_col.to_f64();
    std::vector<double> l(static_cast<std::size_t>(T * N), 0.0), mean(N, 0.0), var(N, 1.0 - kBatchnormEps);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < N; ++j)
        for (std::int64_t h = 0; h < H; ++h) l[t * N + j] += x[t * H + h] * w[j * H + h];
    if (nm == NormMode::bn_inference) {
      mean = p.running_mean_col.to_f64();
      var = p.running_var_col.to_f64();
    } else if (nm == NormMode::bn_training) {
      for (std::int64_t j = 0; j < N; ++j) {
        double m = 0, v = 0;
        for (std::int64_t t = 0; t < T; ++t) m += l[t * N + j] / T;
        for (std::int64_t t = 0; t < T; ++t) v += (l[t * N + j] - m) * (l[t * N + j] - m) / T;
        mean[j] = m;
        var[j] = v;
      }
    }
    for (std::int64_t t = 0; t < T; ++t) {
      std::vector<double> lp(N);
      double mx = -INFINITY, sum = 0;
      for (std::int64_t j = 0; j < N; ++j) {
        lp[j] = (l[t * N + j] - mean[j]) / std::sqrt(var[j] + kBatchnormEps);
        mx = std::max(mx, lp[j]);
      }
      for (std::int64_t j = 0; j < N; ++j) sum += std::exp(lp[j] - mx);
      for (std::int64_t j = 0; j < N; ++j) lp[j] -= mx + std::log(sum);
      std::vector<std::int64_t> order(N);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return lp[a] > lp[b]; });
      // Rounding decides between scores closer than this; random data essentially never is.
      bool near_tie = false;
      for (std::int64_t k = 0; k < K; ++k) near_tie |= lp[order[k]] - lp[order[k + 1]] < 1e-9;
      if (near_tie) {
        ++skipped;
        continue;
      }
      ++compared;
      for (std::int64_t k = 0; k < K; ++k) {
        const std::int64_t e = order[k];
        ASSERT_EQ(out.ids.get_int(t * K + k), e) << name(nm) << " t=" << t << " k=" << k;
        EXPECT_NEAR(out.scores.get(t * K + k), lp[e], 1e-10) << name(nm) << " t=" << t << " k=" << k;
        const double softmax = std::exp(lp[e]);  // softmax over all N columns at e
        EXPECT_NEAR(out.gates.get(t * K + k), softmax, 1e-10 * softmax) << name(nm) << " t=" << t << " k=" << k;
      }
    }

    HostTensor dy(DType::f64, {T, H});
    std::mt19937_64 rng(test_seed(40 + static_cast<std::uint64_t>(nm)));
    fill_normal(dy, rng, 1.0);
    Grads g = make_grads(c, T, DType::f64);
    ASSERT_TRUE(run_backward(p, mode_of(nm), out.ids, dy, g).ok());
    EXPECT_LE(max_abs_diff(g.router_row.to_f64(), std::vector<double>(H, 0.0)), 1e-12) << name(nm);
    EXPECT_GT(max_abs_diff(g.router_col.to_f64(), std::vector<double>(N * H, 0.0)), 1e-6) << name(nm);
  }
  EXPECT_LE(skipped, 1);
  EXPECT_GE(compared, 3 * T - 1);
}

// The id dtype does not change the routing, and optional scores / gates may be omitted.
TEST(Route, IdDtypeAndOptionalOutputs) {
  Config c = make_config(6, 3, 4, 5, 6, RouterNorm::batchnorm, GateKind::softmax);
  Problem p = make_problem(c, 7, DType::f64, test_seed());
  Outputs a = make_outputs(c, 7, DType::f64, DType::i64);
  Outputs b = make_outputs(c, 7, DType::f64, DType::i32, /*scores=*/false, /*gates=*/false);
  ASSERT_TRUE(run_forward(p, Mode::inference, a).ok());
  ASSERT_TRUE(run_forward(p, Mode::inference, b).ok());
  EXPECT_EQ(a.ids.to_i64(), b.ids.to_i64());
  EXPECT_TRUE(a.y.bitwise_equal(b.y));
  EXPECT_EQ(b.y.count_nonfinite(), 0);
}

}  // namespace
