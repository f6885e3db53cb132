// CUDA backward: workspace planning and the stage sequence. Everything the backward needs
// from the forward is recomputed from x and the routing (the router product and norm, the
// gates, the shared MLP's activations), so the caller keeps only the
// expert ids. The router is recomputed per token chunk and the shared MLP per slice of its
// width, so their buffers do not grow with T; at large T the fp32 dx is written per token
// chunk too (BackwardPlan). No host synchronisation, no allocation, no
// float atomics on any output: graph-capturable and bitwise deterministic (the dense path's
// chunk cells are added to atomically only where one token names an expert twice, and the
// backward's gates for such duplicates are equal, so the sum is exact).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "core/backend.hpp"
#include "core/workspace.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {


constexpr i64 kDenseTokens = 2048, kDenseExperts = 2048;  // chunk extents of the dense path
// The router is recomputed and differentiated token chunk by token chunk, the shared MLP
// slice by slice of its width: both bounded by these budgets instead of growing with T.
constexpr std::size_t kRouteBytes = std::size_t{24} << 20;
constexpr std::size_t kMlpBytes = std::size_t{24} << 20;
constexpr std::size_t kMlpWeightsBytes = std::size_t{48} << 20;
// dx in fp32 over all T tokens is the one buffer that grows with T times H (64 MiB at
// T = 16384, H = 1024: issue 5's whole budget). Beyond kDxBytes the gather path writes dx
// one token chunk of at most kDxChunkBytes at a time ("chunked", below).
constexpr std::size_t kDxBytes = std::size_t{16} << 20;
constexpr std::size_t kDxChunkBytes = std::size_t{16} << 20;
// Chunked: the MLP's weight pass over all T runs first and shares the whole workspace but
// cuBLASLt's scratch, so its slices may be wider than kMlpBytes allows (512 columns at
// T = 16384 in bf16: its weight-gradient products, 512 x H over K = T, need split-K, and at
// 256 columns they ran at ~60% of the tensor-core rate).

// Whole: dx [T, H] in fp32; the token kernel writes it, the router's and the shared MLP's
// products add to it (the MLP slice by slice of its width, each slice's weight gradients
// written once). Chunked: the token kernel runs over all T without dx (a, dgates, dh), the
// expert rows follow; the MLP's weight gradients come from width slices over all T; then
// per token chunk dx = the experts' share (experts_backward_dx, from dh) + the router's +
// the MLP's, recomputing u, v and dm of the chunk at full width: three more products of the
// MLP's eleven, the price of not keeping a [T, H] or [3 I, H] fp32 accumulator.
struct BackwardPlan {
  i64 route_rows, route_chunks;  // router token chunks
  i64 mlp_cols;                  // shared-MLP width slice over all T
  i64 dx_rows;                   // tokens per dx chunk: T (whole), else a multiple of route_rows
  i64 mlp_chunk_cols;            // chunked: width slice of the MLP's recompute for one dx chunk
  ExpertsPath path;               // the experts' path (choose_path, Pass::backward)
  bool chunked = false;
  bool budgets_overridden = false;  // OMNIMOE_CHUNK_BYTES set: backward_plan keeps the slices
};

