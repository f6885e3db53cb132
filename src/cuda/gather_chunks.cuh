// out[t] = sum over token t's tasks k of c(t, k) * rows[ids[t K + k]], the table's rows walked
// in expert chunks of Ec rows so that the step's rows come from L2: one block per token, the
// blocks of a launch, resident together, move through the chunks at about the same pace, so
// each chunk's rows are read from DRAM about once and by all its tokens from L2. Two users:
//   - the forward's sparse output (experts_dense.cu): c = g * act(s), rows = w_out, out = y;
//   - the backward's dx (experts_backward.cu): c = dh, rows = w_in, out = dx in fp32.
// A token's tasks in a table of 210 MB (paper family) read one task at a time go to DRAM
// (the backward's per-token dx kernel ran at the copy rate, 1.25 ms at paper-k512-t4096 on
// the H100); chunk by chunk they come from L2.
//
// Per chunk and window of W * 128 tasks, the warps list the token's tasks whose id lies in
// the chunk in shared memory, in task order (id and coefficient); then warp w adds, over the
// whole list, column slice w of each row (and slice w + W when a row has more than W slices,
// SPW = 2; a slice: 32 lanes x 16 bytes), R rows in flight. Each row is read once, in
// 512-byte pieces by the W warps; no warp holds a whole row, so there are no partial rows to
// sum across warps and the kernel needs few registers (many blocks per SM keep the L2 busy:
// session e's earlier form, W warps each summing whole rows over a share of the tasks and
// then adding them in shared memory, ran two blocks per SM and about a third of the L2
// gather rate). The terms are added in chunk order and task order within a chunk:
// deterministic. Ids outside [0, N) lie in no chunk and add nothing (the callers poison
// those tokens' rows).
//
// Coef: `float operator()(i64 t, int k) const`, the coefficient of task (t, k), read only
// for tasks in the current chunk. Out: `void operator()(i64 t, int v, float (&acc)[V]) const`,
// stores 16-byte vector v of token t's row (V = 16 / sizeof(S) values).
#pragma once

#include <cstddef>

#include "cuda/common.cuh"

