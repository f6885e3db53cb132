// CUDA experts stage, sparse regime: fused gather. One warp per token keeps x[t] and its
// output row in registers and streams the K chosen expert rows with 16-byte loads; with
// about one token per expert every row is read once, which is the floor of this regime.
#include <cstdint>

#include "core/math.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// VPL: 16-byte vectors per lane (H = 32 * VPL * V at most, V elements per vector). W warps
// per token (1, 2, 4 or 8), each taking tasks k = sub, sub + W, ..: few tokens (T = 1024)
// would leave each SM a handful of warps walking K rows one after the other; the partial
// rows are added in warp order (reduce_token_warps).
template <class S, int VPL, int W>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gather_kernel(i64 T, int H, int K, Activation act, const S* __restrict__ x, const S* __restrict__ w_in,
                  const S* __restrict__ w_out, const i32* __restrict__ ids, const float* __restrict__ gates,
                  S* __restrict__ y, bool add) {
  constexpr int V = Vec<S>::kN;
  __shared__ __align__(16) float red[W > 1 ? kWarpsPerBlock : 1][W > 1 ? 32 * VPL * V : 4];
  __shared__ int bad_s[kWarpsPerBlock];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, sub = wi % W;
  const i64 t = static_cast<i64>(blockIdx.x) * (kWarpsPerBlock / W) + wi / W;
  const bool live = t < T;  // no early return: the warps of a block meet at a barrier
  const int nvec = H / V;
  float xr[VPL][V], acc[VPL][V];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int v = j * 32 + lane;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;
    if (live && v < nvec) load16(x + t * H + v * V, xr[j]);
    else
#pragma unroll
      for (int i = 0; i < V; ++i) xr[j][i] = 0.f;
  }
  bool bad = false;  // an id outside [0, N) (caller routing): the token's row becomes NaN
  // Both rows of a task are loaded before its reduction, so they are in flight together.
  const auto rows = [&](int q, i64 e) { return (q == 0 ? w_in : w_out) + e * H; };
  const auto body = [&](int, i64 e, float g, const auto& r) {
    if (e < 0) {
      bad = true;
      return;
    }
    float h = 0.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (j * 32 + lane < nvec) {
        float w[V];
        unpack16<S>(r(0, j), w);
#pragma unroll
        for (int i = 0; i < V; ++i) h = fmaf(xr[j][i], w[i], h);
      }
    h = warp_sum(h);
    const float a = g * activate(act, h);
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (j * 32 + lane < nvec) {
        float w[V];
        unpack16<S>(r(1, j), w);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[j][i] = fmaf(a, w[i], acc[j][i]);
      }
  };
  token_tasks<W, 2, VPL, S>(ids + (live ? t * K : 0), gates + (live ? t * K : 0), K, sub, live, nvec, rows, body);
  if constexpr (W > 1) {
    if (lane == 0) bad_s[wi] = bad;
    reduce_token_warps<W, VPL, V>(acc, &red[0][0], sub);  // its barrier also publishes bad_s
    if (sub != 0 || !live) return;
    for (int w = 1; w < W; ++w) bad |= bad_s[wi + w] != 0;
  }
  if (!live) return;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int v = j * 32 + lane;
    if (v >= nvec) continue;
    if (add) {  // y already holds the shared branch
      float yr[V];
      load16(y + t * H + v * V, yr);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[j][i] += yr[i];
    }
    if (bad)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[j][i] = __int_as_float(0x7fffffff);
    store16(y + t * H + v * V, acc[j]);
  }
}

