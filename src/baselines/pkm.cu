// pkm and peer on the GPU, token-centric as their authors define them: each token finds its
// own K cells of the product-key grid and gathers its own K rows.
//
// Per chunk of tokens (up to 4096, cut so that q, the scores and the plans take about 32 MB;
// with the cuBLASLt scratch the workspace is ~40 MB at the benchmark's shapes):
//   1. q = x queryᵀ [Tc, H] (storage dtype), then s1 = q[:, :H/2] keys_rowᵀ and
//      s2 = q[:, H/2:] keys_colᵀ into one fp32 buffer [Tc, Nr + Nc]: three cuBLASLt products.
//   2. topk_kernel, one block per token: sorts both axes (CUB block radix sort), finds the
//      cut of the exact top-K by bisection (product_key.hpp) and writes a compact plan: per
//      sorted row, the first slot of its cells and how many of them are above the threshold;
//      the sorted row / column ids; tau's tie cap; the best score. The selection itself is
//      never listed, so K may be as large as N; with expert_ids requested, the K ids are
//      also written in (descending score, ascending id) order, band by band (cut at ranks
//      2048, 4096, .., each band sorted in shared memory).
//   3. gather_kernel, one block per token: the plan's slots are split evenly over the warps;
//      a lane decodes one slot (row by binary search over the row offsets, column, id,
//      exp(S - S_max)), the warp then streams that cell's row(s) with 16-byte loads into
//      fp32 registers holding the warp's share of y. pkm: acc += u * values[e]; peer:
//      acc += u * gelu(x . expert_in[e]) * expert_out[e]. The warps' partial rows and
//      normalisers are summed in a fixed order through shared memory and y = acc / sum(u).
// forward_routed runs only step 3, with the caller's ids and gates. No atomics, no host
// synchronisation, no allocation: deterministic and capturable in a CUDA graph.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "baselines/product_key.hpp"
#include "core/math.hpp"
#include "core/workspace.hpp"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"

namespace omnimoe::baselines {
namespace {

using cuda::i32;
using cuda::i64;
using pk::ord;
using pk::prefix_count;
using pk::unord;
using Cut = pk::Cut<unsigned>;

constexpr int kThreads = 256;  // both kernels
constexpr int kWarps = kThreads / 32;
constexpr int kBandItems = 8;
constexpr int kBandCap = kThreads * kBandItems;  // ids sorted per band of expert_ids
constexpr unsigned kFull = 0xffffffffu;

// Workspace target for one token chunk (q, scores, plan); the chunk is cut to fit it.
constexpr i64 kChunkBudget = i64{32} << 20;
constexpr i64 kChunkMin = 256, kChunkMax = 4096;

// ---- plan ---------------------------------------------------------------------------------
// Per token, in 4-byte words: a header, then off [Nr + 1] (exclusive scan over the sorted rows
// of the cells at or above tau: the slots of row p are [off[p], off[p + 1])), gt [Nr] (the
// first gt[p] slots of row p are above tau; the others tie with tau and are taken when their
// id <= cap), rid [Nr] and cid [Nc] (sorted axis ids).
enum : int { kPlanBad = 0, kPlanSlots = 1, kPlanRows = 2, kPlanCols = 3, kPlanCap = 4, kPlanMax = 5, kPlanHeader = 8 };

struct PlanLayout {
  i64 Nr, Nc;
  __host__ __device__ i64 off() const { return kPlanHeader; }
  __host__ __device__ i64 gt() const { return off() + Nr + 1; }
  __host__ __device__ i64 rid() const { return gt() + Nr; }
  __host__ __device__ i64 cid() const { return rid() + Nr; }
  __host__ __device__ i64 stride() const { return (cid() + Nc + 3) / 4 * 4; }  // 16-byte rows
};

// ---- block reduction ----------------------------------------------------------------------
// Every thread gets the total. Warp partials go to one of two shared buffers in turn, so one
// barrier per call suffices: a buffer is rewritten only two calls later, after a barrier that
// every reader of its previous contents has passed. Fixed order: deterministic.
struct BlockReducer {
  unsigned long long (*part)[kWarps];
  int phase = 0;
  template <bool kMax>
  __device__ unsigned long long run(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const unsigned long long w = __shfl_xor_sync(kFull, v, o);
      v = kMax ? (w > v ? w : v) : v + w;
    }
    if ((threadIdx.x & 31) == 0) part[phase][threadIdx.x >> 5] = v;
    __syncthreads();
    unsigned long long r = part[phase][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = kMax ? (part[phase][w] > r ? part[phase][w] : r) : r + part[phase][w];
    phase ^= 1;
    return r;
  }
  __device__ unsigned long long sum(unsigned long long v) { return run<false>(v); }
  __device__ unsigned long long max(unsigned long long v) { return run<true>(v); }
};

// ---- top-K --------------------------------------------------------------------------------

struct TopkArgs {
  const float* scores;  // [rows, Nr + Nc]: s1 then s2 per token
  int Nr, Nc, K;
  int* plan;            // [rows, stride]
  i64 stride;
  i32* ids_out;         // [rows, K] or null
};

// AX: axis entries per thread (Nr, Nc <= kThreads * AX), blocked: thread i owns sorted rows
// i * AX .. i * AX + AX - 1.
template <int AX>
struct TopkSmem {
  static constexpr int kAxis = kThreads * AX;
  using SortAxis = cub::BlockRadixSort<unsigned, kThreads, AX, unsigned>;
  using Scan = cub::BlockScan<int, kThreads>;
  using SortBand = cub::BlockRadixSort<unsigned long long, kThreads, kBandItems>;
  union {
    typename SortAxis::TempStorage sort_axis;
    typename Scan::TempStorage scan;
    typename SortBand::TempStorage sort_band;
    unsigned long long band[kBandCap];  // filled after a scan, read into registers before a sort
  } tmp;
  float rv[kAxis], cv[kAxis];  // sorted axis values (descending; -0 folded into +0)
  int rid[kAxis], cid[kAxis];  // their ids (ascending among equal values)
  unsigned long long part[2][kWarps];
};

// Sorts one axis (values v, blocked) into out_v / out_id.
template <int AX>
__device__ void sort_axis(TopkSmem<AX>& sm, const float (&v)[AX], int n, float* out_v, int* out_id) {
  unsigned key[AX], id[AX];
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    const int i = threadIdx.x * AX + j;
    // Finite values map below ~0u, so the padding sorts last; the sort is stable and ids
    // start ascending, so equal values keep ascending ids.
    key[j] = i < n ? ~ord(v[j]) : ~0u;
    id[j] = static_cast<unsigned>(i);
  }
  typename TopkSmem<AX>::SortAxis(sm.tmp.sort_axis).Sort(key, id);
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    const int i = threadIdx.x * AX + j;
    out_v[i] = unord(~key[j]);
    out_id[i] = static_cast<int>(id[j]);
  }
  __syncthreads();
}

