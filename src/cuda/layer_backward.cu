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
  float *gates, *a, *dg, *dh;  // [T, K]
  int* bad;             // [T] token has an id out of range
  GroupSchedule by_expert;
  float* dx;            // [T, H] fp32 accumulator
  void *u, *v, *dm;     // [T, I] shared MLP
};

BackwardBuffers carve_backward(Arena& a, const Config& cfg, i64 T, DType dt) {
  const auto n = static_cast<std::size_t>(cfg.grid_rows + cfg.grid_cols), t = static_cast<std::size_t>(T);
  const std::size_t es = dtype_size(dt), tk = t * static_cast<std::size_t>(cfg.top_k);
  const i64 N = cfg.num_experts();
  BackwardBuffers b{};
  b.gemm = {a.take<char>(kLayerGemmBytes), kLayerGemmBytes};
  b.wcat = a.take<char>(n * static_cast<std::size_t>(cfg.hidden) * es);
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
  b.a = a.take<float>(tk);
  b.dg = a.take<float>(tk);
  b.dh = a.take<float>(tk);
  b.bad = a.take<int>(t);
  GroupSchedule& s = b.by_expert;  // group = expert id
  s.token_chunk = T;
  s.expert_chunk = 1;
  s.n_tc = 1;
  s.n_ec = N;
  for (int i = 0; i < 2; ++i) {
    s.keys[i] = a.take<unsigned>(tk);
    s.vals[i] = a.take<i32>(tk);
  }
  s.offsets = a.take<i32>(static_cast<std::size_t>(N + 1));
  s.temp_bytes = schedule_temp_bytes(T * cfg.top_k, N);
  s.temp = a.take<char>(s.temp_bytes);
  b.dx = a.take<float>(t * static_cast<std::size_t>(cfg.hidden));
  const auto mlp = t * static_cast<std::size_t>(cfg.intermediate) * es;
  b.u = a.take<char>(mlp);
  b.v = a.take<char>(mlp);
  b.dm = a.take<char>(mlp);
  return b;
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
                const TensorView& grad_y, const Gradients& g, Workspace ws, void* stream) {
  const DType dt = x.dtype;
  const i64 T = x.shape[0], H = cfg.hidden, I = cfg.intermediate, K = cfg.top_k, Nr = cfg.grid_rows;
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

  // experts: token side (dx, per-task a / dgates / dh), then each expert's rows once.
  OMNIMOE_CUDA_TRY(cudaMemsetAsync(b.dx, 0, static_cast<std::size_t>(T * H) * sizeof(float), s));
  ExpertsArgs e{&cfg, T, dt, x.data, p.expert_in.data, p.expert_out.data, b.ids, b.gates, nullptr};
  OMNIMOE_RETURN_IF_ERROR(experts_backward_tokens(e, grad_y.data, b.a, b.dg, b.dh, b.dx, b.bad, s));
  OMNIMOE_RETURN_IF_ERROR(schedule_groups(b.ids, T, K, b.by_expert, s));
  OMNIMOE_RETURN_IF_ERROR(experts_backward_rows(cfg, dt, x.data, grad_y.data, b.by_expert.tasks,
                                                b.by_expert.offsets, b.a, b.dh, g.expert_in.data, g.expert_out.data,
                                                s));

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
