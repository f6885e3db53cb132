// CUDA forward against the CPU float64 reference: fresh random inputs, poisoned outputs and
// workspace, the reference run on the very values the GPU sees (rounded to its storage
// dtype). Routing is compared where the score gap to the next candidate exceeds rounding;
// y is compared on those tokens. Also: determinism, CUDA graph capture, errors.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include "core/backend.hpp"
#include "cuda/cuda_helpers.hpp"

namespace omt {
namespace {

struct Case {
  const char* name;
  std::int64_t H, I, Nr, Nc, K, T;
  RouterNorm norm;
  Mode mode;
  GateKind gate;
  Activation act;
  DType dtype;
  Schedule schedule = Schedule::automatic;
};

Config config_of(const Case& c) {
  Config cfg;
  cfg.hidden = c.H;
  cfg.intermediate = c.I;
  cfg.grid_rows = c.Nr;
  cfg.grid_cols = c.Nc;
  cfg.top_k = c.K;
  cfg.router_norm = c.norm;
  cfg.gate = c.gate;
  cfg.activation = c.act;
  cfg.schedule = c.schedule;
  return cfg;
}

constexpr double kScoreTol = 1e-4;  // log-prob rounding of the fp32 router, with margin


// Invariants of one routing output on its own scores: ids in range and unique per token,
// ordered by descending score then ascending id, gates as defined.
void check_routing_invariants(const Config& cfg, const Outputs& o) {
  const std::int64_t T = o.ids.shape()[0], K = cfg.top_k, N = cfg.num_experts();
  const auto ids = o.ids.to_i64();
  const auto sc = o.scores.to_f64();
  const auto g = o.gates.to_f64();
  for (std::int64_t t = 0; t < T; ++t) {
    std::set<std::int64_t> seen;
    double gsum = 0;
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t e = ids[t * K + k];
      ASSERT_TRUE(e >= 0 && e < N) << "token " << t << " id " << e;
      ASSERT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
      ASSERT_TRUE(std::isfinite(sc[t * K + k]));
      if (k > 0) {
        const double a = sc[t * K + k - 1], b = sc[t * K + k];
        ASSERT_TRUE(a > b || (a == b && ids[t * K + k - 1] < e)) << "token " << t << " position " << k;
      }
      if (cfg.gate == GateKind::exp) ASSERT_NEAR(g[t * K + k], std::exp(sc[t * K + k]), 1e-6 + 1e-5 * g[t * K + k]);
      gsum += g[t * K + k];
    }
    if (cfg.gate == GateKind::softmax) ASSERT_NEAR(gsum, 1.0, 1e-5);
  }
}

// The CUDA forward of case c against the float64 CPU forward on the same values.
void expect_forward_matches_reference(const Case& c) {
  const Config cfg = config_of(c);
  const std::int64_t T = c.T, K = c.K, N = cfg.num_experts(), H = c.H;
  const Problem stored = convert_problem(make_problem(cfg, T, DType::f64, test_seed()), c.dtype);
  const Problem ref = convert_problem(stored, DType::f64);  // the GPU's values, in float64

  // Reference with K and with K + 1 (the extra score gives each token's boundary gap).
  Problem ref_k = ref;
  Outputs want = make_outputs(cfg, T, DType::f64);
  ASSERT_TRUE(run_forward(ref_k, c.mode, want).ok());
  Config cfg1 = cfg;
  cfg1.top_k = std::min(K + 1, N);
  Problem ref_k1 = ref;
  ref_k1.cfg = cfg1;
  Outputs want1 = make_outputs(cfg1, T, DType::f64);
  ASSERT_TRUE(run_forward(ref_k1, c.mode, want1).ok());

  DeviceProblem dev(stored);
  Outputs got = make_outputs(cfg, T, c.dtype, DType::i32);
  DeviceOutputs dout(got);
  dout.poison();
  std::size_t bytes = 0;  // exactly the size for i32 ids: the routing lives in out.expert_ids
  ASSERT_TRUE(forward_workspace_size(cfg, T, c.dtype, Device::cuda, DType::i32, &bytes).ok());
  DeviceWorkspace ws(bytes);
  const Status st = forward(cfg, c.mode, dev.x.view(), dev.params(), dout.view(), ws.ws());
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_TRUE(synchronize(Device::cuda).ok());
  dout.download(got);
  ASSERT_EQ(got.y.count_nonfinite(), 0) << "y not fully written";
  check_routing_invariants(cfg, got);

  // Routing and values per token, where the reference's boundary gap exceeds rounding.
  const auto gid = got.ids.to_i64(), wid = want.ids.to_i64();
  const auto gsc = got.scores.to_f64(), wsc = want.scores.to_f64(), w1 = want1.scores.to_f64();
  const auto gg = got.gates.to_f64(), wg = want.gates.to_f64();
  const auto gy = got.y.to_f64(), wy = want.y.to_f64();
  std::vector<double> cy, ry;
  std::int64_t clear = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    if (K < N && w1[t * (K + 1) + K - 1] - w1[t * (K + 1) + K] <= kScoreTol) continue;
    ++clear;
    std::vector<std::int64_t> a(gid.begin() + t * K, gid.begin() + (t + 1) * K), b(wid.begin() + t * K, wid.begin() + (t + 1) * K);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    ASSERT_EQ(a, b) << "token " << t << ": selected experts differ";
    for (std::int64_t k = 0; k < K; ++k) {
      const auto j = std::find(wid.begin() + t * K, wid.begin() + (t + 1) * K, gid[t * K + k]) - wid.begin();
      EXPECT_NEAR(gsc[t * K + k], wsc[j], kScoreTol) << "token " << t;
      EXPECT_NEAR(gg[t * K + k], wg[j], 1e-4 * std::max(1.0, std::abs(wg[j]))) << "token " << t;
    }
    cy.insert(cy.end(), gy.begin() + t * H, gy.begin() + (t + 1) * H);
    ry.insert(ry.end(), wy.begin() + t * H, wy.begin() + (t + 1) * H);
  }
  EXPECT_GE(clear, T * 9 / 10) << "too few tokens with a clear routing boundary to compare";
  const double tol = c.dtype == DType::f32 ? 1e-5 : 1e-2;
  EXPECT_LE(rel_error(cy, ry), tol) << "y relative error";