// The cut holding exactly the r best cells; tau is searched in [lo, hi], where at least r
// cells reach lo. Also returns, per owned sorted row, the cells above tau (gt) and at or
// above it (ge). Every thread must call it (block-wide barriers inside).
template <int AX>
__device__ Cut select_rank(TopkSmem<AX>& sm, BlockReducer& red, int Nr, int Nc, int r, unsigned lo, unsigned hi,
                           int (&gt)[AX], int (&ge)[AX]) {
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo) / 2 + ((hi - lo) & 1u);  // upper middle
    unsigned long long cnt = 0;
    for (int p = threadIdx.x; p < Nr; p += kThreads) {
      const int m = prefix_count(sm.rv[p], sm.cv, Nc, mid, false);
      if (m == 0) break;  // rows are sorted: the later ones reach mid even less
      cnt += static_cast<unsigned>(m);
    }
    if (red.sum(cnt) >= static_cast<unsigned long long>(r)) lo = mid;
    else hi = mid - 1;
  }
  Cut cut;
  cut.tau = lo;
  unsigned long long packed = 0;  // (sum gt) << 32 | sum ge; both <= N < 2^24
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    const int p = threadIdx.x * AX + j;
    gt[j] = ge[j] = 0;
    if (p < Nr) {
      gt[j] = prefix_count(sm.rv[p], sm.cv, Nc, lo, true);
      ge[j] = prefix_count(sm.rv[p], sm.cv, Nc, lo, false);
    }
    packed += (static_cast<unsigned long long>(gt[j]) << 32) | static_cast<unsigned>(ge[j]);
  }
  packed = red.sum(packed);
  const int n_gt = static_cast<int>(packed >> 32), n_ge = static_cast<int>(packed & 0xffffffffu);
  const int need = r - n_gt;
  if (n_ge - n_gt > need) {  // more ties at tau than needed: the smallest ids
    unsigned elo = 0, ehi = static_cast<unsigned>(Nr * Nc - 1);
    while (elo < ehi) {
      const unsigned mid = elo + (ehi - elo) / 2;
      unsigned long long cnt = 0;
#pragma unroll
      for (int j = 0; j < AX; ++j) {
        const int p = threadIdx.x * AX + j;
        if (p < Nr)
          for (int q = gt[j]; q < ge[j]; ++q)
            cnt += static_cast<unsigned>(sm.rid[p] * Nc + sm.cid[q]) <= mid;
      }
      if (red.sum(cnt) >= static_cast<unsigned long long>(need)) ehi = mid;
      else elo = mid + 1;
    }
    cut.cap = elo;
  }
  return cut;
}

