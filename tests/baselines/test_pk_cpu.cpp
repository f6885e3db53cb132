// pkm / peer on the CPU against the naive float64 reference (test_pk_common.hpp): random
// problems (K below, between and above the axis sizes, K = N), exact ties, caller routing,
// non-finite tokens, token chunks, and the public API around them.
#include <gtest/gtest.h>

#include "baselines/test_pk_common.hpp"

namespace pkt {
namespace {

struct Shape {
  i64 H, Nr, Nc, K, T;
};

// Shapes with K < min(Nr, Nc), K between and above the axes, one-row / one-column grids, K = N.
const Shape kShapes[] = {
    {16, 5, 7, 3, 9},   {16, 5, 7, 12, 9}, {12, 4, 6, 24, 7},   {8, 1, 9, 4, 5},
    {8, 9, 1, 9, 5},    {32, 20, 16, 150, 6}, {24, 11, 13, 1, 8}, {40, 30, 2, 45, 4},
};

double y_tolerance(DType dt) {
  switch (dt) {
    case DType::f64: return 1e-11;
    case DType::f32: return 2e-5;
    default: return 1e-2;  // f32 compute, 16-bit output
  }
}
// Rounding allowance of the scores of token t (f32 compute: products of H/2 terms).
std::vector<double> score_tolerance(const Scores& s, DType dt) {
  const double eps = dt == DType::f64 ? 1e-13 : 1e-5;
  std::vector<double> tol(s.bound.size());
  for (std::size_t t = 0; t < tol.size(); ++t) tol[t] = eps * (1.0 + s.bound[t]);
  return tol;
}

// Runs the CPU forward on `p` and checks ids and y against the naive reference; y of tokens
// whose selection legitimately differs (near ties) is checked against the naive y of the
// implementation's own ids.
void check_forward(const PkProblem& p, bool exact_ids) {
  const std::string what = describe(p.cfg, p.T, p.dtype);
  const i64 T = p.T, H = p.cfg.hidden, K = p.cfg.top_k;
  const Reference ref = naive_forward(p);
  HostTensor y(p.dtype, {T, H}), ids(DType::i32, {T, K});
  const Status st = run_pk_cpu(p, y, &ids);
  ASSERT_TRUE(st.ok()) << what << ": " << st.message();
  const std::vector<i64> got = ids.to_i64();
  i64 flips = 0;
  const std::string sel = check_selection(p, ref.scores, got, ref.ids, ref.next, score_tolerance(ref.scores, p.dtype), &flips);
  EXPECT_EQ(sel, "") << what;
  if (exact_ids) EXPECT_EQ(got, ref.ids) << what;
  const std::vector<double> want = flips == 0 ? ref.y : naive_routed(p, got, softmax_gates(ref.scores, p.cfg, T, got));
  const double err = rel_error(y.to_f64(), want);
  EXPECT_LT(err, y_tolerance(p.dtype)) << what << " (" << flips << " near-tie flips)";
}

class PkCpuCases : public ::testing::TestWithParam<std::tuple<Kind, DType>> {};

TEST_P(PkCpuCases, MatchesNaiveReference) {
  const auto [kind, dt] = GetParam();
  std::uint64_t salt = 0;
  for (const Shape& s : kShapes) {
    const BaselineConfig c = pk_config(kind, s.H, s.Nr, s.Nc, s.K);
    check_forward(make_pk(c, s.T, dt, test_seed(++salt)), dt == DType::f64);
  }
}

// Integer inputs: every score exact in every dtype, many exact ties at every rank; the
// selection and its order (ties by ascending id) must match exactly.
TEST_P(PkCpuCases, ExactTies) {
  const auto [kind, dt] = GetParam();
  std::uint64_t salt = 100;
  for (const Shape& s : {Shape{16, 6, 5, 1, 9}, Shape{16, 6, 5, 7, 9}, Shape{16, 6, 5, 13, 9},
                         Shape{16, 6, 5, 30, 6}, Shape{20, 9, 12, 50, 6}, Shape{8, 3, 3, 9, 4}}) {
    const BaselineConfig c = pk_config(kind, s.H, s.Nr, s.Nc, s.K);
    const PkProblem p = make_pk(c, s.T, dt, test_seed(++salt), Fill::ties);
    check_forward(p, /*exact_ids=*/true);
  }
}

INSTANTIATE_TEST_SUITE_P(All, PkCpuCases,
                         ::testing::Combine(::testing::Values(Kind::pkm, Kind::peer),
                                            ::testing::Values(DType::f64, DType::f32, DType::bf16, DType::f16)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) == Kind::pkm ? "pkm_" : "peer_") +
                                  dtype_name(std::get<1>(info.param));
                         });