  if (c.mode == Mode::training && c.norm == RouterNorm::batchnorm) {
    for (auto [d, h] : {std::pair{&dev.running_mean_row, &ref_k.running_mean_row},
                        std::pair{&dev.running_var_row, &ref_k.running_var_row},
                        std::pair{&dev.running_mean_col, &ref_k.running_mean_col},
                        std::pair{&dev.running_var_col, &ref_k.running_var_col}}) {
      HostTensor back(accumulation_dtype(c.dtype), h->shape());
      d->download(back);
      EXPECT_LE(rel_error(back.to_f64(), h->to_f64()), 1e-5) << "running statistics";
    }
  }

  // Bitwise identical on a second run (running statistics restored first).
  if (c.mode == Mode::inference) {
    Outputs again = make_outputs(cfg, T, c.dtype, DType::i32);
    dout.poison();
    ASSERT_TRUE(forward(cfg, c.mode, dev.x.view(), dev.params(), dout.view(), ws.ws()).ok());
    ASSERT_TRUE(synchronize(Device::cuda).ok());
    dout.download(again);
    EXPECT_TRUE(again.y.bitwise_equal(got.y)) << "forward is not deterministic";
    EXPECT_TRUE(again.ids.bitwise_equal(got.ids));
  }
}

class CudaForward : public ::testing::TestWithParam<Case> {};

TEST_P(CudaForward, MatchesFloat64Reference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  expect_forward_matches_reference(GetParam());
}