template <int AX>
__global__ void __launch_bounds__(kThreads) topk_kernel(TopkArgs a) {
  using Sm = TopkSmem<AX>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Sm& sm = *reinterpret_cast<Sm*>(smem_raw);
  const int tid = threadIdx.x;
  const i64 t = blockIdx.x;
  const int Nr = a.Nr, Nc = a.Nc, K = a.K;
  const float* s = a.scores + t * (Nr + Nc);
  int* plan = a.plan + t * a.stride;
  const PlanLayout L{Nr, Nc};

  float rvals[AX], cvals[AX];
  bool bad = false;
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    const int i = tid * AX + j;
    rvals[j] = i < Nr ? s[i] : 0.f;
    cvals[j] = i < Nc ? s[Nr + i] : 0.f;
    bad |= !isfinite(rvals[j]) || !isfinite(cvals[j]);
  }
  if (__syncthreads_or(bad)) {  // NaN / inf sub-key score: NaN row, ids 0 .. K-1
    if (tid == 0) plan[kPlanBad] = 1;
    if (a.ids_out != nullptr)
      for (int k = tid; k < K; k += kThreads) a.ids_out[t * K + k] = k;
    return;
  }
  sort_axis<AX>(sm, rvals, Nr, sm.rv, sm.rid);
  sort_axis<AX>(sm, cvals, Nc, sm.cv, sm.cid);

  BlockReducer red{sm.part};
  const unsigned top = ord(sm.rv[0] + sm.cv[0]);
  // Lower bound of tau: row p with the best ceil(K / (p + 1)) columns spans at least K cells
  // at or above its corner (p = Nr - 1 always qualifies since K <= N).
  unsigned long long lo = 0;
  for (int p = tid; p < Nr; p += kThreads) {
    const i64 w = (static_cast<i64>(K) + p) / (p + 1);
    if (w <= Nc) {
      const unsigned o = ord(sm.rv[p] + sm.cv[w - 1]);
      lo = o > lo ? o : lo;
    }
  }
  lo = red.max(lo);
  int gt[AX], ge[AX];
  const Cut cut = select_rank<AX>(sm, red, Nr, Nc, K, static_cast<unsigned>(lo), top, gt, ge);

  // Plan: slot offsets per sorted row, above-tau counts, sorted ids, header.
  int off[AX], slots, rows_used = 0;
  typename Sm::Scan(sm.tmp.scan).ExclusiveSum(ge, off, slots);
#pragma unroll
  for (int j = 0; j < AX; ++j) {
    const int p = tid * AX + j;
    if (p < Nr) {
      plan[L.off() + p] = off[j];
      plan[L.gt() + p] = gt[j];
      rows_used += ge[j] > 0;
    }
  }
  for (int p = tid; p < Nr; p += kThreads) plan[L.rid() + p] = sm.rid[p];
  for (int q = tid; q < Nc; q += kThreads) plan[L.cid() + q] = sm.cid[q];
  rows_used = static_cast<int>(red.sum(static_cast<unsigned long long>(rows_used)));  // ge falls along the rows
  if (tid == 0) {
    plan[L.off() + Nr] = slots;
    plan[kPlanBad] = 0;
    plan[kPlanSlots] = slots;
    plan[kPlanRows] = rows_used;
    plan[kPlanCols] = ge[0];  // row 0 reaches the most columns
    plan[kPlanCap] = static_cast<int>(cut.cap);
    plan[kPlanMax] = __float_as_int(sm.rv[0] + sm.cv[0]);
  }
  if (a.ids_out == nullptr) return;

  // expert_ids in (descending score, ascending id) order: band b holds the cells of rank
  // [b * kBandCap, min((b + 1) * kBandCap, K)), i.e. cut(end) minus cut(start).
  __syncthreads();  // the scan's temporary storage is reused below
  i32* out = a.ids_out + t * K;
  int id_bits = 1;
  while ((i64{1} << id_bits) < static_cast<i64>(Nr) * Nc) ++id_bits;
  Cut prev;
  prev.empty = true;
  int pgt[AX];
