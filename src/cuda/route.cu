// CUDA route stage: router statistics and the fused per-token kernel (norm, log_softmax,
// exact bounded top-K, gates). The router product itself is a cuBLASLt call (layer.cu).
#include <algorithm>
#include <cub/block/block_merge_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/cuda.cuh"
#include "cuda/topk_region.hpp"

namespace omnimoe::cuda {
namespace {

// ---- statistics -------------------------------------------------------------------------

constexpr int kStatCols = 32, kStatRows = 8;

// One block per (32 columns, row block of kStatBlockRows); every thread walks a fixed set of
// the block's rows, partial sums are combined in a fixed order: deterministic. Two passes
// (mean, then squared deviations), in double.
__global__ void chunk_moments_kernel(const float* __restrict__ l, i64 rows, i64 n, double* __restrict__ out) {
  __shared__ double part[kStatRows][kStatCols];
  __shared__ double mean_s[kStatCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const i64 c = static_cast<i64>(blockIdx.x) * kStatCols + tx;
  const i64 r0 = static_cast<i64>(blockIdx.y) * kStatBlockRows, r1 = min(rows, r0 + kStatBlockRows);
  double s = 0;
  if (c < n)
    for (i64 r = r0 + ty; r < r1; r += kStatRows) s += l[r * n + c];
  part[ty][tx] = s;
  __syncthreads();
  if (ty == 0) {
    double tot = 0;
    for (int i = 0; i < kStatRows; ++i) tot += part[i][tx];
    mean_s[tx] = tot / static_cast<double>(r1 - r0);
  }
  __syncthreads();
  const double m = mean_s[tx];
  double q = 0;
  if (c < n)
    for (i64 r = r0 + ty; r < r1; r += kStatRows) {
      const double d = l[r * n + c] - m;
      q += d * d;
    }
  __syncthreads();
  part[ty][tx] = q;
  __syncthreads();
  if (ty == 0 && c < n) {
    double tot = 0;
    for (int i = 0; i < kStatRows; ++i) tot += part[i][tx];
    double* o = out + static_cast<i64>(blockIdx.y) * 2 * n;
    o[c] = m;
    o[n + c] = tot;
  }
}

// Merges the moments of nb rows (mean mb, sum of squared deviations m2b) into (cnt, m, m2)
// (Chan et al.); merging nothing (nb = 0) or into nothing (cnt = 0) is exact.
__device__ __forceinline__ void chan_merge(double& cnt, double& m, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double tot = cnt + nb;
  const double d = mb - m, f = nb / tot;
  m += d * f;
  m2 += m2b + d * d * cnt * f;
  cnt = tot;
}

// Combines the chunks' row-block moments, one warp per column: lane l merges row blocks
// l, l + 32, .. in order, then the lanes' moments merge in a fixed tree (deterministic; a
// thread walking all T / 256 blocks in order had cost 9 us at T = 4096, each step waiting
// on a double division). Then writes mean / rstd and updates the running statistics; or
// reads the running statistics; or writes the identity.
__global__ void stats_kernel(RouteStatsArgs a, i64 Nr, i64 n, int norm, int train) {
  const i64 c = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (c >= n) return;  // warp-uniform
  const bool is_row = c < Nr;
  const i64 j = is_row ? c : c - Nr;
  if (!norm) {
    if (lane == 0) {
      a.mean[c] = 0.f;
      a.rstd[c] = 1.f;
    }
    return;
  }
  float* rm = is_row ? a.running_mean_row : a.running_mean_col;
  float* rv = is_row ? a.running_var_row : a.running_var_col;
  double mean, var;
  if (train) {
    // Row block g of chunk k = g / blocks is partial[g]: every chunk but the last is full.
    const i64 blocks = stat_blocks(a.chunk_rows), chunks = (a.T + a.chunk_rows - 1) / a.chunk_rows;
    const i64 G = (chunks - 1) * blocks + stat_blocks(a.T - (chunks - 1) * a.chunk_rows);
    double cnt = 0, m = 0, m2 = 0;
    for (i64 g = lane; g < G; g += 32) {
      const i64 k = g / blocks, rows = min(a.chunk_rows, a.T - k * a.chunk_rows);
      const double nb = static_cast<double>(min(kStatBlockRows, rows - (g - k * blocks) * kStatBlockRows));
      const double* p = a.partial + g * 2 * n;
      chan_merge(cnt, m, m2, nb, p[c], p[n + c]);
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double oc = __shfl_down_sync(0xffffffffu, cnt, o), om = __shfl_down_sync(0xffffffffu, m, o),
                   om2 = __shfl_down_sync(0xffffffffu, m2, o);
      if ((lane & (2 * o - 1)) == 0) chan_merge(cnt, m, m2, oc, om, om2);
    }
    mean = m;
    var = m2 / static_cast<double>(a.T);
    if (lane == 0 && a.update_running) {
      const double unbiased = var * static_cast<double>(a.T) / static_cast<double>(a.T - 1);
      rm[j] = static_cast<float>((1 - kBatchnormMomentum) * rm[j] + kBatchnormMomentum * mean);
      rv[j] = static_cast<float>((1 - kBatchnormMomentum) * rv[j] + kBatchnormMomentum * unbiased);
    }
  } else {
    mean = rm[j];
    var = rv[j];
  }
  if (lane == 0) {
    a.mean[c] = static_cast<float>(mean);
    a.rstd[c] = static_cast<float>(1.0 / sqrt(var + kBatchnormEps));
  }
}

// ---- top-K ------------------------------------------------------------------------------

// Order-preserving map of a float to an unsigned integer (after folding -0 into +0), so that
// every comparison of the selection is an exact integer comparison.
__device__ __forceinline__ unsigned ord(float v) {
  const unsigned b = __float_as_uint(v + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float unord(unsigned u) {
  return __uint_as_float((u & 0x80000000u) ? (u ^ 0x80000000u) : ~u);
}
// Ascending sort of these keys = descending value, then ascending id.
__device__ __forceinline__ unsigned long long key_of(float v, unsigned id) {
  return (static_cast<unsigned long long>(~ord(v)) << 32) | id;
}
__device__ __forceinline__ float key_value(unsigned long long k) { return unord(~static_cast<unsigned>(k >> 32)); }
__device__ __forceinline__ unsigned key_id(unsigned long long k) { return static_cast<unsigned>(k); }

// AX: axis entries per thread (Nr, Nc <= THREADS * AX); SEL: selected cells per thread
// (K <= THREADS * SEL). Separate, so a large K does not inflate the axis sorts.
template <int THREADS, int AX, int SEL>
struct TopkSmem {
  static constexpr int kAxis = THREADS * AX;
  static constexpr int kSel = THREADS * SEL;
  // Both sorts compare packed keys (key_of: ascending = descending value, then ascending
  // id), so equal values come out in id order without a stable sort. Merge sorts: log2
  // THREADS rounds of merge-path steps, where radix sorts took 8 passes (32-bit values with
  // the id as payload) and 13 (the selection's 32 + ceil(log2 N) bits at N = 102400) of
  // digit ranking; at paper-k512-t4096 the kernel went 334 -> 265 µs (H100, session s).
  using Sort = cub::BlockMergeSort<unsigned long long, THREADS, AX>;
  using SortCells = cub::BlockMergeSort<unsigned long long, THREADS, SEL>;
  using ReduceF = cub::BlockReduce<float, THREADS>;
  using ReduceI = cub::BlockReduce<int, THREADS>;
  using ReduceU = cub::BlockReduce<unsigned, THREADS>;
  using Scan = cub::BlockScan<int, THREADS>;
  union {
    typename SortCells::TempStorage sort_cells;
    typename ReduceF::TempStorage reduce_f;
    typename ReduceI::TempStorage reduce_i;
    typename ReduceU::TempStorage reduce_u;
    typename Scan::TempStorage scan;
  } tmp;
  // Each axis is sorted in its own key array: the merge sort's scratch (kAxis + 1 keys) is
  // that array until the sorted keys are stored there, instead of a third axis-sized area in
  // `tmp`. At <256, 16, 4> (axes up to 4096) that is 32 KB: 123 -> 98 KB, two blocks an SM
  // (the other tiles gain 16 bytes).
  union {
    typename Sort::TempStorage rows_sort;
    unsigned long long rows[kAxis];  // sorted row keys (log-prob, row id)
  };
  union {
    typename Sort::TempStorage cols_sort;
    unsigned long long cols[kAxis];  // sorted column keys
  };
  unsigned long long sel[kSel];    // selected cells (score, expert id)
  int row_off[kAxis];              // first output slot of each candidate row's cells above tau
  float bcast_f;
  int bcast_i;
  unsigned bcast_u;
};

// log_softmax of one axis of the token's normalised logits, sorted into keys (blocked:
// thread i holds ranks i*ITEMS ..), stored to `out`.
template <int THREADS, int ITEMS, class S>
__device__ void axis_sorted(S& sm, const float* l, const float* mean, const float* rstd, i64 n,
                            typename S::Sort::TempStorage& scratch, unsigned long long* out) {
  float v[ITEMS];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const i64 i = static_cast<i64>(threadIdx.x) * ITEMS + j;
    v[j] = i < n ? (l[i] - mean[i]) * rstd[i] : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
  mx = typename S::ReduceF(sm.tmp.reduce_f).Reduce(mx, [](float x, float y) { return fmaxf(x, y); });
  if (threadIdx.x == 0) sm.bcast_f = mx;
  __syncthreads();
  mx = sm.bcast_f;
  float s = 0;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j)
    if (static_cast<i64>(threadIdx.x) * ITEMS + j < n) s += expf(v[j] - mx);
  s = typename S::ReduceF(sm.tmp.reduce_f).Sum(s);
  if (threadIdx.x == 0) sm.bcast_f = mx + logf(s);
  __syncthreads();
  const float lse = sm.bcast_f;
  unsigned long long k[ITEMS];
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const i64 i = static_cast<i64>(threadIdx.x) * ITEMS + j;
    k[j] = i < n ? key_of(v[j] - lse, static_cast<unsigned>(i)) : ~0ull;
  }
  __syncthreads();
  typename S::Sort(scratch).Sort(k, [](unsigned long long x, unsigned long long y) { return x < y; });
  __syncthreads();  // `out` is the sort's scratch: every thread has read its keys back first
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) out[threadIdx.x * ITEMS + j] = k[j];
  __syncthreads();
}

// Number of q in [0, qn) with ord(a + b[q]) >= u (strict: > u); b sorted descending, so the
// predicate holds on a prefix. A caller that knows the count is at least q0 passes it.
__device__ __forceinline__ int prefix_count(float a, const unsigned long long* cols, int qn, unsigned u, bool strict,
                                            int q0 = 0) {
  int lo = q0, hi = qn;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const unsigned o = ord(a + key_value(cols[mid]));
    if (strict ? o > u : o >= u) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The whole selection for token t, by one thread block.
template <int THREADS, int AX, int SEL>
__device__ __forceinline__ void topk_token(TopkSmem<THREADS, AX, SEL>& sm, const RouteTopkArgs& a, i64 t, i64 Nr,
                                           i64 Nc, i64 K, int gate_softmax) {
  using S = TopkSmem<THREADS, AX, SEL>;
  const float* l = a.logits + t * (Nr + Nc);
  axis_sorted<THREADS, AX>(sm, l, a.mean, a.rstd, Nr, sm.rows_sort, sm.rows);
  axis_sorted<THREADS, AX>(sm, l + Nr, a.mean + Nr, a.rstd + Nr, Nc, sm.cols_sort, sm.cols);

  // 1. tau = ord of the K-th largest value of S, searched over the block of the best
  //    min(K, Nr) rows x min(K, Nc) columns (it holds the K-th largest value): bisection
  //    on the count of cells at or above a threshold, stopped as soon as that count is K
  //    (about half the steps with distinct values: the gap below the K-th value is wide).
  //    Each of a thread's rows keeps the bracket its count lies in: the count at a tested
  //    threshold that became lo bounds the later counts from above (their thresholds are
  //    higher), one that became hi + 1 from below, so the binary searches shrink with the
  //    interval (the counts, and with them tau, are those of a search over [0, ck)).
  constexpr int RPT = AX < SEL ? AX : SEL;  // rows per thread: rk <= min(Nr, K) <= THREADS min(AX, SEL)
  const int rk = static_cast<int>(min(K, Nr)), ck = static_cast<int>(min(K, Nc));
  unsigned lo = ord(key_value(sm.rows[rk - 1]) + key_value(sm.cols[ck - 1]));
  unsigned hi = ord(key_value(sm.rows[0]) + key_value(sm.cols[0]));
  int qmin[RPT], qmax[RPT];  // row threadIdx.x + i THREADS: its count lies in [qmin, qmax]
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    qmin[i] = 0;
    qmax[i] = static_cast<int>(threadIdx.x) + i * THREADS < rk ? ck : 0;
  }
  bool exact = false;  // exactly K cells reach lo
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo + 1) / 2;
    int cnt = 0, cur[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int p = threadIdx.x + i * THREADS;
      cur[i] = qmin[i] < qmax[i] ? prefix_count(key_value(sm.rows[p]), sm.cols, qmax[i], mid, false, qmin[i]) : qmin[i];
      cnt += cur[i];
    }
    cnt = typename S::ReduceI(sm.tmp.reduce_i).Sum(cnt);
    if (threadIdx.x == 0) sm.bcast_i = cnt;
    __syncthreads();
    cnt = sm.bcast_i;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RPT; ++i) (cnt >= K ? qmax[i] : qmin[i]) = cur[i];
    if (cnt >= K) lo = mid;
    else hi = mid - 1;
    if (cnt == K) {  // tau is the smallest of those K cells: no need to narrow [lo, hi] further
      exact = true;
      break;
    }
  }
  if (exact) {
    // Row p's smallest cell at or above lo is its last one there (the cells that reach lo
    // are a prefix of the row; their number is the count at lo, qmax).
    unsigned m = 0xffffffffu;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int p = threadIdx.x + i * THREADS, c = qmax[i];
      if (c > 0) m = min(m, ord(key_value(sm.rows[p]) + key_value(sm.cols[c - 1])));
    }
    m = typename S::ReduceU(sm.tmp.reduce_u).Reduce(m, [](unsigned x, unsigned y) { return min(x, y); });
    if (threadIdx.x == 0) sm.bcast_u = m;
    __syncthreads();
    lo = sm.bcast_u;
    __syncthreads();
  }
  const unsigned tau = lo;

  // 2. Rows / columns that can reach tau (a prefix of each sorted axis: rounding ties of the
  //    sums may lie outside the block), then per row the cells above and at tau.
  const float amax = key_value(sm.rows[0]), bmax = key_value(sm.cols[0]);
  const int pn = prefix_count(bmax, sm.rows, static_cast<int>(Nr), tau, false);  // a + bmax >= tau
  const int qn = prefix_count(amax, sm.cols, static_cast<int>(Nc), tau, false);
  int gt[AX], ge[AX];
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    const int p = threadIdx.x * AX + j;
    gt[j] = ge[j] = 0;
    if (p < pn) {
      const float av = key_value(sm.rows[p]);
      gt[j] = prefix_count(av, sm.cols, qn, tau, true);
      ge[j] = prefix_count(av, sm.cols, qn, tau, false);
    }
  }
  for (int i = threadIdx.x; i < S::kSel; i += THREADS) sm.sel[i] = ~0ull;
  int gt_off[AX], n_gt;
  __syncthreads();
  typename S::Scan(sm.tmp.scan).ExclusiveSum(gt, gt_off, n_gt);
  __syncthreads();
  auto cell_key = [&](int p, int q) {
    const unsigned e = key_id(sm.rows[p]) * static_cast<unsigned>(Nc) + key_id(sm.cols[q]);
    return key_of(key_value(sm.rows[p]) + key_value(sm.cols[q]), e);
  };
  // Each output slot finds its row by binary search over the row offsets, so the rows with
  // many cells (the best ones) do not serialise on one thread.
