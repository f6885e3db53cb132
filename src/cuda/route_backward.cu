// CUDA route stage, backward: the gates recomputed for the caller's routing, then the
// gradient back through gates, scores, log_softmax and the norm. Every sum runs in a fixed
// order (no atomics): deterministic.
#include <algorithm>

#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

// A block per token; its threads stride over the token's n = Nr + Nc logits. Entries
// [0, Nr) are the row axis, [Nr, n) the column axis: every reduction runs per axis.

// op-reduction of (a, b) over the block, the same result on every thread: a shuffle tree
// per warp, then the warps' partials in warp order (deterministic). part: [32] shared.
template <class Op>
__device__ float2 block_all2(float a, float b, Op op, float2* part) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a = op(a, __shfl_xor_sync(0xffffffffu, a, o));
    b = op(b, __shfl_xor_sync(0xffffffffu, b, o));
  }
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = make_float2(a, b);
  __syncthreads();
  float2 r = part[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) r = make_float2(op(r.x, part[w].x), op(r.y, part[w].y));
  __syncthreads();  // part is free again
  return r;
}
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Per-axis log-sum-exp of the token's normalised logits lhat = (l - mean) rstd. With
// `lhat_out`, lhat is also written there (in place over l is allowed: each entry is read
// and written by the same thread).
__device__ float2 axes_lse(const float* l, const float* mean, const float* rstd, int Nr, int n, float* lhat_out,
                           float2* part) {
  float m0 = -INFINITY, m1 = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = (l[i] - mean[i]) * rstd[i];
    if (lhat_out != nullptr) lhat_out[i] = v;
    if (i < Nr) m0 = fmaxf(m0, v);
    else m1 = fmaxf(m1, v);
  }
  const float2 m = block_all2(m0, m1, Max{}, part);
  float s0 = 0.f, s1 = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = lhat_out != nullptr ? lhat_out[i] : (l[i] - mean[i]) * rstd[i];
    if (i < Nr) s0 += expf(v - m.x);
    else s1 += expf(v - m.y);
  }
  const float2 s = block_all2(s0, s1, Add{}, part);
  return make_float2(m.x + logf(s.x), m.y + logf(s.y));
}

// The gates of the caller's routing from the raw logits: S = logp_row[i] + logp_col[j].
__global__ void gates_kernel(int Nr, int Nc, int K, int softmax, const float* logits, const float* mean,
                             const float* rstd, const i32* ids, float* gates) {
  __shared__ float2 part[32];
  const i64 t = blockIdx.x;
  const int n = Nr + Nc;
  const float* l = logits + t * n;
  const float2 lse = axes_lse(l, mean, rstd, Nr, n, nullptr, part);
  auto score = [&](int k) {
    const i32 e = ids[t * K + k];
    if (e < 0) return 0.f;
    const int i = e / Nc, j = Nr + e % Nc;
    return ((l[i] - mean[i]) * rstd[i] - lse.x) + ((l[j] - mean[j]) * rstd[j] - lse.y);  // as the forward groups it
  };
  float mx = -INFINITY, sum = 0.f;
  if (softmax) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) mx = fmaxf(mx, score(k));
    mx = block_all2(mx, 0.f, Max{}, part).x;
    for (int k = threadIdx.x; k < K; k += blockDim.x) sum += expf(score(k) - mx);
    sum = block_all2(sum, 0.f, Add{}, part).x;
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x)
    gates[t * K + k] = softmax ? expf(score(k) - mx) / sum : expf(score(k));
}

