// pkm / peer on the GPU against the CPU float64 forward of the same (storage-rounded) inputs:
// fresh random problems, poisoned outputs and workspace, every kernel variant (16-byte and
// element pieces, the three axis capacities, banded id sorting for K > 2048, token chunks),
// exact ties, caller routing, non-finite tokens, CUDA-graph replay, refused configurations.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "baselines/test_pk_common.hpp"
#include "cuda/cuda_helpers.hpp"

namespace pkt {
namespace {

namespace bl = omnimoe::baselines;

struct Shape {
  i64 H, Nr, Nc, K, T;
};

// Rounding allowance of the scores of token t when two cells' scores are compared. 16-bit
// storage: the GPU rounds q to the storage dtype (unit roundoff u) before the sub-key
// products, which moves a score by sum_h k_h q_h d_h, |d_h| <= u: at most u * l1 and, the
// d_h being independent, a few u * l2 / sqrt(3) in practice (l2 << l1 at large H). f32: fp32
// products on both sides.
std::vector<double> score_tolerance(const Scores& s, DType dt) {
  const double u = dt == DType::bf16 ? std::ldexp(1.0, -8) : dt == DType::f16 ? std::ldexp(1.0, -11) : 0.0;
  std::vector<double> tol(s.bound.size());
  for (std::size_t t = 0; t < tol.size(); ++t)
    tol[t] = std::min(2 * u * s.bound[t], 8 * u * s.l2[t]) + 1e-5 * (1.0 + s.bound[t]);
  return tol;
}

// y tolerance: fp32 accumulation over K terms for f32 (~1e-5 at K <= 64, growing like sqrt K);
// rounding of q and y for the 16-bit dtypes.
double y_tolerance(DType dt, i64 K) {
  switch (dt) {
    case DType::f32: return 1e-5 * std::max(1.0, std::sqrt(static_cast<double>(K) / 64.0));
    case DType::f16: return 5e-3;
    default: return 1.5e-2;
  }
}

struct DevicePk {
  DeviceTensor x, query, keys_row, keys_col, values, expert_in, expert_out;
  explicit DevicePk(const PkProblem& p)
      : x(p.x), query(p.query), keys_row(p.keys_row), keys_col(p.keys_col), values(p.values), expert_in(p.expert_in),
        expert_out(p.expert_out) {}
  BaselineParams params() const {
    BaselineParams q;
    q.query = query.view();
    q.keys_row = keys_row.view();
    q.keys_col = keys_col.view();
    q.values = values.view();
    q.expert_in = expert_in.view();
    q.expert_out = expert_out.view();
    return q;
  }
};

std::size_t cuda_workspace(const PkProblem& p) {
  std::size_t bytes = 0;
  const Status s = bl::pkm_workspace_size(p.cfg, p.T, p.dtype, Device::cuda, &bytes);
  EXPECT_TRUE(s.ok()) << s.message();
  return bytes;
}

// pkm_forward on the GPU (poisoned y, ids and workspace); results copied back.
Status run_pk_cuda(const PkProblem& p, HostTensor& y, HostTensor* ids_out, const HostTensor* ids_in = nullptr,
                   const HostTensor* gates_in = nullptr, cudaStream_t stream = nullptr) {
  DevicePk d(p);
  y.poison();
  DeviceTensor dy(y);
  HostTensor ids_host = ids_out ? *ids_out : HostTensor();
  if (ids_out) ids_host.poison();
  DeviceTensor dids(ids_host);
  DeviceTensor din(ids_in ? *ids_in : HostTensor()), dg(gates_in ? *gates_in : HostTensor());
  DeviceWorkspace ws(cuda_workspace(p));
  const BaselineParams params = d.params();
  const ForwardArgs a{&p.cfg, d.x.view(), &params, din.view(), dg.view(), dids.view(), dy.view(), ws.ws(), stream};
  const Status st = bl::pkm_forward(a);
  if (!st.ok()) return st;
  const cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return {StatusCode::cuda_error, cudaGetErrorString(e)};
  dy.download(y);
  if (ids_out) dids.download(*ids_out);
  return Status::Ok();
}

// A GPU result (y, ids) of `stored` against the CPU float64 forward of the same values
// (`ref`: stored converted to f64; want_y, want_ids). Where the GPU's selection differs from
// the CPU's at a near tie (allowed within the rounding of the dtype), its y is compared with
// the float64 y of its own ids.
void compare(const PkProblem& stored, const PkProblem& ref, const HostTensor& y, const HostTensor& ids,
             const HostTensor& want_y, const HostTensor& want_ids, bool exact_ids) {
  const std::string what = describe(stored.cfg, stored.T, stored.dtype);
  const i64 T = stored.T, H = stored.cfg.hidden, K = stored.cfg.top_k;
  const Scores s = naive_scores(ref);
  const std::vector<i64> got = ids.to_i64(), want = want_ids.to_i64();
  i64 flips = 0;
  EXPECT_EQ(check_selection(ref, s, got, want, next_scores(s, ref.cfg, T), score_tolerance(s, stored.dtype), &flips),
            "")
      << what;
  if (exact_ids) EXPECT_EQ(got, want) << what;

  std::vector<double> yref = want_y.to_f64();
  if (flips > 0) {  // reference y of the GPU's own ids for the tokens that differ
    const std::vector<double> own = naive_routed(ref, got, softmax_gates(s, ref.cfg, T, got));
    for (i64 t = 0; t < T; ++t)
      if (!std::equal(got.begin() + t * K, got.begin() + (t + 1) * K, want.begin() + t * K))
        std::copy(own.begin() + t * H, own.begin() + (t + 1) * H, yref.begin() + t * H);
  }
  const double err = rel_error(y.to_f64(), yref);
  EXPECT_LT(err, y_tolerance(stored.dtype, K)) << what << " (" << flips << " near-tie flips)";
}

// GPU forward of `stored` against the CPU float64 forward of the same values.
void check_against_cpu(const PkProblem& stored, bool exact_ids) {
  const std::string what = describe(stored.cfg, stored.T, stored.dtype);
  const i64 T = stored.T, H = stored.cfg.hidden, K = stored.cfg.top_k;
  HostTensor y(stored.dtype, {T, H}), ids(DType::i32, {T, K});
  const Status sg = run_pk_cuda(stored, y, &ids);
  ASSERT_TRUE(sg.ok()) << what << ": " << sg.message();
  const PkProblem ref = convert_pk(stored, DType::f64);
  HostTensor want_y(DType::f64, {T, H}), want_ids(DType::i32, {T, K});
  const Status sc = run_pk_cpu(ref, want_y, &want_ids);
  ASSERT_TRUE(sc.ok()) << what << ": " << sc.message();
  compare(stored, ref, y, ids, want_y, want_ids, exact_ids);
}

class PkCudaCases : public ::testing::TestWithParam<std::tuple<Kind, DType>> {};

TEST_P(PkCudaCases, MatchesCpuFloat64) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [kind, dt] = GetParam();
  const Shape shapes[] = {
      {64, 16, 12, 5, 37},     // K < axes; 16-byte pieces, 1 per lane
      {64, 16, 12, 40, 37},    // K above both axes
      {32, 8, 8, 64, 20},      // K = N
      {20, 7, 9, 30, 11},      // H = 20: element pieces for 16-bit storage
      {96, 40, 24, 300, 16},   // several pieces per lane
      {128, 600, 30, 50, 8},   // axis capacity 1024
      {64, 1500, 20, 3000, 4}, // axis capacity 4096, ids sorted in two bands
      {32, 80, 80, 5000, 5},   // three bands
      {34, 9, 7, 63, 3},       // K = N, odd H / 2
      {320, 20, 20, 100, 6},   // 2 (16-bit) / 4 (f32) pieces per lane
      {330, 12, 10, 50, 5},    // element pieces, H > 256
  };
  std::uint64_t salt = 0;
  for (const Shape& s : shapes) {
    const BaselineConfig c = pk_config(kind, s.H, s.Nr, s.Nc, s.K);
    check_against_cpu(convert_pk(make_pk(c, s.T, DType::f64, test_seed(++salt)), dt), false);
  }
}

// The benchmark's shapes (DESIGN.md section 3) at a few tokens, bf16 (the benchmark's dtype)
// and f32 (~200M table entries per problem: made in the storage dtype directly).
TEST(PkCuda, BenchmarkShapes) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (Kind kind : {Kind::pkm, Kind::peer})
    for (DType dt : {DType::bf16, DType::f32}) {
      const Shape s = kind == Kind::pkm ? Shape{1024, 444, 444, 2500, 4} : Shape{1024, 320, 320, 1250, 4};
      const BaselineConfig c = pk_config(kind, s.H, s.Nr, s.Nc, s.K);
      check_against_cpu(make_pk(c, s.T, dt, test_seed(static_cast<int>(dt))), false);
    }
}