#pragma unroll
  for (int j = 0; j < AX; ++j) sm.row_off[threadIdx.x * AX + j] = gt_off[j];
  __syncthreads();
  for (int i = threadIdx.x; i < n_gt && i < K; i += THREADS) {
    int lo = 0, hi = pn - 1;  // the last row whose offset is <= i
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (sm.row_off[mid] <= i) lo = mid;
      else hi = mid - 1;
    }
    sm.sel[i] = cell_key(lo, i - sm.row_off[lo]);
  }

  // 3. Ties at tau: all of them when they fit, else the smallest ids (threshold on the id).
  const int need = static_cast<int>(K) - n_gt;
  int eq[AX], eq_off[AX], n_eq;
#pragma unroll
  for (int j = 0; j < AX; ++j) eq[j] = ge[j] - gt[j];
  typename S::Scan(sm.tmp.scan).ExclusiveSum(eq, eq_off, n_eq);
  __syncthreads();
  unsigned id_cap = 0xffffffffu;  // ties with id <= id_cap are taken
  if (n_eq > need) {
    unsigned elo = 0, ehi = static_cast<unsigned>(Nr * Nc - 1);
    while (elo < ehi) {  // smallest E with #{ties with id <= E} >= need
      const unsigned mid = elo + (ehi - elo) / 2;
      int cnt = 0;
#pragma unroll
      for (int j = 0; j < AX; ++j)
        for (int q = gt[j]; q < ge[j]; ++q) cnt += key_id(cell_key(threadIdx.x * AX + j, q)) <= mid;
      cnt = typename S::ReduceI(sm.tmp.reduce_i).Sum(cnt);
      if (threadIdx.x == 0) sm.bcast_i = cnt;
      __syncthreads();
      if (sm.bcast_i >= need) ehi = mid;
      else elo = mid + 1;
      __syncthreads();
    }
    id_cap = elo;
#pragma unroll
    for (int j = 0; j < AX; ++j) {
      eq[j] = 0;
      for (int q = gt[j]; q < ge[j]; ++q) eq[j] += key_id(cell_key(threadIdx.x * AX + j, q)) <= id_cap;
    }
    typename S::Scan(sm.tmp.scan).ExclusiveSum(eq, eq_off, n_eq);
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    int pos = n_gt + eq_off[j];
    for (int q = gt[j]; q < ge[j]; ++q) {
      const unsigned long long c = cell_key(threadIdx.x * AX + j, q);
      if (key_id(c) <= id_cap && pos < K) sm.sel[pos++] = c;
    }
  }
  __syncthreads();

  // 4. Output order (descending score, ascending id): one merge sort of the keys (the
  //    unused slots, ~0, sort last).
  unsigned long long k[SEL];