// dgates -> dS -> d logp -> through log_softmax, from the raw logits (normalised in place
// into lhat on the way). d logp is built in shared memory [n]: the first `split` warps each
// take a contiguous share of the K tasks into their own copy [n], 32 tasks at a time (per
// batch, each row's and each column's dS summed in task order, then added into its entry
// once), and the copies are then added in warp order: deterministic. History, paper-k512-t4096
// step on the H100: every warp scanning all K tasks for the entries it owns cost 8x the
// instructions (at K = 4096 the step was 39% slower); warp 0 alone handing each task in turn
// to the lane that owned its entry took 0.44 ms (session o), split over 8 warps 0.28 ms
// (session p: issue-bound at ~30 warp instructions a task).
__global__ void scores_backward_kernel(int Nr, int Nc, int K, int split, int softmax, float* logits, const float* mean,
                                       const float* rstd, const i32* ids, const float* gates, const float* dgates,
                                       float* dlogp) {
  extern __shared__ float d[];  // [split][n]
  __shared__ float2 part[32];
  const i64 t = blockIdx.x;
  const int n = Nr + Nc, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* l = logits + t * n;
  for (int i = threadIdx.x; i < split * n; i += blockDim.x) d[i] = 0.f;
  const float2 lse = axes_lse(l, mean, rstd, Nr, n, l, part);  // its barriers also publish d's zeros
  const float* g = gates + t * K;
  const float* dg = dgates + t * K;
  float dot = 0.f;  // softmax gate: sum_k g dg
  if (softmax) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) dot += g[k] * dg[k];
    dot = block_all2(dot, 0.f, Add{}, part).x;
  }
  if (warp < split) {  // 32 tasks at a time, a lane each
    const int per = (K + split - 1) / split, kb = warp * per, ke = min(K, kb + per);
    float* dw = d + warp * n;
    for (int k0 = kb; k0 < ke; k0 += 32) {
      const int k = k0 + lane;
      const i32 e = k < ke ? ids[t * K + k] : -1;
      const float ds_k = e < 0 ? 0.f : softmax ? g[k] * (dg[k] - dot) : g[k] * dg[k];
      const int i_k = e < 0 ? -1 : e / Nc, j_k = e < 0 ? -1 : Nr + e % Nc;
      // The lanes that share a row (a column) form a group; each lane sums its groups' dS in
      // lane order, i.e. task order (all 32 lanes' values broadcast in turn: the same
      // instructions on every lane, no divergence), and the group's first lane adds the sum
      // into the entry. Groups of a batch name distinct entries; the batches follow in order.
      const unsigned mi = __match_any_sync(0xffffffffu, i_k), mj = __match_any_sync(0xffffffffu, j_k);
      float si = 0.f, sj = 0.f;
#pragma unroll
      for (int q = 0; q < 32; ++q) {
        const float v = __shfl_sync(0xffffffffu, ds_k, q);
        if ((mi >> q) & 1u) si += v;
        if ((mj >> q) & 1u) sj += v;
      }
      const unsigned below = (1u << lane) - 1u;  // a group's first lane has no member below it
      if (i_k >= 0 && (mi & below) == 0) dw[i_k] += si;
      if (j_k >= 0 && (mj & below) == 0) dw[j_k] += sj;
      __syncwarp();  // an entry's writer may be another lane in the next batch
    }
  }
  __syncthreads();
  if (split > 1) {  // the copies added in warp order
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      float v = d[i];
      for (int w = 1; w < split; ++w) v += d[w * n + i];
      d[i] = v;
    }
    __syncthreads();
  }
  float s0 = 0.f, s1 = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (i < Nr) s0 += d[i];
    else s1 += d[i];
  }
  const float2 sum = block_all2(s0, s1, Add{}, part);
  float* out = dlogp + t * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x)  // d - softmax(lhat) sum(d), per axis
    out[i] = i < Nr ? d[i] - expf(l[i] - lse.x) * sum.x : d[i] - expf(l[i] - lse.y) * sum.y;
}

// Threads per token for n logits: about 8 entries per thread, 64 to 256.
unsigned token_threads(i64 n) { return n >= 2048 ? 256 : n >= 1024 ? 128 : 64; }

// Warps that share scores_backward_kernel's K tasks: one per 64 tasks, at most 8, and their
// copies of the n entries within 47 KB of dynamic shared memory (room for the kernel's
// static `part` in the 48 KB a launch gets without opting in): K = 512, n = 640: 8 warps
// of 64 tasks; n = 2048: at most 5; K <= 64 or n > 6016: warp 0 alone.
int split_warps(i64 K, i64 n) {
  const i64 by_tasks = (K + 63) / 64, by_memory = (i64{47} << 10) / (n * static_cast<i64>(sizeof(float)));
  return static_cast<int>(std::max<i64>(1, std::min<i64>({8, by_tasks, by_memory})));
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

Status route_gates_of(const Config& cfg, i64 T, const float* logits, const float* mean, const float* rstd,
                      const i32* ids, float* gates, cudaStream_t stream) {
  if (T == 0) return Status::Ok();
  const i64 n = cfg.grid_rows + cfg.grid_cols;
  gates_kernel<<<static_cast<unsigned>(T), token_threads(n), 0, stream>>>(
      static_cast<int>(cfg.grid_rows), static_cast<int>(cfg.grid_cols), static_cast<int>(cfg.top_k),
      cfg.gate == GateKind::softmax, logits, mean, rstd, ids, gates);
  OMNIMOE_CUDA_LAUNCH_CHECK("route gates_kernel");
  return Status::Ok();
}

Status route_scores_backward(const Config& cfg, i64 T, float* logits, const float* mean, const float* rstd,
                             const i32* ids, const float* gates, const float* dgates, float* dlogp,
                             cudaStream_t stream) {
  if (T == 0) return Status::Ok();
  const i64 n = cfg.grid_rows + cfg.grid_cols;  // <= 2 kRouteMaxExtent: 32 KB of shared memory for one copy
  const int split = split_warps(cfg.top_k, n);  // split copies of n floats: at most 47 KB
  const unsigned threads = std::max(token_threads(n), 32u * static_cast<unsigned>(split));
  scores_backward_kernel<<<static_cast<unsigned>(T), threads, split * n * sizeof(float), stream>>>(
      static_cast<int>(cfg.grid_rows), static_cast<int>(cfg.grid_cols), static_cast<int>(cfg.top_k), split,
      cfg.gate == GateKind::softmax, logits, mean, rstd, ids, gates, dgates, dlogp);
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
