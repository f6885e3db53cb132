// backward_sparse on the CPU: the same gradients as backward, with the expert tables'
// rows returned for the active experts only (ascending ids, then -1 and zero rows), for
// every storage dtype; and its argument errors.
#include <gtest/gtest.h>

#include <algorithm>

#include "cpu/test_helpers.hpp"

namespace {

using namespace omt;

struct Sparse {
  HostTensor ids, count, in, out;
  Sparse(const Config& c, std::int64_t T, DType dt)
      : ids(DType::i32, {sparse_gradient_capacity(c, T)}), count(DType::i32, {1}),
        in(dt, {sparse_gradient_capacity(c, T), c.hidden}), out(dt, {sparse_gradient_capacity(c, T), c.hidden}) {
    for (auto* t : {&ids, &count, &in, &out}) t->poison();
  }
  SparseExpertGradients view() { return {ids.view(), count.view(), in.view(), out.view()}; }
};

class BackwardSparse : public ::testing::TestWithParam<DType> {};

TEST_P(BackwardSparse, SameRowsAsDense) {
  const DType dt = GetParam();
  // T * K = 30 < N = 64: capacity T * K, some experts unchosen, some chosen twice.
  const Config c = make_config(16, 8, 8, 8, 3);
  const std::int64_t T = 10, H = c.hidden;
  const Problem p = convert_problem(make_problem(c, T, DType::f64, test_seed()), dt);
  Outputs out = make_outputs(c, T, dt);
  Problem fwd = p;
  ASSERT_TRUE(run_forward(fwd, Mode::training, out).ok());
  HostTensor gy(dt, {T, H});
  std::mt19937_64 rng(test_seed(3));
  fill_normal(gy, rng, 1.0);
  Grads dense = make_grads(c, T, dt);
  ASSERT_TRUE(run_backward(p, Mode::training, out.ids, gy, dense).ok());

  Grads g = make_grads(c, T, dt);
  g.expert_in = HostTensor();
  g.expert_out = HostTensor();
  g.poison();
  Sparse sp(c, T, dt);
  HostWorkspace ws = backward_workspace(c, T, dt);
  const Status s = backward_sparse(c, Mode::training, p.x.view(), p.params(), out.ids.view(), gy.view(), g.view(),
                                   sp.view(), ws.ws());
  ASSERT_TRUE(s.ok()) << s.message();
  const auto a = g.all();
  const auto b = dense.all();
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i]->defined()) EXPECT_TRUE(a[i]->bitwise_equal(*b[i])) << kTrainableNames[i];

  std::vector<std::int64_t> active = out.ids.to_i64();
  std::sort(active.begin(), active.end());
  active.erase(std::unique(active.begin(), active.end()), active.end());
  const auto n = static_cast<std::int64_t>(active.size()), cap = sparse_gradient_capacity(c, T);
  ASSERT_EQ(cap, 30);
  ASSERT_EQ(sp.count.get_int(0), n);
  const auto win = dense.expert_in.to_f64(), gin = sp.in.to_f64(), gout = sp.out.to_f64();
  const auto wout = dense.expert_out.to_f64();
  for (std::int64_t slot = 0; slot < cap; ++slot) {
    const bool used = slot < n;
    ASSERT_EQ(sp.ids.get_int(slot), used ? active[slot] : -1) << slot;
    for (std::int64_t h = 0; h < H; ++h) {
      ASSERT_EQ(gin[slot * H + h], used ? win[active[slot] * H + h] : 0.0) << slot;
      ASSERT_EQ(gout[slot * H + h], used ? wout[active[slot] * H + h] : 0.0) << slot;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, BackwardSparse, ::testing::Values(DType::f64, DType::f32, DType::bf16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(BackwardSparseArgs, ErrorsNameTheArgument) {
  const Config c = make_config(8, 4, 3, 3, 2);
  const std::int64_t T = 4;
  const Problem p = make_problem(c, T, DType::f64, test_seed());
  Outputs out = make_outputs(c, T, DType::f64);
  Problem fwd = p;
  ASSERT_TRUE(run_forward(fwd, Mode::training, out).ok());
  HostTensor gy(DType::f64, {T, c.hidden});
  std::mt19937_64 rng(test_seed(1));
  fill_normal(gy, rng, 1.0);
  HostWorkspace ws = backward_workspace(c, T, DType::f64);
  Grads g = make_grads(c, T, DType::f64);
  Sparse sp(c, T, DType::f64);
  HostTensor wrong(DType::f64, {sparse_gradient_capacity(c, T) + 1, c.hidden});
  HostTensor ids64(DType::i64, {sparse_gradient_capacity(c, T)});
  struct Case {
    const char* needle;
    bool dense_rows;  // pass grads.expert_in / expert_out too
    SparseExpertGradients sg;
  };
  SparseExpertGradients ok = sp.view();
  SparseExpertGradients bad_rows = ok, bad_ids = ok, no_count = ok;
  bad_rows.expert_out = wrong.view();
  bad_ids.ids = ids64.view();
  no_count.count = TensorView{};
  for (const Case& k : {Case{"grads.expert_in", true, ok}, Case{"sparse.expert_out", false, bad_rows},
                        Case{"sparse.ids", false, bad_ids}, Case{"sparse.count", false, no_count}}) {
    Gradients gv = g.view();
    if (!k.dense_rows) gv.expert_in = gv.expert_out = TensorView{};
    const Status s =
        backward_sparse(c, Mode::training, p.x.view(), p.params(), out.ids.view(), gy.view(), gv, k.sg, ws.ws());
    EXPECT_EQ(s.code(), StatusCode::invalid_argument) << k.needle << ": " << s.message();
    EXPECT_NE(s.message().find(k.needle), std::string::npos) << s.message();
  }
}

}  // namespace