#pragma unroll
  for (int j = 0; j < AX; ++j) pgt[j] = 0;
  for (int start = 0; start < K; start += kBandCap) {
    const int end = min(start + kBandCap, K);
    Cut cur = cut;
    int cgt[AX], cge[AX];
#pragma unroll
    for (int j = 0; j < AX; ++j) {
      cgt[j] = gt[j];
      cge[j] = ge[j];
    }
    if (end < K) cur = select_rank<AX>(sm, red, Nr, Nc, end, cut.tau, prev.empty ? top : prev.tau, cgt, cge);
    // Members per owned row: sorted columns [pgt, cge) (before pgt: in prev; from cge on:
    // below cur's tau), in cur and not in prev.
    int cnt[AX], pos[AX], total;
#pragma unroll
    for (int j = 0; j < AX; ++j) {
      const int p = tid * AX + j;
      cnt[j] = 0;
      if (p < Nr)
        for (int q = pgt[j]; q < cge[j]; ++q) {
          const unsigned o = ord(sm.rv[p] + sm.cv[q]), e = static_cast<unsigned>(sm.rid[p] * Nc + sm.cid[q]);
          cnt[j] += cur.contains(o, e) && !prev.contains(o, e);
        }
    }
    typename Sm::Scan(sm.tmp.scan).ExclusiveSum(cnt, pos, total);
    __syncthreads();
    for (int i = tid; i < kBandCap; i += kThreads) sm.tmp.band[i] = ~0ull;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < AX; ++j) {
      const int p = tid * AX + j;
      if (p < Nr)
        for (int q = pgt[j]; q < cge[j]; ++q) {
          const unsigned o = ord(sm.rv[p] + sm.cv[q]), e = static_cast<unsigned>(sm.rid[p] * Nc + sm.cid[q]);
          if (cur.contains(o, e) && !prev.contains(o, e))
            sm.tmp.band[pos[j]++] = (static_cast<unsigned long long>(~o) << id_bits) | e;
        }
    }
    __syncthreads();
    unsigned long long keys[kBandItems];
#pragma unroll
    for (int i = 0; i < kBandItems; ++i) keys[i] = sm.tmp.band[tid * kBandItems + i];
    __syncthreads();
    typename Sm::SortBand(sm.tmp.sort_band).Sort(keys, 0, 32 + id_bits);
    const unsigned long long id_mask = (1ull << id_bits) - 1;
#pragma unroll
    for (int i = 0; i < kBandItems; ++i) {
      const int rank = start + tid * kBandItems + i;
      if (rank < end) out[rank] = static_cast<i32>(keys[i] & id_mask);
    }
    __syncthreads();
    prev = cur;
#pragma unroll
    for (int j = 0; j < AX; ++j) pgt[j] = cgt[j];
  }
}

template <int AX>
Status launch_topk_t(const TopkArgs& a, i64 rows, cudaStream_t stream) {
  const auto kernel = topk_kernel<AX>;
  const int bytes = static_cast<int>(sizeof(TopkSmem<AX>));
  OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned>(rows), kThreads, bytes, stream>>>(a);
  OMNIMOE_CUDA_LAUNCH_CHECK("pkm topk_kernel");
  return Status::Ok();
}

Status launch_topk(const TopkArgs& a, i64 rows, cudaStream_t stream) {
  const int axis = std::max(a.Nr, a.Nc);
  if (axis <= kThreads * 2) return launch_topk_t<2>(a, rows, stream);
  if (axis <= kThreads * 4) return launch_topk_t<4>(a, rows, stream);
  return launch_topk_t<16>(a, rows, stream);  // up to kPkCudaMaxAxis = 4096
}

// ---- gather -------------------------------------------------------------------------------

struct GatherArgs {
  i64 rows;
  int H, K, Nr, Nc;
  i64 N;
  const int* plan;       // plan mode: [rows, stride]; null: routed mode
  i64 stride;
  const float* scores;   // plan mode: [rows, Nr + Nc]
  const i32* ids;        // routed mode: [rows, K]
  const float* gates;    // routed mode: [rows, K]
  const void* x;         // [rows, H]
  const void* wa;        // pkm: values; peer: expert_in
  const void* wb;        // peer: expert_out
  void* y;               // [rows, H]
};

// V consecutive elements of a row: one 16-byte load (V = 16 / sizeof(S)) or one element.
template <class S, int V>
struct Piece {
  static constexpr bool kVec = V > 1;
  using Raw = std::conditional_t<kVec, uint4, S>;
  static __device__ __forceinline__ Raw load(const S* p) {
    if constexpr (kVec) return __ldg(reinterpret_cast<const uint4*>(p));
    else return *p;
  }
  static __device__ __forceinline__ float get(const Raw& r, int i) {
    if constexpr (kVec) {
      return cuda::to_f32(reinterpret_cast<const S*>(&r)[i]);
    } else {
      (void)i;
      return cuda::to_f32(r);
    }
  }
};