// OMNIMOE_CHUNK_BYTES overrides every budget (tests use a tiny one to exercise many chunks).
// The budgets' plan; backward_plan (below carve_backward) then widens the MLP's slices.
BackwardPlan base_plan(const Config& cfg, i64 T, DType dt) {
  const i64 n = cfg.grid_rows + cfg.grid_cols, es = static_cast<i64>(dtype_size(dt)), H = cfg.hidden;
  const char* env = std::getenv("OMNIMOE_CHUNK_BYTES");
  i64 route_bytes = static_cast<i64>(kRouteBytes), mlp_bytes = static_cast<i64>(kMlpBytes);
  i64 dx_bytes = static_cast<i64>(kDxBytes), dx_chunk_bytes = static_cast<i64>(kDxChunkBytes);
  i64 weights_bytes = static_cast<i64>(kMlpWeightsBytes);
  if (env != nullptr)
    route_bytes = mlp_bytes = dx_bytes = dx_chunk_bytes = weights_bytes = std::max(1L, std::atol(env));
  BackwardPlan p;
  p.budgets_overridden = env != nullptr;
  p.path = choose_path(cfg, T, dt, Pass::backward);
  // The experts' dx can come in chunks on the gather path only: the dense path's products
  // add to dx over expert chunks, token chunk by token chunk. And only where dx outweighs
  // the per-pair state (H fp32 values against 32 bytes per pair, issue 5's budget: K < H / 8):
  // the chunks' dx pass re-reads the T K chosen rows of w_in, which at the paper family's
  // K = 512 cost more than the whole step's MLP (paper-k512-t16384, H200: 35.1 -> 40.5 ms
  // chunked, for 306 -> 275 MB, already within its goal of 320).
  // (Under OMNIMOE_CHUNK_BYTES every gather case is chunked, so the tests reach the chunks.)
  p.chunked = T * H * 4 > dx_bytes && (env != nullptr || H * 4 > 32 * cfg.top_k) &&
              p.path == ExpertsPath::gather;
  // logits and dlogp in fp32, plus dlogp in the storage dtype for the weight products (for
  // f32 that is dlogp itself).
  i64 route_rows = route_bytes / (n * (8 + (dt == DType::f32 ? 0 : es)));
  // At least one statistics row block, so the router chunks cut the forward's blocks.
  const i64 dx_chunk = std::max<i64>(dx_chunk_bytes / (H * 4), env != nullptr ? 1 : kStatBlockRows);
  if (p.chunked) route_rows = std::min(route_rows, dx_chunk);  // whole router chunks per dx chunk
  p.route_rows = route_chunk_rows(route_rows, T);
  p.route_chunks = (T + p.route_rows - 1) / p.route_rows;
  p.dx_rows = p.chunked ? std::min(T, std::max<i64>(dx_chunk / p.route_rows, 1) * p.route_rows) : T;
  const auto width = [&](i64 bytes, i64 rows, i64 at_least) {
    const i64 cols = std::max<i64>(bytes / (3 * rows * es), env != nullptr ? 1 : at_least);
    return std::clamp<i64>(cols >= 64 ? cols / 8 * 8 : cols, 1, std::max<i64>(cfg.intermediate, 1));
  };
  // At least 1024 columns where a slice adds to dx (unless the budget is overridden):
  // thinner slices re-read and re-write the fp32 dx once per slice, which costs more than
  // their memory saves. The chunked mode's slices over all T write weight gradients only.
  p.mlp_cols = p.chunked ? width(weights_bytes, T, 8) : width(mlp_bytes, T, 1024);
  p.mlp_chunk_cols = p.chunked ? width(mlp_bytes, p.dx_rows, 1024) : 0;
  return p;
}

struct BackwardBuffers {
  GemmWorkspace gemm;
  BackwardPlan plan;
  void* wcat;           // [n, H] router weights side by side (n = Nr + Nc)
  double* partial;      // [route_chunks, stat_blocks(route_rows), 2n] block moments (training batchnorm)
  double* sums;         // [route_chunks, stat_blocks(route_rows), 2n] column sums of d and d * lhat
  double* means;        // [2n] their means over all T
  float *mean, *rstd;   // [n]
  float* gw;            // [n, H] fp32 router weight gradients, summed over token chunks
  i32* ids;             // [T, K]
  float *gates, *dg;    // [T, K]
  int* bad;             // [T] token has an id out of range
  float* dx;            // [plan.dx_rows, H] fp32 accumulator: all T, or one token chunk
  // Phases that run one after the other share one region:
  float* logits;        // route: [route_rows, n] logits, normalised in place (lhat)
  float* dlogp;         // route: [route_rows, n] gradient w.r.t. logp, then lhat, then the logits
  void* dl;             // route: [route_rows, n] that gradient in the storage dtype
  SegmentScratch seg;   // experts: active experts, sparse slots, split segments
  float *a, *dh;        // experts, gather path: [T, K] a = g act(h) and dh (in by_expert's
                        // keys; chunked: dh in its own buffer, read per dx chunk later)
  GroupSchedule by_expert;     // experts, gather path: tasks sorted by expert
  DenseBackwardBuffers dense;  // experts, dense path
  void *u, *v, *dm;     // shared_mlp: [T, mlp_cols] slices (chunked: [dx_rows, mlp_chunk_cols])
  void *wu, *wv, *wdm;  // chunked: the weight pass's [T, mlp_cols] slices, over everything else
};