// Any H (rows not a whole number of 16-byte vectors, or wider than the register tile):
// one block per token; the K activations first (a warp per expert), then each thread sums
// its output columns over the K rows.
template <class S>
__global__ void gather_generic_kernel(i64 T, int H, int K, Activation act, const S* __restrict__ x,
                                      const S* __restrict__ w_in, const S* __restrict__ w_out,
                                      const i32* __restrict__ ids, const float* __restrict__ gates,
                                      S* __restrict__ y, bool add) {
  extern __shared__ float a_s[];  // [K]
  __shared__ int bad;
  const i64 t = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  for (int k = warp; k < K; k += warps) {
    const i64 e = ids[t * K + k];
    if (e < 0) {  // caller routing with an id out of range
      if (lane == 0) bad = 1;
      if (lane == 0) a_s[k] = 0.f;
      continue;
    }
    float h = 0.f;
    for (int i = lane; i < H; i += 32) h = fmaf(to_f32(x[t * H + i]), to_f32(w_in[e * H + i]), h);
    h = warp_sum(h);
    if (lane == 0) a_s[k] = gates[t * K + k] * activate(act, h);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float acc = 0.f;
    for (int k = 0; k < K; ++k) {
      const i64 e = ids[t * K + k];
      if (e >= 0) acc = fmaf(a_s[k], to_f32(w_out[e * H + i]), acc);
    }
    if (add) acc += to_f32(y[t * H + i]);
    y[t * H + i] = from_f32<S>(bad ? __int_as_float(0x7fffffff) : acc);
  }
}

// Caller routing to the internal i32 ids; ids outside [0, N) become -1 (see gather_kernel).
template <class I>
__global__ void import_ids_kernel(const I* __restrict__ in, i64 n, i64 N, i32* __restrict__ out) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const i64 e = in[i];
    out[i] = (e >= 0 && e < N) ? static_cast<i32>(e) : -1;
  }
}

template <class S>
int vec_elems() {
  return 16 / static_cast<int>(sizeof(S));
}

template <class S>
Status launch_gather(const ExpertsArgs& a, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const int H = static_cast<int>(c.hidden);
  if (!vector_rows(a)) {
    const std::size_t smem = static_cast<std::size_t>(c.top_k) * sizeof(float);
    const auto kernel = gather_generic_kernel<S>;
    OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(a.T), 256, smem, stream>>>(a.T, H, static_cast<int>(c.top_k), c.activation,
                                                             static_cast<const S*>(a.x), static_cast<const S*>(a.w_in),
                                                             static_cast<const S*>(a.w_out), a.ids, a.gates,
                                                             static_cast<S*>(a.y), a.add);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts gather_generic_kernel");
    return Status::Ok();
  }
  const int vpl = static_cast<int>((H / vec_elems<S>() + 31) / 32);
  dispatch_tile<16>(vpl, token_warps(a.T, c.top_k), [&](auto p, auto w) {
    constexpr int W = decltype(w)::value;
    gather_kernel<S, decltype(p)::value, W><<<ceil_div(a.T * W, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
        a.T, H, static_cast<int>(c.top_k), c.activation, static_cast<const S*>(a.x), static_cast<const S*>(a.w_in),
        static_cast<const S*>(a.w_out), a.ids, a.gates, static_cast<S*>(a.y), a.add);
  });
  OMNIMOE_CUDA_LAUNCH_CHECK("experts gather_kernel");
  return Status::Ok();
}

}  // namespace

bool vector_rows(const ExpertsArgs& a) {
  const i64 H = a.cfg->hidden, v = 16 / static_cast<i64>(dtype_size(a.dtype));
  return H % v == 0 && H <= 32 * 16 * v && aligned16(a.x) && aligned16(a.w_in) && aligned16(a.w_out) &&
         aligned16(a.y);
}

Status experts_supported(const Config& cfg, DType dtype) {
  (void)dtype;
  // The generic kernel keeps the K activations of a token in shared memory.
  if (cfg.top_k > 8192)
    return {StatusCode::unsupported, "CUDA experts: top_k = " + std::to_string(cfg.top_k) + " exceeds 8192"};
  return Status::Ok();
}

Status experts_import_ids(const TensorView& ids, i64 num_experts, i32* out, cudaStream_t stream) {
  const i64 n = ids.numel();
  if (ids.dtype == DType::i64)
    import_ids_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(ids.as<const i64>(), n, num_experts, out);
  else
    import_ids_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(ids.as<const i32>(), n, num_experts, out);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts import_ids_kernel");
  return Status::Ok();
}

Status experts_gather(const ExpertsArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::bf16: return launch_gather<__nv_bfloat16>(a, stream);
    case DType::f16: return launch_gather<__half>(a, stream);
    case DType::f32: return launch_gather<float>(a, stream);
    default: return {StatusCode::unsupported, "CUDA experts: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace omnimoe::cuda
