// CUDA stages of the coarse baselines (dense, gshard, deepseekmoe), one launcher per file:
//   (the dense SwiGLU of the dense layer and deepseekmoe's shared expert is the layer's own
//   shared_mlp stage, src/cuda/shared_mlp.cu)
//   gshard_route.cu    fused softmax + exact top-K + gates (a warp per token); caller ids
//   gshard_schedule.cu tasks sorted by expert (CUB radix sort), segment and tile offsets
//   grouped_gemm.cu    the per-expert products over the sorted tasks (tensor cores)
//   gshard_combine.cu  y[t] (+)= sum over k, in order, of gate * expert output
// Every launcher takes an explicit stream, writes only the memory it is given, never
// allocates and never synchronises with the host (graph-capturable).
#pragma once

#include "cuda/common.cuh"
#include "cuda/cuda.cuh"
#include "cuda/gemm.cuh"

namespace omnimoe::baselines::gpu {

using cuda::i32;
using cuda::i64;

// ---- SwiGLU MLP: the layer's shared_mlp stage (src/cuda/shared_mlp.cu) ---------------------
using cuda::SwigluArgs;
using cuda::swiglu_chunk_rows;
using cuda::swiglu_forward;

// ---- gshard_route.cu ------------------------------------------------------------------------
// Per token t: p = softmax(logits[t, :N]) in fp32; the K largest p (ties: smaller id) in
// descending order; gates p_k / sum_k p_k (renormalize) or p_k. Writes ids [T, K], gates
// [T, K] and, when not null, ids_out [T, K].
struct RouteArgs {
  i64 T, N, K;
  bool renormalize;
  const float* logits;  // [T, N]
  i32* ids;
  float* gates;
  i32* ids_out;
};
Status route_softmax_topk(const RouteArgs& a, cudaStream_t stream);
// Caller routing to internal ids: an id outside [0, N) becomes -1 (its token's output row
// becomes NaN: the GPU cannot report it without a host synchronisation).
Status route_import_ids(const i32* ids_in, i64 n, i64 N, i32* ids, cudaStream_t stream);

// ---- gshard_schedule.cu ---------------------------------------------------------------------
// Rows of one tile of the grouped products (also the granularity of the tile offsets).
inline constexpr int kTileRows = 64;

// Tasks i = t K + k sorted by expert (stable: tokens ascending inside an expert); invalid
// ids (-1) sort past the last expert and are never computed.
struct ExpertSchedule {
  unsigned* keys[2] = {nullptr, nullptr};  // [T K] each: CUB double buffer of expert ids
  i32* vals[2] = {nullptr, nullptr};  // [T K] each: task indices
  void* temp = nullptr;               // CUB scratch
  std::size_t temp_bytes = 0;
  i32* seg = nullptr;    // [N + 1]: expert e's tasks are sorted slots seg[e] .. seg[e + 1]
  i32* tiles = nullptr;  // [N + 1]: exclusive scan of ceil(rows_e / kTileRows); tiles[N] = total
  const i32* tasks = nullptr;  // out: the sorted task indices (one of vals)
};
std::size_t schedule_temp_bytes(i64 tasks, i64 N);
Status schedule_by_expert(const i32* ids, i64 tasks, i64 N, ExpertSchedule& s, cudaStream_t stream);
// Host bound on the tiles of any routing of `tasks` tasks over N experts (the grid size).
inline i64 max_tiles(i64 tasks, i64 N) { return (tasks + kTileRows - 1) / kTileRows + (N < tasks ? N : tasks); }

// ---- grouped_gemm.cu ------------------------------------------------------------------------
// For every expert g and each of its sorted slots p in [seg[g], seg[g + 1]):
//   single: C[crow(p)] = A[arow(p)] B_gᵀ
//   dual:   C[crow(p)] = silu(A[arow(p)] B0_gᵀ) * (A[arow(p)] B1_gᵀ)
// with arow(p) = a_map ? a_map[p] / a_div : p, crow(p) = c_map ? c_map[p] : p, and B_g the
// [cols, depth] row-major matrix at b + g * b_stride. Tiles of kTileRows slots x 64 columns,
// one CTA each; the grid is sized from max_tiles on the host and CTAs past the device's
// tile count exit. Tensor cores (WMMA, fp32 accumulation) for bf16 / f16, fp32 FMA for f32.
// Needs depth and cols multiples of 8 and 16-byte aligned operands.
struct GroupedGemmArgs {
  DType dtype;
  i64 groups;        // N
  const i32* seg;    // [N + 1]
  const i32* tiles;  // [N + 1]
  i64 grid_tiles;    // max_tiles(...)
  const void* a;
  i64 lda;
  const i32* a_map;
  int a_div;
  const void* b0;
  const void* b1;  // null: single product
  i64 b_stride, ldb;
  i64 cols, depth;
  void* c;
  i64 ldc;
  const i32* c_map;
};
Status grouped_gemm(const GroupedGemmArgs& a, cudaStream_t stream);

// ---- gshard_combine.cu ----------------------------------------------------------------------
// y[t] = (accumulate ? y[t] : 0) + sum over k = 0 .. K-1 of gates[t K + k] * out[t K + k],
// in fp32, stored in the layer dtype; a token with an id < 0 gets a NaN row.
struct CombineArgs {
  DType dtype;
  i64 T, H, K;
  const i32* ids;
  const float* gates;
  const void* out;  // [T K, H]
  void* y;          // [T, H]
  bool accumulate;
};
Status combine(const CombineArgs& a, cudaStream_t stream);

}  // namespace omnimoe::baselines::gpu