#pragma unroll
  for (int j = 0; j < SEL; ++j) k[j] = sm.sel[threadIdx.x * SEL + j];
  typename S::SortCells(sm.tmp.sort_cells).Sort(k, [](unsigned long long x, unsigned long long y) { return x < y; });
  __syncthreads();
  if (threadIdx.x == 0) sm.bcast_f = key_value(k[0]);  // thread 0 holds the best cell
  __syncthreads();
  const float smax = sm.bcast_f;
  float denom = 1.f;
  if (gate_softmax) {
    float s = 0;
#pragma unroll
    for (int j = 0; j < SEL; ++j)
      if (threadIdx.x * SEL + j < K) s += expf(key_value(k[j]) - smax);
    s = typename S::ReduceF(sm.tmp.reduce_f).Sum(s);
    if (threadIdx.x == 0) sm.bcast_f = s;
    __syncthreads();
    denom = sm.bcast_f;
  }
  const i64 N = Nr * Nc;
#pragma unroll
  for (int j = 0; j < SEL; ++j) {
    const i64 pos = static_cast<i64>(threadIdx.x) * SEL + j;
    if (pos >= K) continue;
    const float sc = key_value(k[j]);
    const i32 e = static_cast<i32>(min(static_cast<i64>(key_id(k[j])), N - 1));  // in range even for NaN input
    const float g = gate_softmax ? expf(sc - smax) / denom : expf(sc);
    const i64 o = t * K + pos;
    a.ids32[o] = e;
    a.gates32[o] = g;
    if (a.ids_out_i64) static_cast<i64*>(a.ids_out)[o] = e;
    else static_cast<i32*>(a.ids_out)[o] = e;
    if (a.scores_out) a.scores_out[o] = sc;
    if (a.gates_out) a.gates_out[o] = g;
  }
}

