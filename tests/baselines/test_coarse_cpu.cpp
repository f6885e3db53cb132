// CPU reference of the coarse baselines (dense, gshard, deepseekmoe) against the independent
// naive float64 implementation of test_coarse_helpers.hpp, with and without the router, in
// every storage dtype; then config, parameter-count and argument-error checks of the
// dispatch layer (baselines.cpp), which serve every kind.
#include <gtest/gtest.h>

#include <string>

#include "baselines/test_coarse_helpers.hpp"

namespace omt::coarse {
namespace {

struct CpuCase {
  const char* label;
  BaselineConfig cfg;
  i64 T;
};

// The dense cases come first: the routed suite starts at index 2.
const CpuCase kCases[] = {
    {"dense", dense_config(48, 40), 17},
    {"dense_odd", dense_config(33, 7), 5},
    {"gshard", moe_config(Kind::gshard, 40, 8, 24, 2), 50},
    {"gshard_k1", moe_config(Kind::gshard, 24, 6, 16, 1), 30},
    {"gshard_k_eq_n", moe_config(Kind::gshard, 17, 5, 3, 5), 9},
    {"deepseek", moe_config(Kind::deepseekmoe, 40, 16, 8, 4, 24), 40},
    {"deepseek_no_shared", moe_config(Kind::deepseekmoe, 24, 6, 16, 3, 0), 20},
    {"deepseek_odd", moe_config(Kind::deepseekmoe, 19, 7, 5, 3, 11), 23},
};

// Relative 2-norm tolerance on y, by storage dtype (compute: f64 for f64, f32 otherwise).
double y_tolerance(DType dt) {
  switch (dt) {
    case DType::f64: return 1e-12;
    case DType::f32: return 2e-5;
    case DType::f16: return 3e-3;
    default: return 1e-2;
  }
}
// Routing of a token is compared where its probabilities are separated by more than this.
double gap_tolerance(DType dt) { return dt == DType::f64 ? 1e-12 : 1e-5; }

class CoarseCpu : public ::testing::TestWithParam<std::tuple<int, DType, bool>> {};

TEST_P(CoarseCpu, MatchesNaiveFloat64) {
  const auto [index, dtype, routed] = GetParam();
  const CpuCase& cs = kCases[index];
  const i64 T = cs.T, H = cs.cfg.hidden, K = cs.cfg.top_k, N = cs.cfg.num_experts;
  const CoarseProblem p = make_problem(cs.cfg, T, dtype, test_seed());
  const Routing routing = random_routing(T, K, std::max<i64>(N, 1), test_seed(1), /*duplicates=*/index % 2 == 1);
  const Routing* r = routed ? &routing : nullptr;
  const CpuRun run = run_cpu(p, r);
  ASSERT_TRUE(run.status.ok()) << run.status.message();
  const NaiveResult ref = naive_forward(p, r);
  const std::vector<double> y = run.y.to_f64();

  std::vector<double> got, want;
  i64 skipped = 0;
  for (i64 t = 0; t < T; ++t) {
    if (!routed && cs.cfg.kind != Kind::dense) {
      if (routing_gap(ref, N, K, t) < gap_tolerance(dtype)) {
        ++skipped;
        continue;
      }
      for (i64 k = 0; k < K; ++k)
        ASSERT_EQ(run.ids.get_int(t * K + k), ref.ids[t * K + k]) << describe(cs.cfg, T) << " token " << t << " k " << k;
    }
    const auto a = row(y, H, t), b = row(ref.y, H, t);
    got.insert(got.end(), a.begin(), a.end());
    want.insert(want.end(), b.begin(), b.end());
  }
  EXPECT_LE(skipped, T / 4) << "too many near-tied routings";
  EXPECT_EQ(run.y.count_nonfinite(), 0) << "an output row was not written";
  EXPECT_LT(rel_error(got, want), y_tolerance(dtype)) << describe(cs.cfg, T) << " " << dtype_name(dtype);
}

// With the router: every case; with a given routing: the routed kinds (cases 2 onwards).
std::string case_name(const ::testing::TestParamInfo<std::tuple<int, DType, bool>>& info) {
  return std::string(kCases[std::get<0>(info.param)].label) + "_" + dtype_name(std::get<1>(info.param)) +
         (std::get<2>(info.param) ? "_routed" : "_router");
}
INSTANTIATE_TEST_SUITE_P(Router, CoarseCpu,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(std::size(kCases))),
                                            ::testing::Values(DType::f64, DType::f32, DType::bf16, DType::f16), ::testing::Values(false)),
                         case_name);
