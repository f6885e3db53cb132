// The tile product of the device-scheduled grouped GEMMs: a 64-row x 64-column tile of
// C = A_gathered · Bᵀ, A rows gathered through per-row element offsets, B a [column][k]
// panel (a row-major [cols, depth] matrix, as w_in and the baselines' weights are stored),
// three-stage cp.async pipeline (zero-filled past the rows, the columns and the depth),
// WMMA 16x16x16 tensor-core products with fp32 accumulation for bf16 / f16 and fp32 FMA for
// f32, and the accumulators stored to a [kBM][kOutStride] fp32 tile in shared memory for the
// caller's epilogue. Users: the baselines' grouped GEMM (src/baselines/grouped_gemm.cu) and
// the dense experts path's gathered scores (experts_dense_scores.cu). Rows of A and B must be
// whole 16-byte chunks (depth a multiple of 16 / sizeof(S), 16-byte aligned rows).
#pragma once

#include <mma.h>

#include <type_traits>

#include "core/math.hpp"
#include "cuda/common.cuh"

namespace omnimoe::cuda::grouped {

constexpr int kBM = 64;  // rows (slots) per tile
constexpr int kBN = 64;  // columns per tile
constexpr int kStages = 3;
constexpr int kThreads = 128;                 // 4 warps, 2 x 2 over the tile
constexpr int kSliceBytes = 64;               // one row of a k-slice: 32 bf16 / f16, 16 f32
constexpr int kRowBytes = kSliceBytes + 16;   // shared-memory row stride (padding: fewer bank conflicts)
constexpr int kPanelBytes = kBM * kRowBytes;  // one operand panel of a stage (kBM == kBN)
constexpr int kOutStride = kBN + 4;           // floats per row of the epilogue tile
constexpr int kOutBytes = kBM * kOutStride * 4;
static_assert(kBM == kBN, "A and B panels share one size");

// NB: B panels per stage (1, or 2 for the baselines' fused gate / up product).
template <int NB>
struct Layout {
  static constexpr int kStageBytes = (1 + NB) * kPanelBytes;  // A panel, then NB B panels
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kBodyBytes = kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes;  // pipeline, then out tile
};

// The group that owns CTA `block` of a grouped launch: the last g < groups with
// off[g] <= block, where off[0 .. groups] are the groups' first blocks (ascending; empty
// groups, off[g] == off[g + 1], are passed over) and block < off[groups].
__device__ __forceinline__ i64 group_of_block(const i32* off, i64 groups, i64 block) {
  i64 lo = 0, hi = groups;
  while (hi - lo > 1) {
    const i64 mid = (lo + hi) / 2;
    if (off[mid] <= block) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The tile's accumulators: WMMA fragments (bf16 / f16) or a per-thread 8 x 4 block (f32).
template <class S, int NB, bool kTensorCores = !std::is_same_v<S, float>>
struct Accumulators;

template <class S, int NB>
struct Accumulators<S, NB, true> {
  static constexpr int kLd = kRowBytes / sizeof(S);  // elements per shared row
  static constexpr int kBK = kSliceBytes / sizeof(S);
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[NB][2][2];

  __device__ void zero() {
#pragma unroll
    for (int m = 0; m < NB; ++m)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[m][i][j], 0.f);
  }
  // One stage: A panel at `stage`, B panel m at stage + (1 + m) * kPanelBytes.
  __device__ void mma(const unsigned char* stage) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    const S* As = reinterpret_cast<const S*>(stage);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::row_major> fa[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int m = 0; m < NB; ++m) {
        const S* Bs = reinterpret_cast<const S*>(stage + (1 + m) * kPanelBytes);
        // B panels hold [column][k]: the K x N operand in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::col_major> fb[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[m][i][j], fa[i], fb[j], acc[m][i][j]);
      }
    }
  }
  // SwiGLU (NB == 2: the two accumulators have the same fragment layout, so element t of
  // one pairs with element t of the other) or the plain product, into out [kBM][kOutStride].
  __device__ void store(float* out) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (NB == 2) {
#pragma unroll
          for (int t = 0; t < acc[0][i][j].num_elements; ++t) {
            const float g = acc[0][i][j].x[t];
            acc[0][i][j].x[t] = g * sigmoid(g) * acc[1][i][j].x[t];
          }
        }
        wmma::store_matrix_sync(out + (wm * 32 + i * 16) * kOutStride + wn * 32 + j * 16, acc[0][i][j], kOutStride,
                                wmma::mem_row_major);
      }
  }
};

