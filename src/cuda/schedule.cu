// CUDA schedule stage: tasks (t, k) grouped by (token chunk, expert chunk) with a CUB radix
// sort (stable, so tokens stay ascending inside a group), and each group's offsets.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <string>

#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

__global__ void group_keys_kernel(const i32* __restrict__ ids, i64 n, int K, i64 token_chunk, i64 expert_chunk,
                                  i64 n_ec, i64 groups, unsigned* __restrict__ keys, i32* __restrict__ vals) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const i64 t = i / K;
  // An id out of range (caller routing, marked -1) goes to a group past the last one, which
  // no chunk processes; experts_dense poisons its token instead.
  keys[i] = ids[i] < 0 ? static_cast<unsigned>(groups)
                       : static_cast<unsigned>((t / token_chunk) * n_ec + ids[i] / expert_chunk);
  vals[i] = static_cast<i32>(i);
}

// offsets[g] = first + (the first of the n sorted keys >= g), g = 0 .. groups.
template <class Key>
__global__ void group_offsets_kernel(const Key* __restrict__ keys, i64 n, i64 groups, i64 first,
                                     i32* __restrict__ offsets) {
  const i64 g = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g > groups) return;
  i64 lo = 0, hi = n;
  while (lo < hi) {
    const i64 mid = (lo + hi) / 2;
    if (static_cast<i64>(keys[mid]) < g) lo = mid + 1;
    else hi = mid;
  }
  offsets[g] = static_cast<i32>(first + lo);
}

// Token chunk [first / K, ..): key = expert chunk (n_ec for an id out of range, after the
// last group), value = the task's index over all T.
__global__ void chunk_keys_kernel(const i32* __restrict__ ids, i64 first, i64 n, i64 expert_chunk, i64 n_ec,
                                  unsigned short* __restrict__ keys, i32* __restrict__ vals) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const i32 e = ids[first + i];
  keys[i] = static_cast<unsigned short>(e < 0 ? n_ec : e / expert_chunk);
  vals[i] = static_cast<i32>(first + i);
}

int key_bits(i64 groups) {
  int b = 1;
  while ((i64{1} << b) < groups) ++b;
  return b;
}

// CUB's scratch for sorting `tasks` (key, task) pairs whose keys go up to `groups`.
template <class Key>
std::size_t sort_temp_bytes(i64 tasks, i64 groups) {
  std::size_t bytes = 0;
  cub::DoubleBuffer<Key> keys(nullptr, nullptr);
  cub::DoubleBuffer<i32> vals(nullptr, nullptr);
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, vals, tasks, 0, key_bits(groups + 1));
  return bytes;
}

}  // namespace

std::size_t schedule_temp_bytes(i64 tasks, i64 groups) { return sort_temp_bytes<unsigned>(tasks, groups); }

GroupSchedule group_extents(i64 T, i64 N, i64 token_chunk, i64 expert_chunk) {
  GroupSchedule s;
  s.token_chunk = std::min(T, token_chunk);
  s.expert_chunk = std::min(N, expert_chunk);
  s.n_tc = s.token_chunk > 0 ? (T + s.token_chunk - 1) / s.token_chunk : 0;
  s.n_ec = (N + s.expert_chunk - 1) / s.expert_chunk;
  return s;
}

GroupSchedule carve_group_schedule(Arena& a, i64 T, i64 K, i64 N, i64 token_chunk, i64 expert_chunk) {
  GroupSchedule s = group_extents(T, N, token_chunk, expert_chunk);
  const auto tk = static_cast<std::size_t>(T * K);
  for (int i = 0; i < 2; ++i) {
    s.keys[i] = a.take<unsigned>(tk);
    s.vals[i] = a.take<i32>(tk);
  }
  s.offsets = a.take<i32>(static_cast<std::size_t>(s.n_tc * s.n_ec + 1));
  s.temp_bytes = schedule_temp_bytes(T * K, s.n_tc * s.n_ec);
  s.temp = a.take<char>(s.temp_bytes);
  return s;
}

TokenChunkSchedule carve_token_chunk_schedule(Arena& a, i64 T, i64 K, i64 N, i64 token_chunk, i64 expert_chunk) {
  const GroupSchedule e = group_extents(T, N, token_chunk, expert_chunk);
  TokenChunkSchedule s;
  s.token_chunk = e.token_chunk;
  s.expert_chunk = e.expert_chunk;
  s.n_tc = e.n_tc;
  s.n_ec = e.n_ec;
  s.tasks = a.take<i32>(static_cast<std::size_t>(T * K));
  s.offsets = a.take<i32>(static_cast<std::size_t>(s.n_tc * (s.n_ec + 1)));
  return s;
}