INSTANTIATE_TEST_SUITE_P(Routed, CoarseCpu,
                         ::testing::Combine(::testing::Range(2, static_cast<int>(std::size(kCases))),
                                            ::testing::Values(DType::f64, DType::f32, DType::bf16, DType::f16), ::testing::Values(true)),
                         case_name);

TEST(CoarseCpuRouting, GatesFollowTheKind) {
  // gshard renormalises over the K chosen (gates sum to 1); deepseekmoe keeps p (sum < 1).
  for (Kind kind : {Kind::gshard, Kind::deepseekmoe}) {
    const CoarseProblem p = make_problem(moe_config(kind, 32, 8, 16, 3, kind == Kind::deepseekmoe ? 8 : 0), 12, DType::f64, test_seed());
    const NaiveResult ref = naive_forward(p);
    for (i64 t = 0; t < p.T; ++t) {
      double s = 0;
      for (i64 k = 0; k < 3; ++k) s += ref.gates[t * 3 + k];
      if (kind == Kind::gshard) EXPECT_NEAR(s, 1.0, 1e-12);
      else EXPECT_LT(s, 1.0);
    }
    const CpuRun run = run_cpu(p);
    ASSERT_TRUE(run.status.ok()) << run.status.message();
    EXPECT_LT(rel_error(run.y.to_f64(), ref.y), 1e-12);
  }
}

TEST(CoarseCpuRouting, Deterministic) {
  const CoarseProblem p = make_problem(moe_config(Kind::deepseekmoe, 64, 16, 32, 4, 32), 64, DType::f32, test_seed());
  const CpuRun a = run_cpu(p), b = run_cpu(p);
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  EXPECT_TRUE(a.y.bitwise_equal(b.y));
  EXPECT_TRUE(a.ids.bitwise_equal(b.ids));
}

TEST(CoarseCpuRouting, OutOfRangeIdIsAnError) {
  const CoarseProblem p = make_problem(moe_config(Kind::gshard, 16, 4, 8, 2), 6, DType::f32, test_seed());
  Routing r = random_routing(6, 2, 4, test_seed(1));
  r.ids.set(3 * 2 + 1, 4.0);  // N = 4
  const CpuRun run = run_cpu(p, &r);
  EXPECT_EQ(run.status.code(), StatusCode::invalid_argument);
  EXPECT_NE(run.status.message().find("expert_ids"), std::string::npos) << run.status.message();
  r.ids.set(3 * 2 + 1, -1.0);
  EXPECT_EQ(run_cpu(p, &r).status.code(), StatusCode::invalid_argument);
}

// ---- config and parameter counts -----------------------------------------------------------

void expect_invalid(const BaselineConfig& c, const std::string& field) {
  const Status s = validate(c);
  EXPECT_EQ(s.code(), StatusCode::invalid_argument) << field;
  EXPECT_NE(s.message().find(field), std::string::npos) << s.message();
}

BaselineConfig product_key_config(Kind kind, i64 H, i64 rows, i64 cols, i64 K) {
  BaselineConfig c;
  c.kind = kind;
  c.hidden = H;
  c.grid_rows = rows;
  c.grid_cols = cols;
  c.num_experts = rows * cols;
  c.top_k = K;
  return c;
}

