// CUDA backward: workspace planning and the stage sequence. Everything the backward needs
// from the forward is recomputed from x and the routing (the router product and norm, the
// log-probabilities, the gates, the shared MLP's activations), so the caller keeps only the
// expert ids. No host synchronisation, no allocation, no atomics: graph-capturable and
// bitwise deterministic.
#include <algorithm>

#include "core/backend.hpp"
#include "core/workspace.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {


constexpr i64 kDenseTokens = 2048, kDenseExperts = 2048;  // chunk extents of the dense path

struct BackwardBuffers {
  GemmWorkspace gemm;
  void* wcat;           // [n, H] router weights side by side (n = Nr + Nc)
  double* partial;      // [2n] batch moments (training batchnorm)
  double* colsums;      // [2n] column means of d and d * lhat
  float *mean, *rstd;   // [n]
  float* logits;        // [T, n] logits, normalised in place (lhat)
  float* logp;          // [T, n]
  float* dlogp;         // [T, n] gradient w.r.t. logp, then lhat, then the logits
  void* dl;             // [T, n] that gradient in the storage dtype for the products
  i32* ids;             // [T, K]
  float *gates, *dg;    // [T, K]
  float *a, *dh;        // [T, K] gather path: per-task a = g act(h) and dh
  int* bad;             // [T] token has an id out of range
  ExpertsPath path;
  GroupSchedule by_expert;      // gather path: tasks sorted by expert
  SegmentScratch seg;           // active experts, sparse slots, split segments
  DenseBackwardBuffers dense;   // dense path
  float* dx;            // [T, H] fp32 accumulator
  void *u, *v, *dm;     // [T, I] shared MLP
};

BackwardBuffers carve_backward(Arena& a, const Config& cfg, i64 T, DType dt) {
  const auto n = static_cast<std::size_t>(cfg.grid_rows + cfg.grid_cols), t = static_cast<std::size_t>(T);
  const std::size_t es = dtype_size(dt), tk = t * static_cast<std::size_t>(cfg.top_k);
  const i64 N = cfg.num_experts(), H = cfg.hidden;
  BackwardBuffers b{};
  b.gemm = {a.take<char>(kLayerGemmBytes), kLayerGemmBytes};
  b.wcat = a.take<char>(n * static_cast<std::size_t>(H) * es);
  b.partial = a.take<double>(2 * n);
  b.colsums = a.take<double>(2 * n);
  b.mean = a.take<float>(n);
  b.rstd = a.take<float>(n);
  b.logits = a.take<float>(t * n);
  b.logp = a.take<float>(t * n);
  b.dlogp = a.take<float>(t * n);
  b.dl = dt == DType::f32 ? static_cast<void*>(b.dlogp) : a.take<char>(t * n * es);
  b.ids = a.take<i32>(tk);
  b.gates = a.take<float>(tk);
  b.dg = a.take<float>(tk);
  b.bad = a.take<int>(t);
  b.dx = a.take<float>(t * static_cast<std::size_t>(H));
  b.path = choose_path(cfg, T, dt);
  b.seg = carve_segment_scratch(a, N, b.path == ExpertsPath::gather ? T * cfg.top_k : 0, H);
  // The experts phase and the shared-MLP phase never overlap: they share memory.
  const std::size_t phase = a.mark();
  if (b.path == ExpertsPath::gather) {
    b.a = a.take<float>(tk);
    b.dh = a.take<float>(tk);
    b.by_expert = carve_group_schedule(a, T, cfg.top_k, N, T, 1);  // group = expert id
  } else {
    DenseBackwardBuffers& d = b.dense;
    d.schedule = carve_group_schedule(a, T, cfg.top_k, N, kDenseTokens, kDenseExperts);
    const auto chunk = static_cast<std::size_t>(d.schedule.token_chunk * d.schedule.expert_chunk) * es;
    d.s = a.take<char>(chunk);
    d.da = a.take<char>(chunk);
    d.pa = a.take<char>(chunk);
    d.pdh = a.take<char>(chunk);
    const auto rows = static_cast<std::size_t>(d.schedule.expert_chunk * H);
    d.gin = a.take<float>(rows);
    d.gout = a.take<float>(rows);
    d.gemm = b.gemm;
  }
  a.rewind(phase);
  const auto mlp = t * static_cast<std::size_t>(cfg.intermediate) * es;
  b.u = a.take<char>(mlp);
  b.v = a.take<char>(mlp);
  b.dm = a.take<char>(mlp);
  return b;
}