using RN = RouterNorm;
using GK = GateKind;
using AC = Activation;
const Case kCases[] = {
    {"small_f32_bn_train", 64, 96, 16, 24, 8, 37, RN::batchnorm, Mode::training, GK::exp, AC::silu, DType::f32},
    {"small_bf16_bn_infer", 64, 96, 16, 24, 8, 37, RN::batchnorm, Mode::inference, GK::exp, AC::silu, DType::bf16},
    {"f16_none_softmax_gelu", 64, 64, 12, 10, 6, 33, RN::none, Mode::inference, GK::softmax, AC::gelu, DType::f16},
    {"k_equals_n_no_mlp", 32, 0, 5, 7, 35, 20, RN::batchnorm, Mode::training, GK::softmax, AC::relu, DType::f32},
    {"one_row_k1", 64, 32, 1, 40, 1, 50, RN::batchnorm, Mode::inference, GK::exp, AC::silu, DType::bf16},
    {"rect_40x3", 128, 64, 40, 3, 20, 45, RN::batchnorm, Mode::training, GK::exp, AC::gelu, DType::f32},
    {"large_k_600", 32, 32, 48, 48, 600, 40, RN::none, Mode::inference, GK::softmax, AC::silu, DType::bf16},
    {"large_k_2000", 32, 32, 64, 64, 2000, 12, RN::batchnorm, Mode::training, GK::exp, AC::relu, DType::f32},
    {"chunked_router_and_mlp", 64, 4096, 4096, 1, 8, 2100, RN::batchnorm, Mode::training, GK::exp, AC::silu,
     DType::f32},
    {"h1024_bf16", 1024, 256, 64, 64, 16, 64, RN::batchnorm, Mode::inference, GK::exp, AC::silu, DType::bf16},
    {"h2048_f32", 2048, 128, 32, 32, 4, 24, RN::none, Mode::inference, GK::exp, AC::gelu, DType::f32},
    // The dense path's sparse output (forced suites) with several warps per token and more
    // than one window of listed tasks (H = 1024 in bf16: 4 warps, windows of 512 tasks; K =
    // 600: a second, partial window), and with 10 column slices (H = 2312 in bf16: two per
    // warp for some warps, the last slice one vector wide).
    {"h1024_k600_bf16", 1024, 64, 32, 32, 600, 24, RN::none, Mode::inference, GK::exp, AC::silu, DType::bf16},
    {"h2312_bf16", 2312, 32, 8, 8, 12, 9, RN::none, Mode::inference, GK::exp, AC::gelu, DType::bf16},
    // 5 column slices (H = 1280 in bf16): an odd count, so a layout of two slices per warp
    // leaves the last warp's second slice empty.
    {"h1280_bf16", 1280, 32, 16, 16, 40, 20, RN::batchnorm, Mode::inference, GK::softmax, AC::silu, DType::bf16},
    // N = 9000: three expert chunks of 4096 for the dense path's product output (the
    // forced-path suites; the automatic choice takes the gather), so the fp32 rows carried
    // from chunk to chunk count.
    {"expert_chunks_bf16", 128, 32, 100, 90, 24, 40, RN::batchnorm, Mode::training, GK::exp, AC::silu, DType::bf16},
    {"expert_chunks_f32", 64, 0, 90, 100, 12, 30, RN::none, Mode::inference, GK::softmax, AC::gelu, DType::f32},
    // The sparse output's expert chunks hold 32 MiB of w_out rows (16384 at H = 1024 in bf16,
    // 8192 in fp32): N = 16900 and N = 10000 give two chunks each, walked in one launch.
    {"out_chunks_h1024_bf16", 1024, 0, 130, 130, 40, 24, RN::none, Mode::inference, GK::exp, AC::silu, DType::bf16},
    {"out_chunks_h1024_f32", 1024, 0, 100, 100, 24, 20, RN::batchnorm, Mode::inference, GK::softmax, AC::gelu,
     DType::f32},
    // N = 1050 (not a multiple of 64: the sparse form's last score tile is partial) over two
    // token chunks of the dense path (2048 + 52 tokens): its tile schedule and slots per chunk.
    {"partial_tile_two_chunks_bf16", 64, 0, 30, 35, 12, 2100, RN::none, Mode::inference, GK::exp, AC::silu,
     DType::bf16},
    {"partial_tile_two_chunks_f32", 32, 16, 35, 30, 40, 2100, RN::batchnorm, Mode::inference, GK::softmax, AC::gelu,
     DType::f32},
    // Block top-K kernels sized by axis and K separately.
    {"axis700_k100", 32, 16, 700, 3, 100, 30, RN::batchnorm, Mode::training, GK::softmax, AC::silu, DType::f32},
    {"axis600_k1500", 32, 0, 600, 4, 1500, 10, RN::none, Mode::inference, GK::exp, AC::gelu, DType::bf16},
    {"axis320_k512", 32, 16, 320, 4, 512, 24, RN::batchnorm, Mode::training, GK::softmax, AC::silu, DType::bf16},
    // Widths the 16-byte register tile does not serve: the generic gather.
    {"odd_h6_f32", 6, 5, 3, 4, 5, 19, RN::batchnorm, Mode::training, GK::softmax, AC::silu, DType::f32},
    {"odd_h36_bf16", 36, 12, 9, 7, 10, 41, RN::batchnorm, Mode::inference, GK::exp, AC::gelu, DType::bf16},
    {"wide_h4104_bf16", 4104, 32, 8, 8, 6, 9, RN::none, Mode::inference, GK::exp, AC::relu, DType::bf16},
    // Full axes of 256 and 1024 entries with K <= 32: the warp top-K's full-axis form (its
    // 64-entry form: h1024_bf16 above). K = 32 at 256 entries sends most tokens' axes to the
    // rounds of warp minima (more than 64 candidates), K = 16 at 1024 to the sorts.
    {"full_axes_256_k32_bf16", 64, 32, 256, 256, 32, 300, RN::batchnorm, Mode::training, GK::exp, AC::silu,
     DType::bf16},
    {"full_axes_1024_k16_f32", 16, 0, 1024, 1024, 16, 160, RN::none, Mode::inference, GK::softmax, AC::gelu,
     DType::f32},
};
INSTANTIATE_TEST_SUITE_P(Cases, CudaForward, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

// config.schedule decides the experts path: each case forces the path that the automatic
// rule would not take at its sizes and dtype (checked first, so the case really runs that
// path because of the config), and still matches the float64 reference. Kept out of the
// OMNIMOE_EXPERTS_PATH suites of CMakeLists.txt: that variable overrides the config.
class CudaScheduleForward : public ::testing::TestWithParam<Case> {};

TEST_P(CudaScheduleForward, ForcedPathMatchesFloat64Reference) {
  if (std::getenv("OMNIMOE_EXPERTS_PATH") != nullptr) GTEST_SKIP() << "OMNIMOE_EXPERTS_PATH overrides config.schedule";
  const Case c = GetParam();
  ASSERT_TRUE(schedule_decides_path(config_of(c), c.T, c.dtype, c.schedule, /*backward=*/false));
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  expect_forward_matches_reference(c);
}

// The forward's automatic rule takes the dense (expert-centric) path when N < 32 K in f32 and
// N < 220 K in bf16 / f16 (round H100 rates): the cases below sit on the other side of it.
const Case kScheduleCases[] = {
    {"token_f32_bn_train", 64, 48, 16, 16, 16, 80, RN::batchnorm, Mode::training, GK::exp, AC::silu, DType::f32,
     kToken},
    {"token_bf16_none_softmax", 64, 32, 16, 16, 4, 70, RN::none, Mode::inference, GK::softmax, AC::gelu, DType::bf16,
     kToken},
    {"expert_f32_bn_infer_gelu", 64, 48, 24, 24, 8, 60, RN::batchnorm, Mode::inference, GK::softmax, AC::gelu,
     DType::f32, kExpert},
    {"expert_bf16_no_mlp", 128, 0, 64, 64, 8, 50, RN::batchnorm, Mode::training, GK::exp, AC::relu, DType::bf16,
     kExpert},
    // The grid 1 x 4096: a dense 4096-way softmax router (the training example's ablation).
    {"grid1x4096_expert_f32", 64, 64, 1, 4096, 32, 64, RN::batchnorm, Mode::training, GK::exp, AC::silu, DType::f32,
     kExpert},
    {"grid1x4096_token_bf16", 64, 64, 1, 4096, 32, 64, RN::batchnorm, Mode::training, GK::exp, AC::silu, DType::bf16,
     kToken},
};
INSTANTIATE_TEST_SUITE_P(Schedules, CudaScheduleForward, ::testing::ValuesIn(kScheduleCases),
                         [](const auto& info) { return std::string(info.param.name); });

// Captured once, replayed on new inputs written into the same buffers: same result as an
// eager run on those inputs (no host synchronisation, allocation or host-side decision in
// the forward).
TEST(CudaForwardGraph, ReplaysOnNewInputs) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  Config cfg;
  cfg.hidden = 256;
  cfg.intermediate = 128;
  cfg.grid_rows = 32;
  cfg.grid_cols = 32;
  cfg.top_k = 16;
  const std::int64_t T = 96;
  const Problem p1 = make_problem(cfg, T, DType::bf16, test_seed(1));
  const Problem p2 = make_problem(cfg, T, DType::bf16, test_seed(2));
  DeviceProblem dev(p1);
  Outputs o = make_outputs(cfg, T, DType::bf16, DType::i32);
  DeviceOutputs dout(o);
  std::size_t bytes = 0;
  // i32 ids at their own size: the captured forward keeps its routing in them.
  ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, DType::i32, &bytes).ok());
  DeviceWorkspace ws(bytes);
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_TRUE(forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws(), s).ok());  // warm-up
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  Outputs first = make_outputs(cfg, T, DType::bf16, DType::i32);
  dout.download(first);

  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const Status st = forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws(), s);
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  ASSERT_TRUE(st.ok()) << st.message();
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

  dev.x.upload(p2.x);
  dout.poison();
  ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  Outputs replay = make_outputs(cfg, T, DType::bf16, DType::i32);
  dout.download(replay);

  dout.poison();
  ASSERT_TRUE(forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws(), s).ok());
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  Outputs eager = make_outputs(cfg, T, DType::bf16, DType::i32);
  dout.download(eager);

  EXPECT_TRUE(replay.y.bitwise_equal(eager.y));
  EXPECT_TRUE(replay.ids.bitwise_equal(eager.ids));
  EXPECT_FALSE(replay.y.bitwise_equal(first.y)) << "the replay did not see the new input";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