// Cells whose rows are in flight together per warp: about 64 registers of raw row data.
template <bool PEER, int V, int VPL>
constexpr int group_cells() {
  if (V == 1) return 1;
  const int regs = VPL * 4 * (PEER ? 2 : 1);
  const int u = 64 / regs;
  return u < 1 ? 1 : (u > 4 ? 4 : u);
}

// Lane `lane` owns elements [(j * 32 + lane) * V, +V) of a row for j < VPL.
// Two blocks per SM for the 16-byte variants up to 4 pieces per lane (H <= 1024 in 16-bit
// storage), so that 16 warps per SM keep rows in flight.
template <int V, int VPL>
constexpr int gather_min_blocks() {
  return (V > 1 && VPL <= 4) ? 2 : 1;
}

// Shared memory of gather_kernel: the warps' partial rows [kWarps][H] fp32, x [H] (peer), the
// plan's arrays (plan mode): off [Nr + 1], gt, rid [Nr], cid [Nc], rv [Nr], cv [Nc].
__host__ __device__ inline std::size_t gather_x_offset(int H) { return static_cast<std::size_t>(kWarps) * H * sizeof(float); }
__host__ __device__ inline std::size_t gather_plan_offset(int H, std::size_t elem) {
  return gather_x_offset(H) + (static_cast<std::size_t>(H) * elem + 15) / 16 * 16;
}

