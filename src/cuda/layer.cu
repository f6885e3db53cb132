// CUDA backend entry points: workspace planning and the stage sequence of the forward.
// Nothing here synchronises with the host or allocates: every buffer is carved from the
// caller's workspace, so the forward can be captured in a CUDA graph.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "core/backend.hpp"
#include "core/workspace.hpp"
#include "cuda/cuda.cuh"
#include "cuda/gather_chunks.cuh"
#include "cuda/side_stream.cuh"

namespace omnimoe::cuda {
namespace {

// Token chunks bound the workspace: router logits and shared-MLP activations are produced
// and consumed chunk by chunk (peak memory is independent of T beyond 8 bytes per pair, 4 with the caller's i32 ids).
// When the router overlaps the shared MLP both sets of buffers live at once, so the logits
// get half the budget and the router's products their own, smaller cuBLASLt scratch.
constexpr std::size_t kLogitBytes = std::size_t{32} << 20;
constexpr std::size_t kOverlapLogitBytes = std::size_t{16} << 20;
constexpr std::size_t kRouteGemmBytes = std::size_t{2} << 20;
constexpr std::size_t kMlpBytes = std::size_t{32} << 20;

// The router runs on a side stream, beside the shared MLP on the caller's stream: the
// router is latency- and bandwidth-bound, the MLP's products tensor-core-bound, and neither
// reads the other's results. The experts stage waits for both.
bool overlapped(const Config& cfg) { return cfg.has_shared_mlp() && overlap_enabled(); }

struct Plan {
  i64 route_rows;  // tokens per router chunk
  i64 mlp_rows;    // tokens per shared-MLP chunk
  i64 chunks;      // router chunks
};

Plan plan_of(const Config& cfg, i64 T, DType dtype) {
  const i64 n = cfg.grid_rows + cfg.grid_cols;
  Plan p;
  const std::size_t logit_bytes = overlapped(cfg) ? kOverlapLogitBytes : kLogitBytes;
  p.route_rows = route_chunk_rows(static_cast<i64>(logit_bytes / (n * sizeof(float))), T);
  p.mlp_rows = cfg.intermediate > 0
                   ? std::clamp<i64>(static_cast<i64>(kMlpBytes / (2 * cfg.intermediate * dtype_size(dtype))), 1, T)
                   : T;
  p.chunks = (T + p.route_rows - 1) / p.route_rows;
  return p;
}

constexpr i64 kDenseTokens = 2048, kDenseExperts = 4096;  // chunk extents of the dense path
constexpr i64 kSortTasks = i64{1} << 20;  // tasks per sort of the product output's schedule

struct ForwardBuffers {
  GemmWorkspace gemm;        // cuBLASLt scratch of the shared MLP and the dense experts path
  GemmWorkspace route_gemm;  // the router's: its own when it overlaps the shared MLP, else `gemm`
  void* wcat;          // [Nr + Nc, H] router weights side by side: one product for both axes
  double* partial;     // [chunks, stat_blocks(route_rows), 2 (Nr + Nc)] block moments (training batchnorm)
  float *mean, *rstd;  // [Nr + Nc]
  i32* ids32;          // [T, K]: the routing as the experts read it; the caller's i32
                       // out.expert_ids themselves when the forward was given them (ids_in_place)
  float* gates32;      // [T, K]
  // Phases that never run at once share one region (route and shared_mlp do when
  // overlapped(): then the MLP's buffers follow the router's):
  float* logits;       // route: [route_rows, Nr + Nc]
  int* flags;          // route: [route_rows + 1] tokens left to the block top-K kernel, their count
  DenseBuffers dense;  // experts, dense path
  void *u, *v;         // shared_mlp: [mlp_rows, I]
};

// ids_in_place: the routing is written to (and read from) the caller's i32 expert ids, not
// a copy in the workspace (4 T K bytes: at K = 4096 and T = 1024 it had been 16 MB of the
// paper comparison's peak).
ForwardBuffers carve_forward(Arena& a, const Config& cfg, i64 T, DType dtype, bool ids_in_place) {
  const Plan p = plan_of(cfg, T, dtype);
  const auto n = static_cast<std::size_t>(cfg.grid_rows + cfg.grid_cols);
  const std::size_t es = dtype_size(dtype), tk = static_cast<std::size_t>(T * cfg.top_k);
  ForwardBuffers b{};
  b.gemm = {a.take<char>(kLayerGemmBytes), kLayerGemmBytes};
  b.route_gemm = overlapped(cfg) ? GemmWorkspace{a.take<char>(kRouteGemmBytes), kRouteGemmBytes} : b.gemm;
  b.wcat = a.take<char>(n * static_cast<std::size_t>(cfg.hidden) * es);
  b.partial = a.take<double>(static_cast<std::size_t>(p.chunks * stat_blocks(p.route_rows)) * 2 * n);
  b.mean = a.take<float>(n);
  b.rstd = a.take<float>(n);
  b.ids32 = ids_in_place ? nullptr : a.take<i32>(tk);
  b.gates32 = a.take<float>(tk);
  const std::size_t phase = a.mark();

  b.logits = a.take<float>(static_cast<std::size_t>(p.route_rows) * n);
  b.flags = a.take<int>(static_cast<std::size_t>(p.route_rows) + 1);
  const std::size_t route_end = a.mark();
  a.rewind(phase);

  if (choose_path(cfg, T, dtype, Pass::forward) == ExpertsPath::dense) {
    const i64 tc = std::min(T, kDenseTokens);
    const bool sparse = dense_output_sparse(cfg, dtype);  // read once: it may consult the environment
    if (sparse) {
      // No P, no [tokens, experts] scores and no fp32 rows: the scores at one token chunk's
      // tasks, from its own tile schedule (TaskScores); the output's sums stay in registers.
      // The expert chunk is the output's L2 working set per step (gather_chunk_rows).
      const i64 ec = gather_chunk_rows(cfg.hidden, es);
      b.dense.schedule = group_extents(tc, cfg.num_experts(), kDenseTokens, ec);
      b.dense.scores = carve_task_scores(a, tc, cfg.top_k, cfg.num_experts(), dtype);
    } else {
      // One token chunk is scheduled at a time, its tasks sorted by expert chunk in
      // sub-chunks of at most kSortTasks tasks: 4 bytes per task of the chunk for the sorted
      // array, the sort's own buffers (8 bytes per task and CUB's scratch) for a sub-chunk
      // only (at K = 4096 a 1024-token chunk's 4M tasks had held 64 MB of sort buffers).
      b.dense.schedule = group_extents(tc, cfg.num_experts(), kDenseTokens, kDenseExperts);
      const i64 sub = std::clamp<i64>(kSortTasks / std::max<i64>(cfg.top_k, 1), 1, tc);
      b.dense.sort = carve_token_chunk_schedule(a, tc, cfg.top_k, cfg.num_experts(), sub, kDenseExperts);
      carve_token_chunk_sort(a, b.dense.sort, cfg.top_k);
      const auto chunk = static_cast<std::size_t>(b.dense.schedule.token_chunk * b.dense.schedule.expert_chunk);
      b.dense.s = a.take<char>(chunk * es);
      b.dense.p = a.take<char>(chunk * es);
      b.dense.yacc = a.take<float>(static_cast<std::size_t>(b.dense.schedule.token_chunk * cfg.hidden));
    }
    b.dense.gemm = b.gemm;
  }
  a.rewind(overlapped(cfg) ? route_end : phase);

  const auto mlp = static_cast<std::size_t>(p.mlp_rows * cfg.intermediate) * es;
  b.u = a.take<char>(mlp);
  b.v = a.take<char>(mlp);
  return b;
}

// Runs the experts stage on the chosen path.
Status experts(const Config& cfg, const TensorView& x, const Params& p, const float* gates, const TensorView& y,
               const ForwardBuffers& b, cudaStream_t s) {
  const i64 T = x.shape[0];
  ExpertsArgs e{&cfg, T, x.dtype, x.data, p.expert_in.data, p.expert_out.data, b.ids32, gates, y.data};
  e.add = cfg.has_shared_mlp();  // y already holds the shared branch
  if (choose_path(cfg, T, x.dtype, Pass::forward) == ExpertsPath::dense) return experts_dense(e, b.dense, s);
  return experts_gather(e, s);
}



// Router logits of tokens [t0, t0 + rows): [rows, Nr + Nc] = x wcatᵀ.
Status router_product(const Config& cfg, DType dt, const TensorView& x, const ForwardBuffers& b, i64 t0, i64 rows,
                      cudaStream_t s) {
  GemmArgs g;
  g.tb = true;
  g.M = rows;
  g.N = cfg.grid_rows + cfg.grid_cols;
  g.K = cfg.hidden;
  g.A = at(x.data, t0 * cfg.hidden, dt);
  g.lda = cfg.hidden;
  g.B = b.wcat;
  g.ldb = cfg.hidden;
  g.C = b.logits;
  g.ldc = g.N;
  g.ab = dt;
  g.c = DType::f32;
  return gemm(g, b.route_gemm, s);
}

Status route(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out,
             const ForwardBuffers& b, cudaStream_t s) {
  const DType dt = x.dtype;
  const i64 T = x.shape[0], H = cfg.hidden, Nr = cfg.grid_rows, n = cfg.grid_rows + cfg.grid_cols;
  const Plan plan = plan_of(cfg, T, dt);
  const std::size_t es = dtype_size(dt);
  OMNIMOE_CUDA_TRY(cudaMemcpyAsync(b.wcat, p.router_row.data, Nr * H * es, cudaMemcpyDeviceToDevice, s));
  OMNIMOE_CUDA_TRY(cudaMemcpyAsync(static_cast<char*>(b.wcat) + Nr * H * es, p.router_col.data,
                                   cfg.grid_cols * H * es, cudaMemcpyDeviceToDevice, s));

  const bool batch_stats = mode == Mode::training && cfg.router_norm == RouterNorm::batchnorm;
  if (batch_stats)  // first pass over the chunks: their moments
    for (i64 k = 0; k < plan.chunks; ++k) {
      const i64 t0 = k * plan.route_rows, rows = std::min(plan.route_rows, T - t0);
      OMNIMOE_RETURN_IF_ERROR(router_product(cfg, dt, x, b, t0, rows, s));
      OMNIMOE_RETURN_IF_ERROR(
          route_chunk_moments(b.logits, rows, n, b.partial + k * stat_blocks(plan.route_rows) * 2 * n, s));
    }
  RouteStatsArgs st{&cfg, mode, T, plan.route_rows, b.partial, p.running_mean_row.as<float>(),
                    p.running_var_row.as<float>(), p.running_mean_col.as<float>(), p.running_var_col.as<float>(),
                    b.mean, b.rstd};
  OMNIMOE_RETURN_IF_ERROR(route_stats(st, s));

  const i64 K = cfg.top_k;
  const bool ids64 = out.expert_ids.dtype == DType::i64;
  for (i64 k = 0; k < plan.chunks; ++k) {
    const i64 t0 = k * plan.route_rows, rows = std::min(plan.route_rows, T - t0);
    if (!(batch_stats && plan.chunks == 1))  // one chunk: the logits of the first pass are still there
      OMNIMOE_RETURN_IF_ERROR(router_product(cfg, dt, x, b, t0, rows, s));
    RouteTopkArgs ta;
    ta.cfg = &cfg;
    ta.rows = rows;
    ta.logits = b.logits;
    ta.mean = b.mean;
    ta.rstd = b.rstd;
    ta.ids32 = b.ids32 + t0 * K;  // the same memory as ids_out when ids_in_place (each id written twice, alike)
    ta.gates32 = b.gates32 + t0 * K;
    ta.ids_out = const_cast<char*>(at(out.expert_ids.data, t0 * K, out.expert_ids.dtype));
    ta.ids_out_i64 = ids64;
    ta.scores_out = out.scores.defined() ? out.scores.as<float>() + t0 * K : nullptr;
    ta.gates_out = out.gates.defined() ? out.gates.as<float>() + t0 * K : nullptr;
    ta.fallback_flags = b.flags;
    ta.fallback_count = b.flags + plan.route_rows;
    OMNIMOE_RETURN_IF_ERROR(route_topk(ta, s));
  }
  return Status::Ok();
}

// y = (silu(x gateᵀ) * (x upᵀ)) downᵀ (swiglu_forward, chunk by chunk of tokens); the
// experts stage adds the routed branch afterwards.
Status shared_mlp(const Config& cfg, const TensorView& x, const Params& p, const TensorView& y,
                  const ForwardBuffers& b, cudaStream_t s) {
  const SwigluArgs a{x.dtype, x.shape[0], cfg.hidden, cfg.intermediate, x.data,  p.gate.data, p.up.data,
                     p.down.data, y.data, plan_of(cfg, x.shape[0], x.dtype).mlp_rows, b.u, b.v, b.gemm};
  return swiglu_forward(a, s);
}

}  // namespace

ExpertsPath choose_path(const Config& cfg, i64 T, DType dtype, Pass pass) {
  // The test override comes first so that the path suites (tests/cuda/CMakeLists.txt) force
  // every case, whatever schedule it configures.
  if (const char* env = std::getenv("OMNIMOE_EXPERTS_PATH")) {
    if (std::string(env) == "dense") return ExpertsPath::dense;
    if (std::string(env) == "gather") return ExpertsPath::gather;
  }
  switch (cfg.schedule) {
    case Schedule::expert_centric: return ExpertsPath::dense;
    case Schedule::token_centric: return ExpertsPath::gather;
    case Schedule::automatic: break;
  }
  // Forward: rates are round figures for an H100 (bf16 / f16; fp32 products run on CUDA
  // cores). The backward weighs the dense path by backward_ratio against the gather:
  //   - session i (H200, paper-k512): 3.5 / 2 (three T x N x H products against two, and
  //     the tile products of both sides), i.e. dense when N < 126 K in bf16 / f16;
  //   - session q (H100, each path forced, backward = training step - forward of the same
  //     path, docs/bench/paths_h100_2026-12-07q.csv): since session i the gather backward
  //     got the expert-side values, the dx walk and a faster router backward. Gather against
  //     dense at N = 102400: 1.76 / 3.84 ms at K = 1024, 3.03 / 4.16 at K = 2048, 5.39 / 4.95
  //     at K = 4096 (T = 1024), 19.85 / 14.29 at K = 4096, T = 4096. Linear in K between
  //     2048 and 4096 they cross near K = 3500 (N = 29 K) at T = 1024; the dense path gains
  //     with T (gather / dense 1.09 at T = 1024, 1.39 at T = 4096, K = 4096), which puts the
  //     crossover near K = 2200-2500 at T = 4096 (N = 41-46 K, estimated from that one
  //     point). The rule takes N = 41 K: ratio 220 / 41 = 5.4 in bf16 / f16, the gather at
  //     K <= 2048 (N = 102400), the dense path from K = 2514. f16 follows bf16 unmeasured;
  //     fp32 was not re-measured and keeps 3.5 / 2 (dense when N < 18 K).
  const double gather_s = 2.0 * T * cfg.top_k * cfg.hidden * dtype_size(dtype) / 2.5e12;
  const double dense_s = 4.0 * T * cfg.num_experts() * cfg.hidden / (dtype == DType::f32 ? 40e12 : 550e12);
  const double backward_ratio = pass == Pass::backward ? (dtype == DType::f32 ? 3.5 / 2.0 : 5.4) : 1.0;
  return dense_s * backward_ratio < gather_s ? ExpertsPath::dense : ExpertsPath::gather;
}

Schedule experts_schedule(const Config& cfg, i64 tokens, DType dtype, bool backward) {
  return choose_path(cfg, tokens, dtype, backward ? Pass::backward : Pass::forward) == ExpertsPath::dense ? Schedule::expert_centric : Schedule::token_centric;
}

Status check_supported(const Config& cfg, DType dtype, i64 T) {
  // Task indices t * K + k are 32-bit on the device.
  if (T * cfg.top_k >= (i64{1} << 31))
    return {StatusCode::unsupported, "device cuda: x has T = " + std::to_string(T) + " tokens and config.top_k = " +
                                         std::to_string(cfg.top_k) + ": T * top_k must be below 2^31"};
  if (dtype != DType::f32 && dtype != DType::bf16 && dtype != DType::f16)
    return {StatusCode::unsupported, std::string("device cuda: dtype ") + dtype_name(dtype) +
                                         " is not supported (f32, bf16, f16); f64 runs on the CPU"};
  if (std::max({cfg.grid_rows, cfg.grid_cols, cfg.top_k}) > kRouteMaxExtent)
    return {StatusCode::unsupported, "device cuda: grid_rows, grid_cols and top_k must be at most " +
                                         std::to_string(kRouteMaxExtent) + " for the CUDA router"};
  return experts_supported(cfg, dtype);
}

bool built() { return true; }

Status forward_workspace_size(const Config& cfg, i64 tokens, DType dtype, bool ids_i32, std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_supported(cfg, dtype, tokens));
  Arena a;
  carve_forward(a, cfg, tokens, dtype, ids_i32);
  *bytes = a.used();
  return Status::Ok();
}


