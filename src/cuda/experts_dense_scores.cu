// The dense path's sparse form, score side: s[t K + k] = x[t] . w_in[ids[t K + k]] for one
// token chunk, computed at the chosen cells only instead of the whole [tokens, experts]
// product (a token chooses K of N experts, but touches ~195 of 1600 tiles of 64 experts at
// the paper's sizes with a router: ~12.6% of the dense product's multiply-adds).
//
//   1. the chunk's tasks sorted by 64-expert tile (schedule_groups; stable, so each tile's
//      tasks are in token order), ids < 0 past the last tile;
//   2. slots: the distinct (tile, token) pairs of the sorted tasks (a flag where the tile or
//      the token changes, a CUB scan), per slot its first sorted position, per tile its
//      first slot and its blocks of 64 slots (CUB scan into block offsets); the per-task
//      arrays live in the sort's spare halves (its double buffers), so the slots cost no
//      memory per task beyond the sort's 16 bytes;
//   3. one CTA per block: the 64 slots' x rows gathered against the tile's 64 w_in rows
//      (grouped::tile_product), then each of the block's sorted positions (a contiguous
//      range) reads its cell: s[task] = C[slot][id - tile base], rounded to the storage
//      dtype as the cuBLASLt S buffer was. Each task has one writer (a task is one sorted
//      position) and no atomics: deterministic. A token that names an expert twice has two
//      positions in one slot, both written from the same row. With a second product (the
//      backward's dy . w_out at the same cells) the CTA then runs it over the same slots.
// All device-side: no host synchronisation, no allocation; the grid is a host bound (tiles
// plus tasks / 64) and CTAs past the device's block count exit before any barrier.
// Rows that are not whole 16-byte vectors, or x / w_in (or the second product's inputs) not
// 16-byte aligned: a warp per task, for both products.
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "cuda/cuda.cuh"
#include "cuda/grouped_gemm.cuh"

namespace omnimoe::cuda {
namespace {

using grouped::kBM;
using grouped::kOutStride;
using grouped::kThreads;

// Whether sorted position p starts a slot. Keys >= tiles are the ids out of range: no slot.
__device__ __forceinline__ bool slot_start(const unsigned* keys, const i32* tasks, i64 p, unsigned tiles, int K) {
  if (keys[p] >= tiles) return false;
  return p == 0 || keys[p] != keys[p - 1] || tasks[p] / K != tasks[p - 1] / K;
}

__global__ void slot_flags_kernel(const unsigned* __restrict__ keys, const i32* __restrict__ tasks, i64 n,
                                  unsigned tiles, int K, i32* __restrict__ flags) {
  const i64 p = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < n) flags[p] = slot_start(keys, tasks, p, tiles, K) ? 1 : 0;
}

// first[slot] = its first sorted position. Overwrites the flags (recomputed here, never
// read): each entry has one writer.
__global__ void slot_first_kernel(const unsigned* __restrict__ keys, const i32* __restrict__ tasks,
                                  const i32* __restrict__ incl, i64 n, unsigned tiles, int K, i32* __restrict__ first) {
  const i64 p = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n) return;
  if (slot_start(keys, tasks, p, tiles, K)) first[incl[p] - 1] = static_cast<i32>(p);
}

// Per tile g (and g = tiles): its first slot, and its blocks of kBM slots (0 for g = tiles).
__global__ void tile_blocks_kernel(const i32* __restrict__ offsets, const i32* __restrict__ incl, i64 tiles,
                                   i32* __restrict__ tile_slots, i32* __restrict__ tile_blocks) {
  const i64 g = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g > tiles) return;
  auto slot_at = [&](i32 p) { return p == 0 ? 0 : incl[p - 1]; };  // slots before position p
  const i32 s0 = slot_at(offsets[g]);
  tile_slots[g] = s0;
  tile_blocks[g] = g < tiles ? (slot_at(offsets[g + 1]) - s0 + kBM - 1) / kBM : 0;
}

struct TileArgs {
  i64 tiles, width;  // tile count and experts per tile (the last tile may hold fewer)
  const i32* block_off;
  const i32* tile_slots;
  const i32* offsets;  // the sort's: offsets[tiles] is the end of the valid tasks
  const i32* first;
  const i32* incl;
  const i32* tasks;
  const i32* ids;    // the chunk's
  const void* x;     // the chunk's first row
  const void* w_in;
  i64 H, N;
  int K;
  void* s;           // [rows K] the chunk's task scores
  TaskProduct second;  // a second product at the same cells (second.s null: none), x its chunk's first row
};

