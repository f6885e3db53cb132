// Ceilings for benchmark floors, measured on the device in the same run as the benchmark.

#include <algorithm>
#include <vector>

#include "cuda/gemm.cuh"
#include "omnimoe/device.hpp"

namespace omnimoe {
namespace {

// A well-mixed 32-bit hash of an element index.
__device__ __forceinline__ unsigned hash_index(std::int64_t i, unsigned seed) {
  unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  return h ^ (h >> 13);
}

// Random bf16 in [-1, 1) (never zeros: zeros run faster than real data).
__global__ void fill_random_bf16(__nv_bfloat16* p, std::int64_t n, unsigned seed) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = __float2bfloat16(static_cast<float>(hash_index(i, seed) & 0xffff) / 32768.f - 1.f + 1.f / 65536.f);
}

// Random row indices in [0, rows).
__global__ void fill_random_rows(std::int32_t* p, std::int64_t n, std::int32_t rows, unsigned seed) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = static_cast<std::int32_t>(hash_index(i, seed) % static_cast<unsigned>(rows));
}

// Gathers of whole 2 KB rows by index, a warp per row, two rows in flight, 16-byte loads:
// the pattern of the dense path's first sparse output (the current one reads each row in
// 512-byte slices, one per warp, four rows in flight: the same rows and bytes from L2).
// Each warp folds what it read into one word (so nothing is optimised away) and stores it.
constexpr int kGatherRowBytes = 2048;
__global__ void gather_rows_kernel(const uint4* __restrict__ table, const std::int32_t* __restrict__ idx,
                                   std::int64_t n, unsigned* __restrict__ sink) {
  constexpr int kVecs = kGatherRowBytes / 16 / 32;  // 16-byte vectors per lane and row
  const int lane = threadIdx.x & 31;
  const std::int64_t warp = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const std::int64_t warps = (static_cast<std::int64_t>(gridDim.x) * blockDim.x) >> 5;
  unsigned fold = 0;
  for (std::int64_t i = 2 * warp; i < n; i += 2 * warps) {
    const std::int64_t r0 = idx[i], r1 = i + 1 < n ? idx[i + 1] : r0;
    uint4 v[2][kVecs];
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      v[0][j] = table[r0 * (kGatherRowBytes / 16) + j * 32 + lane];
      v[1][j] = table[r1 * (kGatherRowBytes / 16) + j * 32 + lane];
    }
#pragma unroll
    for (int j = 0; j < kVecs; ++j)  // every word, so every load stays a whole 16-byte load
      fold ^= v[0][j].x ^ v[0][j].y ^ v[0][j].z ^ v[0][j].w ^ v[1][j].x ^ v[1][j].y ^ v[1][j].z ^ v[1][j].w;
  }
  sink[(static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x)] = fold;
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

Status measure_l2_gather_rate(Device d, double* bytes_per_s) {
  if (d != Device::cuda) return {StatusCode::unsupported, "measure_l2_gather_rate: CUDA only"};
  constexpr std::int32_t rows = 8192;                 // 16 MB: an expert chunk's w_out rows
  constexpr std::int64_t n = std::int64_t{1} << 22;   // 8 GiB of rows per pass
  constexpr int threads = 256;
  unsigned blocks = 0;  // one full wave: as many warps per SM as fit
  OMNIMOE_RETURN_IF_ERROR(cuda::resident_blocks(gather_rows_kernel, threads, blocks));
  void *table = nullptr, *idx = nullptr, *sink = nullptr;
  auto release = [&] {
    for (void* p : {table, idx, sink}) cudaFree(p);
  };
  Status st = cuda::cuda_status(cudaMalloc(&table, std::size_t{rows} * kGatherRowBytes), "cudaMalloc");
  if (st.ok()) st = cuda::cuda_status(cudaMalloc(&idx, n * sizeof(std::int32_t)), "cudaMalloc");
  if (st.ok())
    st = cuda::cuda_status(cudaMalloc(&sink, std::size_t{1} * blocks * threads * sizeof(unsigned)), "cudaMalloc");
  if (!st.ok()) {
    release();
    return st;
  }
  const std::int64_t elems = std::int64_t{rows} * kGatherRowBytes / 2;
  fill_random_bf16<<<static_cast<unsigned>(elems / 256), 256>>>(static_cast<__nv_bfloat16*>(table), elems, 5u);
  fill_random_rows<<<static_cast<unsigned>(n / 256), 256>>>(static_cast<std::int32_t*>(idx), n, rows, 6u);
  double ms = 0;
  st = cuda::cuda_status(cudaGetLastError(), "fill kernels");
  if (st.ok())
    st = median_ms(
        [&] {
          gather_rows_kernel<<<blocks, threads>>>(static_cast<const uint4*>(table),
                                                  static_cast<const std::int32_t*>(idx), n,
                                                  static_cast<unsigned*>(sink));
          return cuda::cuda_status(cudaGetLastError(), "gather_rows_kernel");
        },
        10, &ms);
  release();
  OMNIMOE_RETURN_IF_ERROR(st);
  *bytes_per_s = static_cast<double>(n) * kGatherRowBytes / (ms * 1e-3);
  return Status::Ok();
}

}  // namespace omnimoe

