// CUDA shared_mlp stage: the products are cuBLASLt calls (layer.cu); this file holds the
// SwiGLU between them.
#include "core/math.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

template <class S>
__global__ void swiglu_kernel(S* __restrict__ u, const S* __restrict__ v, i64 n) {
  constexpr int V = Vec<S>::kN;
  const i64 i = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i + V <= n) {
    float a[V], b[V];
    load16(u + i, a);
    load16(v + i, b);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = a[j] * sigmoid(a[j]) * b[j];
    store16(u + i, a);
  } else {
    for (i64 j = i; j < n; ++j) {
      const float a = to_f32(u[j]);
      u[j] = from_f32<S>(a * sigmoid(a) * to_f32(v[j]));
    }
  }
}

template <class S>
Status launch(void* u, const void* v, i64 n, cudaStream_t stream) {
  const i64 threads = (n + Vec<S>::kN - 1) / Vec<S>::kN;
  swiglu_kernel<S><<<ceil_div(threads, 256), 256, 0, stream>>>(static_cast<S*>(u), static_cast<const S*>(v), n);
  OMNIMOE_CUDA_LAUNCH_CHECK("shared_mlp swiglu_kernel");
  return Status::Ok();
}

}  // namespace

Status shared_mlp_swiglu(DType dtype, void* u, const void* v, i64 n, cudaStream_t stream) {
  switch (dtype) {
    case DType::bf16: return launch<__nv_bfloat16>(u, v, n, stream);
    case DType::f16: return launch<__half>(u, v, n, stream);
    default: return launch<float>(u, v, n, stream);
  }
}

}  // namespace omnimoe::cuda