BackwardBuffers carve_backward(Arena& a, const Config& cfg, i64 T, DType dt, const BackwardPlan& plan) {
  const auto n = static_cast<std::size_t>(cfg.grid_rows + cfg.grid_cols), t = static_cast<std::size_t>(T);
  const std::size_t es = dtype_size(dt), tk = t * static_cast<std::size_t>(cfg.top_k);
  const i64 N = cfg.num_experts(), H = cfg.hidden;
  BackwardBuffers b{};
  b.plan = plan;
  const auto chunks = static_cast<std::size_t>(b.plan.route_chunks * stat_blocks(b.plan.route_rows));
  b.gemm = {a.take<char>(kLayerGemmBytes), kLayerGemmBytes};
  if (b.plan.chunked) {  // the weight pass runs before anything below is written
    const std::size_t first = a.mark(), w = static_cast<std::size_t>(T * b.plan.mlp_cols) * es;
    b.wu = a.take<char>(w);
    b.wv = a.take<char>(w);
    b.wdm = a.take<char>(w);
    a.rewind(first);
  }
  b.wcat = a.take<char>(n * static_cast<std::size_t>(H) * es);
  b.partial = a.take<double>(chunks * 2 * n);
  b.sums = a.take<double>(chunks * 2 * n);
  b.means = a.take<double>(2 * n);
  b.mean = a.take<float>(n);
  b.rstd = a.take<float>(n);
  b.gw = a.take<float>(n * static_cast<std::size_t>(H));
  b.ids = a.take<i32>(tk);
  b.gates = a.take<float>(tk);
  b.dg = a.take<float>(tk);
  b.bad = a.take<int>(t);
  if (!b.plan.chunked) b.dx = a.take<float>(t * static_cast<std::size_t>(H));
  float* dh_kept = b.plan.chunked ? a.take<float>(tk) : nullptr;  // outlives the experts phase
  const std::size_t phase = a.mark();
  // Chunked: the dx chunk lives beside the router's and the MLP's buffers (all used in the
  // chunk loop); the experts phase, over before the loop, shares its memory too.
  if (b.plan.chunked) b.dx = a.take<float>(static_cast<std::size_t>(b.plan.dx_rows * H));
  const std::size_t loop = a.mark();

  const auto rn = static_cast<std::size_t>(b.plan.route_rows) * n;
  b.logits = a.take<float>(rn);
  b.dlogp = a.take<float>(rn);
  b.dl = dt == DType::f32 ? static_cast<void*>(b.dlogp) : a.take<char>(rn * es);
  const std::size_t route_end = a.mark();
  a.rewind(loop);

  const auto mlp = static_cast<std::size_t>(b.plan.chunked ? b.plan.dx_rows * b.plan.mlp_chunk_cols
                                                            : T * b.plan.mlp_cols) * es;
  b.u = a.take<char>(mlp);
  b.v = a.take<char>(mlp);
  b.dm = a.take<char>(mlp);
  const std::size_t room_end = std::max(route_end, a.mark());
  a.rewind(phase);

  // The experts phase: the segment scratch (N + 1 entries four times: 16 MB at N = 2^20) is
  // only used here, so it shares the region with the router's and the MLP's buffers. Its
  // partial rows (split hot segments), carved last, get what the larger of those two phases
  // leaves, between 2 and 16 MB: at N = 2^20 the (N + 1)-entry arrays nearly fill that
  // room, and 16 MB of partial rows on top (for segments that at these sizes average well
  // under one task) had set the step's workspace (T = 4096: 75 MB against issue 5's goal
  // of 66); at N <= 65536 the budget stays 16 MB.
  b.seg = carve_segment_scratch(a, N);
  if (b.plan.path == ExpertsPath::gather) {
    b.by_expert = carve_group_schedule(a, T, cfg.top_k, N, T, 1);  // group = expert id
    // a and dh live in the sort's two key buffers: the sort runs first, and once the offsets
    // are found the keys are dead (the sorted tasks stay in one of the value buffers). That
    // saves 8 bytes per pair (paper-k512-t16384: 369 -> 305 MiB, within issue 5's goal).
    static_assert(sizeof(unsigned) == sizeof(float));
    b.a = reinterpret_cast<float*>(b.by_expert.keys[0]);
    b.dh = b.plan.chunked ? dh_kept : reinterpret_cast<float*>(b.by_expert.keys[1]);
  } else {
    DenseBackwardBuffers& d = b.dense;
    d.schedule = carve_token_chunk_schedule(a, T, cfg.top_k, N, kDenseTokens, kDenseExperts);
    const auto chunk = static_cast<std::size_t>(d.schedule.token_chunk * d.schedule.expert_chunk) * es;
    // Task values where the forward adds its outputs at the chosen cells (the same rule);
    // the per-task values stay for the groups. Three scratch sets follow one another in
    // time and share one region: the schedule's sort buffers (used by the schedule only),
    // the task scores' (before the groups), then A, DH and the row accumulators.
    d.task_values = dense_output_sparse(cfg, dt);
    if (d.task_values) {
      d.va = a.take<char>(tk * es);
      d.vdh = a.take<char>(tk * es);
    }
    const std::size_t before = a.mark();
    carve_token_chunk_sort(a, d.schedule, cfg.top_k);
    std::size_t scratch_end = a.mark();
    a.rewind(before);
    if (d.task_values) {
      d.scores = carve_task_scores(a, d.schedule.token_chunk, cfg.top_k, N, dt);
      d.task_da = a.take<char>(static_cast<std::size_t>(d.schedule.token_chunk * cfg.top_k) * es);
      scratch_end = std::max(scratch_end, a.mark());
      a.rewind(before);
    } else {
      d.s = a.take<char>(chunk);
      d.da = a.take<char>(chunk);
    }
    for (int q = 0; q < 2; ++q) {
      d.pa[q] = a.take<char>(chunk);
      d.pdh[q] = a.take<char>(chunk);
    }
    const auto rows = static_cast<std::size_t>(d.schedule.expert_chunk * H);
    d.gin = a.take<float>(rows);
    d.gout = a.take<float>(rows);
    d.gemm = b.gemm;
    a.skip_to(scratch_end);  // what follows starts past all three
  }
  const i64 tasks = b.plan.path == ExpertsPath::gather ? T * cfg.top_k : 0;
  carve_segment_partials(a, b.seg, tasks, H, room_end > a.mark() ? room_end - a.mark() : 0);
  a.rewind(phase);
  return b;
}