namespace omnimoe {

Status time_dense_equivalent(const Config& cfg, std::int64_t T, DType dtype, int reps, double* ms) {
  if (dtype != DType::bf16 && dtype != DType::f16) return {StatusCode::unsupported, "dense equivalent: bf16 or f16"};
  const std::int64_t H = cfg.hidden, I = cfg.intermediate, N = cfg.num_experts(), R = cfg.grid_rows + cfg.grid_cols;
  const std::size_t es = 2;
  // x, router weights, logits (fp32), shared weights and activations, expert tables, T x N scores.
  const std::vector<std::size_t> sizes = {
      static_cast<std::size_t>(T * H) * es,  static_cast<std::size_t>(R * H) * es, static_cast<std::size_t>(T * R) * 4,
      static_cast<std::size_t>(3 * I * H) * es, static_cast<std::size_t>(2 * T * I) * es,
      static_cast<std::size_t>(2 * N * H) * es, static_cast<std::size_t>(T * N) * es,
      static_cast<std::size_t>(T * H) * es, cuda::kGemmWorkspaceBytes};
  std::size_t total = 0, free = 0, cap = 0;
  for (auto b : sizes) total += b;
  OMNIMOE_CUDA_TRY(cudaMemGetInfo(&free, &cap));
  if (total + (std::size_t{1} << 30) > free) return {StatusCode::unsupported, "dense equivalent does not fit in device memory"};
  std::vector<void*> p(sizes.size(), nullptr);
  Status st;
  for (std::size_t i = 0; i < sizes.size() && st.ok(); ++i) st = cuda::cuda_status(cudaMalloc(&p[i], sizes[i]), "cudaMalloc");
  for (std::size_t i = 0; i + 1 < sizes.size() && st.ok(); ++i)
    fill_random_bf16<<<static_cast<unsigned>((sizes[i] / 2 + 255) / 256), 256>>>(static_cast<__nv_bfloat16*>(p[i]),
                                                                                  sizes[i] / 2, 11u + i);
  char* x = static_cast<char*>(p[0]);
  char* wr = static_cast<char*>(p[1]);
  char* sh = static_cast<char*>(p[4]);
  char* tab = static_cast<char*>(p[5]);
  auto mm = [&](bool tb, std::int64_t M, std::int64_t Nn, std::int64_t K, const void* A, const void* B, void* C,
                DType c) {
    cuda::GemmArgs g;
    g.tb = tb;
    g.M = M;
    g.N = Nn;
    g.K = K;
    g.A = A;
    g.lda = K;
    g.B = B;
    g.ldb = tb ? K : Nn;
    g.C = C;
    g.ldc = Nn;
    g.ab = dtype;
    g.c = c;
    return cuda::gemm(g, {p.back(), cuda::kGemmWorkspaceBytes}, nullptr);
  };
  auto run = [&]() -> Status {
    OMNIMOE_RETURN_IF_ERROR(mm(true, T, R, H, x, wr, p[2], DType::f32));
    if (I > 0) {
      OMNIMOE_RETURN_IF_ERROR(mm(true, T, I, H, x, p[3], sh, dtype));
      OMNIMOE_RETURN_IF_ERROR(mm(true, T, I, H, x, static_cast<char*>(p[3]) + I * H * es, sh + T * I * es, dtype));
      OMNIMOE_RETURN_IF_ERROR(mm(true, T, H, I, sh, static_cast<char*>(p[3]) + 2 * I * H * es, p[7], dtype));
    }
    OMNIMOE_RETURN_IF_ERROR(mm(true, T, N, H, x, tab, p[6], dtype));
    return mm(false, T, H, N, p[6], tab + N * H * es, p[7], dtype);
  };
  if (st.ok()) st = median_ms(run, reps, ms);
  for (void* q : p) cudaFree(q);
  return st;
}

}  // namespace omnimoe