// All scores equal (zero keys): the top-K is the K smallest ids, in order, and the weights
// are uniform. Zero keys are the one place the tests use zeros: that is the point here.
TEST(PkCpu, AllScoresTied) {
  for (Kind kind : {Kind::pkm, Kind::peer})
    for (i64 K : {1, 5, 17, 35}) {
      const BaselineConfig c = pk_config(kind, 8, 5, 7, K);
      PkProblem p = make_pk(c, 3, DType::f64, test_seed(K));
      for (i64 i = 0; i < p.keys_row.numel(); ++i) p.keys_row.set(i, 0.0);
      for (i64 i = 0; i < p.keys_col.numel(); ++i) p.keys_col.set(i, 0.0);
      HostTensor y(DType::f64, {3, 8}), ids(DType::i32, {3, K});
      ASSERT_TRUE(run_pk_cpu(p, y, &ids).ok());
      for (i64 t = 0; t < 3; ++t)
        for (i64 k = 0; k < K; ++k) ASSERT_EQ(ids.get_int(t * K + k), k);
      check_forward(p, true);
    }
}

// forward_routed: the caller's ids (repeats allowed) and gates as given; an id outside
// [0, N) is refused.
TEST(PkCpu, Routed) {
  for (Kind kind : {Kind::pkm, Kind::peer})
    for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
      const BaselineConfig c = pk_config(kind, 24, 6, 7, 9);
      const i64 T = 11, K = c.top_k, N = 42;
      const PkProblem p = make_pk(c, T, dt, test_seed(static_cast<int>(dt)));
      std::mt19937_64 rng(test_seed(7));
      HostTensor ids(DType::i32, {T, K}), gates(DType::f32, {T, K});
      std::vector<i64> idv(T * K);
      std::vector<double> gv(T * K);
      for (i64 i = 0; i < T * K; ++i) {
        idv[i] = std::uniform_int_distribution<i64>(0, N - 1)(rng);
        gv[i] = std::uniform_real_distribution<double>(-0.5, 1.0)(rng);
      }
      idv[3 * K + 1] = idv[3 * K];  // a repeated id: the terms add
      ids.from_i64(idv);
      gates.from_f64(gv);
      gv = gates.to_f64();  // the f32 values the layer sees
      HostTensor y(dt, {T, c.hidden});
      const Status st = run_pk_cpu(p, y, nullptr, &ids, &gates);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_LT(rel_error(y.to_f64(), naive_routed(p, idv, gv)), y_tolerance(dt)) << describe(c, T, dt);
      ids.set(5 * K + 2, static_cast<double>(N));
      EXPECT_EQ(run_pk_cpu(p, y, nullptr, &ids, &gates).code(), StatusCode::invalid_argument);
      ids.set(5 * K + 2, -1.0);
      EXPECT_EQ(run_pk_cpu(p, y, nullptr, &ids, &gates).code(), StatusCode::invalid_argument);
    }
}