// Integer inputs, exact in every dtype: the GPU's selection and order must equal the CPU's.
TEST_P(PkCudaCases, ExactTies) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [kind, dt] = GetParam();
  std::uint64_t salt = 50;
  for (const Shape& s : {Shape{16, 6, 5, 7, 9}, Shape{16, 6, 5, 30, 6}, Shape{24, 40, 70, 2600, 3},
                         Shape{16, 12, 9, 1, 5}}) {
    const BaselineConfig c = pk_config(kind, s.H, s.Nr, s.Nc, s.K);
    check_against_cpu(convert_pk(make_pk(c, s.T, DType::f64, test_seed(++salt), Fill::ties), dt), true);
  }
}

INSTANTIATE_TEST_SUITE_P(All, PkCudaCases,
                         ::testing::Combine(::testing::Values(Kind::pkm, Kind::peer),
                                            ::testing::Values(DType::f32, DType::bf16, DType::f16)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) == Kind::pkm ? "pkm_" : "peer_") +
                                  dtype_name(std::get<1>(info.param));
                         });

// forward_routed: the same ids and gates on both backends; an id out of range turns only its
// token's row into NaN on the GPU.
TEST(PkCuda, Routed) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (Kind kind : {Kind::pkm, Kind::peer})
    for (DType dt : {DType::f32, DType::bf16}) {
      const BaselineConfig c = pk_config(kind, 64, 12, 10, 37);
      const i64 T = 23, K = 37, N = 120, H = 64;
      const PkProblem stored = convert_pk(make_pk(c, T, DType::f64, test_seed(static_cast<int>(dt))), dt);
      const PkProblem ref = convert_pk(stored, DType::f64);
      std::mt19937_64 rng(test_seed(3));
      HostTensor ids(DType::i32, {T, K}), gates(DType::f32, {T, K});
      for (i64 i = 0; i < T * K; ++i) {
        ids.set(i, static_cast<double>(std::uniform_int_distribution<i64>(0, N - 1)(rng)));
        gates.set(i, std::uniform_real_distribution<double>(-0.2, 1.0)(rng));
      }
      ids.set(4 * K + 1, ids.get(4 * K));  // repeated id
      HostTensor want(DType::f64, {T, H});
      ASSERT_TRUE(run_pk_cpu(ref, want, nullptr, &ids, &gates).ok());
      ids.set(9 * K + 5, static_cast<double>(N + 3));  // token 9: out of range
      HostTensor y(dt, {T, H});
      const Status st = run_pk_cuda(stored, y, nullptr, &ids, &gates);
      ASSERT_TRUE(st.ok()) << st.message();
      const auto yv = y.to_f64();
      for (i64 h = 0; h < H; ++h) EXPECT_TRUE(std::isnan(yv[9 * H + h]));
      std::vector<char> keep(T, 1);
      keep[9] = 0;
      EXPECT_LT(rel_error(rows_of(yv, H, keep), rows_of(want.to_f64(), H, keep)), y_tolerance(dt, K))
          << describe(c, T, dt);
    }
}