// The experts' backward on the chosen path: dgates, the experts' share of dx, and the
// expert rows (dense tables or sparse slots).
Status experts_backward(const Config& cfg, const TensorView& x, const Params& p, const TensorView& grad_y,
                        const Gradients& g, const SparseExpertGradients* sparse, const BackwardBuffers& b,
                        cudaStream_t s) {
  const i64 T = x.shape[0], K = cfg.top_k, N = cfg.num_experts();
  const DType dt = x.dtype;
  SparseRowsOut so{};
  if (sparse != nullptr)
    so = {sparse->ids.as<i32>(), sparse->count.as<i32>(), sparse->expert_in.data, sparse->expert_out.data,
          sparse_gradient_capacity(cfg, T)};
  const SparseRowsOut* sp = sparse != nullptr ? &so : nullptr;
  if (b.path == ExpertsPath::dense) {
    if (sp != nullptr) OMNIMOE_RETURN_IF_ERROR(experts_active_from_ids(b.ids, T * K, N, b.seg, so, s));
    DenseBackwardArgs d{&cfg,          T,      dt,     x.data,  grad_y.data,        p.expert_in.data,
                        p.expert_out.data, b.ids, b.gates, b.dg, b.bad,             b.dx,
                        g.expert_in.data,  g.expert_out.data, sp, &b.seg,          &b.dense};
    return experts_backward_dense(d, s);
  }
  ExpertsArgs e{&cfg, T, dt, x.data, p.expert_in.data, p.expert_out.data, b.ids, b.gates, nullptr};
  OMNIMOE_RETURN_IF_ERROR(experts_backward_tokens(e, grad_y.data, b.a, b.dg, b.dh, b.dx, b.bad, s));
  GroupSchedule by_expert = b.by_expert;
  OMNIMOE_RETURN_IF_ERROR(schedule_groups(b.ids, T, K, by_expert, s));
  OMNIMOE_RETURN_IF_ERROR(experts_active_list(N, by_expert.offsets, b.seg, sp, s));
  RowsArgs r{&cfg, dt, x.data, grad_y.data, by_expert.tasks, by_expert.offsets, b.a, b.dh, &b.seg,
             g.expert_in.data, g.expert_out.data, sp};
  return experts_backward_rows(r, s);
}

// C (+)= op(A) op(B), row-major, in one call.
Status mm(const BackwardBuffers& b, cudaStream_t s, bool ta, bool tb, i64 M, i64 N, i64 K, const void* A, i64 lda,
          const void* B, i64 ldb, void* C, i64 ldc, DType ab, DType c, float beta) {
  GemmArgs g;
  g.ta = ta;
  g.tb = tb;
  g.M = M;
  g.N = N;
  g.K = K;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.C = C;
  g.ldc = ldc;
  g.ab = ab;
  g.c = c;
  g.beta = beta;
  return gemm(g, b.gemm, s);
}

}  // namespace

Status backward_workspace_size(const Config& cfg, i64 tokens, DType dtype, std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_supported(cfg, dtype, tokens));
  Arena a;
  carve_backward(a, cfg, tokens, dtype);
  *bytes = a.used();
  return Status::Ok();
}