// The small tiles (AX * SEL <= 4: K <= 512, axes <= 512) at 1536 threads per SM: 40
// registers, no spills (44 before: 5 blocks of 256 threads, 62% occupancy, and the kernel
// issue-bound, session p); at 2048 threads per SM ptxas spilled.
template <int THREADS, int AX, int SEL>
__global__ void __launch_bounds__(THREADS, AX * SEL <= 4 ? 1536 / THREADS : 1)
    topk_kernel(RouteTopkArgs a, i64 Nr, i64 Nc, i64 K, int gate_softmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  topk_token<THREADS, AX, SEL>(*reinterpret_cast<TopkSmem<THREADS, AX, SEL>*>(smem_raw), a, blockIdx.x, Nr, Nc, K,
                               gate_softmax);
}

template <int THREADS, int AX, int SEL>
__global__ void __launch_bounds__(THREADS)
    topk_list_kernel(RouteTopkArgs a, i64 Nr, i64 Nc, i64 K, int gate_softmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<TopkSmem<THREADS, AX, SEL>*>(smem_raw);
  const int count = *a.fallback_count;
  for (int i = blockIdx.x; i < count; i += gridDim.x) {
    topk_token<THREADS, AX, SEL>(sm, a, a.fallback_flags[i], Nr, Nc, K, gate_softmax);
    __syncthreads();  // the next token reuses the shared memory
  }
}

template <int THREADS, int AX, int SEL>
Status launch_topk(const RouteTopkArgs& a, cudaStream_t stream) {
  const Config& c = *a.cfg;
  // The tile's limits (topk_token's per-thread rows and selected cells): route_topk picks the
  // instantiation so that these hold; a change there that broke them would drop rows silently.
  if (c.top_k > i64{THREADS} * SEL || std::max(c.grid_rows, c.grid_cols) > i64{THREADS} * AX)
    return {StatusCode::internal, "CUDA router: top-K tile too small for the grid or K"};
  const bool listed = a.fallback_count != nullptr;
  const auto kernel = listed ? topk_list_kernel<THREADS, AX, SEL> : topk_kernel<THREADS, AX, SEL>;
  const int bytes = static_cast<int>(sizeof(TopkSmem<THREADS, AX, SEL>));
  OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  // One block per token; or, after the warp kernel, one wave of resident blocks walking the
  // list of tokens it left (their number is known only on the device). The list is usually
  // empty, but a router whose logits all tie (zero-initialised weights) lists every token:
  // a block per SM (tried in session w, 0.5 us less when empty) would serve those 8x slower.
  i64 blocks = a.rows;
  if (listed) {
    unsigned resident = 0;
    OMNIMOE_RETURN_IF_ERROR(resident_blocks(kernel, THREADS, resident, static_cast<std::size_t>(bytes)));
    blocks = std::min<i64>(a.rows, resident);
  }
  kernel<<<static_cast<unsigned>(blocks), THREADS, bytes, stream>>>(a, c.grid_rows, c.grid_cols, c.top_k,
                                                                     c.gate == GateKind::softmax);
  OMNIMOE_CUDA_LAUNCH_CHECK("route topk_kernel");
  return Status::Ok();
}

// ---- top-K, small K: one warp per token -------------------------------------------------
// For K <= 32 and axes of at most 32 * VPL entries. The same three steps as topk_kernel,
// with the sorted axes reduced to their best min(K, n) entries (one per lane) and the
// selection done with warp shuffles. Tokens where exact ties touch the threshold (rows /
// columns outside the candidate lists reaching it; for K > kRegionMaxK also several cells
// equal to the K-th value) are flagged for topk_kernel, which resolves ties by id in full
// generality.
constexpr int kWarpTopkWarps = 8;