TEST(BaselineConfigTest, Validation) {
  EXPECT_TRUE(validate(dense_config(8, 4)).ok());
  EXPECT_TRUE(validate(moe_config(Kind::gshard, 8, 4, 4, 4)).ok());
  EXPECT_TRUE(validate(moe_config(Kind::deepseekmoe, 8, 4, 4, 2, 0)).ok());
  EXPECT_TRUE(validate(product_key_config(Kind::pkm, 8, 3, 5, 15)).ok());
  EXPECT_TRUE(validate(product_key_config(Kind::peer, 8, 3, 5, 1)).ok());

  BaselineConfig c = dense_config(0, 4);
  expect_invalid(c, "config.hidden");
  c = dense_config(8, 0);
  expect_invalid(c, "config.width");
  c = dense_config(8, 4);
  c.top_k = 1;
  expect_invalid(c, "config.top_k");
  c = dense_config(8, 4);
  c.shared_width = 2;
  expect_invalid(c, "config.shared_width");

  expect_invalid(moe_config(Kind::gshard, 8, 4, 4, 5), "config.top_k");
  expect_invalid(moe_config(Kind::gshard, 8, 4, 4, 0), "config.top_k");
  expect_invalid(moe_config(Kind::gshard, 8, 0, 4, 1), "config.num_experts");
  expect_invalid(moe_config(Kind::gshard, 8, 4, 0, 1), "config.width");
  expect_invalid(moe_config(Kind::gshard, 8, 4, 4, 1, 4), "config.shared_width");
  expect_invalid(moe_config(Kind::deepseekmoe, 8, 4, 4, 1, -1), "config.shared_width");
  c = moe_config(Kind::gshard, 8, 4, 4, 1);
  c.grid_rows = 2;
  expect_invalid(c, "config.grid_rows");
  expect_invalid(moe_config(Kind::gshard, 1 << 20, 1 << 12, 4, 1), "config.num_experts");

  expect_invalid(product_key_config(Kind::pkm, 7, 3, 5, 2), "config.hidden");
  expect_invalid(product_key_config(Kind::pkm, 8, 3, 5, 16), "config.top_k");
  expect_invalid(product_key_config(Kind::peer, 8, 0, 5, 1), "config.grid_rows");
  c = product_key_config(Kind::pkm, 8, 3, 5, 2);
  c.num_experts = 16;
  expect_invalid(c, "config.num_experts");
  c = product_key_config(Kind::peer, 8, 3, 5, 2);
  c.width = 4;
  expect_invalid(c, "config.width");

  c = dense_config(8, 4);
  c.kind = static_cast<Kind>(9);
  expect_invalid(c, "config.kind");
  EXPECT_STREQ(name(Kind::deepseekmoe), "deepseekmoe");
  EXPECT_STREQ(name(Kind::peer), "peer");
}

TEST(BaselineConfigTest, ParameterCountsOfThePaperTable) {
  // DESIGN.md section 3, H = 1024: each layer holds about 200M parameters.
  const double H = 1024;
  const BaselineConfig gs = moe_config(Kind::gshard, 1024, 128, 512, 2);
  EXPECT_EQ(gs.activated_params(), 128 * H + 2 * 3 * H * 512);
  EXPECT_EQ(gs.total_params(), 128 * H + 128 * 3 * H * 512);
  const BaselineConfig ds = moe_config(Kind::deepseekmoe, 1024, 256, 256, 4, 1024);
  EXPECT_EQ(ds.activated_params(), 256 * H + 4 * 3 * H * 256 + 3 * H * 1024);
  EXPECT_EQ(ds.total_params(), 256 * H + 256 * 3 * H * 256 + 3 * H * 1024);
  const BaselineConfig pk = product_key_config(Kind::pkm, 1024, 444, 444, 2500);
  EXPECT_EQ(pk.activated_params(), H * H + 888 * H / 2 + 2500 * H);
  EXPECT_EQ(pk.total_params(), H * H + 888 * H / 2 + 197136 * H);
  const BaselineConfig pe = product_key_config(Kind::peer, 1024, 320, 320, 1250);
  EXPECT_EQ(pe.activated_params(), H * H + 640 * H / 2 + 1250 * 2 * H);
  EXPECT_EQ(pe.total_params(), H * H + 640 * H / 2 + 102400 * 2 * H);
  EXPECT_EQ(dense_config(1024, 4096).activated_params(), 3 * H * 4096);
  EXPECT_EQ(dense_config(1024, 4096).total_params(), 3 * H * 4096);
  for (const BaselineConfig& c : {gs, ds, pk, pe}) {
    EXPECT_GT(c.total_params(), 190e6) << name(c.kind);
    EXPECT_LT(c.total_params(), 220e6) << name(c.kind);
  }
}

// ---- argument errors -------------------------------------------------------------------------

