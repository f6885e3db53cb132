// Ceilings for benchmark floors, measured on the device in the same run as the benchmark.

#include <algorithm>
#include <vector>

#include "cuda/gemm.cuh"
#include "omnimoe/device.hpp"

namespace omnimoe {
namespace {

// Random bf16 in [-1, 1) (never zeros: zeros run faster than real data).
__global__ void fill_random_bf16(__nv_bfloat16* p, std::int64_t n, unsigned seed) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  p[i] = __float2bfloat16(static_cast<float>(h & 0xffff) / 32768.f - 1.f + 1.f / 65536.f);
}

template <class Fn>
Status median_ms(Fn&& fn, int reps, double* out) {
  cudaEvent_t a, b;
  OMNIMOE_CUDA_TRY(cudaEventCreate(&a));
  OMNIMOE_CUDA_TRY(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < reps + 2; ++i) {
    cudaEventRecord(a);
    OMNIMOE_RETURN_IF_ERROR(fn());
    cudaEventRecord(b);
    OMNIMOE_CUDA_TRY(cudaEventSynchronize(b));
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    if (i >= 2) ms.push_back(t);  // two warm-ups
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  *out = ms[ms.size() / 2];
  return Status::Ok();
}

}  // namespace

Status measure_ceilings(Device d, double* flops_per_s, double* bytes_per_s) {
  if (d != Device::cuda) return {StatusCode::unsupported, "measure_ceilings: CUDA only"};
  constexpr std::int64_t n = 8192;
  constexpr std::size_t copy_bytes = std::size_t{1} << 30;  // 1 GiB each way
  void *a = nullptr, *b = nullptr, *c = nullptr, *ws = nullptr, *src = nullptr, *dst = nullptr;
  auto release = [&] {
    for (void* p : {a, b, c, ws, src, dst}) cudaFree(p);
  };
  Status st = cuda::cuda_status(cudaMalloc(&a, n * n * 2), "cudaMalloc");
  if (st.ok()) st = cuda::cuda_status(cudaMalloc(&b, n * n * 2), "cudaMalloc");
  if (st.ok()) st = cuda::cuda_status(cudaMalloc(&c, n * n * 2), "cudaMalloc");
  if (st.ok()) st = cuda::cuda_status(cudaMalloc(&ws, cuda::kGemmWorkspaceBytes), "cudaMalloc");
  if (st.ok()) st = cuda::cuda_status(cudaMalloc(&src, copy_bytes), "cudaMalloc");
  if (st.ok()) st = cuda::cuda_status(cudaMalloc(&dst, copy_bytes), "cudaMalloc");
  if (!st.ok()) {
    release();
    return st;
  }
  fill_random_bf16<<<n * n / 256, 256>>>(static_cast<__nv_bfloat16*>(a), n * n, 1u);
  fill_random_bf16<<<n * n / 256, 256>>>(static_cast<__nv_bfloat16*>(b), n * n, 2u);
  fill_random_bf16<<<copy_bytes / 2 / 256, 256>>>(static_cast<__nv_bfloat16*>(src), copy_bytes / 2, 3u);
  cuda::GemmArgs g;
  g.tb = true;
  g.M = g.N = g.K = n;
  g.A = a;
  g.B = b;
  g.C = c;
  g.lda = g.ldb = g.ldc = n;
  g.ab = g.c = DType::bf16;
  double gemm_ms = 0, copy_ms = 0;
  st = median_ms([&] { return cuda::gemm(g, {ws, cuda::kGemmWorkspaceBytes}, nullptr); }, 10, &gemm_ms);
  if (st.ok())
    st = median_ms([&] { return cuda::cuda_status(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice), "copy"); },
                   10, &copy_ms);
  release();
  OMNIMOE_RETURN_IF_ERROR(st);
  *flops_per_s = 2.0 * n * n * n / (gemm_ms * 1e-3);
  *bytes_per_s = 2.0 * static_cast<double>(copy_bytes) / (copy_ms * 1e-3);
  return Status::Ok();
}

}  // namespace omnimoe