__device__ __forceinline__ unsigned long long warp_min_u64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// One merge stage of a warp bitonic sort: sorts the bitonic runs of `size` lanes, each
// ascending where lane & size is 0 (DESCENDING: descending), the other way elsewhere.
template <bool DESCENDING, class T>
__device__ __forceinline__ T warp_bitonic_merge(T k, int size) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int stride = size >> 1; stride > 0; stride >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, k, stride);
    const bool take_first = (((lane & size) == 0) == ((lane & stride) == 0)) != DESCENDING;
    k = take_first ? (other < k ? other : k) : (other > k ? other : k);
  }
  return k;
}

// Bitonic sort of 32 keys across the warp, one per lane, ascending (DESCENDING: descending).
template <bool DESCENDING, class T>
__device__ __forceinline__ T warp_bitonic32(T k) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) k = warp_bitonic_merge<DESCENDING>(k, size);
  return k;
}

// Ascending sort of 32 keys, one per lane.
__device__ __forceinline__ unsigned long long warp_sort32(unsigned long long k) { return warp_bitonic32<false>(k); }

// The k-th largest (1-based) of the 32 lanes' values.
__device__ __forceinline__ unsigned warp_kth_largest(unsigned m, int k) {
  return __shfl_sync(0xffffffffu, warp_bitonic32<true>(m), k - 1);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Ascending bitonic sort of 64 keys held two per lane (element lane + 32 h in k[h]).
__device__ __forceinline__ void warp_sort64(unsigned long long (&k)[2]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int size = 2; size <= 64; size <<= 1)
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (stride == 32) {  // partner is the same lane's other half; i < partner, ascending
        const unsigned long long lo = k[0] < k[1] ? k[0] : k[1], hi = k[0] < k[1] ? k[1] : k[0];
        k[0] = lo;
        k[1] = hi;
        continue;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = lane + 32 * h;
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, k[h], stride);
        const bool take_min = ((i & size) == 0) == ((i & stride) == 0);
        k[h] = take_min ? (other < k[h] ? other : k[h]) : (other > k[h] ? other : k[h]);
      }
    }
}

// Normalised log-probabilities of one axis (lane holds entries lane + 32 j), and the keys of
// its best `keep` (<= 32) entries: lane r returns the r-th best (~0 beyond keep). `next`
// gets the best value among the entries not taken (NaN skipped) and `has_next` whether
// there is one, so the caller can test the rest without keeping the axis in registers.
// Selection: the keep-th largest of the 32 lane maxima is a lower bound theta on the keep-th
// best entry (the keep best lane maxima are entries >= it), so the answer lies among the
// entries >= theta; when at most 64 of them exist (the usual case) one warp sort of those
// candidates finishes, else `keep` rounds of a warp-wide minimum do.
template <int VPL>
__device__ unsigned long long warp_axis_best(const float* l, const float* mean, const float* rstd, int n, int keep,
                                             float* vals, float& next, bool& has_next,
                                             unsigned long long* buf) {
  const int lane = threadIdx.x & 31;
  float* v = vals + lane;  // entry lane + 32 j is v[32 j]: each lane touches only its own
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int i = lane + 32 * j;
    v[32 * j] = i < n ? (l[i] - mean[i]) * rstd[i] : -INFINITY;
    mx = fmaxf(mx, v[32 * j]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j)
    if (lane + 32 * j < n) sum += expf(v[32 * j] - mx);
  sum = warp_sum(sum);
  const float lse = mx + logf(sum);
  unsigned best_ord = 0;  // this lane's best entry as ord (0: none)
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    v[32 * j] -= lse;
    if (lane + 32 * j < n) best_ord = max(best_ord, ord(v[32 * j]));
  }
  const unsigned theta = warp_kth_largest(best_ord, keep);  // the keep-th largest lane maximum
  int count = 0;
#pragma unroll
  for (int j = 0; j < VPL; ++j) count += (lane + 32 * j < n && ord(v[32 * j]) >= theta) ? 1 : 0;
  int off = count;  // inclusive scan over lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int w = __shfl_up_sync(0xffffffffu, off, o);
    if (lane >= o) off += w;
  }
  const int total = __shfl_sync(0xffffffffu, off, 31);
  off -= count;
  unsigned long long kth;
  unsigned long long mine = ~0ull;
  if (total <= 64) {
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int i = lane + 32 * j;
      if (i < n && ord(v[32 * j]) >= theta) buf[off++] = key_of(v[32 * j], static_cast<unsigned>(i));
    }
    __syncwarp();
    unsigned long long k[2] = {lane < total ? buf[lane] : ~0ull, lane + 32 < total ? buf[lane + 32] : ~0ull};
    __syncwarp();
    warp_sort64(k);
    kth = __shfl_sync(0xffffffffu, k[0], keep - 1);
    if (lane < keep) mine = k[0];
  } else {  // many entries tie around theta: keep rounds of a warp minimum
    unsigned taken = 0;  // bit j: entry lane + 32 j already selected
    for (int r = 0; r < keep; ++r) {
      unsigned long long best = ~0ull;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int i = lane + 32 * j;
        if (i < n && !((taken >> j) & 1u)) {
          const unsigned long long key = key_of(v[32 * j], static_cast<unsigned>(i));
          best = key < best ? key : best;
        }
      }
      best = warp_min_u64(best);
      const unsigned id = key_id(best);
      if (static_cast<int>(id % 32) == lane) taken |= 1u << (id / 32);
      if (lane == r) mine = best;
    }
    kth = __shfl_sync(0xffffffffu, mine, keep - 1);
  }
  // The taken entries are exactly those with a key at or below the keep-th (ids are unique).
  float nx = -INFINITY;
  bool has = false;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int i = lane + 32 * j;
    if (i < n && !isnan(v[32 * j]) && key_of(v[32 * j], static_cast<unsigned>(i)) > kth) {
      nx = fmaxf(nx, v[32 * j]);
      has = true;
    }
  }
  next = warp_max(nx);
  has_next = __any_sync(0xffffffffu, has);
  return mine;
}