Status backward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const TensorView& expert_ids,
                const TensorView& grad_y, const Gradients& g, Workspace ws, void* stream,
                const SparseExpertGradients* sparse) {
  const DType dt = x.dtype;
  const i64 T = x.shape[0], H = cfg.hidden, I = cfg.intermediate, Nr = cfg.grid_rows;
  const i64 n = cfg.grid_rows + cfg.grid_cols;
  OMNIMOE_RETURN_IF_ERROR(check_supported(cfg, dt, T));
  const auto s = static_cast<cudaStream_t>(stream);
  Arena arena(ws.data, ws.bytes);
  BackwardBuffers b = carve_backward(arena, cfg, T, dt);
  if (!arena.fits()) return {StatusCode::internal, "cuda backward: workspace plan exceeds the queried size"};
  const std::size_t es = dtype_size(dt);

  // route, recomputed: logits, norm statistics (running ones untouched), log-probs, gates.
  OMNIMOE_CUDA_TRY(cudaMemcpyAsync(b.wcat, p.router_row.data, Nr * H * es, cudaMemcpyDeviceToDevice, s));
  OMNIMOE_CUDA_TRY(cudaMemcpyAsync(static_cast<char*>(b.wcat) + Nr * H * es, p.router_col.data,
                                   cfg.grid_cols * H * es, cudaMemcpyDeviceToDevice, s));
  OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, true, T, n, H, x.data, H, b.wcat, H, b.logits, n, dt, DType::f32, 0.f));
  if (mode == Mode::training && cfg.router_norm == RouterNorm::batchnorm)
    OMNIMOE_RETURN_IF_ERROR(route_chunk_moments(b.logits, T, n, b.partial, s));
  RouteStatsArgs st{&cfg, mode, T, T, b.partial, p.running_mean_row.as<float>(), p.running_var_row.as<float>(),
                    p.running_mean_col.as<float>(), p.running_var_col.as<float>(), b.mean, b.rstd};
  st.update_running = false;
  OMNIMOE_RETURN_IF_ERROR(route_stats(st, s));
  OMNIMOE_RETURN_IF_ERROR(route_log_probs(cfg, T, b.logits, b.mean, b.rstd, b.logp, s));
  OMNIMOE_RETURN_IF_ERROR(experts_import_ids(expert_ids, cfg.num_experts(), b.ids, s));
  OMNIMOE_RETURN_IF_ERROR(route_gates_of(cfg, T, b.logp, b.ids, b.gates, s));

  // experts: dgates, the experts' share of dx, each expert's rows once.
  OMNIMOE_CUDA_TRY(cudaMemsetAsync(b.dx, 0, static_cast<std::size_t>(T * H) * sizeof(float), s));
  OMNIMOE_RETURN_IF_ERROR(experts_backward(cfg, x, p, grad_y, g, sparse, b, s));

  // route backward: gates -> scores -> log_softmax -> norm -> router weights and dx.
  OMNIMOE_RETURN_IF_ERROR(route_scores_backward(cfg, T, b.ids, b.gates, b.dg, b.logp, b.dlogp, s));
  OMNIMOE_RETURN_IF_ERROR(route_norm_backward(cfg, mode, T, b.logits, b.rstd, b.dlogp, b.colsums, s));
  if (dt != DType::f32) OMNIMOE_RETURN_IF_ERROR(store_rows(dt, b.dlogp, T, n, nullptr, b.dl, s));
  OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, Nr, H, T, b.dl, n, x.data, H, g.router_row.data, H, dt, dt, 0.f));
  OMNIMOE_RETURN_IF_ERROR(
      mm(b, s, true, false, cfg.grid_cols, H, T, at(b.dl, Nr, dt), n, x.data, H, g.router_col.data, H, dt, dt, 0.f));
  OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, false, T, H, n, b.dl, n, b.wcat, H, b.dx, H, dt, DType::f32, 1.f));

  // shared_mlp: recompute u, v; dm = dy down; (du, m, dv); weight gradients; dx.
  if (cfg.has_shared_mlp()) {
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, true, T, I, H, x.data, H, p.gate.data, H, b.u, I, dt, dt, 0.f));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, true, T, I, H, x.data, H, p.up.data, H, b.v, I, dt, dt, 0.f));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, false, T, I, H, grad_y.data, H, p.down.data, I, b.dm, I, dt, dt, 0.f));
    OMNIMOE_RETURN_IF_ERROR(shared_mlp_swiglu_backward(dt, b.u, b.v, b.dm, T * I, s));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, H, I, T, grad_y.data, H, b.v, I, g.down.data, I, dt, dt, 0.f));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, I, H, T, b.u, I, x.data, H, g.gate.data, H, dt, dt, 0.f));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, I, H, T, b.dm, I, x.data, H, g.up.data, H, dt, dt, 0.f));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, false, T, H, I, b.u, I, p.gate.data, H, b.dx, H, dt, DType::f32, 1.f));
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, false, T, H, I, b.dm, I, p.up.data, H, b.dx, H, dt, DType::f32, 1.f));
  }
  return store_rows(dt, b.dx, T, H, b.bad, g.x.data, s);
}

}  // namespace omnimoe::cuda