template <class S, bool PEER, int V, int VPL>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<V, VPL>()) gather_kernel(GatherArgs a) {
  using Pc = Piece<S, V>;
  using Raw = typename Pc::Raw;
  constexpr int U = group_cells<PEER, V, VPL>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float zpart[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const i64 t = blockIdx.x;
  const int H = a.H, Nr = a.Nr, Nc = a.Nc;
  const S* wa = static_cast<const S*>(a.wa);
  const S* wb = static_cast<const S*>(a.wb);
  S* y = static_cast<S*>(a.y) + t * H;
  float* red = reinterpret_cast<float*>(smem_raw);  // [kWarps][H]
  S* s_x = reinterpret_cast<S*>(smem_raw + gather_x_offset(H));
  int* s_off = reinterpret_cast<int*>(smem_raw + gather_plan_offset(H, sizeof(S)));
  int* s_gt = s_off + Nr + 1;
  int* s_rid = s_gt + Nr;
  int* s_cid = s_rid + Nr;
  float* s_rv = reinterpret_cast<float*>(s_cid + Nc);
  float* s_cv = s_rv + Nr;

  const bool planned = a.plan != nullptr;
  i64 slots = a.K;
  int rows_used = 0;
  unsigned cap = 0;
  float smax = 0.f;
  if (planned) {
    const int* pl = a.plan + t * a.stride;
    if (pl[kPlanBad] != 0) {
      for (int i = tid; i < H; i += kThreads) y[i] = cuda::from_f32<S>(__int_as_float(0x7fffffff));
      return;
    }
    const PlanLayout L{Nr, Nc};
    slots = pl[kPlanSlots];
    rows_used = pl[kPlanRows];
    const int cols_used = pl[kPlanCols];
    cap = static_cast<unsigned>(pl[kPlanCap]);
    smax = __int_as_float(pl[kPlanMax]);
    const float* s1 = a.scores + t * (Nr + Nc);
    const float* s2 = s1 + Nr;
    for (int i = tid; i <= rows_used; i += kThreads) s_off[i] = pl[L.off() + i];
    for (int i = tid; i < rows_used; i += kThreads) {
      const int r = pl[L.rid() + i];
      s_gt[i] = pl[L.gt() + i];
      s_rid[i] = r;
      s_rv[i] = s1[r];
    }
    for (int i = tid; i < cols_used; i += kThreads) {
      const int c = pl[L.cid() + i];
      s_cid[i] = c;
      s_cv[i] = s2[c];
    }
  }

  if constexpr (PEER) {  // x in shared memory: its registers go to rows in flight
    const S* x = static_cast<const S*>(a.x) + t * H;
    for (int i = tid; i < H; i += kThreads) s_x[i] = x[i];
  }
  __syncthreads();

  float acc[VPL][V];
#pragma unroll
  for (int j = 0; j < VPL; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;
  float z = 0.f;
  bool bad = false;
  const i64 begin = slots * warp / kWarps, end = slots * (warp + 1) / kWarps;
  for (i64 base = begin; base < end; base += 32) {
    const i64 r = base + lane;
    int e = 0;
    float u = 0.f;
    bool take = false;
    if (r < end) {
      if (planned) {
        int lo = 0, hi = rows_used - 1;  // the last row whose first slot is <= r
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (s_off[mid] <= r) lo = mid;
          else hi = mid - 1;
        }
        const int q = static_cast<int>(r - s_off[lo]);
        e = s_rid[lo] * Nc + s_cid[q];
        take = q < s_gt[lo] || static_cast<unsigned>(e) <= cap;
        if (take) u = expf((s_rv[lo] + s_cv[q]) - smax);
      } else {
        const i32 id = a.ids[t * a.K + r];
        if (id < 0 || id >= a.N) {
          bad = true;  // caller routing out of range: NaN row, no out-of-bounds read
        } else {
          e = id;
          u = a.gates[t * a.K + r];
          take = true;
        }
      }
    }
    z += u;
    unsigned mask = __ballot_sync(kFull, take);
    while (mask != 0) {
      int eg[U];
      float ug[U];
      bool vg[U];
#pragma unroll
      for (int g = 0; g < U; ++g) {
        vg[g] = mask != 0;
        const int k = vg[g] ? __ffs(static_cast<int>(mask)) - 1 : 0;
        if (vg[g]) mask &= mask - 1;
        eg[g] = __shfl_sync(kFull, e, k);
        ug[g] = __shfl_sync(kFull, u, k);
      }
      if constexpr (PEER) {
        Raw ri[U][VPL], ro[U][VPL];
#pragma unroll
        for (int g = 0; g < U; ++g)
          if (vg[g]) {
            const S* pi = wa + static_cast<i64>(eg[g]) * H;
            const S* po = wb + static_cast<i64>(eg[g]) * H;
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
              const int el = (j * 32 + lane) * V;
              if (el < H) {
                ri[g][j] = Pc::load(pi + el);
                ro[g][j] = Pc::load(po + el);
              }
            }
          }
        float h[U];
#pragma unroll
        for (int g = 0; g < U; ++g) h[g] = 0.f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
          const int el = (j * 32 + lane) * V;
          if (el < H) {
            Raw xraw;
            if constexpr (Pc::kVec) xraw = *reinterpret_cast<const uint4*>(s_x + el);
            else xraw = s_x[el];
#pragma unroll
            for (int g = 0; g < U; ++g)
              if (vg[g])
#pragma unroll
                for (int i = 0; i < V; ++i) h[g] = fmaf(Pc::get(xraw, i), Pc::get(ri[g][j], i), h[g]);
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
          for (int g = 0; g < U; ++g) h[g] += __shfl_xor_sync(kFull, h[g], o);
#pragma unroll
        for (int g = 0; g < U; ++g)
          if (vg[g]) {
            const float act = ug[g] * activate(Activation::gelu, h[g]);
#pragma unroll
            for (int j = 0; j < VPL; ++j)
              if ((j * 32 + lane) * V < H)
#pragma unroll
                for (int i = 0; i < V; ++i) acc[j][i] = fmaf(act, Pc::get(ro[g][j], i), acc[j][i]);
          }
      } else {
        Raw rw[U][VPL];
#pragma unroll
        for (int g = 0; g < U; ++g)
          if (vg[g]) {
            const S* pv = wa + static_cast<i64>(eg[g]) * H;
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
              const int el = (j * 32 + lane) * V;
              if (el < H) rw[g][j] = Pc::load(pv + el);
            }
          }
#pragma unroll
        for (int g = 0; g < U; ++g)
          if (vg[g])
#pragma unroll
            for (int j = 0; j < VPL; ++j)
              if ((j * 32 + lane) * V < H)
#pragma unroll
                for (int i = 0; i < V; ++i) acc[j][i] = fmaf(ug[g], Pc::get(rw[g][j], i), acc[j][i]);
      }
    }
  }

  // Fixed-order sum of the warps' rows and normalisers.
  z = cuda::warp_sum(z);
  if (lane == 0) zpart[warp] = z;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int el = (j * 32 + lane) * V;
    if (el < H)
#pragma unroll
      for (int i = 0; i < V; ++i) red[warp * H + el + i] = acc[j][i];
  }
  bad = __syncthreads_or(bad);
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += zpart[w];
  for (int i = tid; i < H; i += kThreads) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w * H + i];
    if (planned) v /= total;
    y[i] = cuda::from_f32<S>(bad ? __int_as_float(0x7fffffff) : v);
  }
}

std::size_t gather_smem(const GatherArgs& a, std::size_t elem) {
  std::size_t b = gather_plan_offset(a.H, elem);
  if (a.plan != nullptr) b += (static_cast<std::size_t>(a.Nr) * 4 + 1 + static_cast<std::size_t>(a.Nc) * 2) * 4;
  return b;
}