// A NaN in x makes that token's scores NaN: its row is NaN and its ids are 0 .. K-1; the
// other tokens are untouched.
TEST(PkCpu, NonFiniteToken) {
  for (Kind kind : {Kind::pkm, Kind::peer}) {
    const BaselineConfig c = pk_config(kind, 16, 5, 6, 8);
    const i64 T = 6, H = 16, K = 8;
    PkProblem p = make_pk(c, T, DType::f32, test_seed(kind == Kind::pkm));
    p.x.set(2 * H + 3, std::nan(""));
    HostTensor y(DType::f32, {T, H}), ids(DType::i32, {T, K});
    ASSERT_TRUE(run_pk_cpu(p, y, &ids).ok());
    const auto yv = y.to_f64();
    for (i64 h = 0; h < H; ++h) EXPECT_TRUE(std::isnan(yv[2 * H + h]));
    for (i64 k = 0; k < K; ++k) EXPECT_EQ(ids.get_int(2 * K + k), k);
    PkProblem clean = p;
    clean.x.set(2 * H + 3, 0.5);
    const Reference ref = naive_forward(clean);
    std::vector<char> keep(T, 1);
    keep[2] = 0;
    EXPECT_LT(rel_error(rows_of(yv, H, keep), rows_of(ref.y, H, keep)), 2e-5);
  }
}

// More tokens than one chunk of the query products (2048), and no ids output.
TEST(PkCpu, ChunksAndNoIds) {
  const BaselineConfig c = pk_config(Kind::peer, 8, 4, 5, 6);
  const i64 T = 2100;
  const PkProblem p = make_pk(c, T, DType::f64, test_seed());
  const Reference ref = naive_forward(p);
  HostTensor y(DType::f64, {T, 8});
  ASSERT_TRUE(run_pk_cpu(p, y, nullptr).ok());
  EXPECT_LT(rel_error(y.to_f64(), ref.y), 1e-11);
}

// The same layer through the public API (validation, dispatch, workspace query).
TEST(PkApi, ForwardAndRouted) {
  namespace bl = omnimoe::baselines;
  for (Kind kind : {Kind::pkm, Kind::peer}) {
    const BaselineConfig c = pk_config(kind, 16, 6, 5, 11);
    const i64 T = 7, K = 11;
    const PkProblem p = make_pk(c, T, DType::f64, test_seed(kind == Kind::peer));
    const Reference ref = naive_forward(p);
    std::size_t bytes = 0;
    ASSERT_TRUE(bl::workspace_size(c, T, DType::f64, Device::cpu, &bytes).ok());
    HostWorkspace ws(bytes);
    HostTensor y(DType::f64, {T, 16}), ids(DType::i32, {T, K});
    y.poison();
    ids.poison();
    const Status st = bl::forward(c, p.x.view(), p.params(), y.view(), ws.ws(), nullptr, ids.view());
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(ids.to_i64(), ref.ids);
    EXPECT_LT(rel_error(y.to_f64(), ref.y), 1e-11);

    HostTensor gates(DType::f32, {T, K});
    gates.from_f64(softmax_gates(ref.scores, c, T, ref.ids));
    y.poison();
    ASSERT_TRUE(bl::forward_routed(c, p.x.view(), p.params(), ids.view(), gates.view(), y.view(), ws.ws()).ok());
    EXPECT_LT(rel_error(y.to_f64(), ref.y), 1e-6);  // f32 gates

    // Too small a workspace, a missing parameter: refused with the argument named.
    EXPECT_EQ(bl::forward(c, p.x.view(), p.params(), y.view(), ws.ws(bytes - 1)).code(),
              StatusCode::workspace_too_small);
    BaselineParams missing = p.params();
    missing.keys_col = TensorView{};
    const Status m = bl::forward(c, p.x.view(), missing, y.view(), ws.ws());
    EXPECT_EQ(m.code(), StatusCode::invalid_argument);
    EXPECT_NE(m.message().find("keys_col"), std::string::npos) << m.message();
  }
}

}  // namespace
}  // namespace pkt