// The MLP's slices as wide as issue 5's memory goal for the step (64 MiB + 32 bytes per
// (token, expert) pair beyond the parameters, their gradients, input and output) allows:
// fewer slices than the budgets give, each of whole 128-column tiles. Every slice that
// adds to dx runs two dx products whose epilogues read and write the fp32 dx (~11 µs each
// at 4096 tokens, H = 1024), plus the SwiGLU backward's and the products' fixed costs.
// Measured (H100, session v, training step; docs/bench/ab_mlp_widen_h100_2026-12-07v.csv):
// lm-64x64-t4096 -26 to -34 µs (4 -> 3 slices, three A/Bs), lm-256x256-t4096 -11 to -20
// (four); in the chunked mode the dx chunks' slices (4 -> 3 a chunk) -84 and -166 µs at
// lm-64x64-t16384, -118 and -142 at lm-256x256-t16384 (two A/Bs of this code; single A/Bs
// at T = 16384 move by about ±50 µs). The chunked weight pass stays at the budget's width:
// its 640-column slices (7 instead of 8 of 512) read +31 and +43 µs at
// lm-1024x1024-t16384, within that noise but no gain either. The
// workspace of each candidate is carved to check it (host arithmetic only). Not under
// OMNIMOE_CHUNK_BYTES, whose tiny budgets the tests use to reach many slices.
BackwardPlan backward_plan(const Config& cfg, i64 T, DType dt) {
  BackwardPlan p = base_plan(cfg, T, dt);
  const i64 I = cfg.intermediate;
  if (!cfg.has_shared_mlp() || p.budgets_overridden) return p;
  const auto goal = (std::size_t{64} << 20) + std::size_t{32} * static_cast<std::size_t>(T * cfg.top_k);
  const auto fits = [&](const BackwardPlan& q) {
    Arena a;
    carve_backward(a, cfg, T, dt, q);
    return a.used() <= goal;
  };
  // The widest of 1, 2, .. slices that fits, fewer than the budgets' (k < slices makes each
  // candidate wider than their width). Widths are whole 128-column tiles (the last slice
  // takes the rest): at T = 4096 three slices of 1408, 1408, 1280 columns are 32 tile
  // columns, as many as I = 4096 has; three of 1368 would be 33.
  const auto widen = [&](i64 BackwardPlan::*cols) {
    const i64 slices = (I + p.*cols - 1) / p.*cols;
    for (i64 k = 1; k < slices; ++k) {
      BackwardPlan q = p;
      q.*cols = std::min(I, ((I + k - 1) / k + 127) / 128 * 128);
      if (fits(q)) {
        p = q;
        return;
      }
    }
  };
  widen(p.chunked ? &BackwardPlan::mlp_chunk_cols : &BackwardPlan::mlp_cols);
  return p;
}