template <class S>
// Register caps: f32 at 6 CTAs per SM (80 registers; with the second product's arguments it
// had taken 128), 16-bit types at 7 (their 72: a minimum of 1 CTA made ptxas take 88-116).
__global__ void __launch_bounds__(kThreads, std::is_same_v<S, float> ? 6 : 7) task_scores_tile_kernel(TileArgs p) {
  constexpr int kBody = grouped::Layout<1>::kBodyBytes;
  __shared__ __align__(128) unsigned char sm[kBody + kBM * 8];
  i64* arow = reinterpret_cast<i64*>(sm + kBody);  // element offset of each slot's x row, -1 past the tile's slots

  const i64 block = blockIdx.x;
  if (block >= p.block_off[p.tiles]) return;  // the whole CTA leaves together, before any barrier
  const i64 g = grouped::group_of_block(p.block_off, p.tiles, block);
  const i64 slot0 = p.tile_slots[g] + (block - p.block_off[g]) * kBM;
  const i64 left = p.tile_slots[g + 1] - slot0, rows = left < kBM ? left : kBM;
  for (int r = threadIdx.x; r < kBM; r += kThreads)
    arow[r] = r < rows ? static_cast<i64>(p.tasks[p.first[slot0 + r]] / p.K) * p.H : -1;
  __syncthreads();

  const i64 e0 = g * p.width;
  const i64 cols = p.N - e0 < p.width ? p.N - e0 : p.width;
  // The block's tasks are the sorted positions of its slots: one contiguous range, which
  // ends where the next slot starts or, after the last slot, where the valid tasks end.
  const i32 begin = p.first[slot0];
  const i32 end = slot0 + rows < p.tile_slots[p.tiles] ? p.first[slot0 + rows] : p.offsets[p.tiles];
  const float* out = reinterpret_cast<const float*>(sm);
  // One product over the block's slots, then each task's cell out of the tile.
  auto product = [&](const void* x, const void* w, void* dst) {
    const S* B[2] = {static_cast<const S*>(w) + e0 * p.H, nullptr};
    grouped::tile_product<S, 1>(sm, arow, static_cast<const S*>(x), B, 0, cols, p.H, p.H);
    S* s = static_cast<S*>(dst);
    for (i32 q = begin + threadIdx.x; q < end; q += kThreads) {
      const i32 task = p.tasks[q];
      const i64 r = p.incl[q] - 1 - slot0;
      s[task] = from_f32<S>(out[r * kOutStride + (p.ids[task] - e0)]);
    }
  };
  product(p.x, p.w_in, p.s);
  if (p.second.s == nullptr) return;
  __syncthreads();  // the second product's pipeline overwrites the tile the first one's cells came from
  product(p.second.x, p.second.w, p.second.s);
}

// The fallback: a warp per task, lanes over the row (any H, any alignment), one warp sum.
template <class S>
__global__ void task_scores_warp_kernel(i64 n, int H, int K, const S* __restrict__ x, const S* __restrict__ w_in,
                                        const i32* __restrict__ ids, S* __restrict__ s) {
  const i64 i = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= n) return;  // warp-uniform; no barrier follows
  const i32 e = ids[i];
  if (e < 0) return;  // out of range: never read
  const S* xr = x + (i / K) * H;
  const S* wr = w_in + static_cast<i64>(e) * H;
  float acc = 0.f;
  for (int h = lane; h < H; h += 32) acc = fmaf(to_f32(xr[h]), to_f32(wr[h]), acc);
  acc = warp_sum(acc);
  if (lane == 0) s[i] = from_f32<S>(acc);
}

template <class S>
Status warp_scores(const ExpertsArgs& a, const TaskScores& ts, const TaskProduct* second, i64 t0, i64 rows,
                   cudaStream_t stream) {
  const i64 H = a.cfg->hidden, K = a.cfg->top_k, n = rows * K;
  for (const TaskProduct& q : {TaskProduct{a.x, a.w_in, ts.s}, second != nullptr ? *second : TaskProduct{}}) {
    if (q.s == nullptr) continue;
    task_scores_warp_kernel<S><<<ceil_div(n * 32, 256), 256, 0, stream>>>(
        n, static_cast<int>(H), static_cast<int>(K), static_cast<const S*>(q.x) + t0 * H, static_cast<const S*>(q.w),
        a.ids + t0 * K, static_cast<S*>(q.s));
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense task_scores_warp_kernel");
  }
  return Status::Ok();
}

// Steps 1 and 2 of the header: the tile sort and the slot arrays.
Status build_slots(const i32* ids, i64 rows, i64 K, TaskScores& ts, cudaStream_t stream) {
  GroupSchedule& sc = ts.sort;
  OMNIMOE_RETURN_IF_ERROR(schedule_groups(ids, rows, K, sc, stream));
  // The sort's other halves are free now (which ones: decided on the host from the sizes).
  ts.incl = sc.tasks == sc.vals[0] ? sc.vals[1] : sc.vals[0];
  ts.first = reinterpret_cast<i32*>(sc.sorted == sc.keys[0] ? sc.keys[1] : sc.keys[0]);
  const i64 n = rows * K, tiles = sc.n_ec;
  const auto utiles = static_cast<unsigned>(tiles);
  slot_flags_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(sc.sorted, sc.tasks, n, utiles, static_cast<int>(K),
                                                           ts.first);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense slot_flags_kernel");
  std::size_t bytes = ts.scan_bytes;
  OMNIMOE_CUDA_TRY(
      cub::DeviceScan::InclusiveSum(ts.scan_temp, bytes, ts.first, ts.incl, static_cast<int>(n), stream));
  slot_first_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(sc.sorted, sc.tasks, ts.incl, n, utiles,
                                                           static_cast<int>(K), ts.first);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense slot_first_kernel");
  tile_blocks_kernel<<<ceil_div(tiles + 1, 256), 256, 0, stream>>>(sc.offsets, ts.incl, tiles, ts.tile_slots,
                                                                  ts.tile_blocks);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense tile_blocks_kernel");
  bytes = ts.scan_bytes;
  OMNIMOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(ts.scan_temp, bytes, ts.tile_blocks, ts.block_off,
                                                 static_cast<int>(tiles + 1), stream));
  return Status::Ok();
}