template <class S, bool PEER, int V, int VPL>
Status launch_gather_t(const GatherArgs& a, cudaStream_t stream) {
  const auto kernel = gather_kernel<S, PEER, V, VPL>;
  const std::size_t smem = gather_smem(a, sizeof(S));
  OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(a.rows), kThreads, smem, stream>>>(a);
  OMNIMOE_CUDA_LAUNCH_CHECK(PEER ? "peer gather_kernel" : "pkm gather_kernel");
  return Status::Ok();
}

// 16-byte pieces when every row is whole 16-byte vectors (H a multiple of V, aligned bases) and
// at most 8 per lane; else element pieces (any H up to kPkCudaMaxHidden).
template <class S, bool PEER>
Status launch_gather_s(const GatherArgs& a, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(S));
  const bool vec = a.H % V == 0 && a.H <= 32 * 8 * V && cuda::aligned16(a.x) && cuda::aligned16(a.wa) &&
                   (!PEER || cuda::aligned16(a.wb));
  if (vec) {
    const int vpl = (a.H / V + 31) / 32;
    if (vpl <= 1) return launch_gather_t<S, PEER, V, 1>(a, stream);
    if (vpl <= 2) return launch_gather_t<S, PEER, V, 2>(a, stream);
    if (vpl <= 4) return launch_gather_t<S, PEER, V, 4>(a, stream);
    return launch_gather_t<S, PEER, V, 8>(a, stream);
  }
  if (a.H <= 32 * 8) return launch_gather_t<S, PEER, 1, 8>(a, stream);
  return launch_gather_t<S, PEER, 1, kPkCudaMaxHidden / 32>(a, stream);
}

Status launch_gather(DType dt, bool peer, const GatherArgs& a, cudaStream_t stream) {
  switch (dt) {
    case DType::f32: return peer ? launch_gather_s<float, true>(a, stream) : launch_gather_s<float, false>(a, stream);
    case DType::bf16:
      return peer ? launch_gather_s<__nv_bfloat16, true>(a, stream) : launch_gather_s<__nv_bfloat16, false>(a, stream);
    case DType::f16: return peer ? launch_gather_s<__half, true>(a, stream) : launch_gather_s<__half, false>(a, stream);
    default: return {StatusCode::unsupported, "pkm cuda: dtype must be f32, bf16 or f16"};
  }
}

// ---- host ---------------------------------------------------------------------------------

Status check_cuda(const BaselineConfig& c, DType dtype) {
  if (dtype != DType::f32 && dtype != DType::bf16 && dtype != DType::f16)
    return {StatusCode::unsupported, std::string("pkm cuda: dtype ") + dtype_name(dtype) +
                                         " is not supported on cuda (f32, bf16, f16); f64 runs on the cpu"};
  if (c.grid_rows > kPkCudaMaxAxis || c.grid_cols > kPkCudaMaxAxis)
    return {StatusCode::unsupported, "pkm cuda: grid_rows and grid_cols must be at most " +
                                         std::to_string(kPkCudaMaxAxis) + " (got " + std::to_string(c.grid_rows) +
                                         " x " + std::to_string(c.grid_cols) + "); use the cpu backend"};
  if (c.hidden > kPkCudaMaxHidden)
    return {StatusCode::unsupported, "pkm cuda: hidden must be at most " + std::to_string(kPkCudaMaxHidden) +
                                         " (got " + std::to_string(c.hidden) + "); use the cpu backend"};
  return Status::Ok();
}

struct CudaBuffers {
  i64 chunk = 0;    // tokens per chunk
  i64 stride = 0;   // plan words per token
  void* q = nullptr;       // [chunk, H] storage dtype
  float* s = nullptr;      // [chunk, Nr + Nc]
  int* plan = nullptr;     // [chunk, stride]
  cuda::GemmWorkspace gemm;
};

CudaBuffers carve(Arena& a, const BaselineConfig& c, i64 T, DType dt) {
  CudaBuffers b;
  const i64 H = c.hidden, Nr = c.grid_rows, Nc = c.grid_cols;
  b.stride = PlanLayout{Nr, Nc}.stride();
  const i64 per_token = H * static_cast<i64>(dtype_size(dt)) + (Nr + Nc) * 4 + b.stride * 4;
  const i64 fit = std::clamp(kChunkBudget / per_token / kChunkMin * kChunkMin, kChunkMin, kChunkMax);
  b.chunk = std::min(T, fit);
  const auto n = static_cast<std::size_t>(b.chunk);
  b.q = a.take<unsigned char>(n * static_cast<std::size_t>(H) * dtype_size(dt));
  b.s = a.take<float>(n * static_cast<std::size_t>(Nr + Nc));
  b.plan = a.take<int>(n * static_cast<std::size_t>(b.stride));
  b.gemm.data = a.take<unsigned char>(cuda::kLayerGemmBytes);
  b.gemm.bytes = cuda::kLayerGemmBytes;
  return b;
}

}  // namespace