// The gather path's task values (a, dg, dh per task) from the expert side (RowsArgs::values:
// each chosen expert's rows read once, by the warp that sums its gradient rows) where an
// expert has at least kValueTasks tasks on average; else from the token side (the token
// kernel reads both rows of every task, then the rows pass reads x and dy of every task).
// Both give bitwise the same gradients (dx too, except where the expert side's dx walks
// w_in chunk by chunk: experts_backward_dx, another order of adds). Measured (H100, session o, training step, ms, token
// side -> expert side; docs/bench/threshold_values_h100_2026-12-07o.txt): paper-k512-t1024
// (5 tasks per expert) 2.35 -> 1.99, paper-k512-t2048 (10) 4.10 -> 3.35, lm-64x64-t4096
// (16) 1.157 -> 1.127, lm-256x256-t16384 (4) 6.52 -> 6.19, lm-256x256-t4096 (1) 1.447 ->
// 1.417; mixed at 4 (lm-64x64-t1024), ties at 0.25 (lm-256x256-t1024 0.600 both,
// lm-1024x1024-t16384 10.46 -> 10.51): the expert side from one task per expert on.
// (Session n's loop, ~700 instructions a task, lost below 20.) OMNIMOE_BACKWARD_VALUES =
// experts | tokens forces one side.
constexpr i64 kValueTasks = 1;
bool expert_side_values(const Config& cfg, i64 T) {
  if (const char* env = std::getenv("OMNIMOE_BACKWARD_VALUES")) {
    if (std::string(env) == "experts") return true;
    if (std::string(env) == "tokens") return false;
  }
  return T * cfg.top_k >= kValueTasks * cfg.num_experts();
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
  if (b.plan.path == ExpertsPath::dense) {
    if (sp != nullptr) OMNIMOE_RETURN_IF_ERROR(experts_active_from_ids(b.ids, T * K, N, b.seg, so, s));
    DenseBackwardArgs d{&cfg,          T,      dt,     x.data,  grad_y.data,        p.expert_in.data,
                        p.expert_out.data, b.ids, b.gates, b.dg, b.bad,             b.dx,
                        g.expert_in.data,  g.expert_out.data, sp, &b.seg,          &b.dense};
    return experts_backward_dense(d, s);
  }
  // The sort first: the token kernel then writes a and dh over its dead keys (carve_backward).
  GroupSchedule by_expert = b.by_expert;
  OMNIMOE_RETURN_IF_ERROR(schedule_groups(b.ids, T, K, by_expert, s));
  OMNIMOE_RETURN_IF_ERROR(experts_active_list(N, by_expert.offsets, b.seg, sp, s));
  float* dx = b.plan.chunked ? nullptr : b.dx;  // chunked: experts_backward_dx per dx chunk
  RowsArgs r{&cfg, dt, x.data, grad_y.data, by_expert.tasks, by_expert.offsets, b.a, b.dh, &b.seg,
             g.expert_in.data, g.expert_out.data, sp};
  r.w_in = p.expert_in.data;
  r.w_out = p.expert_out.data;
  r.gates = b.gates;
  r.dg_out = b.dg;
  r.dh_out = b.dh;
  r.values = expert_side_values(cfg, T) && experts_rows_values_possible(r);
  if (r.values) {  // the expert rows' pass computes dg and dh; dx from dh after it
    OMNIMOE_RETURN_IF_ERROR(experts_flag_bad_ids(b.ids, T, K, b.dg, b.dh, b.bad, s));
    OMNIMOE_RETURN_IF_ERROR(experts_backward_rows(r, s));
    if (dx == nullptr) return Status::Ok();
    return experts_backward_dx(cfg, dt, T, p.expert_in.data, b.ids, b.dh, dx, s);
  }
  ExpertsArgs e{&cfg, T, dt, x.data, p.expert_in.data, p.expert_out.data, b.ids, b.gates, nullptr};
  OMNIMOE_RETURN_IF_ERROR(experts_backward_tokens(e, grad_y.data, b.a, b.dg, b.dh, dx, b.bad, s));
  return experts_backward_rows(r, s);
}

// C = op(A) op(B) + beta C, row-major, in one call.
Status mm(const BackwardBuffers& b, cudaStream_t s, bool ta, bool tb, i64 M, i64 N, i64 K, const void* A, i64 lda,
          const void* B, i64 ldb, void* C, i64 ldc, DType ab, DType c, float beta) {
  return gemm(gemm_args(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, ab, c, beta), b.gemm, s);
}

// The shared MLP backward's gate and up sides as strided-batch products where the caller's
// tensors allow (8 -> 6 products a slice, each with twice the tiles: the weight gradients,
// w x H over K = T, fill a quarter of an H100's SMs at w = 1024 alone): u and v recomputed
// in one product (x against gate and up), the gate and up weight gradients in one (du and
// dv against x). Batch slot 0 is whichever caller tensor lies first in memory, since strides
// must be >= 0; the three slice buffers take the roles that make the slice-side strides
// positive too. A gap must be whole 16-byte units (batch_gap, gemm.cuh, says why) and the
// gradients' gap at least one tensor (batches writing overlapping memory would race);
// otherwise that side stays two products. The forward's twin of this choice is in
// swiglu_forward (shared_mlp.cu).
struct MlpBatches {
  void *u, *v, *dm;                   // slice buffers: gate's product (then du), up's (then m), dy down (then dv)
  bool uv = false, grads = false;     // which sides run as one batched product
  i64 params_gap = 0, grads_gap = 0;  // |up - gate| of the parameters / their gradients, elements
  i64 uv_gap = 0, grads_in_gap = 0;   // the slice buffers' strides of the two batches, elements
  bool gate_first = true, grad_gate_first = true;  // which caller tensor is batch slot 0
};

