// Schedule of the coarse MoE baselines, on the device: the T K tasks sorted by expert with a
// CUB radix sort (stable: tokens stay ascending inside an expert), then one block computes
// each expert's segment of sorted slots (binary search) and the exclusive scan of its tile
// count, which the grouped products read to find their work. No host synchronisation: the
// per-expert counts never leave the device.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "baselines/coarse_cuda.cuh"

namespace omnimoe::baselines::gpu {
namespace {

constexpr int kPlanThreads = 1024;

// Key of task i: its expert, or N for an invalid id (sorted past every expert).
__global__ void expert_keys_kernel(const i32* __restrict__ ids, i64 n, unsigned N, unsigned* __restrict__ keys,
                                   i32* __restrict__ vals) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  keys[i] = ids[i] < 0 ? N : static_cast<unsigned>(ids[i]);
  vals[i] = static_cast<i32>(i);
}

// First sorted slot whose key is >= e.
__device__ __forceinline__ i32 lower_bound(const unsigned* __restrict__ keys, i64 n, unsigned e) {
  i64 lo = 0, hi = n;
  while (lo < hi) {
    const i64 mid = (lo + hi) / 2;
    if (keys[mid] < e) lo = mid + 1;
    else hi = mid;
  }
  return static_cast<i32>(lo);
}

// One block: seg[e] for e = 0 .. N and tiles[e] = sum over e' < e of ceil(rows_e' / kTileRows).
__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const unsigned* __restrict__ keys, i64 n, i32 N, i32* __restrict__ seg, i32* __restrict__ tiles) {
  using Scan = cub::BlockScan<i32, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan;
  i32 carry = 0;  // tiles of the experts before this pass
  for (i32 base = 0; base < N; base += kPlanThreads) {
    const i32 e = base + static_cast<i32>(threadIdx.x);
    i32 count = 0;
    if (e < N) {
      const i32 first = lower_bound(keys, n, static_cast<unsigned>(e));
      const i32 last = lower_bound(keys, n, static_cast<unsigned>(e) + 1);
      seg[e] = first;
      count = (last - first + kTileRows - 1) / kTileRows;
    }
    i32 before = 0, total = 0;
    Scan(scan).ExclusiveSum(count, before, total);
    if (e < N) tiles[e] = carry + before;
    carry += total;
    __syncthreads();  // TempStorage is reused by the next pass
  }
  if (threadIdx.x == 0) {
    seg[N] = lower_bound(keys, n, static_cast<unsigned>(N));
    tiles[N] = carry;
  }
}

int key_bits(i64 max_key) {
  int b = 1;
  while ((i64{1} << b) <= max_key) ++b;
  return b;
}

}  // namespace

std::size_t schedule_temp_bytes(i64 tasks, i64 N) {
  std::size_t bytes = 0;
  cub::DoubleBuffer<unsigned> keys(nullptr, nullptr);
  cub::DoubleBuffer<i32> vals(nullptr, nullptr);
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, vals, tasks, 0, key_bits(N));
  return bytes;
}

Status schedule_by_expert(const i32* ids, i64 tasks, i64 N, ExpertSchedule& s, cudaStream_t stream) {
  expert_keys_kernel<<<cuda::ceil_div(tasks, 256), 256, 0, stream>>>(ids, tasks, static_cast<unsigned>(N),
                                                                      s.keys[0], s.vals[0]);
  OMNIMOE_CUDA_LAUNCH_CHECK("baselines expert_keys_kernel");
  cub::DoubleBuffer<unsigned> keys(s.keys[0], s.keys[1]);  // keys in [0, N]: key_bits(N) bits
  cub::DoubleBuffer<i32> vals(s.vals[0], s.vals[1]);
  std::size_t bytes = s.temp_bytes;
  OMNIMOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(s.temp, bytes, keys, vals, tasks, 0, key_bits(N), stream));
  s.tasks = vals.Current();  // which buffer holds the result is decided on the host from the sizes
  plan_kernel<<<1, kPlanThreads, 0, stream>>>(keys.Current(), tasks, static_cast<i32>(N), s.seg, s.tiles);
  OMNIMOE_CUDA_LAUNCH_CHECK("baselines plan_kernel");
  return Status::Ok();
}

}  // namespace omnimoe::baselines::gpu