TEST(PkCuda, NonFiniteToken) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (Kind kind : {Kind::pkm, Kind::peer}) {
    const BaselineConfig c = pk_config(kind, 32, 10, 9, 14);
    const i64 T = 6, H = 32, K = 14;
    PkProblem p = make_pk(c, T, DType::f32, test_seed(kind == Kind::pkm));
    p.x.set(3 * H + 1, std::nan(""));
    HostTensor y(DType::f32, {T, H}), ids(DType::i32, {T, K}), want(DType::f32, {T, H}), want_ids(DType::i32, {T, K});
    ASSERT_TRUE(run_pk_cuda(p, y, &ids).ok());
    ASSERT_TRUE(run_pk_cpu(p, want, &want_ids).ok());
    const auto yv = y.to_f64();
    for (i64 h = 0; h < H; ++h) EXPECT_TRUE(std::isnan(yv[3 * H + h]));
    for (i64 k = 0; k < K; ++k) EXPECT_EQ(ids.get_int(3 * K + k), k);
    std::vector<char> keep(T, 1);
    keep[3] = 0;
    EXPECT_LT(rel_error(rows_of(yv, H, keep), rows_of(want.to_f64(), H, keep)), 1e-5);
  }
}

// More tokens than one chunk (at most 4096 tokens per chunk).
TEST(PkCuda, TokenChunks) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const BaselineConfig c = pk_config(Kind::pkm, 32, 8, 8, 10);
  check_against_cpu(convert_pk(make_pk(c, 4100, DType::f64, test_seed()), DType::bf16), false);
}