// A thread whose first forward is captured into a graph: the forward then creates its side
// stream (the router overlaps the shared MLP on it) while the caller's stream captures.
// While that capture is still open the thread runs another forward eagerly on a second
// stream: the side stream still belongs to the open capture, so that call must stay on its
// own stream and neither call may fail. Every result (the replay, the eager calls on both
// streams, a run on the main thread) must agree bitwise; the workspace is poisoned before
// each, so a missing fork or join dependency cannot hide behind the previous run's values.
TEST(CudaForwardGraph, FirstCallOfAThreadCaptured) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const Config cfg = make_config(128, 96, 24, 16, 8);
  const std::int64_t T = 80;
  const Problem p = make_problem(cfg, T, DType::bf16, test_seed(3));
  DeviceProblem dev(p);
  std::size_t bytes = 0;
  ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, &bytes).ok());
  DeviceWorkspace ws(bytes), ws2(bytes);
  Outputs here = make_outputs(cfg, T, DType::bf16, DType::i64), replay = here, eager = here, other = here;
  {  // the same forward run eagerly on this thread first (its own side stream)
    DeviceOutputs dout(here);
    ASSERT_TRUE(forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws(), nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    dout.download(here);
  }
  std::string failure;
  std::thread worker([&] {
    DeviceOutputs dout(replay), dout2(other);
    cudaStream_t a = nullptr, b = nullptr;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    auto run = [&]() -> std::string {
      if (cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking) != cudaSuccess) return "cudaStreamCreate a";
      if (cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking) != cudaSuccess) return "cudaStreamCreate b";
      ws.poison();
      ws2.poison();
      dout.poison();
      dout2.poison();
      if (cudaStreamBeginCapture(a, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return "BeginCapture";
      const Status captured = forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws(), a);
      // (relaxed capture mode for it: what is under test is the side stream's choice, not
      // which runtime calls a capturing thread may make)
      cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
      if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) return "capture mode";
      const Status beside = forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout2.view(), ws2.ws(), b);
      if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) return "capture mode back";
      if (cudaStreamEndCapture(a, &graph) != cudaSuccess) return "EndCapture (a stream left in the capture?)";
      if (!captured.ok()) return "captured forward: " + captured.message();
      if (!beside.ok()) return "forward on a second stream during the capture: " + beside.message();
      if (cudaStreamSynchronize(b) != cudaSuccess) return "sync b";
      dout2.download(other);
      if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) return "GraphInstantiate";
      ws.poison();
      if (cudaGraphLaunch(exec, a) != cudaSuccess || cudaStreamSynchronize(a) != cudaSuccess) return "replay";
      dout.download(replay);
      ws.poison();
      dout.poison();
      if (!forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws(), a).ok()) return "eager";
      if (cudaStreamSynchronize(a) != cudaSuccess) return "eager sync";
      dout.download(eager);
      return "";
    };
    failure = run();
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (a) cudaStreamDestroy(a);
    if (b) cudaStreamDestroy(b);
  });
  worker.join();
  ASSERT_TRUE(failure.empty()) << failure;
  for (const Outputs* o : {&replay, &eager, &other}) {
    EXPECT_TRUE(o->y.bitwise_equal(here.y));
    EXPECT_TRUE(o->ids.bitwise_equal(here.ids));
  }
  for (std::int64_t i = 0; i < here.y.numel(); ++i) ASSERT_TRUE(std::isfinite(here.y.get(i))) << "element " << i;
}