Status pkm_workspace_size_cuda(const BaselineConfig& c, std::int64_t tokens, DType dtype, std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_cuda(c, dtype));
  Arena a;
  (void)carve(a, c, tokens, dtype);
  *bytes = a.used();
  return Status::Ok();
}

Status pkm_forward_cuda(const ForwardArgs& a) {
  const BaselineConfig& c = *a.cfg;
  const DType dt = a.x.dtype;
  OMNIMOE_RETURN_IF_ERROR(check_cuda(c, dt));
  const BaselineParams& p = *a.p;
  const bool peer = c.kind == Kind::peer;
  const i64 T = a.x.shape[0], H = c.hidden, Hh = H / 2, Nr = c.grid_rows, Nc = c.grid_cols, K = c.top_k;
  auto stream = static_cast<cudaStream_t>(a.stream);

  GatherArgs g{};
  g.H = static_cast<int>(H);
  g.K = static_cast<int>(K);
  g.Nr = static_cast<int>(Nr);
  g.Nc = static_cast<int>(Nc);
  g.N = Nr * Nc;
  g.wa = peer ? p.expert_in.data : p.values.data;
  g.wb = peer ? p.expert_out.data : nullptr;

  if (a.ids_in.defined()) {  // forward_routed: only the gather
    g.rows = T;
    g.ids = a.ids_in.as<const i32>();
    g.gates = a.gates_in.as<const float>();
    g.x = a.x.data;
    g.y = a.y.data;
    return launch_gather(dt, peer, g, stream);
  }

  Arena arena(a.ws.data, a.ws.bytes);
  const CudaBuffers b = carve(arena, c, T, dt);
  if (!arena.fits()) return {StatusCode::internal, "pkm cuda: workspace plan exceeds the queried size"};
  i32* ids_out = a.ids_out.defined() ? a.ids_out.as<i32>() : nullptr;
  for (i64 t0 = 0; t0 < T; t0 += b.chunk) {
    const i64 rows = std::min(b.chunk, T - t0);
    cuda::GemmArgs q;  // q = x queryᵀ
    q.tb = true;
    q.M = rows;
    q.N = H;
    q.K = H;
    q.A = cuda::at(a.x.data, t0 * H, dt);
    q.lda = H;
    q.B = p.query.data;
    q.ldb = H;
    q.C = b.q;
    q.ldc = H;
    q.ab = dt;
    q.c = dt;
    OMNIMOE_RETURN_IF_ERROR(cuda::gemm(q, b.gemm, stream));
    cuda::GemmArgs s1;  // s1 = q[:, :H/2] keys_rowᵀ, into columns [0, Nr) of s
    s1.tb = true;
    s1.M = rows;
    s1.N = Nr;
    s1.K = Hh;
    s1.A = b.q;
    s1.lda = H;
    s1.B = p.keys_row.data;
    s1.ldb = Hh;
    s1.C = b.s;
    s1.ldc = Nr + Nc;
    s1.ab = dt;
    s1.c = DType::f32;
    OMNIMOE_RETURN_IF_ERROR(cuda::gemm(s1, b.gemm, stream));
    cuda::GemmArgs s2 = s1;  // s2 = q[:, H/2:] keys_colᵀ, into columns [Nr, Nr + Nc)
    s2.N = Nc;
    s2.A = cuda::at(b.q, Hh, dt);
    s2.B = p.keys_col.data;
    s2.C = b.s + Nr;
    OMNIMOE_RETURN_IF_ERROR(cuda::gemm(s2, b.gemm, stream));

    TopkArgs tk{b.s, g.Nr, g.Nc, g.K, b.plan, b.stride, ids_out != nullptr ? ids_out + t0 * K : nullptr};
    OMNIMOE_RETURN_IF_ERROR(launch_topk(tk, rows, stream));

    GatherArgs gc = g;
    gc.rows = rows;
    gc.plan = b.plan;
    gc.stride = b.stride;
    gc.scores = b.s;
    gc.x = cuda::at(a.x.data, t0 * H, dt);
    gc.y = const_cast<char*>(cuda::at(a.y.data, t0 * H, dt));
    OMNIMOE_RETURN_IF_ERROR(launch_gather(dt, peer, gc, stream));
  }
  return Status::Ok();
}

}  // namespace omnimoe::baselines