template <class S>
Status tile_scores(const ExpertsArgs& a, TaskScores& ts, const TaskProduct* second, i64 t0, i64 rows,
                   cudaStream_t stream) {
  const i64 H = a.cfg->hidden, K = a.cfg->top_k, N = a.cfg->num_experts();
  const i32* ids = a.ids + t0 * K;
  OMNIMOE_RETURN_IF_ERROR(build_slots(ids, rows, K, ts, stream));
  const GroupSchedule& sc = ts.sort;
  // Blocks: sum over tiles of ceil(slots / kBM) < tiles + slots / kBM, slots <= rows min(K, tiles).
  const i64 grid = sc.n_ec + (rows * std::min(K, sc.n_ec) + kBM - 1) / kBM;
  if (grid >= (i64{1} << 31)) return {StatusCode::internal, "experts_dense task scores: grid too large"};
  const TileArgs p{sc.n_ec, sc.expert_chunk, ts.block_off, ts.tile_slots, sc.offsets, ts.first, ts.incl, sc.tasks, ids,
                   at(a.x, t0 * H, a.dtype), a.w_in, H, N, static_cast<int>(K), ts.s,
                   second != nullptr ? TaskProduct{at(second->x, t0 * H, a.dtype), second->w, second->s} : TaskProduct{}};
  task_scores_tile_kernel<S><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense task_scores_tile_kernel");
  return Status::Ok();
}

// Whether the tile product serves the call: whole 16-byte chunks per row (cp.async), the
// rows' and the tables' bases 16-byte aligned (then so is every row).
bool tile_rows(const ExpertsArgs& a, const TaskProduct* second) {
  const i64 v = 16 / static_cast<i64>(dtype_size(a.dtype));
  const bool second_ok = second == nullptr || (aligned16(second->x) && aligned16(second->w));
  return a.cfg->hidden % v == 0 && aligned16(a.x) && aligned16(a.w_in) && second_ok;
}

template <class S>
Status run(const ExpertsArgs& a, TaskScores& ts, const TaskProduct* second, i64 t0, i64 rows, cudaStream_t stream) {
  if (rows <= 0) return Status::Ok();
  if (!tile_rows(a, second)) return warp_scores<S>(a, ts, second, t0, rows, stream);
  return tile_scores<S>(a, ts, second, t0, rows, stream);
}

std::size_t scan_temp_bytes(i64 n) {
  std::size_t incl = 0, excl = 0;
  cub::DeviceScan::InclusiveSum(nullptr, incl, static_cast<const i32*>(nullptr), static_cast<i32*>(nullptr),
                                static_cast<int>(n));
  cub::DeviceScan::ExclusiveSum(nullptr, excl, static_cast<const i32*>(nullptr), static_cast<i32*>(nullptr),
                                static_cast<int>(n));
  return std::max(incl, excl);
}

}  // namespace

TaskScores carve_task_scores(Arena& a, i64 rows, i64 K, i64 N, DType dtype) {
  TaskScores s;
  s.sort = carve_group_schedule(a, rows, K, N, rows, kBM);  // one token chunk: groups are the tiles
  const i64 n = rows * K, tiles = s.sort.n_ec;
  s.tile_slots = a.take<i32>(static_cast<std::size_t>(tiles + 1));
  s.tile_blocks = a.take<i32>(static_cast<std::size_t>(tiles + 1));
  s.block_off = a.take<i32>(static_cast<std::size_t>(tiles + 1));
  s.scan_bytes = std::max(scan_temp_bytes(n), scan_temp_bytes(tiles + 1));
  s.scan_temp = a.take<char>(s.scan_bytes);
  s.s = a.take<char>(static_cast<std::size_t>(n) * dtype_size(dtype));
  return s;
}

Status dense_task_scores(const ExpertsArgs& a, TaskScores& s, i64 t0, i64 rows, cudaStream_t stream,
                         const TaskProduct* second) {
  if (second != nullptr && second->s == nullptr) second = nullptr;
  switch (a.dtype) {
    case DType::bf16: return run<__nv_bfloat16>(a, s, second, t0, rows, stream);
    case DType::f16: return run<__half>(a, s, second, t0, rows, stream);
    case DType::f32: return run<float>(a, s, second, t0, rows, stream);
    default: return {StatusCode::unsupported, "CUDA experts: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace omnimoe::cuda