// The branches for a caller-given routing (uniform random ids, as the benchmark uses):
// the same routing on both backends, so values compare at every token. An id out of range
// turns its token's row into NaN on the GPU and leaves the other rows intact.
TEST(CudaRouted, MatchesCpuForSameRouting) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::f32, DType::bf16}) {
    Config cfg;
    cfg.hidden = 128;
    cfg.intermediate = 64;
    cfg.grid_rows = 16;
    cfg.grid_cols = 20;
    cfg.top_k = 24;
    const std::int64_t T = 70, K = cfg.top_k, N = cfg.num_experts();
    const Problem stored = convert_problem(make_problem(cfg, T, DType::f64, test_seed(dt == DType::f32)), dt);
    const Problem ref = convert_problem(stored, DType::f64);
    std::mt19937_64 rng(test_seed(7));
    HostTensor ids = random_distinct_ids(T, K, N, rng), gates32(DType::f32, {T, K});
    for (std::int64_t i = 0; i < T * K; ++i) gates32.set(i, std::uniform_real_distribution<double>(0.01, 1.0)(rng));
    ids.set(5 * K + 3, static_cast<double>(N + 4));  // token 5: out of range
    ids.set(6 * K + 1, ids.get(6 * K + 0));          // token 6 names one expert twice: the terms sum
    HostTensor gates64(DType::f64, {T, K});
    gates64.from_f64(gates32.to_f64());

    // CPU float64 reference, token 5 with a valid id (the CPU refuses bad ids).
    HostTensor ids_ok = ids;
    ids_ok.set(5 * K + 3, 0.0);
    HostTensor want(DType::f64, {T, cfg.hidden});
    HostWorkspace hws = forward_workspace(cfg, T, DType::f64);
    ASSERT_TRUE(forward_routed(cfg, ref.x.view(), ref.params(), ids_ok.view(), gates64.view(), want.view(), hws.ws()).ok());
    EXPECT_EQ(forward_routed(cfg, ref.x.view(), ref.params(), ids.view(), gates64.view(), want.view(), hws.ws()).code(),
              StatusCode::invalid_argument);

    DeviceProblem dev(stored);
    DeviceTensor dids(ids), dg(gates32);
    HostTensor got(dt, {T, cfg.hidden});
    got.poison();
    DeviceTensor dy(got);
    std::size_t bytes = 0;
    ASSERT_TRUE(forward_workspace_size(cfg, T, dt, Device::cuda, &bytes).ok());
    DeviceWorkspace ws(bytes);
    const Status st = forward_routed(cfg, dev.x.view(), dev.params(), dids.view(), dg.view(), dy.view(), ws.ws());
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_TRUE(synchronize(Device::cuda).ok());
    dy.download(got);
    const auto g = got.to_f64(), w = want.to_f64();
    std::vector<double> a, b;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < cfg.hidden; ++h) {
        const double v = g[t * cfg.hidden + h];
        if (t == 5) {
          ASSERT_TRUE(std::isnan(v)) << "bad id must poison its token's row";
          continue;
        }
        a.push_back(v);
        b.push_back(w[t * cfg.hidden + h]);
      }
    EXPECT_LE(rel_error(a, b), dt == DType::f32 ? 1e-5 : 1e-2) << dtype_name(dt);
  }
}

