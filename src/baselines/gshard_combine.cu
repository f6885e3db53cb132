// Combine of the coarse MoE baselines: each token's K expert outputs (rows t K .. t K + K - 1
// of the task-ordered output buffer) summed in k order with their gates, in fp32, onto the
// shared expert's output or zero. One thread per 16 bytes of y: every element has one writer
// and a fixed summation order, so the result is bitwise reproducible.
#include "baselines/coarse_cuda.cuh"

namespace omnimoe::baselines::gpu {
namespace {

template <class S>
__global__ void combine_kernel(i64 T, i64 H, i64 K, const i32* __restrict__ ids, const float* __restrict__ gates,
                               const S* __restrict__ out, S* __restrict__ y, bool accumulate) {
  constexpr int V = cuda::Vec<S>::kN;
  const i64 per_row = H / V;
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * per_row) return;
  const i64 t = i / per_row, h = (i % per_row) * V;
  float acc[V];
  if (accumulate) {
    cuda::load16(y + t * H + h, acc);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
  }
  bool bad = false;
  for (i64 k = 0; k < K; ++k) {
    const i64 task = t * K + k;
    if (ids[task] < 0) {  // caller id outside [0, N): its output row was never computed
      bad = true;
      continue;
    }
    const float g = gates[task];
    float o[V];
    cuda::load16(out + task * H + h, o);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = fmaf(g, o[j], acc[j]);
  }
  if (bad)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = __int_as_float(0x7fffffff);
  cuda::store16(y + t * H + h, acc);
}

template <class S>
Status launch(const CombineArgs& a, cudaStream_t stream) {
  const i64 n = a.T * (a.H / cuda::Vec<S>::kN);
  combine_kernel<S><<<cuda::ceil_div(n, 256), 256, 0, stream>>>(a.T, a.H, a.K, a.ids, a.gates,
                                                                static_cast<const S*>(a.out), static_cast<S*>(a.y),
                                                                a.accumulate);
  OMNIMOE_CUDA_LAUNCH_CHECK("baselines combine_kernel");
  return Status::Ok();
}

}  // namespace

Status combine(const CombineArgs& a, cudaStream_t stream) {
  if (a.H % 8 != 0) return {StatusCode::internal, "baselines combine: H must be a multiple of 8"};
  switch (a.dtype) {
    case DType::bf16: return launch<__nv_bfloat16>(a, stream);
    case DType::f16: return launch<__half>(a, stream);
    case DType::f32: return launch<float>(a, stream);
    default: return {StatusCode::internal, "baselines combine: unsupported dtype"};
  }
}

}  // namespace omnimoe::baselines::gpu
