// CUDA forward of the coarse baselines (dense, gshard, deepseekmoe) against the CPU float64
// reference on the same stored values: fresh random inputs per case, outputs and workspace
// poisoned, with the router (routing compared where the probabilities are separated) and
// with a given routing; plus CUDA-graph capture and replay, determinism, NaN rows for
// out-of-range ids, and the unsupported cases.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>

#include "baselines/test_coarse_helpers.hpp"
#include "cuda/cuda_helpers.hpp"

namespace omt::coarse {
namespace {

struct DeviceCoarse {
  DeviceTensor x, gate, up, down, router, expert_gate, expert_up, expert_down;
  explicit DeviceCoarse(const CoarseProblem& p)
      : x(p.x), gate(p.gate), up(p.up), down(p.down), router(p.router), expert_gate(p.expert_gate),
        expert_up(p.expert_up), expert_down(p.expert_down) {}
  BaselineParams params() const {
    BaselineParams q;
    q.gate = gate.view();
    q.up = up.view();
    q.down = down.view();
    q.router = router.view();
    q.expert_gate = expert_gate.view();
    q.expert_up = expert_up.view();
    q.expert_down = expert_down.view();
    return q;
  }
};

// Outputs and workspace of one GPU call, poisoned.
struct GpuOutputs {
  HostTensor y, ids;
  DeviceTensor dy, dids;
  DeviceWorkspace ws;
  GpuOutputs(const CoarseProblem& p, bool with_ids)
      : y(p.dtype, {p.T, p.cfg.hidden}),
        ids(with_ids ? HostTensor(DType::i32, {p.T, p.cfg.top_k}) : HostTensor()),
        dy(y),
        dids(ids),
        ws(workspace_bytes(p.cfg, p.T, p.dtype, Device::cuda)) {
    dy.poison();
    dids.poison();
  }
  void download() {
    dy.download(y);
    if (ids.defined()) dids.download(ids);
  }
};

Status call(const CoarseProblem& p, const DeviceCoarse& d, GpuOutputs& o, const DeviceTensor* rid,
            const DeviceTensor* rg, cudaStream_t stream) {
  if (rid) return forward_routed(p.cfg, d.x.view(), d.params(), rid->view(), rg->view(), o.dy.view(), o.ws.ws(), stream);
  return forward(p.cfg, d.x.view(), d.params(), o.dy.view(), o.ws.ws(), stream, o.dids.view());
}

double y_tolerance(DType dt) {
  switch (dt) {
    case DType::f32: return 1e-5;
    case DType::f16: return 3e-3;
    default: return 1e-2;
  }
}
constexpr double kGapTolerance = 1e-5;  // probabilities: fp32 logits from the same stored values

struct GpuCase {
  const char* label;
  BaselineConfig cfg;
  i64 T;
};

// The dense cases come first: the routed suite starts at index 2.
const GpuCase kCases[] = {
    {"dense", dense_config(64, 96), 100},
    {"dense_small", dense_config(40, 24), 7},
    // 72 = two 32-deep slices + 8 (partial depth tile); width 40: a partial column tile;
    // about 75 tasks per expert: two row tiles each.
    {"gshard_partial_tiles", moe_config(Kind::gshard, 72, 8, 40, 2), 300},
    {"gshard_large", moe_config(Kind::gshard, 256, 16, 128, 4), 1024},
    {"gshard_k_eq_n", moe_config(Kind::gshard, 32, 4, 16, 4), 70},
    {"gshard_sparse", moe_config(Kind::gshard, 64, 64, 24, 1), 13},  // most experts empty
    {"deepseek", moe_config(Kind::deepseekmoe, 128, 32, 32, 6, 96), 257},
    {"deepseek_no_shared", moe_config(Kind::deepseekmoe, 48, 12, 16, 3, 0), 65},
    {"deepseek_wide", moe_config(Kind::deepseekmoe, 1024, 16, 64, 2, 128), 96},
};

class CoarseCuda : public ::testing::TestWithParam<std::tuple<int, DType, bool>> {};

TEST_P(CoarseCuda, MatchesCpuFloat64) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [index, dtype, routed] = GetParam();
  const GpuCase& cs = kCases[index];
  const BaselineConfig& c = cs.cfg;
  const i64 T = cs.T, H = c.hidden, K = c.top_k, N = c.num_experts;
  const CoarseProblem p = make_problem(c, T, dtype, test_seed());
  const Routing routing = random_routing(T, K, std::max<i64>(N, 1), test_seed(1), /*duplicates=*/index % 2 == 0);

