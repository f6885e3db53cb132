// CUDA route stage, backward: log-probabilities and gates recomputed for the caller's
// routing, then the gradient back through gates, scores, log_softmax and the norm. Every
// sum runs in a fixed order (no atomics): deterministic.
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

// One warp per axis segment [0, n) of one token's row: lhat in place, logp beside it.
__device__ void log_softmax_segment(float* l, const float* mean, const float* rstd, int n, float* logp) {
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int i = lane; i < n; i += 32) {
    const float v = (l[i] - mean[i]) * rstd[i];
    l[i] = v;
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float s = 0.f;
  for (int i = lane; i < n; i += 32) s += expf(l[i] - mx);
  s = warp_sum(s);
  const float lse = mx + logf(s);
  for (int i = lane; i < n; i += 32) logp[i] = l[i] - lse;
}

__global__ void log_probs_kernel(i64 T, int Nr, int Nc, float* logits, const float* mean, const float* rstd,
                                 float* logp) {
  const i64 t = blockIdx.x;
  const int warp = threadIdx.x >> 5, n = Nr + Nc;
  if (warp == 0) log_softmax_segment(logits + t * n, mean, rstd, Nr, logp + t * n);
  else log_softmax_segment(logits + t * n + Nr, mean + Nr, rstd + Nr, Nc, logp + t * n + Nr);
}

// One warp per token.
__global__ void gates_kernel(i64 T, int Nr, int Nc, int K, int softmax, const float* logp, const i32* ids,
                             float* gates) {
  const int lane = threadIdx.x & 31;
  const i64 t = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* lp = logp + t * (Nr + Nc);
  auto score = [&](int k) {
    const i32 e = ids[t * K + k];
    return e < 0 ? 0.f : lp[e / Nc] + lp[Nr + e % Nc];
  };
  float mx = -INFINITY, sum = 0.f;
  if (softmax) {
    for (int k = lane; k < K; k += 32) mx = fmaxf(mx, score(k));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    for (int k = lane; k < K; k += 32) sum += expf(score(k) - mx);
    sum = warp_sum(sum);
  }
  for (int k = lane; k < K; k += 32) gates[t * K + k] = softmax ? expf(score(k) - mx) / sum : expf(score(k));
}

// One warp per token: dS from dgates, then each lane owns the entries i = lane (mod 32) of
// the token's d logp row and sums into them in task order; then log_softmax backward.
__global__ void scores_backward_kernel(i64 T, int Nr, int Nc, int K, int softmax, const i32* ids, const float* gates,
                                       const float* dgates, const float* logp, float* dlogp) {
  const int lane = threadIdx.x & 31, n = Nr + Nc;
  const i64 t = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* g = gates + t * K;
  const float* dg = dgates + t * K;
  float dot = 0.f;  // softmax gate: sum_k g dg
  if (softmax) {
    for (int k = lane; k < K; k += 32) dot += g[k] * dg[k];
    dot = warp_sum(dot);
  }
  float* d = dlogp + t * n;
  for (int i = lane; i < n; i += 32) d[i] = 0.f;
  __syncwarp();
  for (int k = 0; k < K; ++k) {
    const i32 e = ids[t * K + k];
    if (e < 0) continue;
    const float ds = softmax ? g[k] * (dg[k] - dot) : g[k] * dg[k];
    const int i = e / Nc, j = Nr + e % Nc;
    if ((i & 31) == lane) d[i] += ds;
    if ((j & 31) == lane) d[j] += ds;
  }
  __syncwarp();
  const float* lp = logp + t * n;
  for (int seg = 0; seg < 2; ++seg) {  // d <- d - softmax(logp) * sum(d), per axis
    const int b = seg ? Nr : 0, e = seg ? n : Nr;
    float s = 0.f;
    for (int i = b + lane; i < e; i += 32) s += d[i];
    s = warp_sum(s);
    for (int i = b + lane; i < e; i += 32) d[i] -= expf(lp[i]) * s;
  }
}

constexpr int kCols = 32, kRows = 8;