Status forward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out,
               Workspace ws, void* stream) {
  OMNIMOE_RETURN_IF_ERROR(check_supported(cfg, x.dtype, x.shape[0]));
  const auto s = static_cast<cudaStream_t>(stream);
  const i64 T = x.shape[0];
  Arena arena(ws.data, ws.bytes);
  const bool ids_in_place = out.expert_ids.dtype == DType::i32;
  ForwardBuffers b = carve_forward(arena, cfg, T, x.dtype, ids_in_place);
  if (!arena.fits()) return {StatusCode::internal, "cuda forward: workspace plan exceeds the queried size"};
  if (ids_in_place) b.ids32 = out.expert_ids.as<i32>();

  SideStream side;
  bool forked = false;
  if (overlapped(cfg)) {
    OMNIMOE_RETURN_IF_ERROR(side_stream_for_current_device(&side));
    OMNIMOE_RETURN_IF_ERROR(fork_side(s, side, &forked));
  }
  if (forked) {
    const Status routed = route(cfg, mode, x, p, out, b, side.stream);
    const Status mlp = routed.ok() ? shared_mlp(cfg, x, p, out.y, b, s) : Status::Ok();
    OMNIMOE_RETURN_IF_ERROR(join_side(s, side));  // even after an error: a capture must not end unjoined
    OMNIMOE_RETURN_IF_ERROR(routed);
    OMNIMOE_RETURN_IF_ERROR(mlp);
  } else {
    OMNIMOE_RETURN_IF_ERROR(route(cfg, mode, x, p, out, b, s));
    if (cfg.has_shared_mlp()) OMNIMOE_RETURN_IF_ERROR(shared_mlp(cfg, x, p, out.y, b, s));
  }
  return experts(cfg, x, p, b.gates32, out.y, b, s);
}

Status forward_routed(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                      const TensorView& gates, const TensorView& y, Workspace ws, void* stream) {
  OMNIMOE_RETURN_IF_ERROR(check_supported(cfg, x.dtype, x.shape[0]));
  const auto s = static_cast<cudaStream_t>(stream);
  const i64 T = x.shape[0];
  Arena arena(ws.data, ws.bytes);
  const ForwardBuffers b = carve_forward(arena, cfg, T, x.dtype, /*ids_in_place=*/false);  // a checked copy
  if (!arena.fits()) return {StatusCode::internal, "cuda forward_routed: workspace plan exceeds the queried size"};
  OMNIMOE_RETURN_IF_ERROR(experts_import_ids(expert_ids, cfg.num_experts(), b.ids32, s));
  if (cfg.has_shared_mlp()) OMNIMOE_RETURN_IF_ERROR(shared_mlp(cfg, x, p, y, b, s));
  return experts(cfg, x, p, gates.as<const float>(), y, b, s);
}


}  // namespace omnimoe::cuda
