// Router of the coarse MoE baselines: a warp per token turns its N logits into softmax
// probabilities (fp32, max-subtracted), keeps them in shared memory as packed (order key,
// id) words and takes the exact top-K by K warp-wide maxima (ties: smaller id), then the
// gates. Comparisons are on an order-preserving integer image of the probability, so NaN
// input still yields K distinct in-range ids. Deterministic (fixed reduction order).
#include <algorithm>

#include "baselines/coarse_cuda.cuh"

namespace omnimoe::baselines::gpu {
namespace {

constexpr int kSharedBytes = 32 * 1024;  // per block: [warps][N] packed words

__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Packed word: key in the high half, (0xffffffff - id) in the low half, so the maximum is the
// largest probability and, among equal ones, the smallest id. Every untaken word is > 0;
// taken words are set to 0.
__device__ __forceinline__ unsigned long long pack(float p, int id) {
  return (static_cast<unsigned long long>(order_key(p)) << 32) | (0xffffffffu - static_cast<unsigned>(id));
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__global__ void softmax_topk_kernel(i64 T, int N, int K, bool renormalize, const float* __restrict__ logits,
                                    i32* __restrict__ ids, float* __restrict__ gates, i32* __restrict__ ids_out) {
  extern __shared__ unsigned long long words[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 t = static_cast<i64>(blockIdx.x) * warps + warp;
  if (t >= T) return;  // no block-wide barrier below
  unsigned long long* w = words + static_cast<i64>(warp) * N;
  const float* l = logits + t * N;

  float m = -INFINITY;
  for (int i = lane; i < N; i += 32) m = fmaxf(m, l[i]);  // NaN is skipped here, propagates below
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0.f;
  for (int i = lane; i < N; i += 32) s += expf(l[i] - m);
  s = cuda::warp_sum(s);
  for (int i = lane; i < N; i += 32) w[i] = pack(expf(l[i] - m) / s, i);
  __syncwarp();

  i32* tid = ids + t * K;
  float* tg = gates + t * K;
  float chosen = 0.f;
  for (int k = 0; k < K; ++k) {
    unsigned long long best = 0;
    for (int i = lane; i < N; i += 32) best = w[i] > best ? w[i] : best;
    best = warp_max(best);
    const int id = static_cast<int>(0xffffffffu - static_cast<unsigned>(best & 0xffffffffu));
    const float p = key_value(static_cast<unsigned>(best >> 32));
    chosen += p;
    if (lane == (id & 31)) w[id] = 0;  // the lane that owns slot id
    if (lane == 0) {
      tid[k] = id;
      tg[k] = p;
      if (ids_out) ids_out[t * K + k] = id;
    }
    __syncwarp();
  }
  if (renormalize)  // lane 0's writes above are ordered before this by __syncwarp
    for (int k = lane; k < K; k += 32) tg[k] = tg[k] / chosen;
}

__global__ void import_ids_kernel(const i32* __restrict__ in, i64 n, i64 N, i32* __restrict__ out) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const i32 v = in[i];
  out[i] = (v >= 0 && v < N) ? v : -1;
}

}  // namespace

Status route_softmax_topk(const RouteArgs& a, cudaStream_t stream) {
  if (a.T == 0) return Status::Ok();
  const int per_warp = static_cast<int>(a.N) * static_cast<int>(sizeof(unsigned long long));
  const int warps = std::clamp(kSharedBytes / per_warp, 1, 8);
  const unsigned blocks = cuda::ceil_div(a.T, warps);
  softmax_topk_kernel<<<blocks, warps * 32, static_cast<std::size_t>(warps) * per_warp, stream>>>(
      a.T, static_cast<int>(a.N), static_cast<int>(a.K), a.renormalize, a.logits, a.ids, a.gates, a.ids_out);
  OMNIMOE_CUDA_LAUNCH_CHECK("baselines softmax_topk_kernel");
  return Status::Ok();
}

Status route_import_ids(const i32* ids_in, i64 n, i64 N, i32* ids, cudaStream_t stream) {
  if (n == 0) return Status::Ok();
  import_ids_kernel<<<cuda::ceil_div(n, 256), 256, 0, stream>>>(ids_in, n, N, ids);
  OMNIMOE_CUDA_LAUNCH_CHECK("baselines import_ids_kernel");
  return Status::Ok();
}

}  // namespace omnimoe::baselines::gpu
