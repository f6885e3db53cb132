// Device-scheduled grouped GEMM over expert-sorted tasks (coarse_cuda.cuh, GroupedGemmArgs).
//
// The tile list lives on the device (seg / tiles from gshard_schedule.cu); the grid has one
// CTA per possible tile (a host bound) times the column blocks, and a CTA finds its expert by
// binary search over the tile offsets or exits when its index is past the device's tile
// count. Each CTA computes a 64-slot x 64-column tile: A rows gathered through the slot ->
// row map, the expert's weight panel streamed alongside (the tile product of
// src/cuda/grouped_gemm.cuh: cp.async pipeline, WMMA for bf16 / f16, fp32 FMA for f32), then
// an epilogue through shared memory: SwiGLU of the two accumulators (dual) or the plain
// product, written with 16-byte stores to the slot's output row. No atomics: every output row
// has one writer.
#include "baselines/coarse_cuda.cuh"
#include "cuda/grouped_gemm.cuh"

namespace omnimoe::baselines::gpu {
namespace {

using cuda::grouped::kBM;
using cuda::grouped::kBN;
using cuda::grouped::kOutStride;
using cuda::grouped::kThreads;
static_assert(kBM == kTileRows, "a tile holds kTileRows slots");

template <int NB>
struct Layout {
  static constexpr int kBodyBytes = cuda::grouped::Layout<NB>::kBodyBytes;
  static constexpr int kBytes = kBodyBytes + 2 * kBM * 8;  // + row offsets of A and C
};
static_assert(Layout<2>::kBytes <= 48 * 1024, "static shared memory limit");

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

template <class S, int NB>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(KernelArgs p) {
  using L = Layout<NB>;
  constexpr int kChunk = 16 / sizeof(S);  // elements per 16-byte store
  __shared__ __align__(128) unsigned char sm[L::kBytes];
  i64* arow = reinterpret_cast<i64*>(sm + L::kBodyBytes);  // element offset of each slot's A row, -1 past the segment
  i64* crow = arow + kBM;                                 // the same for its output row

  // Which tile: the expert g with tiles[g] <= tile < tiles[g + 1].
  const i64 tile = blockIdx.x;
  if (tile >= p.tiles[p.groups]) return;  // the whole CTA leaves together, before any barrier
  const i64 g = cuda::grouped::group_of_block(p.tiles, p.groups, tile);
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
  cuda::grouped::tile_product<S, NB>(sm, arow, A, B, n0, p.cols, p.ldb, p.depth);

  const float* out = reinterpret_cast<const float*>(sm);
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