// Column sums of d and d * lhat over one row block of one token chunk, in double, fixed
// order (as chunk_moments): out[block * 2n + c] and out[block * 2n + n + c].
__global__ void norm_colsums_kernel(i64 rows, i64 n, const float* lhat, const float* d, double* out) {
  __shared__ double part[2][kRows][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const i64 c = static_cast<i64>(blockIdx.x) * kCols + tx;
  const i64 r0 = static_cast<i64>(blockIdx.y) * kStatBlockRows, r1 = min(rows, r0 + kStatBlockRows);
  out += static_cast<i64>(blockIdx.y) * 2 * n;
  double s = 0, sx = 0;
  if (c < n)
    for (i64 r = r0 + ty; r < r1; r += kRows) {
      s += d[r * n + c];
      sx += static_cast<double>(d[r * n + c]) * lhat[r * n + c];
    }
  part[0][ty][tx] = s;
  part[1][ty][tx] = sx;
  __syncthreads();
  if (ty == 0 && c < n) {
    double a = 0, b = 0;
    for (int i = 0; i < kRows; ++i) {
      a += part[0][i][tx];
      b += part[1][i][tx];
    }
    out[c] = a;
    out[n + c] = b;
  }
}

// Means over all T tokens from the row blocks' sums, added in order: means[c], means[n + c].
__global__ void norm_means_kernel(i64 chunk_rows, i64 n, i64 T, const double* sums, double* means) {
  const i64 c = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= 2 * n) return;
  const i64 blocks = stat_blocks(chunk_rows);
  double a = 0;
  for (i64 start = 0, k = 0; start < T; start += chunk_rows, ++k)
    for (i64 j = 0; j < stat_blocks(min(chunk_rows, T - start)); ++j) a += sums[(k * blocks + j) * 2 * n + c];
  means[c] = a / static_cast<double>(T);
}

__global__ void norm_apply_kernel(i64 T, i64 n, int train, const float* lhat, const float* rstd, const double* means,
                                  float* d) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * n) return;
  const i64 c = i % n;
  d[i] = train ? rstd[c] * (d[i] - static_cast<float>(means[c]) - lhat[i] * static_cast<float>(means[n + c]))
               : d[i] * rstd[c];
}

}  // namespace

Status route_log_probs(const Config& cfg, i64 T, float* logits, const float* mean, const float* rstd, float* logp,
                       cudaStream_t stream) {
  log_probs_kernel<<<static_cast<unsigned>(T), 64, 0, stream>>>(T, static_cast<int>(cfg.grid_rows),
                                                                static_cast<int>(cfg.grid_cols), logits, mean, rstd,
                                                                logp);
  OMNIMOE_CUDA_LAUNCH_CHECK("route log_probs_kernel");
  return Status::Ok();
}

Status route_gates_of(const Config& cfg, i64 T, const float* logp, const i32* ids, float* gates, cudaStream_t stream) {
  gates_kernel<<<ceil_div(T, 8), 256, 0, stream>>>(T, static_cast<int>(cfg.grid_rows), static_cast<int>(cfg.grid_cols),
                                                   static_cast<int>(cfg.top_k), cfg.gate == GateKind::softmax, logp,
                                                   ids, gates);
  OMNIMOE_CUDA_LAUNCH_CHECK("route gates_kernel");
  return Status::Ok();
}

Status route_scores_backward(const Config& cfg, i64 T, const i32* ids, const float* gates, const float* dgates,
                             const float* logp, float* dlogp, cudaStream_t stream) {
  scores_backward_kernel<<<ceil_div(T, 8), 256, 0, stream>>>(
      T, static_cast<int>(cfg.grid_rows), static_cast<int>(cfg.grid_cols), static_cast<int>(cfg.top_k),
      cfg.gate == GateKind::softmax, ids, gates, dgates, logp, dlogp);
  OMNIMOE_CUDA_LAUNCH_CHECK("route scores_backward_kernel");
  return Status::Ok();
}

Status route_norm_colsums(const Config& cfg, i64 rows, const float* lhat, const float* d, double* sums,
                          cudaStream_t stream) {
  const i64 n = cfg.grid_rows + cfg.grid_cols;
  const dim3 grid(ceil_div(n, kCols), static_cast<unsigned>(stat_blocks(rows)));
  norm_colsums_kernel<<<grid, dim3(kCols, kRows), 0, stream>>>(rows, n, lhat, d, sums);
  OMNIMOE_CUDA_LAUNCH_CHECK("route norm_colsums_kernel");
  return Status::Ok();
}

Status route_norm_means(const Config& cfg, i64 chunk_rows, i64 T, const double* sums, double* means,
                        cudaStream_t stream) {
  const i64 n = cfg.grid_rows + cfg.grid_cols;
  norm_means_kernel<<<ceil_div(2 * n, 256), 256, 0, stream>>>(chunk_rows, n, T, sums, means);
  OMNIMOE_CUDA_LAUNCH_CHECK("route norm_means_kernel");
  return Status::Ok();
}

Status route_norm_apply(const Config& cfg, Mode mode, i64 rows, const float* lhat, const float* rstd,
                        const double* means, float* d, cudaStream_t stream) {
  if (cfg.router_norm == RouterNorm::none) return Status::Ok();
  const i64 n = cfg.grid_rows + cfg.grid_cols;
  norm_apply_kernel<<<ceil_div(rows * n, 256), 256, 0, stream>>>(rows, n, mode == Mode::training, lhat, rstd, means,
                                                                 d);
  OMNIMOE_CUDA_LAUNCH_CHECK("route norm_apply_kernel");
  return Status::Ok();
}

}  // namespace omnimoe::cuda