  const DeviceCoarse d(p);
  GpuOutputs o(p, !routed && c.kind != Kind::dense);
  const DeviceTensor rid(routing.ids), rg(routing.gates);
  const Status s = call(p, d, o, routed ? &rid : nullptr, &rg, nullptr);
  ASSERT_TRUE(s.ok()) << s.message();
  ASSERT_TRUE(synchronize(Device::cuda).ok());
  o.download();

  // Reference: the CPU forward in float64 on the same stored values.
  const CoarseProblem p64 = convert(p, DType::f64);
  const CpuRun ref = run_cpu(p64, routed ? &routing : nullptr);
  ASSERT_TRUE(ref.status.ok()) << ref.status.message();
  const NaiveResult naive = routed || c.kind == Kind::dense ? NaiveResult{} : naive_forward(p64);

  const std::vector<double> y = o.y.to_f64(), want_y = ref.y.to_f64();
  std::vector<double> got, want;
  i64 skipped = 0;
  for (i64 t = 0; t < T; ++t) {
    if (!routed && c.kind != Kind::dense) {
      if (routing_gap(naive, N, K, t) < kGapTolerance) {
        ++skipped;
        continue;
      }
      for (i64 k = 0; k < K; ++k)
        ASSERT_EQ(o.ids.get_int(t * K + k), ref.ids.get_int(t * K + k))
            << describe(c, T) << " " << dtype_name(dtype) << " token " << t << " k " << k;
    }
    const auto a = row(y, H, t), b = row(want_y, H, t);
    got.insert(got.end(), a.begin(), a.end());
    want.insert(want.end(), b.begin(), b.end());
  }
  EXPECT_LE(skipped, T / 4) << "too many near-tied routings";
  EXPECT_EQ(o.y.count_nonfinite(), 0) << "an output element was not written";
  EXPECT_LT(rel_error(got, want), y_tolerance(dtype)) << describe(c, T) << " " << dtype_name(dtype);
}

// With the router: every case; with a given routing: the routed kinds (cases 2 onwards).
std::string case_name(const ::testing::TestParamInfo<std::tuple<int, DType, bool>>& info) {
  return std::string(kCases[std::get<0>(info.param)].label) + "_" + dtype_name(std::get<1>(info.param)) +
         (std::get<2>(info.param) ? "_routed" : "_router");
}
INSTANTIATE_TEST_SUITE_P(Router, CoarseCuda,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(std::size(kCases))),
                                            ::testing::Values(DType::f32, DType::bf16, DType::f16), ::testing::Values(false)),
                         case_name);
INSTANTIATE_TEST_SUITE_P(Routed, CoarseCuda,
                         ::testing::Combine(::testing::Range(2, static_cast<int>(std::size(kCases))),
                                            ::testing::Values(DType::f32, DType::bf16, DType::f16), ::testing::Values(true)),
                         case_name);

// Captured once, replayed on new inputs: bit-identical to eager calls, which are themselves
// bit-identical run to run. Inside the capture, a synchronising call from this thread would fail it.
class CoarseCudaGraph : public ::testing::TestWithParam<int> {};

