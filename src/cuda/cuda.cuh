// CUDA backend stage launchers (route, experts, shared_mlp), mirroring src/cpu/cpu.hpp.
// Every launcher takes an explicit stream, writes only caller-provided memory and returns a
// Status; none synchronises with the host or allocates.
#pragma once

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "core/workspace.hpp"
#include "omnimoe/config.hpp"

namespace omnimoe::cuda {

// Whether the CUDA backend serves this config, dtype and token count (a clear message
// naming the limit when not).
Status check_supported(const Config& cfg, DType dtype, i64 T);

// ---- route ------------------------------------------------------------------------------
// Column statistics run over blocks of kStatBlockRows tokens, one thread block per (32
// columns, row block), so a router of few columns still fills the GPU; the blocks' results
// are merged in a fixed order afterwards (deterministic). A token chunk of `rows` tokens
// has stat_blocks(chunk_rows) slots of 2n doubles reserved, of which stat_blocks(rows) are
// written.
inline constexpr i64 kStatBlockRows = 256;
__host__ __device__ inline i64 stat_blocks(i64 rows) { return (rows + kStatBlockRows - 1) / kStatBlockRows; }
// Router tokens per chunk for a budget of `rows`: whole row blocks (so the forward's and the
// backward's chunks cut the same blocks and their statistics agree bitwise), at most
// 65535 blocks (a grid dimension), at least 1 and at most T.
inline i64 route_chunk_rows(i64 rows, i64 T) {
  if (rows >= kStatBlockRows) rows = std::min<i64>(rows / kStatBlockRows, 65535) * kStatBlockRows;
  return std::clamp<i64>(rows, 1, T);
}
// Router statistics of one token chunk for training batchnorm: per row block and column of
// logits [rows, n], the block mean and sum of squared deviations (double), written to
// partial[block * 2n ...]: [n means][n M2].
Status route_chunk_moments(const float* logits, i64 rows, i64 n, double* partial, cudaStream_t stream);
// Per column mean and 1/sqrt(var + eps) used by the norm: from the chunk moments (training;
// also updates the running statistics), from the running statistics (inference), or 0 / 1
// (no norm). Columns [0, Nr) are the row axis, [Nr, Nr + Nc) the column axis.
struct RouteStatsArgs {
  const Config* cfg;
  Mode mode;
  i64 T;                  // tokens in the whole batch
  i64 chunk_rows;         // tokens per chunk (the last chunk may be shorter)
  const double* partial;  // [chunks][stat_blocks(chunk_rows)][2n] block moments (training batchnorm)
  float *running_mean_row, *running_var_row, *running_mean_col, *running_var_col;
  float* mean;  // [n] out
  float* rstd;  // [n] out
  bool update_running = true;  // training forward: update the running statistics (not backward)
};
Status route_stats(const RouteStatsArgs& a, cudaStream_t stream);

// Largest Nr, Nc and K the CUDA router serves (one thread block per token holds them).
inline constexpr i64 kRouteMaxExtent = 4096;

// Norm, both log_softmax, exact bounded top-K and gates for `rows` tokens whose logits are
// [rows, Nr + Nc]. Outputs for those tokens (pointers already offset to the chunk):
// ids32/gates32 (internal, [rows, K]), and the caller's expert_ids (i32 or i64), scores and
// gates when not null.
struct RouteTopkArgs {
  const Config* cfg;
  i64 rows;
  const float* logits;
  const float* mean;
  const float* rstd;
  i32* ids32;
  float* gates32;
  void* ids_out;
  bool ids_out_i64;
  float* scores_out;  // may be null
  float* gates_out;   // may be null
  int* fallback_flags;  // [rows] scratch: tokens the small-K warp kernel leaves to the block
                        // kernel (null: block kernel only)
  int* fallback_count;  // [1] scratch: their number
};
Status route_topk(RouteTopkArgs a, cudaStream_t stream);

// ---- schedule ---------------------------------------------------------------------------
// Tasks grouped by (token chunk, expert chunk): group g = (t / token_chunk) * n_ec +
// e / expert_chunk; inside a group tasks keep ascending token order.
struct GroupSchedule {
  i64 token_chunk = 0, expert_chunk = 0;  // chunk extents
  i64 n_tc = 0, n_ec = 0;                 // chunk counts
  unsigned* keys[2] = {nullptr, nullptr};  // [T * K] each: CUB double buffer of group keys
  i32* vals[2] = {nullptr, nullptr};       // [T * K] each: task indices t * K + k
  i32* offsets = nullptr;                  // [groups + 1]: group g is tasks[offsets[g] .. offsets[g + 1])
  void* temp = nullptr;                    // CUB scratch
  std::size_t temp_bytes = 0;
  i32* tasks = nullptr;                    // out: the sorted task indices (one of vals)
  const unsigned* sorted = nullptr;        // out: their group keys, ascending (one of keys)
};
std::size_t schedule_temp_bytes(i64 tasks, i64 groups);
Status schedule_groups(const i32* ids, i64 T, i64 K, GroupSchedule& s, cudaStream_t stream);

// The same grouping with the sort done one token chunk at a time (the dense backward, whose
// expert-chunk loop visits every token chunk once per expert chunk): chunk tc's tasks,
// sorted by expert chunk (stable: tokens ascending inside a group), fill its slice
// [t0 K, (t0 + rows) K) of a task array over all T. Only that array (4 bytes per pair) spans
// T; the sort's buffers (16-bit keys) cover one token chunk.
struct TokenChunkSchedule {
  i64 token_chunk = 0, expert_chunk = 0;   // chunk extents
  i64 n_tc = 0, n_ec = 0;                  // chunk counts
  i32* tasks = nullptr;                    // [T K] out: task indices t K + k, sorted per token chunk
  i32* offsets = nullptr;                  // [n_tc (n_ec + 1)] out: group (tc, ec) is
                                           // tasks[offsets[tc (n_ec + 1) + ec] .. offsets[.. + 1])
  unsigned short* keys[2] = {nullptr, nullptr};  // [Tc K] each: CUB double buffer of expert chunks
  i32* vals = nullptr;                     // [Tc K]: the values' first buffer (the second: the slice)
  void* temp = nullptr;                    // CUB scratch
  std::size_t temp_bytes = 0;
};
Status schedule_token_chunks(const i32* ids, i64 T, i64 K, const TokenChunkSchedule& s, cudaStream_t stream);

// ---- experts ----------------------------------------------------------------------------
// y[t] = sum_k g * act(x[t] . w_in[e]) * w_out[e]: one warp per token, 16-byte loads; the
// shared branch is added afterwards by its last product (beta = 1).
struct ExpertsArgs {
  const Config* cfg;
  i64 T;
  DType dtype;
  const void* x;
  const void* w_in;
  const void* w_out;
  const i32* ids;
  const float* gates;
  void* y;
  bool add = false;  // y += routed (y holds the shared branch) instead of y = routed
};
Status experts_gather(const ExpertsArgs& a, cudaStream_t stream);
// Whether the 16-byte-vector kernels (the gather's register tiles, the dense path's sparse
// output with its 32-vector column slices) serve this call: whole 16-byte vectors,
// H <= 512 V, and every row 16-byte aligned (a view into a larger buffer may not be).
bool vector_rows(const ExpertsArgs& a);
// Warps per token of the gather kernels (forward and backward), from sizes alone: below
// 4096 tokens, up to 8 (a power of two, at most K) while T W <= 8192; from 4096 tokens on,
// one (measured on an H200: at T = 4096 four warps per token made the forward 5-8% slower
// than one; at T = 1024, with eight, it ran 6-8% faster than before, router changes included).
inline int token_warps(i64 T, i64 K) {
  int w = 1;
  while (T < 4096 && w < 8 && 2 * w <= K && T * 2 * w <= 8192) w *= 2;
  return w;
}
// Dense regime, per token chunk. Two output forms (dense_output_sparse decides):
//   product: per expert chunk, S = x w_inᵀ (cuBLASLt), P = g * act(S) at the chosen cells
//            and 0 elsewhere, y += P w_out (cuBLASLt).
//   sparse:  the scores at the chosen cells only (TaskScores: the chunk's tasks by 64-expert
//            tile, a gathered tile product per (tile, 64 tokens that chose one of its
//            experts)), then per expert chunk warps per token add g act(s) w_out[e] over its
//            tasks in that chunk.
// No T x N buffer, deterministic (no atomics). Buffers from DenseBuffers.
//
// The sparse form's scores of one token chunk of `rows` tokens (tasks numbered t K + k from
// its first token). A slot is a distinct (tile, token) pair of the tile-sorted tasks; the
// slots of a tile are cut into blocks of 64, one CTA of the tile product each.
struct TaskScores {
  GroupSchedule sort;          // the chunk's tasks by 64-expert tile (groups: n_ec tiles)
  i32* first = nullptr;        // [chunk K] slot-start flags per sorted position, then per slot its
                               // first sorted position (set per call: the sort's spare keys)
  i32* incl = nullptr;         // [chunk K] inclusive scan of the flags: position p is in slot
                               // incl[p] - 1 (set per call: the sort's spare values)
  i32* tile_slots = nullptr;   // [tiles + 1] first slot of each tile; entry `tiles`: the slot count
  i32* tile_blocks = nullptr;  // [tiles + 1] 64-slot blocks per tile (entry `tiles`: 0)
  i32* block_off = nullptr;    // [tiles + 1] their exclusive scan; entry `tiles`: the block count
  void* scan_temp = nullptr;   // CUB scan scratch
  std::size_t scan_bytes = 0;
  void* s = nullptr;           // [chunk K] out: s[t K + k] = x[t] . w_in[ids[t K + k]] in the storage
                               // dtype (tasks with an id < 0 are left unwritten)
};
// Carved for token chunks of up to `rows` tokens (host-side CUB size queries only).
TaskScores carve_task_scores(Arena& a, i64 rows, i64 K, i64 N, DType dtype);
// A product at the tasks' cells: s[t K + k] = x[t] . w[ids[t K + k]] (x the whole [T, H]
// input, w an [N, H] table, s the chunk's [rows K] in the storage dtype).
struct TaskProduct {
  const void* x = nullptr;
  const void* w = nullptr;
  void* s = nullptr;
};
// The scores of tokens [t0, t0 + rows) at their tasks, into s.s: the tile product where
// rows are whole 16-byte vectors and x, w_in (and second's x, w) 16-byte aligned, else a warp
// per task for both products. With
// `second` (the backward's dy . w_out), that product too, at the same cells: it shares the
// sort and the slots, and each CTA runs both tile products over its slots.
Status dense_task_scores(const ExpertsArgs& a, TaskScores& s, i64 t0, i64 rows, cudaStream_t stream,
                         const TaskProduct* second = nullptr);
struct DenseBuffers {
  GroupSchedule schedule;  // chunk extents (no buffers)
  TokenChunkSchedule sort; // product: one token chunk's tasks by expert chunk, sorted in
                           // sub-chunks of tokens (its token_chunk) to bound the sort's buffers
  void* s = nullptr;       // product: [token_chunk, expert_chunk] scores, storage dtype
  void* p = nullptr;       // product: [token_chunk, expert_chunk] storage dtype, kept zero between
                           // groups; null: the sparse output
  TaskScores scores;       // sparse: the chunk's scores at its tasks
  float* yacc = nullptr;   // product: [token_chunk, H], P w_out summed over expert chunks
  GemmWorkspace gemm;
};
// Whether the dense path adds its outputs at the chosen cells (few experts per token and
// chunk) rather than by the tensor-core product with P, from sizes alone.
// OMNIMOE_DENSE_OUTPUT=sparse|product overrides it (a test switch, not API; like
// OMNIMOE_EXPERTS_PATH it must not change between a workspace query and the calls it sizes,
// else the call fails with an internal error when the plan outgrows the queried size).
bool dense_output_sparse(const Config& cfg, DType dtype);
Status experts_dense(const ExpertsArgs& a, const DenseBuffers& b, cudaStream_t stream);

// Caller routing (i32 or i64) to internal i32 ids; ids outside [0, N) become -1, which the
// gather kernel turns into a NaN output row (no out-of-bounds access, nothing silent).
Status experts_import_ids(const TensorView& ids, i64 num_experts, i32* out, cudaStream_t stream);
// Whether the gather kernel serves this hidden size and dtype (16-byte rows, H <= limit).
Status experts_supported(const Config& cfg, DType dtype);

// ---- backward (route_backward.cu, experts_backward.cu) ----------------------------------
// Per token (a thread block each), from the raw router logits [T, n] and the norm's mean
// and rstd: the gates of the given ids (S = logp_row[i] + logp_col[j], then exp or softmax
// over the K), logits left as they are.
Status route_gates_of(const Config& cfg, i64 T, const float* logits, const float* mean, const float* rstd,
                      const i32* ids, float* gates, cudaStream_t stream);
// Per token: the logits normalised in place (l -> lhat, which the norm's backward reads),
// then dgates -> dS -> d logp (each entry summed in task order) -> through log_softmax,
// written over dlogp [T, n] (which needs no initial value). No log-probabilities are stored.
Status route_scores_backward(const Config& cfg, i64 T, float* logits, const float* mean, const float* rstd,
                             const i32* ids, const float* gates, const float* dgates, float* dlogp,
                             cudaStream_t stream);
// Through the norm, in place over d [rows, n], token chunk by token chunk. Training
// batchnorm needs the column means of d and d * lhat over all T tokens first: the sums of
// each row block of each chunk (route_norm_colsums into sums[(chunk * stat_blocks(chunk_rows)
// + block) * 2n ...]), then their means added in order (route_norm_means into means [2n]).
// Then route_norm_apply per chunk: none: identity; inference: * rstd; training:
// rstd (d - mean(d) - lhat mean(d lhat)).
Status route_norm_colsums(const Config& cfg, i64 rows, const float* lhat, const float* d, double* sums,
                          cudaStream_t stream);
Status route_norm_means(const Config& cfg, i64 chunk_rows, i64 T, const double* sums, double* means,
                        cudaStream_t stream);
Status route_norm_apply(const Config& cfg, Mode mode, i64 rows, const float* lhat, const float* rstd,
                        const double* means, float* d, cudaStream_t stream);
// Per task: a = g act(h), dg = da act(h), dh = da g act'(h) (h = x . w_in[e], da = dy . w_out[e]),
// and dx_acc[t] = sum_k dh w_in[e] (fp32, one warp per token; written, not added to). Tasks with an id < 0 are
// skipped and their token flagged in bad[t].
// dx_acc may be null: experts_backward_dx then adds the experts' share later, per token chunk.
Status experts_backward_tokens(const ExpertsArgs& a, const void* dy, float* act_out, float* dgates, float* dh,
                               float* dx_acc, int* bad, cudaStream_t stream);
// The token kernel's dx alone for T tokens (pointers offset to the first): dx[t] =
// sum_k dh[t K + k] w_in[ids[t K + k]] (fp32, written); tasks with an id < 0 are skipped.
Status experts_backward_dx(const Config& cfg, DType dtype, i64 T, const void* w_in, const i32* ids, const float* dh,
                           float* dx, cudaStream_t stream);
// Expert rows of the backward, from the expert-sorted tasks (offsets [N + 1]): dw_in[e] =
// sum dh x[t], dw_out[e] = sum a dy[t], each row written once (zero for unchosen experts),
// dense [N, H] or sparse (SparseExpertGradients). A segment longer than `piece` tasks is
// cut into pieces whose partial rows (fp32) a second stage sums in order: deterministic,
// no atomics, and no warp walks a hot expert's thousands of tasks alone.
// The partial-row buffer holds at most kPartialBytes; the caller may give it less (at
// least kMinPartialBytes), which makes pieces longer: fewer warps share a hot expert.
inline constexpr std::size_t kPartialBytes = std::size_t{16} << 20;
inline constexpr std::size_t kMinPartialBytes = std::size_t{2} << 20;
struct SegmentScratch {
  int piece = 0;           // tasks per piece (segments longer than this are split)
  i64 max_pieces = 0;      // bound on the pieces of any routing: 2 T K / piece
  i32* active = nullptr;   // [N + 1] expert chosen (entry N: 0)
  i32* rank = nullptr;     // [N + 1] exclusive scan of active: sparse slot; rank[N] = count
  i32* npieces = nullptr;  // [N + 1] pieces of a split segment, else 0
  i32* pstart = nullptr;   // [N + 1] exclusive scan of npieces
  float* partial = nullptr;  // [max_pieces, 2, H]
  void* scan_temp = nullptr;
  std::size_t scan_bytes = 0;
};
// The (N + 1)-entry arrays and the scan's scratch; then the partial rows, for `tasks` tasks
// and a budget in bytes (clamped to [kMinPartialBytes, kPartialBytes]), which sets `piece`.
SegmentScratch carve_segment_scratch(Arena& a, i64 N);
void carve_segment_partials(Arena& a, SegmentScratch& s, i64 tasks, i64 H, std::size_t budget);
// Sparse output (SparseExpertGradients' buffers): capacity slots.
struct SparseRowsOut {
  i32* ids;
  i32* count;
  void* dw_in;
  void* dw_out;
  i64 capacity;
};
// Active flags, piece counts and their scans; with `sparse`, also its ids and count.
Status experts_active_list(i64 N, const i32* offsets, const SegmentScratch& s, const SparseRowsOut* sparse,
                           cudaStream_t stream);
struct RowsArgs {
  const Config* cfg;
  DType dtype;
  const void* x;             // [T, H]
  const void* dy;            // [T, H]
  const i32* tasks;          // [T K] sorted by expert, tokens ascending
  const i32* offsets;        // [N + 1]
  const float* act_out;      // [T K] a = g act(h)
  const float* dh;           // [T K]
  const SegmentScratch* seg; // after experts_active_list
  void* dw_in;               // dense output [N, H] (sparse == nullptr)
  void* dw_out;
  const SparseRowsOut* sparse;  // or sparse output
  // Expert-side values (experts_rows_values_possible must hold): each warp loads its
  // expert's two rows once and computes its tasks' a, dg and dh itself, bitwise as the token
  // kernel would; act_out and dh above are then not read. It writes dg_out and dh_out at
  // every task with a valid id (experts_flag_bad_ids covers the others); dx then comes from
  // experts_backward_dx. With many tasks per expert this reads each chosen expert row once
  // instead of once per task (and the token kernel's pass over them goes).
  bool values = false;
  const void* w_in = nullptr;    // [N, H]
  const void* w_out = nullptr;   // [N, H]
  const float* gates = nullptr;  // [T K]
  float* dg_out = nullptr;       // [T K]
  float* dh_out = nullptr;       // [T K]
};
Status experts_backward_rows(const RowsArgs& r, cudaStream_t stream);
// Whether r may ask for expert-side values: rows of whole 16-byte vectors, H <= 4 x 32
// vectors (one pass per task), 16-byte aligned tensors.
bool experts_rows_values_possible(const RowsArgs& r);
// For the expert-side values: tasks with an id < 0 get dg = dh = 0, their token bad[t] = 1
// (others 0).
Status experts_flag_bad_ids(const i32* ids, i64 T, i64 K, float* dg, float* dh, int* bad, cudaStream_t stream);
// Active flags and sparse slots straight from the ids (the dense backward has no per-expert
// offsets): seg.active / seg.rank, then sparse ids and count. Ids < 0 are skipped.
Status experts_active_from_ids(const i32* ids, i64 tasks, i64 N, const SegmentScratch& s, const SparseRowsOut& sparse,
                               cudaStream_t stream);
// Dense regime backward (experts_backward_dense.cu): tensor-core products over (token
// chunk, expert chunk) groups; writes dgates per task, adds the experts' dx to dx_acc and
// stores every expert row once (dense tables, or sparse slots from experts_active_from_ids).
// Two forms, as the forward's output (dense_output_sparse decides, from sizes): products
// (S and DA per group by cuBLASLt) or task values (S and DA at the tasks only, per token
// chunk by the forward's block-sparse tile product, kept per task for the groups).
struct DenseBackwardBuffers {
  TokenChunkSchedule schedule;  // grouped by (token chunk, expert chunk), sorted per token chunk
  bool task_values = false;     // the task-values form (s and da unused)
  void* s = nullptr;       // products: [Tc, Ec] storage dtype: scores
  void* da = nullptr;      // products: [Tc, Ec] storage dtype: dy w_outᵀ
  TaskScores scores;       // task values: the token chunk's tasks by 64-expert tile; s at its tasks
  void* task_da = nullptr; // task values: [Tc K] storage dtype, dy . w_out at the chunk's tasks
  void* va = nullptr;      // task values: [T K] storage dtype, g act(s) per task
  void* vdh = nullptr;     // task values: [T K] storage dtype, da g act'(s) per task
  void* pa[2] = {};        // [Tc, Ec] storage dtype: g act(S) at the tasks, kept zero elsewhere;
                           // two, used by alternate groups (one launch clears one, fills the other)
  void* pdh[2] = {};       // [Tc, Ec] storage dtype: dh at the tasks, the same
  float* gin = nullptr;    // [Ec, H] fp32 gradient rows of w_in being summed over token chunks
  float* gout = nullptr;   // [Ec, H] fp32, of w_out
  GemmWorkspace gemm;
};
struct DenseBackwardArgs {
  const Config* cfg;
  i64 T;
  DType dtype;
  const void *x, *dy, *w_in, *w_out;  // [T, H], [T, H], [N, H], [N, H]
  const i32* ids;                     // [T, K] (-1: out of range)
  const float* gates;                 // [T, K]
  float* dgates;                      // [T, K] out
  int* bad;                           // [T] out: token has an id out of range
  float* dx_acc;                      // [T, H] fp32, added to
  void *dw_in, *dw_out;               // dense output [N, H], or
  const SparseRowsOut* sparse;        // sparse output (with seg from experts_active_from_ids)
  const SegmentScratch* seg;
  const DenseBackwardBuffers* buf;
};
Status experts_backward_dense(const DenseBackwardArgs& a, cudaStream_t stream);

// Experts path: config.schedule (expert_centric: dense, token_centric: gather), or under
// Schedule::automatic chosen per pass from sizes known on the host (never from device
// values). Forward: the gather streams 2 T K H elements of expert rows, the dense path does
// 4 T N H flops on tensor cores. Backward: the gather streams the rows twice and the dense
// path runs three products and the tile products of both sides; the weight of the dense
// side is measured (5.4 in bf16 / f16, 1.75 in fp32: choose_path, docs/perf_log.md), so the
// backward takes the gather up to larger K than the forward. The backward recomputes everything from the expert ids, so
// its path need not be the forward's. OMNIMOE_EXPERTS_PATH=gather|dense overrides both passes (a test switch, not API).
// Each pass and its workspace plan ask here with the same pass, so a workspace sized for a config fits its calls.
enum class ExpertsPath { gather, dense };
enum class Pass { forward, backward };
ExpertsPath choose_path(const Config& cfg, i64 T, DType dtype, Pass pass);
// The (token chunk, expert chunk) schedule's buffers, carved from `a`.
GroupSchedule carve_group_schedule(Arena& a, i64 T, i64 K, i64 N, i64 token_chunk, i64 expert_chunk);
// Only the chunk extents and counts of such a schedule (no buffers).
GroupSchedule group_extents(i64 T, i64 N, i64 token_chunk, i64 expert_chunk);
// A schedule sorted one token chunk at a time: its extents and its outputs (the task array
// and the offsets), carved from `a`; then its sort's buffers, used only while
// schedule_token_chunks runs (so a caller may carve them in memory it reuses afterwards).
TokenChunkSchedule carve_token_chunk_schedule(Arena& a, i64 T, i64 K, i64 N, i64 token_chunk, i64 expert_chunk);
void carve_token_chunk_sort(Arena& a, TokenChunkSchedule& s, i64 K);

// SwiGLU backward in place: (u, v, dm) -> (du, m, dv); without keep_m, v is left as it was.
Status shared_mlp_swiglu_backward(DType dtype, void* u, void* v, void* dm, i64 n, bool keep_m, cudaStream_t stream);
// Elementwise copy with conversion: fp32 -> dtype; rows flagged in bad [T] (may be null)
// become NaN.
Status store_rows(DType dtype, const float* src, i64 T, i64 H, const int* bad, void* dst, cudaStream_t stream);

// ---- shared_mlp -------------------------------------------------------------------------
// y = (silu(x gateᵀ) * (x upᵀ)) downᵀ for x [T, H], gate / up [I, H], down [H, I], in chunks
// of `chunk_rows` tokens; u and v hold [chunk_rows, I] each (v right after u). cuBLASLt
// products (fp32 accumulation), gate and up as one strided-batch product where their
// addresses allow. Used by the layer's shared MLP and the dense / shared baselines.
struct SwigluArgs {
  DType dtype;
  i64 T, H, I;
  const void *x, *gate, *up, *down;
  void* y;
  i64 chunk_rows;
  void *u, *v;
  GemmWorkspace gemm;
};
Status swiglu_forward(const SwigluArgs& a, cudaStream_t stream);
// Tokens per chunk whose u and v fit in `bytes` (at least 1, at most T).
i64 swiglu_chunk_rows(i64 T, i64 I, DType dtype, std::size_t bytes);

// m = silu(u) * v in place of u, [n] elements of dtype.
Status shared_mlp_swiglu(DType dtype, void* u, const void* v, i64 n, cudaStream_t stream);

}  // namespace omnimoe::cuda