// Duplicated router rows and columns make exact score ties across many cells; wherever the
// K-th and (K+1)-th reference scores tie exactly, the GPU must break the tie by the smaller
// id as the reference does. For K <= 19 the small-K warp kernel breaks ties among its
// staircase of cells itself and hands the block kernel only ties that reach past its
// candidate lists (duplicated rows or columns at the lists' edge); at K = 32 every tie at
// the K-th value goes to the block kernel.
TEST(CudaRouteTies, SmallerIdWins) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  int exact_ties = 0;  // tokens whose K-th and (K+1)-th reference scores tie exactly
  // The grid 12 x 10 takes the warp top-K's general form (the block kernel at K = 40), 64 x 64
  // the warp top-K's full-axis form.
  for (auto [rows, cols, K] : {std::tuple<std::int64_t, std::int64_t, std::int64_t>{12, 10, 4},
                               {12, 10, 9},
                               {12, 10, 16},
                               {12, 10, 40},
                               {64, 64, 4},
                               {64, 64, 16},
                               {64, 64, 32}}) {
    Config cfg;
    cfg.hidden = 32;
    cfg.intermediate = 0;
    cfg.grid_rows = rows;
    cfg.grid_cols = cols;
    cfg.top_k = K;
    cfg.router_norm = RouterNorm::none;
    const std::int64_t T = 64, H = cfg.hidden, N = cfg.num_experts();
    Problem p = make_problem(cfg, T, DType::f32, test_seed(rows + K));
    // Small dyadic values: every logit is exact in any summation order, on both backends,
    // so duplicated rows give bit-identical scores (random reals would not: BLAS and cuBLAS
    // sum different output columns in different orders).
    std::mt19937_64 rng(test_seed(100 + rows + K));
    auto dyadic = [&](HostTensor& m, double scale) {
      for (std::int64_t i = 0; i < m.numel(); ++i) m.set(i, scale * static_cast<double>(1 + rng() % 4) * (rng() % 2 ? 1 : -1));
    };
    // Row logits are multiples of 1/8, column logits multiples of 2^-14 below 1/32 in size:
    // two cells' exact scores are equal only where their rows and their columns are equal
    // (a difference of rows, 0 or >= 1/8, never cancels one of columns, < 1/16). With both
    // on one scale, cells of different rows and columns tied exactly in real arithmetic, and
    // the float64 reference and the GPU's fp32 sums broke such ties by rounding, each its own
    // way: not a tie the GPU is asked to break by id.
    dyadic(p.x, 0.5);
    dyadic(p.router_row, 0.25);
    dyadic(p.router_col, 0.25 / 2048);
    for (std::int64_t r = 0; r < rows / 2; ++r)  // rows 2r and 2r+1 identical, columns 2c and 2c+1 too
      for (std::int64_t h = 0; h < H; ++h) p.router_row.set((2 * r + 1) * H + h, p.router_row.get(2 * r * H + h));
    for (std::int64_t c = 0; c < cols / 2; ++c)
      for (std::int64_t h = 0; h < H; ++h) p.router_col.set((2 * c + 1) * H + h, p.router_col.get(2 * c * H + h));
    const Problem ref = convert_problem(p, DType::f64);
    Config cfg1 = cfg;
    cfg1.top_k = std::min(K + 1, N);
    Problem ref1 = ref;
    ref1.cfg = cfg1;
    Outputs want1 = make_outputs(cfg1, T, DType::f64);
    ASSERT_TRUE(run_forward(ref1, Mode::inference, want1).ok());

    DeviceProblem dev(p);
    Outputs got = make_outputs(cfg, T, DType::f32, DType::i64);
    DeviceOutputs dout(got);
    dout.poison();
    std::size_t bytes = 0;
    ASSERT_TRUE(forward_workspace_size(cfg, T, DType::f32, Device::cuda, &bytes).ok());
    DeviceWorkspace ws(bytes);
    ASSERT_TRUE(forward(cfg, Mode::inference, dev.x.view(), dev.params(), dout.view(), ws.ws()).ok());
    ASSERT_TRUE(synchronize(Device::cuda).ok());
    dout.download(got);
    check_routing_invariants(cfg, got);
    const auto gid = got.ids.to_i64(), wid = want1.ids.to_i64();
    const auto w = want1.scores.to_f64();
    for (std::int64_t t = 0; t < T; ++t) {
      const double gap = w[t * (K + 1) + K - 1] - w[t * (K + 1) + K];
      if (gap != 0 && gap <= kScoreTol) continue;  // a near tie: rounding decides
      exact_ties += gap == 0;
      std::vector<std::int64_t> a(gid.begin() + t * K, gid.begin() + (t + 1) * K);
      std::vector<std::int64_t> b(wid.begin() + t * (K + 1), wid.begin() + t * (K + 1) + K);
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      ASSERT_EQ(a, b) << "grid " << rows << " x " << cols << " K " << K << " token " << t;
    }
  }
  EXPECT_GT(exact_ties, 0) << "the duplicated rows should tie at the boundary for some token";
}