namespace omnimoe::cuda {

constexpr int kGatherWarps = 8;   // at most, per block (one token)
constexpr int kGatherScan = 128;  // ids each warp lists per window (four ballots)

// The expert chunk in bytes of table rows, the walk's L2 working set: 32 MiB of the H200's
// 60 MB L2 (session g, paper-k512 forward: 16 MiB -> 32 MiB 2-4% faster, 8 MiB 3-5% slower).
constexpr std::size_t kGatherChunkBytes = std::size_t{32} << 20;

// Rows per expert chunk for rows of H elements of es bytes (16384 rows of 2 KB at H = 1024
// in bf16): at least 1024, since each chunk rescans the token's K ids.
inline i64 gather_chunk_rows(i64 H, std::size_t es) {
  const i64 rows = static_cast<i64>(kGatherChunkBytes / (static_cast<std::size_t>(H) * es));
  return rows > 1024 ? rows : 1024;
}

// Slices of 32 16-byte vectors in a row of H values of S, and the warps per token: two
// slices per warp (one for a row of one slice), at most kGatherWarps warps, so H <= 16 * 32 *
// V. Session g (paper-k512 forward): one slice per warp was 7% faster at T = 1024 but 2-4%
// slower at T >= 4096, so two stay.
template <class S>
constexpr int gather_slices(int H) {
  return (H / Vec<S>::kN + 31) / 32;
}
template <class S>
constexpr int gather_warps(int H) {
  return gather_slices<S>(H) == 1 ? 1 : (gather_slices<S>(H) + 1) / 2;
}

template <class S, int SPW, class Coef, class Out>
__global__ void __launch_bounds__(kGatherWarps * 32, SPW == 2 ? 4 : 5)
    gather_chunks_kernel(int H, int K, i64 Ec, i64 N, const S* __restrict__ rows, const i32* __restrict__ ids,
                         Coef coef, Out out) {
  constexpr int V = Vec<S>::kN, R = 4, kPer = kGatherScan / 32;
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ i32 list_e[kGatherWarps * kGatherScan];
  __shared__ float list_c[kGatherWarps * kGatherScan];
  __shared__ int counts[kGatherWarps];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, W = static_cast<int>(blockDim.x >> 5);
  const i64 t = blockIdx.x;
  const int nvec = H / V;
  const i32* tid = ids + t * K;
  float acc[SPW][V];
#pragma unroll
  for (int s = 0; s < SPW; ++s)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[s][i] = 0.f;
  for (i64 e0 = 0; e0 < N; e0 += Ec) {  // expert chunks in order, each row's terms added in task order
    const i64 cols = N - e0 < Ec ? N - e0 : Ec;
    for (int k0 = 0; k0 < K; k0 += W * kGatherScan) {
      // The window's list: warp wi takes tasks [k0 + 128 wi, k0 + 128 (wi + 1)).
      i32 ev[kPer];
      float cv[kPer];
      unsigned mv[kPer];
      int cnt = 0;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int k = k0 + wi * kGatherScan + q * 32 + lane;
        ev[q] = k < K ? tid[k] : -1;
        const bool mine = ev[q] >= e0 && ev[q] < e0 + cols;
        cv[q] = mine ? coef(t, k) : 0.f;
        mv[q] = __ballot_sync(kAll, mine);
        cnt += __popc(mv[q]);
      }
      if (lane == 0) counts[wi] = cnt;
      __syncthreads();
      int pos0 = 0, total = 0;  // this warp's first list position; the window's list length
      for (int w = 0; w < W; ++w) {
        const int c = counts[w];
        pos0 += w < wi ? c : 0;
        total += c;
      }
      const unsigned below = (1u << lane) - 1u;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        if ((mv[q] >> lane) & 1u) {
          const int pos = pos0 + __popc(mv[q] & below);
          list_e[pos] = ev[q];
          list_c[pos] = cv[q];
        }
        pos0 += __popc(mv[q]);
      }
      __syncthreads();
      for (int i = 0; i < total; i += R) {
        uint4 raw[R][SPW];
        float cr[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const bool ok = i + r < total;
          const i64 e = ok ? list_e[i + r] : 0;
          cr[r] = ok ? list_c[i + r] : 0.f;
#pragma unroll
          for (int s = 0; s < SPW; ++s) {
            const int v = (wi + s * W) * 32 + lane;
            raw[r][s] = ok && v < nvec ? *reinterpret_cast<const uint4*>(rows + e * H + v * V) : make_uint4(0, 0, 0, 0);
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (i + r >= total) break;
#pragma unroll
          for (int s = 0; s < SPW; ++s) {
            float w[V];
            unpack16<S>(raw[r][s], w);
#pragma unroll
            for (int j = 0; j < V; ++j) acc[s][j] = fmaf(cr[r], w[j], acc[s][j]);
          }
        }
      }
      __syncthreads();  // the next window rewrites the list
    }
  }
#pragma unroll
  for (int s = 0; s < SPW; ++s) {
    const int v = (wi + s * W) * 32 + lane;
    if (v < nvec) out(t, v, acc[s]);
  }
}

// Launches gather_chunks_kernel for `tokens` tokens (a block each) on rows of H values of S,
// 16-byte aligned, H a multiple of V and at most 16 slices (the caller checks).
template <class S, class Coef, class Out>
void launch_gather_chunks(i64 tokens, int H, int K, i64 Ec, i64 N, const S* rows, const i32* ids, Coef coef, Out out,
                          cudaStream_t stream) {
  const int slices = gather_slices<S>(H), warps = gather_warps<S>(H);
  const auto blocks = static_cast<unsigned>(tokens), threads = static_cast<unsigned>(32 * warps);
  if (slices <= warps)
    gather_chunks_kernel<S, 1><<<blocks, threads, 0, stream>>>(H, K, Ec, N, rows, ids, coef, out);
  else
    gather_chunks_kernel<S, 2><<<blocks, threads, 0, stream>>>(H, K, Ec, N, rows, ids, coef, out);
}

}  // namespace omnimoe::cuda