template <int NB>
struct Accumulators<float, NB, false> {
  static constexpr int kLd = kRowBytes / 4;
  static constexpr int kBK = kSliceBytes / 4;
  float acc[NB][8][4];  // rows tr * 8 + r, columns tc * 4 + c

  __device__ void zero() {
#pragma unroll
    for (int m = 0; m < NB; ++m)
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][r][c] = 0.f;
  }
  __device__ void mma(const unsigned char* stage) {
    const int tr = threadIdx.x >> 4, tc = threadIdx.x & 15;
    const float* As = reinterpret_cast<const float*>(stage);
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float av[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) av[r] = As[(tr * 8 + r) * kLd + k];
#pragma unroll
      for (int m = 0; m < NB; ++m) {
        const float* Bs = reinterpret_cast<const float*>(stage + (1 + m) * kPanelBytes);
        float bv[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = Bs[(tc * 4 + c) * kLd + k];
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[m][r][c] = fmaf(av[r], bv[c], acc[m][r][c]);
      }
    }
  }
  __device__ void store(float* out) {
    const int tr = threadIdx.x >> 4, tc = threadIdx.x & 15;
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v = acc[0][r][c];
        if constexpr (NB == 2) v = v * sigmoid(v) * acc[1][r][c];
        out[(tr * 8 + r) * kOutStride + tc * 4 + c] = v;
      }
  }
};

// The tile product, run by all kThreads threads of the CTA (block barriers inside): arow[r]
// is the element offset of tile row r's A row, or -1 for a row past the group (zeros);
// B[m] points at the group's panel m, whose columns n0 .. n0 + kBN - 1 (those below `cols`)
// enter the tile. On return the tile lies in sm as float [kBM][kOutStride] (the pipeline's
// memory, sm holding Layout<NB>::kBodyBytes), visible to every thread.
template <class S, int NB>
__device__ __forceinline__ void tile_product(unsigned char* sm, const i64* arow, const S* A,
                                             const S* const (&B)[2], i64 n0, i64 cols, i64 ldb, i64 depth) {
  using L = Layout<NB>;
  constexpr int kChunk = 16 / sizeof(S);        // elements per 16-byte copy
  constexpr int kBK = kSliceBytes / sizeof(S);  // depth per stage
  const int ktiles = static_cast<int>((depth + kBK - 1) / kBK);

  auto load_stage = [&](int stage, int kt) {
    unsigned char* st = sm + stage * L::kStageBytes;
    const i64 k0 = static_cast<i64>(kt) * kBK;
    // Each panel row is 4 chunks of 16 bytes; kBM * 4 chunks per panel.
    for (int c = threadIdx.x; c < kBM * 4; c += kThreads) {
      const int r = c >> 2, ch = c & 3;
      const i64 k = k0 + ch * kChunk;
      const bool ok = arow[r] >= 0 && k < depth;
      cp_async16(st + r * kRowBytes + ch * 16, ok ? A + arow[r] + k : A, ok);
    }
#pragma unroll
    for (int m = 0; m < NB; ++m)
      for (int c = threadIdx.x; c < kBN * 4; c += kThreads) {
        const int r = c >> 2, ch = c & 3;
        const i64 col = n0 + r, k = k0 + ch * kChunk;
        const bool ok = col < cols && k < depth;
        cp_async16(st + (1 + m) * kPanelBytes + r * kRowBytes + ch * 16, ok ? B[m] + col * ldb + k : B[m], ok);
      }
  };

  Accumulators<S, NB> acc;
  acc.zero();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();               // ... and everyone's; stage kt - 1 is free again
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    cp_async_commit();
    acc.mma(sm + (kt % kStages) * L::kStageBytes);
  }
  cp_async_wait<0>();
  __syncthreads();  // the epilogue tile reuses the pipeline's memory
  acc.store(reinterpret_cast<float*>(sm));
  __syncthreads();
}

}  // namespace omnimoe::cuda::grouped