MlpBatches mlp_batches(const Params& p, const Gradients& g, bool weights, i64 tensor_bytes, void* b0, void* b1,
                       void* b2) {
  MlpBatches m;
  const BatchGap gp = batch_gap(p.gate.data, p.up.data), gg = batch_gap(g.gate.data, g.up.data);
  m.gate_first = gp.a_first;
  m.grad_gate_first = gg.a_first;
  const i64 es = static_cast<i64>(dtype_size(p.gate.dtype));
  m.params_gap = gp.bytes / es;
  m.grads_gap = gg.bytes / es;
  const bool params_ok = gp.whole16();
  const bool grads_ok = weights && gg.whole16() && gg.bytes >= tensor_bytes;
  // Every assignment of the three buffers to the roles; the batch's slot 1 must lie after
  // slot 0 (batch_after).
  void* buf[3] = {b0, b1, b2};
  int best = -1;
  const int perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
  for (const auto& q : perms) {
    void *u = buf[q[0]], *v = buf[q[1]], *dm = buf[q[2]];
    const bool uv = params_ok && (m.gate_first ? batch_after(u, v) : batch_after(v, u));
    const bool grads = grads_ok && (m.grad_gate_first ? batch_after(u, dm) : batch_after(dm, u));
    const int score = 2 * uv + grads;  // the recompute's products are the larger
    if (score > best) {
      best = score;
      m.u = u;
      m.v = v;
      m.dm = dm;
      m.uv = uv;
      m.grads = grads;
    }
  }
  m.uv_gap = batch_gap(m.u, m.v).bytes / es;
  m.grads_in_gap = batch_gap(m.u, m.dm).bytes / es;
  return m;
}

}  // namespace