// warp_axis_best for a full axis (n = 32 VPL entries, rows 16-byte aligned: the language-model
// grids 64, 256 and 1024), with about a third of its instructions; the same selection and
// `next`. The axis stays in registers (lane holds entries 32 W q + W lane + c, W-wide vector
// loads), unshifted: v - lse is recomputed where needed, and the lane's best shifted entry is
// its best entry minus lse (subtraction is monotone). lse is NaN exactly when an entry is NaN
// or +inf or every entry is -inf (the sum of exponentials is then NaN), and then every shifted
// entry is NaN: the general rounds decide; otherwise lse is finite and no shifted entry is NaN,
// so an ord comparison with theta is a float comparison. The candidates (shifted entries >= theta) are written in
// the same pass, placed by ballots. `next`: the first candidate after the keep-th when there
// is one (every entry outside the candidates is below it), else the best entry below theta.
template <int VPL>
__device__ unsigned long long warp_axis_best_full(const float* __restrict__ l, const float* __restrict__ mean,
                                                  const float* __restrict__ rstd, int keep, float& next, bool& has_next,
                                                  unsigned long long* buf) {
  constexpr int W = VPL < 4 ? VPL : 4;  // floats per vector load
  static_assert(VPL % W == 0 && (W == 2 || W == 4), "full axes of 64, 128, ... entries");
  const int lane = threadIdx.x & 31;
  auto id_of = [&](int j) { return static_cast<unsigned>(32 * W * (j / W) + W * lane + j % W); };
  float v[VPL];
  float lmx = -INFINITY;  // fmaxf skips NaN
#pragma unroll
  for (int q = 0; q < VPL / W; ++q) {
    const int i = 32 * W * q + W * lane;
    float lv[W], mv[W], rv[W];
    if constexpr (W == 4) {
      *reinterpret_cast<float4*>(lv) = *reinterpret_cast<const float4*>(l + i);
      *reinterpret_cast<float4*>(mv) = __ldg(reinterpret_cast<const float4*>(mean + i));
      *reinterpret_cast<float4*>(rv) = __ldg(reinterpret_cast<const float4*>(rstd + i));
    } else {
      *reinterpret_cast<float2*>(lv) = *reinterpret_cast<const float2*>(l + i);
      *reinterpret_cast<float2*>(mv) = __ldg(reinterpret_cast<const float2*>(mean + i));
      *reinterpret_cast<float2*>(rv) = __ldg(reinterpret_cast<const float2*>(rstd + i));
    }
#pragma unroll
    for (int c = 0; c < W; ++c) {
      // Rounded before any later subtraction (never fused into v - lse): every pass below
      // recomputes v - lse from this value and must agree with lmx - lse.
      v[W * q + c] = __fmul_rn(lv[c] - mv[c], rv[c]);
      lmx = fmaxf(lmx, v[W * q + c]);
    }
  }
  // The warp maximum as an integer maximum (lane maxima are never NaN; ord folds -0 into +0,
  // which may flip the sign of a zero v - mx but changes neither its exponential nor lse).
  const float mx = unord(__reduce_max_sync(0xffffffffu, ord(lmx)));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) sum += __expf(v[j] - mx);
  sum = warp_sum(sum);
  const float lse = mx + logf(sum);

  const unsigned theta = warp_kth_largest(ord(lmx - lse), keep);  // the keep-th largest lane maximum
  const float theta_f = unord(theta);
  const unsigned lt = (1u << lane) - 1u;
  int total = 1 << 30;  // NaN case: every entry ties at the NaN image (the general rounds)
  if (!isnan(lse)) {
    total = 0;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const float x = v[j] - lse;
      const bool c = x >= theta_f;
      const unsigned b = __ballot_sync(0xffffffffu, c);
      if (b != 0u) {  // warp-uniform: most j hold no candidate in any lane
        const int pos = total + __popc(b & lt);
        if (c && pos < 64) buf[pos] = key_of(x, id_of(j));
        total += __popc(b);
      }
    }
  }
  unsigned long long kth, mine = ~0ull, after = ~0ull;  // after: the (keep+1)-th best key
  if (total <= 64) {
    __syncwarp();
    if (total <= 32) {
      const unsigned long long k = warp_sort32(lane < total ? buf[lane] : ~0ull);
      kth = __shfl_sync(0xffffffffu, k, keep - 1);
      after = __shfl_sync(0xffffffffu, k, keep & 31);  // used only where total > keep, so keep < 32
      if (lane < keep) mine = k;
    } else {
      unsigned long long k[2] = {buf[lane], lane + 32 < total ? buf[lane + 32] : ~0ull};
      warp_sort64(k);
      kth = __shfl_sync(0xffffffffu, k[0], keep - 1);
      after = __shfl_sync(0xffffffffu, keep < 32 ? k[0] : k[1], keep & 31);
      if (lane < keep) mine = k[0];
    }
  } else {                         // many entries tie around theta (or NaN): keep rounds of a warp minimum
    unsigned long long taken = 0;  // bit j: this lane's entry j already selected
    for (int r = 0; r < keep; ++r) {
      unsigned long long best = ~0ull;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const unsigned long long key = key_of(v[j] - lse, id_of(j));
        if (!((taken >> j) & 1ull)) best = key < best ? key : best;
      }
      best = warp_min_u64(best);
      const unsigned id = key_id(best);
      if (static_cast<int>((id % (32 * W)) / W) == lane) taken |= 1ull << ((id / (32 * W)) * W + id % W);
      if (lane == r) mine = best;
    }
    kth = __shfl_sync(0xffffffffu, mine, keep - 1);
  }
  __syncwarp();                       // buf is read above (or partly written and unread): the column axis reuses it
  if (total <= 64 && total > keep) {  // `after` is a candidate (not NaN: lse is not NaN here)
    next = key_value(after);
    has_next = true;
    return mine;
  }
  // The best entry not taken, NaN skipped (the taken ones: keys at or below the keep-th).
  float nx = -INFINITY;
  bool has = false;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const float x = v[j] - lse;
    if (!isnan(x) && key_of(x, id_of(j)) > kth) {
      nx = fmaxf(nx, x);
      has = true;
    }
  }
  next = warp_max(nx);
  has_next = __any_sync(0xffffffffu, has);
  return mine;
}