TEST_P(CoarseCudaGraph, ReplayMatchesEager) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const GpuCase& cs = kCases[GetParam()];
  const CoarseProblem p = make_problem(cs.cfg, cs.T, DType::bf16, test_seed());
  CoarseProblem p2 = p;  // the same layer, a new x
  p2.x = make_problem(cs.cfg, cs.T, DType::bf16, test_seed(5)).x;
  const bool ids = cs.cfg.kind != Kind::dense;
  DeviceCoarse d(p);

  auto eager = [&](const CoarseProblem& q) {
    d.x.upload(q.x);
    GpuOutputs o(q, ids);
    EXPECT_TRUE(call(q, d, o, nullptr, nullptr, nullptr).ok());
    EXPECT_TRUE(synchronize(Device::cuda).ok());
    o.download();
    return std::pair{o.y, o.ids};
  };
  const auto e1 = eager(p), e1b = eager(p), e2 = eager(p2);
  EXPECT_TRUE(e1.first.bitwise_equal(e1b.first)) << "eager runs differ";
  EXPECT_EQ(e1.first.count_nonfinite(), 0);

  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  GpuOutputs o(p, ids);
  d.x.upload(p.x);
  ASSERT_TRUE(call(p, d, o, nullptr, nullptr, stream).ok());  // warm-up: host-side set-up
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const Status captured = call(p, d, o, nullptr, nullptr, stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(captured.ok()) << captured.message();
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

  for (const auto& [input, expect] : {std::pair{&p, &e1}, std::pair{static_cast<const CoarseProblem*>(&p2), &e2}}) {
    d.x.upload(input->x);
    o.dy.poison();
    o.dids.poison();
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    o.download();
    EXPECT_TRUE(o.y.bitwise_equal(expect->first)) << "replay differs from the eager call";
    if (ids) EXPECT_TRUE(o.ids.bitwise_equal(expect->second));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

INSTANTIATE_TEST_SUITE_P(Layers, CoarseCudaGraph, ::testing::Values(0, 2, 6),
                         [](const auto& info) { return std::string(kCases[info.param].label); });

TEST(CoarseCudaRouted, OutOfRangeIdGivesNanRow) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const BaselineConfig c = moe_config(Kind::deepseekmoe, 64, 8, 16, 2, 32);
  const i64 T = 20, H = 64, bad_token = 7;
  const CoarseProblem p = make_problem(c, T, DType::f32, test_seed());
  Routing r = random_routing(T, 2, 8, test_seed(1));
  r.ids.set(bad_token * 2 + 1, 8.0);  // N = 8
  const DeviceCoarse d(p);
  GpuOutputs o(p, false);
  const DeviceTensor rid(r.ids), rg(r.gates);
  ASSERT_TRUE(call(p, d, o, &rid, &rg, nullptr).ok());
  ASSERT_TRUE(synchronize(Device::cuda).ok());
  o.download();
  for (i64 h = 0; h < H; ++h) EXPECT_TRUE(std::isnan(o.y.get(bad_token * H + h)));
  EXPECT_EQ(o.y.count_nonfinite(), H) << "only the token with the bad id is NaN";
}

TEST(CoarseCudaSupport, Limits) {
  std::size_t bytes = 0;
  Status s = workspace_size(moe_config(Kind::gshard, 36, 4, 16, 2), 8, DType::bf16, Device::cuda, &bytes);
  EXPECT_EQ(s.code(), StatusCode::unsupported);
  EXPECT_NE(s.message().find("config.hidden"), std::string::npos) << s.message();
  s = workspace_size(moe_config(Kind::gshard, 32, 4, 12, 2), 8, DType::bf16, Device::cuda, &bytes);
  EXPECT_EQ(s.code(), StatusCode::unsupported);
  EXPECT_NE(s.message().find("config.width"), std::string::npos) << s.message();
  s = workspace_size(moe_config(Kind::gshard, 32, 5000, 8, 2), 8, DType::bf16, Device::cuda, &bytes);
  EXPECT_EQ(s.code(), StatusCode::unsupported);
  EXPECT_NE(s.message().find("num_experts"), std::string::npos) << s.message();
  s = workspace_size(dense_config(36, 20), 8, DType::f64, Device::cuda, &bytes);
  EXPECT_EQ(s.code(), StatusCode::unsupported);
  EXPECT_TRUE(workspace_size(dense_config(36, 20), 8, DType::bf16, Device::cuda, &bytes).ok());  // cuBLASLt: any size
}

}  // namespace
}  // namespace omt::coarse