void carve_token_chunk_sort(Arena& a, TokenChunkSchedule& s, i64 K) {
  const auto chunk = static_cast<std::size_t>(s.token_chunk * K);
  s.keys[0] = a.take<unsigned short>(chunk);
  s.keys[1] = a.take<unsigned short>(chunk);
  s.vals = a.take<i32>(chunk);
  s.temp_bytes = sort_temp_bytes<unsigned short>(s.token_chunk * K, s.n_ec);
  s.temp = a.take<char>(s.temp_bytes);
}

Status schedule_token_chunks(const i32* ids, i64 T, i64 K, const TokenChunkSchedule& s, cudaStream_t stream) {
  // 16-bit keys: check_supported caps N at 4096^2 (kRouteMaxExtent per axis), 8192 chunks of
  // 2048; this only guards a future change of those limits.
  if (s.n_ec + 1 > 0xffff)
    return {StatusCode::unsupported, "CUDA schedule: " + std::to_string(s.n_ec) + " expert chunks exceed 65534"};
  for (i64 tc = 0; tc < s.n_tc; ++tc) {
    const i64 first = tc * s.token_chunk * K, n = std::min(s.token_chunk, T - tc * s.token_chunk) * K;
    i32* slice = s.tasks + first;
    // The pairs start in the scratch buffers and the slice is the values' other buffer: a
    // sort of one pass (the expert chunk's few key bits) ends there, with no copy.
    chunk_keys_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(ids, first, n, s.expert_chunk, s.n_ec, s.keys[0], s.vals);
    OMNIMOE_CUDA_LAUNCH_CHECK("schedule chunk_keys_kernel");
    cub::DoubleBuffer<unsigned short> keys(s.keys[0], s.keys[1]);
    cub::DoubleBuffer<i32> vals(s.vals, slice);
    std::size_t bytes = s.temp_bytes;
    OMNIMOE_CUDA_TRY(
        cub::DeviceRadixSort::SortPairs(s.temp, bytes, keys, vals, n, 0, key_bits(s.n_ec + 1), stream));
    // CUB picks the buffer that ends with the result (known on the host from the sizes); an
    // even number of passes leaves it in the scratch buffer.
    if (vals.Current() != slice)
      OMNIMOE_CUDA_TRY(cudaMemcpyAsync(slice, vals.Current(), static_cast<std::size_t>(n) * sizeof(i32),
                                       cudaMemcpyDeviceToDevice, stream));
    group_offsets_kernel<<<ceil_div(s.n_ec + 1, 256), 256, 0, stream>>>(keys.Current(), n, s.n_ec, first,
                                                                       s.offsets + tc * (s.n_ec + 1));
    OMNIMOE_CUDA_LAUNCH_CHECK("schedule group_offsets_kernel");
  }
  return Status::Ok();
}

Status schedule_groups(const i32* ids, i64 T, i64 K, GroupSchedule& s, cudaStream_t stream) {
  const i64 n = T * K, groups = s.n_tc * s.n_ec;
  group_keys_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(ids, n, static_cast<int>(K), s.token_chunk,
                                                          s.expert_chunk, s.n_ec, groups, s.keys[0], s.vals[0]);
  OMNIMOE_CUDA_LAUNCH_CHECK("schedule group_keys_kernel");
  // Double-buffer form: CUB needs no scratch copy of the keys and values; which buffer
  // holds the result is decided on the host from the sizes alone.
  cub::DoubleBuffer<unsigned> keys(s.keys[0], s.keys[1]);
  cub::DoubleBuffer<i32> vals(s.vals[0], s.vals[1]);
  std::size_t bytes = s.temp_bytes;
  OMNIMOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(s.temp, bytes, keys, vals, n, 0, key_bits(groups + 1), stream));
  s.tasks = vals.Current();
  s.sorted = keys.Current();
  group_offsets_kernel<<<ceil_div(groups + 1, 256), 256, 0, stream>>>(keys.Current(), n, groups, 0, s.offsets);
  OMNIMOE_CUDA_LAUNCH_CHECK("schedule group_offsets_kernel");
  return Status::Ok();
}

}  // namespace omnimoe::cuda