// The 32 smallest of 64 keys (two a lane), ascending in lane order: each half sorted, the
// halves merged into a bitonic sequence of the 32 smallest, which one merge stage sorts.
__device__ __forceinline__ unsigned long long warp_best32_of64(unsigned long long k0, unsigned long long k1) {
  const int lane = threadIdx.x & 31;
  k0 = warp_sort32(k0);
  k1 = warp_sort32(k1);
  const unsigned long long r = __shfl_sync(0xffffffffu, k1, 31 - lane);
  return warp_bitonic_merge<false>(r < k0 ? r : k0, 32);
}

// FULL: both axes have 32 VPL entries and 16-byte aligned rows (warp_axis_best_full).
template <int VPL, bool FULL>
__global__ void __launch_bounds__(kWarpTopkWarps * 32)
    topk_warp_kernel(const __grid_constant__ RouteTopkArgs a, const __grid_constant__ TopkRegion region, int Nr, int Nc,
                     int K, int gate_softmax) {
  __shared__ unsigned long long cells[kWarpTopkWarps][32];
  __shared__ unsigned long long cand[kWarpTopkWarps][64];  // axis candidates (warp_axis_best)
  // The general form's axis being selected, in shared memory rather than registers: with its
  // bounds checks, 32 VPL registers a thread would cap an SM at a few warps of this
  // latency-bound kernel.
  __shared__ float vals[kWarpTopkWarps][FULL ? 1 : 32 * VPL];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const i64 t = static_cast<i64>(blockIdx.x) * kWarpTopkWarps + warp;
  if (t >= a.rows) return;
  const float* l = a.logits + t * (Nr + Nc);
  const int rk = min(K, Nr), ck = min(K, Nc);
  float rnext, cnext;  // best row / column value outside the candidate lists
  bool rhas, chas;
  unsigned long long rkey, ckey;
  if constexpr (FULL) {
    rkey = warp_axis_best_full<VPL>(l, a.mean, a.rstd, rk, rnext, rhas, cand[warp]);
    ckey = warp_axis_best_full<VPL>(l + Nr, a.mean + Nr, a.rstd + Nr, ck, cnext, chas, cand[warp]);
  } else {
    rkey = warp_axis_best<VPL>(l, a.mean, a.rstd, Nr, rk, vals[warp], rnext, rhas, cand[warp]);
    ckey = warp_axis_best<VPL>(l + Nr, a.mean + Nr, a.rstd + Nr, Nc, ck, vals[warp], cnext, chas, cand[warp]);
  }
  const float av = lane < rk ? key_value(rkey) : 0.f, bv = lane < ck ? key_value(ckey) : 0.f;
  const float amax = __shfl_sync(0xffffffffu, av, 0), bmax = __shfl_sync(0xffffffffu, bv, 0);

  // The K best cells (lane r < K holds the r-th key), unless ties or cells outside the
  // candidate lists could reach the K-th value: then the token goes to the block kernel's
  // list (its order does not matter).
  unsigned long long k = ~0ull;
  bool simple;
  if (region.cells > 0) {
    // The region's cells (at most 64, two a lane), the 32 best of them sorted by key; tau is
    // the K-th best value. Columns are sorted, so no cell of row i past the region beats the
    // first one, (i, width[i]); when none of those reaches tau, every cell at or above tau is
    // in the region and the sorted keys already break ties at tau by id: exact ties among the
    // region's cells need no fallback. Such ties are not rare (two sums of fp32
    // log-probabilities rounding to one value): in session w's profile at lm-256x256-t4096,
    // 2 of 4 forwards left a token to the block kernel, which took ~23 us more for it.
    const unsigned row_id = key_id(rkey), col_id = key_id(ckey), slots = region.slot[lane];
    unsigned long long c[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned cell = (slots >> (16 * h)) & 0xffffu;
      const int i = static_cast<int>(cell & 31u), j = static_cast<int>((cell >> 8) & 31u);
      const float ai = __shfl_sync(0xffffffffu, av, i), bj = __shfl_sync(0xffffffffu, bv, j);
      const unsigned ri = __shfl_sync(0xffffffffu, row_id, i), cj = __shfl_sync(0xffffffffu, col_id, j);
      c[h] = cell != 0xffffu ? key_of(ai + bj, ri * static_cast<unsigned>(Nc) + cj) : ~0ull;
    }
    k = warp_best32_of64(c[0], c[1]);
    const unsigned tau = ~static_cast<unsigned>(__shfl_sync(0xffffffffu, k, K - 1) >> 32);
    const int w = region.width[lane];
    const float bw = __shfl_sync(0xffffffffu, bv, w & 31);
    const bool past = lane < rk && w < ck && ord(av + bw) >= tau;
    // A row or column outside the lists reaches tau iff its best one does (sums are monotone).
    const bool outside = (rhas && ord(rnext + bmax) >= tau) || (chas && ord(amax + cnext) >= tau);
    simple = !__any_sync(0xffffffffu, past) && !outside;
  } else {
    // 1. tau: K pops of the best remaining cell; lane p owns row p, whose cells are in
    //    descending order of value along the sorted columns.
    int head = 0;
    unsigned tau = 0;
    for (int r = 0; r < K; ++r) {
      const float bh = __shfl_sync(0xffffffffu, bv, head & 31);
      const unsigned cand = (lane < rk && head < ck) ? ord(av + bh) : 0u;
      const unsigned m = __reduce_max_sync(0xffffffffu, cand);  // one REDUX, not five shuffles
      const unsigned winner = __ffs(__ballot_sync(0xffffffffu, cand == m && lane < rk && head < ck)) - 1;
      if (lane == static_cast<int>(winner)) ++head;
      tau = m;
    }
    // 2. Cells at or above tau per row; the simple case has exactly K of them and nothing
    //    outside the candidate lists that could reach tau.
    int ge = 0;
    for (int q = 0; q < ck; ++q) {
      const float b = __shfl_sync(0xffffffffu, bv, q);
      if (lane < rk && ord(av + b) >= tau) ++ge;
    }
    const bool outside = (rhas && ord(rnext + bmax) >= tau) || (chas && ord(amax + cnext) >= tau);
    const int total = __reduce_add_sync(0xffffffffu, ge);
    simple = total == K && !outside;
    if (simple) {
      // 3. Gather the K cells and sort them (descending score, ascending id).
      int off = ge;  // inclusive scan over lanes
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, off, o);
        if (lane >= o) off += v;
      }
      off -= ge;
      const unsigned row_id = key_id(rkey);
      for (int q = 0; q < ck; ++q) {
        const float b = __shfl_sync(0xffffffffu, bv, q);
        const unsigned col_id = key_id(__shfl_sync(0xffffffffu, ckey, q));
        if (q < ge) cells[warp][off + q] = key_of(av + b, row_id * static_cast<unsigned>(Nc) + col_id);
      }
      __syncwarp();
      k = warp_sort32(lane < K ? cells[warp][lane] : ~0ull);
    }
  }
  if (!simple) {
    if (lane == 0) a.fallback_flags[atomicAdd(a.fallback_count, 1)] = static_cast<int>(t);
    return;
  }
  const float sc = key_value(k);
  const float smax = __shfl_sync(0xffffffffu, sc, 0);
  float g = lane < K ? expf(gate_softmax ? sc - smax : sc) : 0.f;
  if (gate_softmax) g /= warp_sum(g);
  if (lane < K) {
    const i64 o = t * K + lane;
    const i32 e = static_cast<i32>(key_id(k));
    a.ids32[o] = e;
    a.gates32[o] = g;
    if (a.ids_out_i64) static_cast<i64*>(a.ids_out)[o] = e;
    else static_cast<i32*>(a.ids_out)[o] = e;
    if (a.scores_out) a.scores_out[o] = sc;
    if (a.gates_out) a.gates_out[o] = g;
  }
}

