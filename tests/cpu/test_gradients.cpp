// Backward on the CPU backend: central finite differences of L = sum(grad_y * y) in float64,
// with the selected expert ids held fixed (they are constants of the gradient, DESIGN.md
// section 1), w.r.t. x and every parameter, for every router norm x gate x activation.
// The loss is evaluated by the naive reference's fixed-ids forward.
#include <gtest/gtest.h>

#include <set>
#include <tuple>

#include "cpu/naive_reference.hpp"
#include "cpu/test_helpers.hpp"

namespace {

using namespace omt;

constexpr double kStep = 1e-6;
constexpr double kAbsTol = 1e-6;
constexpr double kRelTol = 1e-6;

struct Shape {
  std::int64_t T, H, Nr, Nc, K, I;
};

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

std::vector<double>* tensor_of(naive::Weights& w, std::vector<double>& x, int which) {
  switch (which) {
    case 0: return &x;
    case 1: return &w.router_row;
    case 2: return &w.router_col;
    case 3: return &w.expert_in;
    case 4: return &w.expert_out;
    case 5: return &w.gate;
    case 6: return &w.up;
    case 7: return &w.down;
  }
  return nullptr;
}

struct GradResult {
  double max_err = 0.0;         // largest |analytic - fd| / (abs + rel * |fd|)
  std::int64_t unchosen = 0;    // experts no token selected
  std::int64_t checked = 0;     // partial derivatives compared
};

// Forward (library) for the ids, backward (library), then every partial derivative by
// central differences of the reference fixed-ids loss.
GradResult check_gradients(const Config& c, NormMode nm, std::int64_t T, std::uint64_t seed,
                           DType id_dtype = DType::i64) {
  GradResult res;
  const Mode mode = mode_of(nm);
  const std::string ctx = describe(c, T) + " " + name(nm);
  Problem p = make_problem(c, T, DType::f64, seed);
  const std::int64_t H = c.hidden, N = c.num_experts();

  Outputs out = make_outputs(c, T, DType::f64, id_dtype);
  Status s = run_forward(p, mode, out);
  EXPECT_TRUE(s.ok()) << ctx << ": " << s.message();
  if (!s.ok()) return res;
  const auto ids = out.ids.to_i64();
  for (auto e : ids) {
    EXPECT_TRUE(e >= 0 && e < N) << ctx << " id " << e;
    if (e < 0 || e >= N) return res;
  }

  HostTensor gy(DType::f64, {T, H});
  std::mt19937_64 rng(seed ^ 0x5151);
  fill_normal(gy, rng, 1.0);

  const Problem before = p;
  Grads g = make_grads(c, T, DType::f64);
  s = run_backward(p, mode, out.ids, gy, g);
  EXPECT_TRUE(s.ok()) << ctx << ": " << s.message();
  if (!s.ok()) return res;

  // Inputs (running statistics included) are read, never written.
  {
    Problem& a = p;
    const Problem& b = before;
    EXPECT_TRUE(a.x.bitwise_equal(b.x) && a.router_row.bitwise_equal(b.router_row) &&
                a.router_col.bitwise_equal(b.router_col) && a.expert_in.bitwise_equal(b.expert_in) &&
                a.expert_out.bitwise_equal(b.expert_out))
        << ctx << " backward modified an input";
    if (c.router_norm == RouterNorm::batchnorm) {
      EXPECT_TRUE(a.running_mean_row.bitwise_equal(b.running_mean_row) &&
                  a.running_var_row.bitwise_equal(b.running_var_row) &&
                  a.running_mean_col.bitwise_equal(b.running_mean_col) &&
                  a.running_var_col.bitwise_equal(b.running_var_col))
          << ctx << " backward modified the running statistics";
    }
  }

  // Fully written (the grads were poisoned with NaN), and bitwise deterministic.
  for (int k = 0; k < 8; ++k)
    if (g.all()[k]->defined()) {
      EXPECT_EQ(g.all()[k]->count_nonfinite(), 0) << ctx << " grads." << kTrainableNames[k];
    }
  {
    Grads g2 = make_grads(c, T, DType::f64);
    EXPECT_TRUE(run_backward(p, mode, out.ids, gy, g2).ok());
    for (int k = 0; k < 8; ++k)
      if (g.all()[k]->defined()) {
        EXPECT_TRUE(g.all()[k]->bitwise_equal(*g2.all()[k])) << ctx << " grads." << kTrainableNames[k] << " not deterministic";
      }
  }

  // Central differences. The reference loss must use the weights as the library's backward
  // saw them: in training the forward updated the running statistics, which batchnorm in
  // training does not read, so either state is fine; in inference they did not change.
  naive::Weights w = p.weights();
  std::vector<double> x = p.x64();
  const auto gyv = gy.to_f64();
  auto loss = [&]() { return dot(gyv, naive::forward_fixed_ids(c, mode, T, x, w, ids)); };
  // Sanity: the reference with the library's ids reproduces the library's y.
  EXPECT_LE(rel_error(out.y.to_f64(), naive::forward_fixed_ids(c, mode, T, before.x64(), before.weights(), ids)), 1e-12)
      << ctx;
  for (int which = 0; which < 8; ++which) {
    std::vector<double>* v = tensor_of(w, x, which);
    const HostTensor* gt = g.all()[which];
    if (v->empty()) {
      EXPECT_FALSE(gt->defined());
      continue;
    }
    for (std::size_t i = 0; i < v->size(); ++i) {
      const double orig = (*v)[i];
      (*v)[i] = orig + kStep;
      const double lp = loss();
      (*v)[i] = orig - kStep;
      const double lm = loss();
      (*v)[i] = orig;
      const double fd = (lp - lm) / (2 * kStep);
      const double an = gt->get(static_cast<std::int64_t>(i));
      const double bound = kAbsTol + kRelTol * std::abs(fd);
      EXPECT_NEAR(an, fd, bound) << ctx << " d/d " << kTrainableNames[which] << "[" << i << "]";
      res.max_err = std::max(res.max_err, std::abs(an - fd) / bound);
      ++res.checked;
    }
  }

  // Experts no token chose: gradient rows exactly zero.
  std::set<std::int64_t> chosen(ids.begin(), ids.end());
  for (std::int64_t e = 0; e < N; ++e) {
    if (chosen.count(e)) continue;
    ++res.unchosen;
    for (std::int64_t h = 0; h < H; ++h) {
      EXPECT_EQ(g.expert_in.get(e * H + h), 0.0) << ctx << " unchosen expert " << e;
      EXPECT_EQ(g.expert_out.get(e * H + h), 0.0) << ctx << " unchosen expert " << e;
    }
  }
  return res;
}

using Combo = std::tuple<NormMode, GateKind, Activation>;

class GradientCombo : public ::testing::TestWithParam<Combo> {
 protected:
  Config config(const Shape& s) const {
    auto [nm, g, a] = GetParam();
    return make_config(s.H, s.I, s.Nr, s.Nc, s.K, norm_of(nm), g, a);
  }
  NormMode norm_mode() const { return std::get<0>(GetParam()); }
};

// T=7, H=5, Nr=3, Nc=4 (N=12), K=5, I=3.
TEST_P(GradientCombo, FiniteDifferences) {
  const Shape s{7, 5, 3, 4, 5, 3};
  const GradResult r = check_gradients(config(s), norm_mode(), s.T, test_seed());
  EXPECT_EQ(r.checked, 7 * 5 + 3 * 5 + 4 * 5 + 2 * 12 * 5 + 3 * 3 * 5);
  std::printf("[ INFO     ] %lld partials, worst |an - fd| / tol = %.3g, %lld unchosen experts\n",
              static_cast<long long>(r.checked), r.max_err, static_cast<long long>(r.unchosen));
}

// Few selections among many experts: most rows of the expert gradients must be exactly zero.
TEST_P(GradientCombo, UnchosenExpertsExactlyZero) {
  const Shape s{2, 4, 4, 4, 2, 2};
  const GradResult r = check_gradients(config(s), norm_mode(), s.T, test_seed(), DType::i32);
  EXPECT_GE(r.unchosen, 12);
}

// f32 backward against the f64 backward on the same (f32-representable) values and the same ids.
TEST_P(GradientCombo, F32MatchesF64) {
  const Shape s{7, 5, 3, 4, 5, 3};
  const Config c = config(s);
  const Mode mode = mode_of(norm_mode());
  const Problem p64 = convert_problem(convert_problem(make_problem(c, s.T, DType::f64, test_seed()), DType::f32),
                                      DType::f64);
  Problem p32 = convert_problem(p64, DType::f32);
  Problem pf = p64;
  Outputs out = make_outputs(c, s.T, DType::f64, DType::i32);
  ASSERT_TRUE(run_forward(pf, mode, out).ok());
  HostTensor gy64(DType::f32, {s.T, s.H});
  std::mt19937_64 rng(test_seed(1));
  fill_normal(gy64, rng, 1.0);
  HostTensor gy32 = gy64;
  gy64 = HostTensor(DType::f64, {s.T, s.H});
  gy64.from_f64(gy32.to_f64());
  Grads g64 = make_grads(c, s.T, DType::f64), g32 = make_grads(c, s.T, DType::f32);
  Status st = run_backward(p64, mode, out.ids, gy64, g64);
  ASSERT_TRUE(st.ok()) << st.message();
  st = run_backward(p32, mode, out.ids, gy32, g32);
  ASSERT_TRUE(st.ok()) << st.message();
  for (int k = 0; k < 8; ++k) {
    if (!g64.all()[k]->defined()) continue;
    EXPECT_EQ(g32.all()[k]->count_nonfinite(), 0) << kTrainableNames[k];
    EXPECT_LE(rel_error(g32.all()[k]->to_f64(), g64.all()[k]->to_f64()), 1e-4) << kTrainableNames[k];
  }
}

std::string combo_name(const ::testing::TestParamInfo<Combo>& info) {
  auto [nm, g, a] = info.param;
  return std::string(name(nm)) + "_" + omnimoe::name(g) + "_" + omnimoe::name(a);
}

INSTANTIATE_TEST_SUITE_P(All, GradientCombo,
                         ::testing::Combine(::testing::Values(NormMode::bn_training, NormMode::bn_inference, NormMode::none),
                                            ::testing::Values(GateKind::exp, GateKind::softmax),
                                            ::testing::Values(Activation::silu, Activation::gelu, Activation::relu)),
                         combo_name);

// No shared MLP (I = 0): grads.gate / up / down are absent.
TEST(Gradients, NoSharedMlp) {
  for (NormMode nm : {NormMode::bn_training, NormMode::bn_inference, NormMode::none}) {
    const Shape s{6, 5, 3, 3, 4, 0};
    const Config c = make_config(s.H, 0, s.Nr, s.Nc, s.K, norm_of(nm), GateKind::softmax, Activation::gelu);
    const GradResult r = check_gradients(c, nm, s.T, test_seed(static_cast<int>(nm)));
    EXPECT_EQ(r.checked, 6 * 5 + 3 * 5 + 3 * 5 + 2 * 9 * 5);
  }
}

// K = N: every expert selected by every token (softmax over all N equals the exp gate).
TEST(Gradients, AllExpertsSelected) {
  for (NormMode nm : {NormMode::bn_training, NormMode::bn_inference, NormMode::none})
    for (GateKind gk : {GateKind::exp, GateKind::softmax}) {
      const Shape s{5, 4, 2, 3, 6, 2};
      const Config c = make_config(s.H, s.I, s.Nr, s.Nc, s.K, norm_of(nm), gk, Activation::silu);
      const GradResult r = check_gradients(c, nm, s.T, test_seed(static_cast<int>(nm) * 2 + static_cast<int>(gk)));
      EXPECT_EQ(r.unchosen, 0);
      EXPECT_GT(r.checked, 0);
    }
}

// Bad backward arguments fail with the argument named, and write nothing.
TEST(Gradients, BadArguments) {
  const std::int64_t T = 3, H = 4, N = 6, K = 2;
  const Config c = make_config(H, 2, 2, 3, K);
  Problem p = make_problem(c, T, DType::f64, test_seed());
  Outputs out = make_outputs(c, T, DType::f64);
  ASSERT_TRUE(run_forward(p, Mode::training, out).ok());
  HostTensor gy(DType::f64, {T, H});
  std::mt19937_64 rng(test_seed(1));
  fill_normal(gy, rng, 1.0);
  HostWorkspace ws = backward_workspace(c, T, DType::f64);

  struct Case {
    const char* what;
    std::int64_t bad_id;  // written into expert_ids[1, 1] when >= -1 (else ids untouched)
    std::function<void(Config&, Params&, Gradients&, TensorView&)> mutate;
    const char* needle;
  };
  HostTensor wrong(DType::f64, {N + 1, H});
  const Case cases[] = {
      {"id = N", N, [](Config&, Params&, Gradients&, TensorView&) {}, "expert_ids"},
      {"id = -1", -1, [](Config&, Params&, Gradients&, TensorView&) {}, "expert_ids"},
      {"grads.expert_in shape", -2, [&](Config&, Params&, Gradients& g, TensorView&) { g.expert_in = wrong.view(); }, "grads.expert_in"},
      {"grads.down missing", -2, [](Config&, Params&, Gradients& g, TensorView&) { g.down = TensorView{}; }, "grads.down"},
      {"grads.gate with I = 0", -2, [](Config& cf, Params& pp, Gradients& g, TensorView&) {
         cf.intermediate = 0;
         pp.gate = pp.up = pp.down = TensorView{};
         g.up = g.down = TensorView{};
       }, "grads.gate"},
      {"grad_y missing", -2, [](Config&, Params&, Gradients&, TensorView& gyv) { gyv = TensorView{}; }, "grad_y"},
  };
  for (const Case& k : cases) {
    HostTensor ids = out.ids;
    if (k.bad_id >= -1) ids.set(1 * K + 1, static_cast<double>(k.bad_id));
    Config cf = c;
    Grads g = make_grads(c, T, DType::f64);
    Gradients gv = g.view();
    Params pv = p.params();
    TensorView gyv = gy.view();
    k.mutate(cf, pv, gv, gyv);
    const Status s = backward(cf, Mode::training, p.x.view(), pv, ids.view(), gyv, gv, ws.ws());
    EXPECT_EQ(s.code(), StatusCode::invalid_argument) << k.what << ": " << s.message();
    EXPECT_NE(s.message().find(k.needle), std::string::npos) << k.what << ": " << s.message();
    for (auto* t : g.all())
      if (t->defined()) {
        EXPECT_EQ(t->count_nonfinite(), t->numel()) << k.what << ": grads written by a failed call";
      }
  }
  std::size_t need = 0;
  ASSERT_TRUE(backward_workspace_size(c, T, DType::f64, Device::cpu, &need).ok());
  if (need > 0) {
    Grads g = make_grads(c, T, DType::f64);
    const Status s = backward(c, Mode::training, p.x.view(), p.params(), out.ids.view(), gy.view(), g.view(), ws.ws(need - 1));
    EXPECT_EQ(s.code(), StatusCode::workspace_too_small) << s.message();
  }
}

}  // namespace