// Views that start one element into a buffer (no 16-byte alignment): the kernels fall back
// from vector loads and cuBLASLt is told the real alignment; results match the aligned call.
TEST(CudaForwardMisaligned, ViewsOffsetByOneElement) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::bf16, DType::f32}) {
    Config cfg;
    cfg.hidden = 256;
    cfg.intermediate = 96;
    cfg.grid_rows = 16;
    cfg.grid_cols = 16;
    cfg.top_k = 8;
    cfg.router_norm = RouterNorm::none;
    const std::int64_t T = 40, K = cfg.top_k;
    const Problem p = make_problem(cfg, T, dt, test_seed(static_cast<int>(dt)));
    HostTensor ids(DType::i32, {T, K}), gates(DType::f32, {T, K});
    std::mt19937_64 rng(test_seed(3));
    for (std::int64_t i = 0; i < T * K; ++i) {
      ids.set(i, static_cast<double>(rng() % static_cast<std::uint64_t>(cfg.num_experts())));
      gates.set(i, 0.1 + 0.8 * static_cast<double>(rng() % 1000) / 1000.0);
    }
    DeviceProblem aligned(p);
    DeviceTensor dids(ids), dg(gates);
    std::size_t bytes = 0;
    ASSERT_TRUE(forward_workspace_size(cfg, T, dt, Device::cuda, &bytes).ok());
    DeviceWorkspace ws(bytes);
    HostTensor want(dt, {T, cfg.hidden}), got(dt, {T, cfg.hidden});
    DeviceTensor dy(want);
    ASSERT_TRUE(forward_routed(cfg, aligned.x.view(), aligned.params(), dids.view(), dg.view(), dy.view(), ws.ws()).ok());
    ASSERT_TRUE(synchronize(Device::cuda).ok());
    dy.download(want);

    // The same tensors again, each one element past a 256-byte boundary.
    MisalignedCopies shifted;
    Params q = aligned.params();
    const TensorView x = shifted.copy(p.x);
    q.expert_in = shifted.copy(p.expert_in);
    q.expert_out = shifted.copy(p.expert_out);
    q.gate = shifted.copy(p.gate);
    q.down = shifted.copy(p.down);
    got.poison();
    const TensorView y = shifted.copy(got);
    const Status st = forward_routed(cfg, x, q, dids.view(), dg.view(), y, ws.ws());
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_TRUE(synchronize(Device::cuda).ok());
    MisalignedCopies::download(y, got);
    EXPECT_EQ(got.count_nonfinite(), 0);
    EXPECT_LE(rel_error(got.to_f64(), want.to_f64()), dt == DType::f32 ? 1e-6 : 1e-2) << dtype_name(dt);
  }
}

TEST(CudaForwardErrors, RefusesWhatItCannotServe) {
  Config cfg;
  cfg.hidden = 64;
  cfg.grid_rows = 8;
  cfg.grid_cols = 8;
  cfg.top_k = 4;
  std::size_t bytes = 0;
  Status s = forward_workspace_size(cfg, 16, DType::f64, Device::cuda, &bytes);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("f64"), std::string::npos) << s.message();
  cfg.grid_rows = 5000;
  s = forward_workspace_size(cfg, 16, DType::bf16, Device::cuda, &bytes);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("grid_rows"), std::string::npos) << s.message();
  cfg.grid_rows = 8;
  cfg.top_k = 64;  // T * K = 2^31: task indices would overflow
  s = forward_workspace_size(cfg, std::int64_t{1} << 25, DType::bf16, Device::cuda, &bytes);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("top_k"), std::string::npos) << s.message();
}