template <int VPL>
Status launch_topk_warp(const RouteTopkArgs& a, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const bool full = c.grid_rows == 32 * VPL && c.grid_cols == 32 * VPL && aligned16(a.logits) && aligned16(a.mean) &&
                    aligned16(a.rstd);
  const auto kernel = full ? topk_warp_kernel<VPL, true> : topk_warp_kernel<VPL, false>;
  const TopkRegion region = topk_region(static_cast<int>(c.top_k), static_cast<int>(std::min(c.top_k, c.grid_rows)),
                                        static_cast<int>(std::min(c.top_k, c.grid_cols)));
  kernel<<<ceil_div(a.rows, kWarpTopkWarps), kWarpTopkWarps * 32, 0, stream>>>(
      a, region, static_cast<int>(c.grid_rows), static_cast<int>(c.grid_cols), static_cast<int>(c.top_k),
      c.gate == GateKind::softmax);
  OMNIMOE_CUDA_LAUNCH_CHECK("route topk_warp_kernel");
  return Status::Ok();
}

}  // namespace

Status route_chunk_moments(const float* logits, i64 rows, i64 n, double* partial, cudaStream_t stream) {
  const dim3 grid(ceil_div(n, kStatCols), static_cast<unsigned>(stat_blocks(rows)));
  chunk_moments_kernel<<<grid, dim3(kStatCols, kStatRows), 0, stream>>>(logits, rows, n, partial);
  OMNIMOE_CUDA_LAUNCH_CHECK("route chunk_moments_kernel");
  return Status::Ok();
}

Status route_stats(const RouteStatsArgs& a, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const i64 n = c.grid_rows + c.grid_cols;
  stats_kernel<<<ceil_div(32 * n, 256), 256, 0, stream>>>(a, c.grid_rows, n, c.router_norm == RouterNorm::batchnorm,
                                                          a.mode == Mode::training);
  OMNIMOE_CUDA_LAUNCH_CHECK("route stats_kernel");
  return Status::Ok();
}

Status route_topk(RouteTopkArgs a, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const i64 axis = std::max(c.grid_rows, c.grid_cols), need = std::max(axis, c.top_k);
  int* count = a.fallback_count;
  a.fallback_count = nullptr;
  if (c.top_k <= 32 && axis <= 1024 && a.fallback_flags != nullptr && count != nullptr) {
    // Warp per token; the block kernel then serves only the tokens it listed.
    OMNIMOE_CUDA_TRY(cudaMemsetAsync(count, 0, sizeof(int), stream));
    a.fallback_count = count;
    Status s = axis <= 64 ? launch_topk_warp<2>(a, stream)
               : axis <= 256 ? launch_topk_warp<8>(a, stream) : launch_topk_warp<32>(a, stream);
    OMNIMOE_RETURN_IF_ERROR(s);
  }
  if (need <= 256) return launch_topk<128, 2, 2>(a, stream);
  // Two selected cells per thread up to K = 512 (the paper family): the final sort of the
  // packed (score, id) keys runs over 512 slots, not 1024.
  if (c.top_k <= 512 && axis <= 512) return launch_topk<256, 2, 2>(a, stream);
  if (c.top_k <= 1024) {
    if (axis <= 512) return launch_topk<256, 2, 4>(a, stream);
    if (axis <= 1024) return launch_topk<256, 4, 4>(a, stream);
    if (axis <= kRouteMaxExtent) return launch_topk<256, 16, 4>(a, stream);
  } else if (c.top_k <= kRouteMaxExtent) {
    if (axis <= 512) return launch_topk<512, 1, 8>(a, stream);
    if (axis <= kRouteMaxExtent) return launch_topk<512, 8, 8>(a, stream);
  }
  return {StatusCode::unsupported, "CUDA router: grid_rows, grid_cols and top_k must be at most 4096 (got " +
                                       std::to_string(need) + "); use the CPU backend"};
}

}  // namespace omnimoe::cuda