// Captured once, replayed on new inputs: bit-identical to an eager call (and so deterministic).
TEST(PkCuda, GraphReplay) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (Kind kind : {Kind::pkm, Kind::peer}) {
    const BaselineConfig c = pk_config(kind, 256, 60, 50, 700);
    const i64 T = 40, K = 700, H = 256;
    const PkProblem p1 = convert_pk(make_pk(c, T, DType::f64, test_seed(1)), DType::bf16);
    const PkProblem p2 = convert_pk(make_pk(c, T, DType::f64, test_seed(2)), DType::bf16);
    DevicePk d(p1);
    HostTensor y(DType::bf16, {T, H}), ids(DType::i32, {T, K});
    DeviceTensor dy(y), dids(ids);
    DeviceWorkspace ws(cuda_workspace(p1));
    const BaselineParams params = d.params();
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    const ForwardArgs a{&c, d.x.view(), &params, {}, {}, dids.view(), dy.view(), ws.ws(), s};
    ASSERT_TRUE(bl::pkm_forward(a).ok());  // warm-up (cuBLASLt heuristics cached)
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    HostTensor first_y = y;
    dy.download(first_y);

    cudaGraph_t graph;
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const Status st = bl::pkm_forward(a);
    ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
    ASSERT_TRUE(st.ok()) << st.message();
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

    d.x.upload(p2.x);
    dy.poison();
    dids.poison();
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    HostTensor replay_y = y, replay_ids = ids;
    dy.download(replay_y);
    dids.download(replay_ids);

    dy.poison();
    dids.poison();
    ASSERT_TRUE(bl::pkm_forward(a).ok());
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    HostTensor eager_y = y, eager_ids = ids;
    dy.download(eager_y);
    dids.download(eager_ids);

    EXPECT_TRUE(replay_y.bitwise_equal(eager_y));
    EXPECT_TRUE(replay_ids.bitwise_equal(eager_ids));
    EXPECT_EQ(replay_y.count_nonfinite(), 0);
    EXPECT_FALSE(replay_y.bitwise_equal(first_y)) << "the replay did not see the new input";
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(s);
  }
}

TEST(PkCuda, RefusedConfigurations) {
  std::size_t bytes = 0;
  const Status big = bl::pkm_workspace_size(pk_config(Kind::pkm, 64, 5000, 4, 10), 8, DType::bf16, Device::cuda, &bytes);
  EXPECT_EQ(big.code(), StatusCode::unsupported);
  EXPECT_NE(big.message().find("4096"), std::string::npos) << big.message();
  EXPECT_EQ(bl::pkm_workspace_size(pk_config(Kind::peer, 4096, 8, 8, 10), 8, DType::bf16, Device::cuda, &bytes).code(),
            StatusCode::unsupported);
  EXPECT_EQ(bl::pkm_workspace_size(pk_config(Kind::pkm, 64, 8, 8, 10), 8, DType::f64, Device::cuda, &bytes).code(),
            StatusCode::unsupported);
}

// The public API on the GPU: forward with ids through validation and dispatch.
TEST(PkCuda, PublicApi) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const BaselineConfig c = pk_config(Kind::peer, 64, 16, 16, 100);
  const i64 T = 9, K = 100, H = 64;
  const PkProblem p = convert_pk(make_pk(c, T, DType::f64, test_seed()), DType::f32);
  const PkProblem ref = convert_pk(p, DType::f64);
  HostTensor want(DType::f64, {T, H}), want_ids(DType::i32, {T, K});
  ASSERT_TRUE(run_pk_cpu(ref, want, &want_ids).ok());
  DevicePk d(p);
  HostTensor y(DType::f32, {T, H}), ids(DType::i32, {T, K});
  y.poison();
  ids.poison();
  DeviceTensor dy(y), dids(ids);
  std::size_t bytes = 0;
  ASSERT_TRUE(bl::workspace_size(c, T, DType::f32, Device::cuda, &bytes).ok());
  DeviceWorkspace ws(bytes);
  const Status st = bl::forward(c, d.x.view(), d.params(), dy.view(), ws.ws(), nullptr, dids.view());
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_TRUE(synchronize(Device::cuda).ok());
  dy.download(y);
  dids.download(ids);
  compare(p, ref, y, ids, want, want_ids, false);
}

