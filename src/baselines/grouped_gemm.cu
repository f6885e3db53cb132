// Device-scheduled grouped GEMM over expert-sorted tasks (coarse_cuda.cuh, GroupedGemmArgs).
//
// The tile list lives on the device (seg / tiles from gshard_schedule.cu); the grid has one
// CTA per possible tile (a host bound) times the column blocks, and a CTA finds its expert by
// binary search over the tile offsets or exits when its index is past the device's tile
// count. Each CTA computes a 64-slot x 64-column tile: A rows gathered through the slot ->
// row map, the expert's weight panel streamed alongside, three-stage cp.async pipeline
// (zero-filled past the segment, the columns and the depth), WMMA 16x16x16 tensor-core
// products with fp32 accumulation for bf16 / f16 and fp32 FMA for f32, then an epilogue
// through shared memory: SwiGLU of the two accumulators (dual) or the plain product, written
// with 16-byte stores to the slot's output row. No atomics: every output row has one writer.
#include <mma.h>

#include <type_traits>

#include "baselines/coarse_cuda.cuh"
#include "core/math.hpp"

namespace omnimoe::baselines::gpu {
namespace {

constexpr int kBM = kTileRows;  // slots per tile
constexpr int kBN = 64;         // columns per tile
constexpr int kStages = 3;
constexpr int kThreads = 128;   // 4 warps, 2 x 2 over the tile
constexpr int kSliceBytes = 64;                     // one row of a k-slice: 32 bf16 / f16, 16 f32
constexpr int kRowBytes = kSliceBytes + 16;         // shared-memory row stride (padding: fewer bank conflicts)
constexpr int kPanelBytes = kBM * kRowBytes;        // one operand panel of a stage (kBM == kBN)
constexpr int kOutStride = kBN + 4;                 // floats per row of the epilogue tile
constexpr int kOutBytes = kBM * kOutStride * 4;
static_assert(kBM == kBN, "A and B panels share one size");

template <int NB>
struct Layout {
  static constexpr int kStageBytes = (1 + NB) * kPanelBytes;  // A panel, then NB B panels
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kBodyBytes = kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes;
  static constexpr int kBytes = kBodyBytes + 2 * kBM * 8;  // + row offsets of A and C
};
static_assert(Layout<2>::kBytes <= 48 * 1024, "static shared memory limit");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const auto s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: nothing read, 16 zero bytes written
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

struct KernelArgs {
  i64 groups;
  const i32* seg;
  const i32* tiles;
  const void* a;
  i64 lda;
  const i32* a_map;
  int a_div;
  const void* b0;
  const void* b1;
  i64 b_stride, ldb, cols, depth;
  void* c;
  i64 ldc;
  const i32* c_map;
};

// The slot tile's accumulators: WMMA fragments (bf16 / f16) or a per-thread 8 x 4 block (f32).
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

template <class S, int NB>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(KernelArgs p) {
  using L = Layout<NB>;
  constexpr int kChunk = 16 / sizeof(S);      // elements per 16-byte copy
  constexpr int kBK = kSliceBytes / sizeof(S);  // depth per stage
  __shared__ __align__(128) unsigned char sm[L::kBytes];
  i64* arow = reinterpret_cast<i64*>(sm + L::kBodyBytes);  // element offset of each slot's A row, -1 past the segment
  i64* crow = arow + kBM;                                 // the same for its output row

  // Which tile: the expert g with tiles[g] <= tile < tiles[g + 1].
  const i64 tile = blockIdx.x;
  if (tile >= p.tiles[p.groups]) return;  // the whole CTA leaves together, before any barrier
  i64 lo = 0, hi = p.groups;  // tiles[lo] <= tile < tiles[hi]
  while (hi - lo > 1) {
    const i64 mid = (lo + hi) / 2;
    if (p.tiles[mid] <= tile) lo = mid;
    else hi = mid;
  }
  const i64 g = lo;
  const i64 first = p.seg[g] + (tile - p.tiles[g]) * kBM;
  const i64 left = static_cast<i64>(p.seg[g + 1]) - first;
  const i64 rows = left < kBM ? left : kBM;
  const i64 n0 = static_cast<i64>(blockIdx.y) * kBN;

  for (int r = threadIdx.x; r < kBM; r += kThreads) {
    i64 ar = -1, cr = -1;
    if (r < rows) {
      const i64 slot = first + r;
      ar = (p.a_map ? p.a_map[slot] / p.a_div : slot) * p.lda;
      cr = (p.c_map ? p.c_map[slot] : slot) * p.ldc;
    }
    arow[r] = ar;
    crow[r] = cr;
  }
  __syncthreads();

  const S* A = static_cast<const S*>(p.a);
  const S* B[2] = {static_cast<const S*>(p.b0) + g * p.b_stride,
                   NB == 2 ? static_cast<const S*>(p.b1) + g * p.b_stride : nullptr};
  const int ktiles = static_cast<int>((p.depth + kBK - 1) / kBK);

  auto load_stage = [&](int stage, int kt) {
    unsigned char* st = sm + stage * L::kStageBytes;
    const i64 k0 = static_cast<i64>(kt) * kBK;
    // Each panel row is 4 chunks of 16 bytes; kBM * 4 chunks per panel.
    for (int c = threadIdx.x; c < kBM * 4; c += kThreads) {
      const int r = c >> 2, ch = c & 3;
      const i64 k = k0 + ch * kChunk;
      const bool ok = arow[r] >= 0 && k < p.depth;
      cp_async16(st + r * kRowBytes + ch * 16, ok ? A + arow[r] + k : A, ok);
    }
#pragma unroll
    for (int m = 0; m < NB; ++m)
      for (int c = threadIdx.x; c < kBN * 4; c += kThreads) {
        const int r = c >> 2, ch = c & 3;
        const i64 col = n0 + r, k = k0 + ch * kChunk;
        const bool ok = col < p.cols && k < p.depth;
        cp_async16(st + (1 + m) * kPanelBytes + r * kRowBytes + ch * 16, ok ? B[m] + col * p.ldb + k : B[m], ok);
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

  float* out = reinterpret_cast<float*>(sm);
  acc.store(out);
  __syncthreads();
  S* C = static_cast<S*>(p.c);
  constexpr int kPerRow = kBN / kChunk;
  for (int c = threadIdx.x; c < kBM * kPerRow; c += kThreads) {
    const int r = c / kPerRow, cc = c % kPerRow;
    const i64 col = n0 + cc * kChunk;
    if (crow[r] < 0 || col >= p.cols) continue;
    float v[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = out[r * kOutStride + cc * kChunk + i];
    cuda::store16(C + crow[r] + col, v);
  }
}

template <class S>
Status launch(const GroupedGemmArgs& a, cudaStream_t stream) {
  const KernelArgs k{a.groups, a.seg, a.tiles, a.a, a.lda, a.a_map, a.a_div, a.b0, a.b1,
                     a.b_stride, a.ldb, a.cols, a.depth, a.c, a.ldc, a.c_map};
  const dim3 grid(static_cast<unsigned>(a.grid_tiles), cuda::ceil_div(a.cols, kBN));
  if (a.b1 != nullptr) grouped_gemm_kernel<S, 2><<<grid, kThreads, 0, stream>>>(k);
  else grouped_gemm_kernel<S, 1><<<grid, kThreads, 0, stream>>>(k);
  OMNIMOE_CUDA_LAUNCH_CHECK("baselines grouped_gemm_kernel");
  return Status::Ok();
}

}  // namespace

Status grouped_gemm(const GroupedGemmArgs& a, cudaStream_t stream) {
  if (a.grid_tiles <= 0 || a.cols <= 0) return Status::Ok();
  if (a.depth % 8 != 0 || a.cols % 8 != 0 || a.lda % 8 != 0 || a.ldb % 8 != 0 || a.ldc % 8 != 0)
    return {StatusCode::internal, "baselines grouped_gemm: depth, columns and leading dimensions must be multiples of 8"};
  if (a.grid_tiles >= (i64{1} << 31) || cuda::ceil_div(a.cols, kBN) > 65535u)
    return {StatusCode::internal, "baselines grouped_gemm: grid too large"};
  switch (a.dtype) {
    case DType::bf16: return launch<__nv_bfloat16>(a, stream);
    case DType::f16: return launch<__half>(a, stream);
    case DType::f32: return launch<float>(a, stream);
    default: return {StatusCode::internal, "baselines grouped_gemm: unsupported dtype"};
  }
}

}  // namespace omnimoe::baselines::gpu