Status backward_workspace_size(const Config& cfg, i64 tokens, DType dtype, std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_supported(cfg, dtype, tokens));
  Arena a;
  carve_backward(a, cfg, tokens, dtype, backward_plan(cfg, tokens, dtype));
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
  BackwardBuffers b = carve_backward(arena, cfg, T, dt, backward_plan(cfg, T, dt));
  if (!arena.fits()) return {StatusCode::internal, "cuda backward: workspace plan exceeds the queried size"};
  const std::size_t es = dtype_size(dt);

  const BackwardPlan& plan = b.plan;
  const i64 K = cfg.top_k, R = plan.route_rows;
  const bool batch_stats = mode == Mode::training && cfg.router_norm == RouterNorm::batchnorm;
  // Router logits of tokens [t0, t0 + rows) into b.logits.
  auto router_logits = [&](i64 t0, i64 rows) {
    return mm(b, s, false, true, rows, n, H, at(x.data, t0 * H, dt), H, b.wcat, H, b.logits, n, dt, DType::f32, 0.f);
  };
  // ... and, normalised in place, the gradient w.r.t. them up to the norm, from the gates'.
  auto route_chunk_grad = [&](i64 t0, i64 rows) -> Status {
    OMNIMOE_RETURN_IF_ERROR(router_logits(t0, rows));
    return route_scores_backward(cfg, rows, b.logits, b.mean, b.rstd, b.ids + t0 * K, b.gates + t0 * K,
                                 b.dg + t0 * K, b.dlogp, s);
  };

  // The shared MLP over tokens [t0, t0 + rows), slice by slice of width w: recompute u, v;
  // dm = dy down; (du, m, dv); with `weights` (rows = T) the slice's weight-gradient rows /
  // columns, each written once; with dx_rows its share of dx (tokens t0.. of dx_rows). u, v
  // and dm hold [rows, width] each.
  auto mlp_slices = [&](i64 t0, i64 rows, i64 width, bool weights, float* dx_rows, void* b0, void* b1,
                        void* b2) -> Status {
    const MlpBatches m = mlp_batches(p, g, weights, I * H * static_cast<i64>(es), b0, b1, b2);
    void *u = m.u, *v = m.v, *dm = m.dm;
    const char* xc = at(x.data, t0 * H, dt);
    const char* dyc = at(grad_y.data, t0 * H, dt);
    for (i64 i0 = 0; cfg.has_shared_mlp() && i0 < I; i0 += width) {
      const i64 w = std::min(width, I - i0);
      const char* gate = at(p.gate.data, i0 * H, dt);
      const char* up = at(p.up.data, i0 * H, dt);
      if (m.uv) {  // [u, v] = x [gate, up]ᵀ; slot 0 is the tensor first in memory
        const GemmArgs r = gemm_args(false, true, rows, w, H, xc, H, m.gate_first ? gate : up, H, m.gate_first ? u : v,
                                     w, dt, dt, 0.f);
        OMNIMOE_RETURN_IF_ERROR(gemm(batch2(r, 0, m.params_gap, m.uv_gap), b.gemm, s));
      } else {
        OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, true, rows, w, H, xc, H, gate, H, u, w, dt, dt, 0.f));
        OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, true, rows, w, H, xc, H, up, H, v, w, dt, dt, 0.f));
      }
      OMNIMOE_RETURN_IF_ERROR(
          mm(b, s, false, false, rows, w, H, dyc, H, at(p.down.data, i0, dt), I, dm, w, dt, dt, 0.f));
      // m (in v) only where the weight products read it: down's gradient.
      OMNIMOE_RETURN_IF_ERROR(shared_mlp_swiglu_backward(dt, u, v, dm, rows * w, weights, s));
      if (weights) {
        OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, H, w, rows, dyc, H, v, w,
                                   const_cast<char*>(at(g.down.data, i0, dt)), I, dt, dt, 0.f));
        char* ggate = const_cast<char*>(at(g.gate.data, i0 * H, dt));
        char* gup = const_cast<char*>(at(g.up.data, i0 * H, dt));
        if (m.grads) {  // [dgate, dup] = [du, dv]ᵀ x; slot 0 is the gradient first in memory
          const GemmArgs r = gemm_args(true, false, w, H, rows, m.grad_gate_first ? u : dm, w, xc, H,
                                       m.grad_gate_first ? ggate : gup, H, dt, dt, 0.f);
          OMNIMOE_RETURN_IF_ERROR(gemm(batch2(r, m.grads_in_gap, 0, m.grads_gap), b.gemm, s));
        } else {
          OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, w, H, rows, u, w, xc, H, ggate, H, dt, dt, 0.f));
          OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, w, H, rows, dm, w, xc, H, gup, H, dt, dt, 0.f));
        }
      }
      if (dx_rows != nullptr) {
        OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, false, rows, H, w, u, w, gate, H, dx_rows, H, dt, DType::f32, 1.f));
        OMNIMOE_RETURN_IF_ERROR(mm(b, s, false, false, rows, H, w, dm, w, up, H, dx_rows, H, dt, DType::f32, 1.f));
      }
    }
    return Status::Ok();
  };

  // Chunked: the MLP's weight pass first, its slices over buffers that later phases reuse.
  if (plan.chunked) OMNIMOE_RETURN_IF_ERROR(mlp_slices(0, T, plan.mlp_cols, true, nullptr, b.wu, b.wv, b.wdm));

  // route, recomputed: norm statistics (running ones untouched), then per chunk the gates.
  OMNIMOE_CUDA_TRY(cudaMemcpyAsync(b.wcat, p.router_row.data, Nr * H * es, cudaMemcpyDeviceToDevice, s));
  OMNIMOE_CUDA_TRY(cudaMemcpyAsync(static_cast<char*>(b.wcat) + Nr * H * es, p.router_col.data,
                                   cfg.grid_cols * H * es, cudaMemcpyDeviceToDevice, s));
  if (batch_stats)
    for (i64 k = 0; k < plan.route_chunks; ++k) {
      const i64 t0 = k * R, rows = std::min(R, T - t0);
      OMNIMOE_RETURN_IF_ERROR(router_logits(t0, rows));
      OMNIMOE_RETURN_IF_ERROR(route_chunk_moments(b.logits, rows, n, b.partial + k * stat_blocks(R) * 2 * n, s));
    }
  RouteStatsArgs st{&cfg, mode, T, R, b.partial, p.running_mean_row.as<float>(), p.running_var_row.as<float>(),
                    p.running_mean_col.as<float>(), p.running_var_col.as<float>(), b.mean, b.rstd};
  st.update_running = false;
  OMNIMOE_RETURN_IF_ERROR(route_stats(st, s));
  OMNIMOE_RETURN_IF_ERROR(experts_import_ids(expert_ids, cfg.num_experts(), b.ids, s));
  // With one router chunk (and the statistics pass) its logits are still in b.logits here,
  // and its lhat and d logp still in b.logits and b.dlogp when its weights pass runs below:
  // between those passes nothing writes the router's buffers (the experts phase and the
  // shared MLP's slices share their memory: the one runs before the column sums, the other
  // after the weights pass; keep that order). So neither is recomputed: one router
  // product and one scores backward fewer, the same values (H100, session t: step
  // lm-256x256-t4096 1.359 -> 1.321 ms, lm-256x256-t1024 0.587 -> 0.564; predicted -41 µs).
  // With more chunks each pass overwrites the buffers chunk by chunk.
  const bool kept = batch_stats && plan.route_chunks == 1;
  for (i64 t0 = 0; t0 < T; t0 += R) {
    const i64 rows = std::min(R, T - t0);
    if (!kept) OMNIMOE_RETURN_IF_ERROR(router_logits(t0, rows));
    OMNIMOE_RETURN_IF_ERROR(route_gates_of(cfg, rows, b.logits, b.mean, b.rstd, b.ids + t0 * K, b.gates + t0 * K, s));
  }

  // experts: dgates, the experts' share of dx, each expert's rows once. The gather path's
  // token kernel writes dx (chunked: dh only, dx from it per chunk below); the dense
  // path's products add to it.
  if (b.plan.path == ExpertsPath::dense)
    OMNIMOE_CUDA_TRY(cudaMemsetAsync(b.dx, 0, static_cast<std::size_t>(T * H) * sizeof(float), s));
  OMNIMOE_RETURN_IF_ERROR(experts_backward(cfg, x, p, grad_y, g, sparse, b, s));

  // route backward, per chunk: gates -> scores -> log_softmax -> norm -> router weights, dx.
  // Training batchnorm first needs column means over all tokens: one more pass for them.
  if (batch_stats) {
    for (i64 k = 0; k < plan.route_chunks; ++k) {
      const i64 t0 = k * R, rows = std::min(R, T - t0);
      OMNIMOE_RETURN_IF_ERROR(route_chunk_grad(t0, rows));
      OMNIMOE_RETURN_IF_ERROR(route_norm_colsums(cfg, rows, b.logits, b.dlogp, b.sums + k * stat_blocks(R) * 2 * n, s));
    }
    OMNIMOE_RETURN_IF_ERROR(route_norm_means(cfg, R, T, b.sums, b.means, s));
  }
  // The router's last pass for chunk k: its weight gradients (summed over the chunks in
  // order) and its share of dx, added to dx_rows (tokens [k R, ..) of the current dx).
  auto route_weights_and_dx = [&](i64 k, float* dx_rows) -> Status {
    const i64 t0 = k * R, rows = std::min(R, T - t0);
    if (!kept) OMNIMOE_RETURN_IF_ERROR(route_chunk_grad(t0, rows));
    OMNIMOE_RETURN_IF_ERROR(route_norm_apply(cfg, mode, rows, b.logits, b.rstd, b.means, b.dlogp, s));
    if (dt != DType::f32) OMNIMOE_RETURN_IF_ERROR(store_rows(dt, b.dlogp, rows, n, nullptr, b.dl, s));
    const char* xc = at(x.data, t0 * H, dt);
    OMNIMOE_RETURN_IF_ERROR(mm(b, s, true, false, n, H, rows, b.dl, n, xc, H, b.gw, H, dt, DType::f32,
                               k > 0 ? 1.f : 0.f));
    return mm(b, s, false, false, rows, H, n, b.dl, n, b.wcat, H, dx_rows, H, dt, DType::f32, 1.f);
  };
  if (!plan.chunked) {
    for (i64 k = 0; k < plan.route_chunks; ++k) OMNIMOE_RETURN_IF_ERROR(route_weights_and_dx(k, b.dx + k * R * H));
    OMNIMOE_RETURN_IF_ERROR(mlp_slices(0, T, plan.mlp_cols, true, b.dx, b.u, b.v, b.dm));
    OMNIMOE_RETURN_IF_ERROR(store_rows(dt, b.dx, T, H, b.bad, g.x.data, s));
  } else {
    // Per dx chunk of C = plan.dx_rows tokens (whole router chunks): the experts' share,
    // then the router's, then the MLP's, then stored. The router's weight gradients add up
    // its chunks in ascending order, as in the whole mode.
    const i64 C = plan.dx_rows;
    for (i64 c0 = 0; c0 < T; c0 += C) {
      const i64 rows = std::min(C, T - c0);
      OMNIMOE_RETURN_IF_ERROR(
          experts_backward_dx(cfg, dt, rows, p.expert_in.data, b.ids + c0 * K, b.dh + c0 * K, b.dx, s));
      for (i64 k = c0 / R; k * R < c0 + rows; ++k) OMNIMOE_RETURN_IF_ERROR(route_weights_and_dx(k, b.dx + (k * R - c0) * H));
      OMNIMOE_RETURN_IF_ERROR(mlp_slices(c0, rows, plan.mlp_chunk_cols, false, b.dx, b.u, b.v, b.dm));
      OMNIMOE_RETURN_IF_ERROR(store_rows(dt, b.dx, rows, H, b.bad + c0, const_cast<char*>(at(g.x.data, c0 * H, dt)), s));
    }
  }
  OMNIMOE_RETURN_IF_ERROR(store_rows(dt, b.gw, Nr, H, nullptr, g.router_row.data, s));
  return store_rows(dt, b.gw + Nr * H, cfg.grid_cols, H, nullptr, g.router_col.data, s);
}

}  // namespace omnimoe::cuda