// The dense path's output form, seen through the workspace query (host only, no GPU): the
// size rule gives the paper family's K = 512 the sparse output (no P and no [tokens, experts]
// scores: the scores at the tasks, from a tile schedule) and K = 4096 the product;
// OMNIMOE_DENSE_OUTPUT forces either.
TEST(CudaDenseOutput, SizeRuleAndSwitchShapeTheWorkspace) {
  Config cfg;
  cfg.hidden = 1024;
  cfg.intermediate = 1024;
  cfg.grid_rows = 320;
  cfg.grid_cols = 320;
  cfg.schedule = Schedule::expert_centric;
  auto query = [&](const char* mode) {
    const ScopedEnv env("OMNIMOE_DENSE_OUTPUT", mode);
    std::size_t bytes = 0;
    EXPECT_TRUE(forward_workspace_size(cfg, 4096, DType::bf16, Device::cuda, &bytes).ok());
    return bytes;
  };
  cfg.top_k = 512;
  const std::size_t by_rule = query(nullptr), sparse = query("sparse"), product = query("product");
  EXPECT_EQ(by_rule, sparse);
  EXPECT_LT(sparse, product);
  cfg.top_k = 4096;
  EXPECT_EQ(query(nullptr), query("product"));
}

// The expert ids' dtype and the workspace (host only, no GPU): with i32 out.expert_ids the
// forward keeps its routing there, so its size is the i64 size less the T K i32 copy (up to
// the arena's 256-byte alignment); the i64 size serves both. Other dtypes are refused.
TEST(CudaForwardWorkspace, I32IdsNeedNoCopyOfTheRouting) {
  Config cfg;
  cfg.hidden = 1024;
  cfg.intermediate = 1024;
  cfg.grid_rows = 320;
  cfg.grid_cols = 320;
  for (const std::int64_t K : {16, 512, 4096}) {
    cfg.top_k = K;
    const std::int64_t T = 1024;
    std::size_t wide = 0, narrow = 0, plain = 0;
    ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, DType::i64, &wide).ok());
    ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, DType::i32, &narrow).ok());
    ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, &plain).ok());
    EXPECT_EQ(plain, wide) << "K = " << K;
    const auto copy = static_cast<std::size_t>(T * K) * 4;
    EXPECT_GE(wide - narrow, copy) << "K = " << K;
    EXPECT_LT(wide - narrow, copy + 256) << "K = " << K;
  }
  std::size_t bytes = 0;
  const Status s = forward_workspace_size(cfg, 16, DType::bf16, Device::cuda, DType::f32, &bytes);
  EXPECT_EQ(s.code(), StatusCode::invalid_argument);
  EXPECT_NE(s.message().find("f32"), std::string::npos) << s.message();
}

// On the GPU: i64 ids (their own copy of the routing in the workspace) and i32 ids (none)
// give the same routing and bitwise the same y, on both expert paths; i64 ids with only the
// i32 size are refused with a message that names the dtype.
TEST(CudaForwardWorkspace, IdsDtypesAgreeAndTheSmallerSizeIsChecked) {
  if (std::getenv("OMNIMOE_EXPERTS_PATH") != nullptr) GTEST_SKIP() << "OMNIMOE_EXPERTS_PATH overrides config.schedule";
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const std::int64_t T = 300;
  for (const Schedule schedule : {Schedule::token_centric, Schedule::expert_centric}) {  // gather, dense path
    Config cfg;
    cfg.schedule = schedule;
    cfg.hidden = 128;
    cfg.intermediate = 64;
    cfg.grid_rows = 64;
    cfg.grid_cols = 64;
    cfg.top_k = 64;
    const Problem stored = convert_problem(make_problem(cfg, T, DType::f64, test_seed()), DType::bf16);
    DeviceProblem dev(stored);
    std::size_t wide = 0, narrow = 0;
    ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, DType::i64, &wide).ok());
    ASSERT_TRUE(forward_workspace_size(cfg, T, DType::bf16, Device::cuda, DType::i32, &narrow).ok());
    ASSERT_LT(narrow, wide);
    Outputs o32 = make_outputs(cfg, T, DType::bf16, DType::i32), o64 = make_outputs(cfg, T, DType::bf16, DType::i64);
    DeviceOutputs d32(o32), d64(o64);
    d32.poison();
    d64.poison();
    DeviceWorkspace ws_narrow(narrow), ws_wide(wide);
    Status st = forward(cfg, Mode::inference, dev.x.view(), dev.params(), d64.view(), ws_narrow.ws());
    EXPECT_EQ(st.code(), StatusCode::workspace_too_small);
    EXPECT_NE(st.message().find("i64"), std::string::npos) << st.message();
    st = forward(cfg, Mode::inference, dev.x.view(), dev.params(), d32.view(), ws_narrow.ws());
    ASSERT_TRUE(st.ok()) << st.message();
    st = forward(cfg, Mode::inference, dev.x.view(), dev.params(), d64.view(), ws_wide.ws());
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_TRUE(synchronize(Device::cuda).ok());
    d32.download(o32);
    d64.download(o64);
    EXPECT_EQ(o32.y.count_nonfinite(), 0) << name(schedule);
    EXPECT_TRUE(o32.y.bitwise_equal(o64.y)) << name(schedule);
    EXPECT_EQ(o32.ids.to_i64(), o64.ids.to_i64()) << name(schedule);
  }
}

}  // namespace
}  // namespace omt