void expect_error(const Status& s, StatusCode code, const std::string& needle) {
  EXPECT_EQ(s.code(), code) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message does not name '" << needle << "': " << s.message();
}

struct ErrorFixture {
  CoarseProblem p;
  HostTensor y, ids;
  HostWorkspace ws;
  explicit ErrorFixture(const BaselineConfig& c, DType dt = DType::f32)
      : p(make_problem(c, 6, dt, 7)), y(dt, {6, c.hidden}), ws(workspace_bytes(c, 6, dt, Device::cpu)) {
    if (c.kind != Kind::dense) ids = HostTensor(DType::i32, {6, c.top_k});
  }
  Status run(const BaselineParams& params) { return forward(p.cfg, p.x.view(), params, y.view(), ws.ws(), nullptr, ids.view()); }
  Status run() { return run(p.params()); }
};

TEST(BaselineArguments, Parameters) {
  ErrorFixture f(moe_config(Kind::deepseekmoe, 16, 4, 8, 2, 8));
  ASSERT_TRUE(f.run().ok()) << f.run().message();
  BaselineParams q = f.p.params();
  q.expert_down.shape[1] = 7;
  expect_error(f.run(q), StatusCode::invalid_argument, "params.expert_down");
  q = f.p.params();
  q.router = {};
  expect_error(f.run(q), StatusCode::invalid_argument, "params.router: required");
  q = f.p.params();
  q.gate.dtype = DType::f64;
  expect_error(f.run(q), StatusCode::invalid_argument, "params.gate");
  q = f.p.params();
  q.expert_up.device = Device::cuda;
  expect_error(f.run(q), StatusCode::invalid_argument, "params.expert_up");
  q = f.p.params();
  q.values = f.p.x.view();  // pkm's parameter on a deepseekmoe layer
  expect_error(f.run(q), StatusCode::invalid_argument, "params.values: must be absent");

  ErrorFixture d(dense_config(16, 8));
  ASSERT_TRUE(d.run().ok());
  q = d.p.params();
  q.router = d.p.x.view();
  expect_error(d.run(q), StatusCode::invalid_argument, "params.router: must be absent for kind dense");
  q = d.p.params();
  q.down = d.p.up.view();  // [8, 16] where [16, 8] is expected
  expect_error(d.run(q), StatusCode::invalid_argument, "params.down");

  ErrorFixture n(moe_config(Kind::deepseekmoe, 16, 4, 8, 2, 0));
  ASSERT_TRUE(n.run().ok());
  q = n.p.params();
  q.gate = n.p.x.view();
  expect_error(n.run(q), StatusCode::invalid_argument, "params.gate: must be absent for kind deepseekmoe with shared_width = 0");
}

TEST(BaselineArguments, Activations) {
  ErrorFixture f(moe_config(Kind::gshard, 16, 4, 8, 2));
  const BaselineParams q = f.p.params();
  TensorView x = f.p.x.view();
  x.shape[1] = 15;
  expect_error(forward(f.p.cfg, x, q, f.y.view(), f.ws.ws()), StatusCode::invalid_argument, "x: expected");
  expect_error(forward(f.p.cfg, {}, q, f.y.view(), f.ws.ws()), StatusCode::invalid_argument, "x: required");
  TensorView y = f.y.view();
  y.shape[0] = 5;
  expect_error(forward(f.p.cfg, f.p.x.view(), q, y, f.ws.ws()), StatusCode::invalid_argument, "y: expected");
  y = f.y.view();
  y.dtype = DType::f64;
  expect_error(forward(f.p.cfg, f.p.x.view(), q, y, f.ws.ws()), StatusCode::invalid_argument, "y: expected");
  HostTensor ids64(DType::i64, {6, 2});
  expect_error(forward(f.p.cfg, f.p.x.view(), q, f.y.view(), f.ws.ws(), nullptr, ids64.view()),
               StatusCode::invalid_argument, "expert_ids");
  HostTensor ids_wrong(DType::i32, {6, 3});
  expect_error(forward(f.p.cfg, f.p.x.view(), q, f.y.view(), f.ws.ws(), nullptr, ids_wrong.view()),
               StatusCode::invalid_argument, "expert_ids");
  TensorView xi = f.p.x.view();
  xi.dtype = DType::i32;
  expect_error(forward(f.p.cfg, xi, q, f.y.view(), f.ws.ws()), StatusCode::invalid_argument, "x: expected");

  ErrorFixture d(dense_config(16, 8));
  HostTensor ids(DType::i32, {6, 1});
  expect_error(forward(d.p.cfg, d.p.x.view(), d.p.params(), d.y.view(), d.ws.ws(), nullptr, ids.view()),
               StatusCode::invalid_argument, "expert_ids: must be absent for kind dense");
}