// Timing of the benchmark shapes at T = 1024 (opt-in: --gtest_also_run_disabled_tests
// --gtest_filter='PkCudaTiming.*'). Prints ms per forward (median of 10 after 2 warm-ups)
// and the table bytes the gather reads per ms. x, query and keys are random (they decide the
// routing); the tables are a byte pattern (their values do not change the time).
TEST(PkCudaTiming, DISABLED_BenchmarkShapes) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const i64 T = 1024, H = 1024;
  for (Kind kind : {Kind::pkm, Kind::peer}) {
    const i64 side = kind == Kind::pkm ? 444 : 320, N = side * side;
    const std::vector<i64> ks = kind == Kind::pkm ? std::vector<i64>{2500, 5000, 12500, 25000}
                                                  : std::vector<i64>{1250, 2500, 6250, 12500};
    BaselineConfig c = pk_config(kind, H, side, side, ks.back());
    PkProblem p;
    p.cfg = c;
    p.T = T;
    p.dtype = DType::bf16;
    std::mt19937_64 rng(test_seed());
    p.x = HostTensor(DType::bf16, {T, H});
    fill_normal(p.x, rng, 1.0);
    p.query = HostTensor(DType::bf16, {H, H});
    fill_normal(p.query, rng, 1.0 / 32);
    p.keys_row = HostTensor(DType::bf16, {side, H / 2});
    fill_normal(p.keys_row, rng, 1.0 / std::sqrt(H / 2.0));
    p.keys_col = HostTensor(DType::bf16, {side, H / 2});
    fill_normal(p.keys_col, rng, 1.0 / std::sqrt(H / 2.0));
    DevicePk d(p);
    const int tables = kind == Kind::pkm ? 1 : 2;
    void* table[2] = {nullptr, nullptr};
    for (int i = 0; i < tables; ++i) {
      ASSERT_TRUE(device_alloc(Device::cuda, N * H * 2, &table[i]).ok());
      ASSERT_TRUE(fill_bytes(table[i], Device::cuda, 0x3c, N * H * 2).ok());
    }
    BaselineParams params = d.params();
    if (kind == Kind::pkm) {
      params.values = make_view(table[0], DType::bf16, Device::cuda, {N, H});
    } else {
      params.expert_in = make_view(table[0], DType::bf16, Device::cuda, {N, H});
      params.expert_out = make_view(table[1], DType::bf16, Device::cuda, {N, H});
    }
    HostTensor y(DType::bf16, {T, H}), ids(DType::i32, {T, ks.back()}), gates(DType::f32, {T, ks.back()});
    for (i64 i = 0; i < gates.numel(); ++i) {
      ids.set(i, static_cast<double>(std::uniform_int_distribution<i64>(0, N - 1)(rng)));
      gates.set(i, 1.0 / static_cast<double>(ks.back()));
    }
    HostTensor ids_out(DType::i32, {T, ks.back()});
    DeviceTensor dy(y), dids_all(ids), dgates_all(gates), dout(ids_out);
    for (i64 K : ks) {
      c.top_k = K;
      std::size_t bytes = 0;
      ASSERT_TRUE(bl::pkm_workspace_size(c, T, DType::bf16, Device::cuda, &bytes).ok());
      DeviceWorkspace ws(bytes);
      const TensorView ids_view = make_view(dids_all.view().data, DType::i32, Device::cuda, {T, K});
      const TensorView gates_view = make_view(dgates_all.view().data, DType::f32, Device::cuda, {T, K});
      const TensorView out_view = make_view(dout.view().data, DType::i32, Device::cuda, {T, K});
      const double gbytes = static_cast<double>(T) * K * H * 2 * tables / 1e9;
      auto time = [&](const ForwardArgs& a) {
        std::vector<double> ms;
        const Status st = time_calls(Device::cuda, [&] { return bl::pkm_forward(a); }, 2, 10, &ms);
        EXPECT_TRUE(st.ok()) << st.message();
        std::sort(ms.begin(), ms.end());
        return ms.empty() ? 0.0 : ms[ms.size() / 2];
      };
      const ForwardArgs plain{&c, d.x.view(), &params, {}, {}, {}, dy.view(), ws.ws(), nullptr};
      const ForwardArgs with_ids{&c, d.x.view(), &params, {}, {}, out_view, dy.view(), ws.ws(), nullptr};
      const ForwardArgs routed{&c, d.x.view(), &params, ids_view, gates_view, {}, dy.view(), ws.ws(), nullptr};
      const double a = time(plain), b = time(with_ids), r = time(routed);
      std::printf("%-4s K=%6lld T=%lld: forward %8.3f ms (%5.2f TB/s of table rows), with expert_ids %8.3f ms, "
                  "routed (random ids) %8.3f ms (%5.2f TB/s); workspace %.1f MB\n",
                  kind == Kind::pkm ? "pkm" : "peer", static_cast<long long>(K), static_cast<long long>(T), a,
                  gbytes / a, b, r, gbytes / r, bytes / 1e6);
    }
    for (int i = 0; i < tables; ++i) device_free(Device::cuda, table[i]);
  }
}

}  // namespace
}  // namespace pkt