TEST(BaselineArguments, Routed) {
  ErrorFixture f(moe_config(Kind::gshard, 16, 4, 8, 2));
  Routing r = random_routing(6, 2, 4, 3);
  const BaselineParams q = f.p.params();
  EXPECT_TRUE(forward_routed(f.p.cfg, f.p.x.view(), q, r.ids.view(), r.gates.view(), f.y.view(), f.ws.ws()).ok());
  expect_error(forward_routed(f.p.cfg, f.p.x.view(), q, {}, r.gates.view(), f.y.view(), f.ws.ws()),
               StatusCode::invalid_argument, "expert_ids: required");
  HostTensor g64(DType::f64, {6, 2});
  expect_error(forward_routed(f.p.cfg, f.p.x.view(), q, r.ids.view(), g64.view(), f.y.view(), f.ws.ws()),
               StatusCode::invalid_argument, "gates: expected");
  HostTensor g_short(DType::f32, {5, 2});
  expect_error(forward_routed(f.p.cfg, f.p.x.view(), q, r.ids.view(), g_short.view(), f.y.view(), f.ws.ws()),
               StatusCode::invalid_argument, "gates: expected");

  ErrorFixture d(dense_config(16, 8));
  HostTensor ids(DType::i32, {6, 1}), gates(DType::f32, {6, 1});
  expect_error(forward_routed(d.p.cfg, d.p.x.view(), d.p.params(), ids.view(), gates.view(), d.y.view(), d.ws.ws()),
               StatusCode::invalid_argument, "kind dense has no routing");
}

TEST(BaselineArguments, Workspace) {
  ErrorFixture f(moe_config(Kind::gshard, 16, 4, 8, 2));
  const std::size_t need = workspace_bytes(f.p.cfg, 6, DType::f32, Device::cpu);
  ASSERT_GT(need, 0u);
  expect_error(forward(f.p.cfg, f.p.x.view(), f.p.params(), f.y.view(), f.ws.ws(need - 1)),
               StatusCode::workspace_too_small, "workspace");
  HostWorkspace big(need + 256);
  const Workspace misaligned{static_cast<char*>(big.ws().data) + 8, need};
  expect_error(forward(f.p.cfg, f.p.x.view(), f.p.params(), f.y.view(), misaligned), StatusCode::invalid_argument,
               "workspace");

  std::size_t bytes = 0;
  expect_error(workspace_size(f.p.cfg, 0, DType::f32, Device::cpu, &bytes), StatusCode::invalid_argument, "tokens");
  expect_error(workspace_size(f.p.cfg, 4, DType::i32, Device::cpu, &bytes), StatusCode::invalid_argument, "dtype");
  expect_error(workspace_size(f.p.cfg, 4, DType::f64, Device::cuda, &bytes), StatusCode::unsupported, "f64");
  expect_error(workspace_size(f.p.cfg, 4, DType::f32, Device::cpu, nullptr), StatusCode::invalid_argument, "bytes");
  BaselineConfig bad = f.p.cfg;
  bad.top_k = 9;
  expect_error(workspace_size(bad, 4, DType::f32, Device::cpu, &bytes), StatusCode::invalid_argument, "config.top_k");
  // Every dtype the CPU serves has a size; more tokens never need less.
  for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
    std::size_t a = 0, b = 0;
    ASSERT_TRUE(workspace_size(f.p.cfg, 4, dt, Device::cpu, &a).ok());
    ASSERT_TRUE(workspace_size(f.p.cfg, 40, dt, Device::cpu, &b).ok());
    EXPECT_LE(a, b);
  }
}

}  // namespace
}  // namespace omt::coarse
