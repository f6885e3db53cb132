// CUDA experts stage, backward. Token side: one warp per token recomputes h and da for its
// K tasks and accumulates dx in its own row. Expert side: one warp per expert sums its tasks
// (sorted by expert, tokens ascending) into the two gradient rows and writes each row once,
// zero for unchosen experts. No atomics: deterministic. Also the SwiGLU backward and the
// final fp32 -> storage conversion.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cub/device/device_scan.cuh>
#include <string>
#include <type_traits>

#include "core/fast_div.hpp"
#include "core/math.hpp"
#include "core/workspace.hpp"
#include "cuda/cuda.cuh"
#include "cuda/gather_chunks.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kWarps = 8;

// Any H (rows not whole 16-byte vectors, or unaligned views): lane-strided scalar loads.
// dx[t] is written, not added to: the token's row is cleared first.
template <class S>
__global__ void __launch_bounds__(kWarps * 32)
    tokens_kernel(i64 T, int H, int K, Activation act, const S* __restrict__ x, const S* __restrict__ w_in,
                  const S* __restrict__ w_out, const i32* __restrict__ ids, const float* __restrict__ gates,
                  const S* __restrict__ dy, float* __restrict__ a_out, float* __restrict__ dg_out,
                  float* __restrict__ dh_out, float* __restrict__ dx, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const i64 t = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  if (dx != nullptr)
    for (int i = lane; i < H; i += 32) dx[t * H + i] = 0.f;
  int bad_id = 0;
  for (int k = 0; k < K; ++k) {
    const i64 task = t * K + k, e = ids[task];
    if (e < 0) {
      if (lane == 0) a_out[task] = dg_out[task] = dh_out[task] = 0.f;
      bad_id = 1;
      continue;
    }
    float h = 0.f, da = 0.f;
    for (int i = lane; i < H; i += 32) {
      h = fmaf(to_f32(x[t * H + i]), to_f32(w_in[e * H + i]), h);
      da = fmaf(to_f32(dy[t * H + i]), to_f32(w_out[e * H + i]), da);
    }
    h = warp_sum(h);
    da = warp_sum(da);
    const float g = gates[task];
    float s, grad;
    activate_with_grad(act, h, s, grad);
    const float dh = da * g * grad;
    if (lane == 0) {
      a_out[task] = g * s;
      dg_out[task] = da * s;
      dh_out[task] = dh;
    }
    if (dx != nullptr)
      for (int i = lane; i < H; i += 32) dx[t * H + i] = fmaf(dh, to_f32(w_in[e * H + i]), dx[t * H + i]);
  }
  if (lane == 0) bad[t] = bad_id;
}

// Rows of whole 16-byte vectors, H <= 32 * VPL * V: lane l owns vectors l, l + 32, .. of a
// row. x[t] and dy[t] stay in registers (as loaded, converted at use), each task's two
// expert rows are read once with 16-byte loads, and dx[t] is summed in registers and
// written once: the scalar kernel above re-read x and dy and re-wrote dx for every task.
// W warps per token share its tasks (k = sub, sub + W, ..) as in the forward gather.
template <class S, int VPL, int W>
__global__ void __launch_bounds__(kWarps * 32)
    tokens_vec_kernel(i64 T, int H, int K, Activation act, const S* __restrict__ x, const S* __restrict__ w_in,
                      const S* __restrict__ w_out, const i32* __restrict__ ids, const float* __restrict__ gates,
                      const S* __restrict__ dy, float* __restrict__ a_out, float* __restrict__ dg_out,
                      float* __restrict__ dh_out, float* __restrict__ dx, int* __restrict__ bad) {
  constexpr int V = Vec<S>::kN;
  __shared__ __align__(16) float red[W > 1 ? kWarps : 1][W > 1 ? 32 * VPL * V : 4];
  __shared__ int bad_s[kWarps];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, sub = wi % W;
  const i64 t = static_cast<i64>(blockIdx.x) * (kWarps / W) + wi / W;
  const bool live = t < T;  // no early return: the warps of a block meet at a barrier
  const int nvec = H / V;
  uint4 xr[VPL], dyr[VPL];
  float acc[VPL][V];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int v = j * 32 + lane;
    xr[j] = dyr[j] = make_uint4(0, 0, 0, 0);
    if (live && v < nvec) {
      xr[j] = *reinterpret_cast<const uint4*>(x + t * H + v * V);
      dyr[j] = *reinterpret_cast<const uint4*>(dy + t * H + v * V);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;
  }
  int bad_id = 0;
  const i64 t0 = live ? t * K : 0;
  const auto rows = [&](int q, i64 e) { return (q == 0 ? w_in : w_out) + e * H; };
  const auto body = [&](int k, i64 e, float g, const auto& r) {
    const i64 task = t0 + k;
    if (e < 0) {
      if (lane == 0) a_out[task] = dg_out[task] = dh_out[task] = 0.f;
      bad_id = 1;
      return;
    }
    float h = 0.f, da = 0.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (j * 32 + lane < nvec) {
        h += dot16<S>(xr[j], r(0, j));
        da += dot16<S>(dyr[j], r(1, j));
      }
    warp_sum2(h, da);
    float s, grad;
    activate_with_grad(act, h, s, grad);
    const float dh = da * g * grad;
    if (lane == 0) {
      a_out[task] = g * s;
      dg_out[task] = da * s;
      dh_out[task] = dh;
    }
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      float w[V];
      unpack16<S>(r(0, j), w);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[j][i] = fmaf(dh, w[i], acc[j][i]);
    }
  };
  token_tasks<W, 2, VPL, S>(ids + t0, gates + t0, K, sub, live, nvec, rows, body);
  if constexpr (W > 1) {
    if (lane == 0) bad_s[wi] = bad_id;
    reduce_token_warps<W, VPL, V>(acc, &red[0][0], sub);  // its barrier also publishes bad_s
    if (sub != 0) return;
    for (int w = 1; w < W; ++w) bad_id |= bad_s[wi + w];
  }
  if (!live) return;
  if (dx != nullptr) store_row_f32<VPL, V>(acc, dx + t * H, nvec, lane);
  if (lane == 0) bad[t] = bad_id;
}

// dx[t] = sum_k dh[t K + k] w_in[ids[t K + k]] for `T` tokens (pointers offset to them):
// the token kernel's dx part alone, for a backward that writes dx one token chunk at a
// time after the token kernel ran over all tokens (layer_backward.cu). Same register tiles,
// warps per token and order of adds as tokens_vec_kernel.
template <class S, int VPL, int W>
__global__ void __launch_bounds__(kWarps * 32)
    dx_vec_kernel(i64 T, int H, int K, const S* __restrict__ w_in, const i32* __restrict__ ids,
                  const float* __restrict__ dh, float* __restrict__ dx) {
  constexpr int V = Vec<S>::kN;
  __shared__ __align__(16) float red[W > 1 ? kWarps : 1][W > 1 ? 32 * VPL * V : 4];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, sub = wi % W;
  const i64 t = static_cast<i64>(blockIdx.x) * (kWarps / W) + wi / W;
  const bool live = t < T;  // no early return: the warps of a block meet at a barrier
  const int nvec = H / V;
  float acc[VPL][V];
#pragma unroll
  for (int j = 0; j < VPL; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;
  const i64 t0 = live ? t * K : 0;
  // e < 0: the token kernel flagged it; store_rows makes its row NaN. Its rows load as zeros.
  const auto row = [&](int, i64 e) { return w_in + e * H; };
  const auto body = [&](int, i64 e, float d, const auto& r) {
    if (e < 0) return;
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (j * 32 + lane < nvec) {
        float w[V];
        unpack16<S>(r(0, j), w);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[j][i] = fmaf(d, w[i], acc[j][i]);
      }
  };
  token_tasks<W, 1, VPL, S>(ids + t0, dh + t0, K, sub, live, nvec, row, body);
  if constexpr (W > 1) {
    reduce_token_warps<W, VPL, V>(acc, &red[0][0], sub);
    if (sub != 0) return;
  }
  if (live) store_row_f32<VPL, V>(acc, dx + t * H, nvec, lane);
}

// Any H: lane-strided scalar loads (as tokens_kernel).
template <class S>
__global__ void __launch_bounds__(kWarps * 32)
    dx_kernel(i64 T, int H, int K, const S* __restrict__ w_in, const i32* __restrict__ ids,
              const float* __restrict__ dh, float* __restrict__ dx) {
  const int lane = threadIdx.x & 31;
  const i64 t = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  for (int i = lane; i < H; i += 32) dx[t * H + i] = 0.f;
  for (int k = 0; k < K; ++k) {
    const i64 task = t * K + k, e = ids[task];
    if (e < 0) continue;
    for (int i = lane; i < H; i += 32) dx[t * H + i] = fmaf(dh[task], to_f32(w_in[e * H + i]), dx[t * H + i]);
  }
}

// ---- expert rows: dw_in[e] = sum dh x[t], dw_out[e] = sum a dy[t] over e's tasks -------
// A warp covers a row in slices of 32 * V columns: lane l owns V consecutive columns
// (16-byte loads) when rows are whole 16-byte vectors (kVec), else columns l, l + 32, ...
template <class S, bool kVec>
struct RowSlice {
  static constexpr int V = kVec ? Vec<S>::kN : 8;
  static constexpr int kWidth = 32 * V;
  __device__ static int col(int c0, int lane, int i) { return kVec ? c0 + lane * V + i : c0 + i * 32 + lane; }
  __device__ static void load(const S* row, int c0, int lane, int H, float (&out)[V]) {
    if constexpr (kVec) {
      if (col(c0, lane, 0) < H) load16(row + col(c0, lane, 0), out);
      else
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = 0.f;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = col(c0, lane, i) < H ? to_f32(row[col(c0, lane, i)]) : 0.f;
    }
  }
  // Stores of the lane's columns: one 16-byte store per lane when kVec (coalesced rows).
  template <class D>
  __device__ static void store(D* row, int c0, int lane, int H, const float (&in)[V]) {
    if constexpr (kVec && sizeof(D) * V == 16) {
      if (col(c0, lane, 0) < H) store16(row + col(c0, lane, 0), in);
    } else if constexpr (kVec && std::is_same_v<D, float> && V == 8) {  // fp32 partial rows of 8 columns
      if (col(c0, lane, 0) < H) {
        float4* p = reinterpret_cast<float4*>(row + col(c0, lane, 0));
        p[0] = make_float4(in[0], in[1], in[2], in[3]);
        p[1] = make_float4(in[4], in[5], in[6], in[7]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (col(c0, lane, i) < H) row[col(c0, lane, i)] = from_f32<D>(in[i]);
    }
  }
};

// Sums tasks [begin, end) of the sorted list into gi / go for NS slices starting at c0 (a
// task's x and dy rows are read once for all NS slices: NS independent loads in flight).
template <class S, bool kVec, int NS>
__device__ __forceinline__ void sum_tasks(i32 begin, i32 end, const i32* __restrict__ tasks, FastDiv kdiv, int H,
                                          int c0, int lane, const S* __restrict__ x, const S* __restrict__ dy,
                                          const float* __restrict__ a, const float* __restrict__ dh,
                                          float (&gi)[NS][RowSlice<S, kVec>::V],
                                          float (&go)[NS][RowSlice<S, kVec>::V]) {
  using R = RowSlice<S, kVec>;
  for (i32 i = begin; i < end; ++i) {
    const i32 task = tasks[i];
    const i64 t = kdiv.div(static_cast<std::uint32_t>(task));
    const float w = dh[task], v = a[task];
    float xr[NS][R::V], dr[NS][R::V];
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      R::load(x + t * H, c0 + q * R::kWidth, lane, H, xr[q]);
      R::load(dy + t * H, c0 + q * R::kWidth, lane, H, dr[q]);
    }
#pragma unroll
    for (int q = 0; q < NS; ++q)
#pragma unroll
      for (int j = 0; j < R::V; ++j) {
        gi[q][j] = fmaf(w, xr[q][j], gi[q][j]);
        go[q][j] = fmaf(v, dr[q][j], go[q][j]);
      }
  }
}

// Expert-side task values (RowsArgs::values): the warp also computes each task's a, dg and
// dh from its expert's rows, read once per warp, instead of reading a and dh that the token
// kernel wrote. Each task's expert rows then come from memory once per warp instead of once
// per task, and no token kernel reads them at all (dx follows from dh in
// experts_backward_dx). h and da are summed in the token kernel's order (lane vectors
// j = 0.., then the warp tree), so every value, and every sum below, is bitwise what the
// token kernel and sum_tasks give.
// The expert rows wait in shared memory as fp32 (ExpertRowsSmem), not in registers: held
// packed in registers (sessions m-p) they took 32 registers and 64 unpacking instructions a
// task, and the pass ran issue-bound at ~573 instructions a task, each x and dy row unpacked
// twice (for the dot product and again for the sums) because no registers were left to hold
// them unpacked across the warp sum. From shared memory they cost 16 16-byte loads a task;
// with bf16 unpacked by shift and mask (unpack16) and x and dy unpacked once, the loop is ~392
// instructions a task (255 registers in 16-bit storage, 40 bytes of spills outside the loop;
// without value_task's empty asm, 182 registers and ~456 instructions: x and dy unpacked
// twice), and paper-k512-t4096's training step went 5.66 -> 5.43 ms on an H100 (session q).
// A copy of the loop without the loads' bounds checks for H = NS * 32 vectors (372
// instructions) spilled 52 bytes and ran 2% slower. At 168 registers (12 warps per SM in
// blocks of 4) ptxas spilled ~500 bytes.
template <class S>
struct ValueArgs {
  const S* w_in;  // [N, H] expert tables
  const S* w_out;
  const float* gates;  // [T K]
  Activation act;
  float* dg;  // [T K] out: dgate
  float* dh;  // [T K] out: dh (for experts_backward_dx)
};

// Row `row` of H elements as the values' slices hold it: vector q * 32 + lane in r[q], zeros
// past H.
template <class S, int NS>
__device__ __forceinline__ void load_row_vecs(const S* __restrict__ row, int H, int lane, uint4 (&r)[NS]) {
#pragma unroll
  for (int q = 0; q < NS; ++q) {
    const int c = (q * 32 + lane) * Vec<S>::kN;
    r[q] = c < H ? *reinterpret_cast<const uint4*>(row + c) : make_uint4(0, 0, 0, 0);
  }
}

// A warp's copy of its expert's two rows (w_in, w_out) in shared memory, fp32, laid out so
// that each load is conflict-free: float4 number c of vector v = q * 32 + lane of row r sits
// at index (r * C + c) * NS * 32 + v (C = kN / 4 float4s a vector), so the 32 lanes of a load
// read 32 consecutive float4s. A lane reads and writes only its own vectors: no warp
// synchronisation is needed between one expert's rows and the next.
template <class S, int NS>
struct ExpertRowsSmem {
  static constexpr int C = Vec<S>::kN / 4;
  static constexpr int kFloat4s = 2 * C * NS * 32;  // per warp
  static constexpr std::size_t kBytes = kFloat4s * sizeof(float4);
  float4* base;  // this warp's kFloat4s
  // Rows w_in[e] and w_out[e] (zeros past H, as load_row_vecs).
  __device__ void stage(const S* __restrict__ w_in, const S* __restrict__ w_out, int H, int lane) const {
    uint4 r[2][NS];
    load_row_vecs<S, NS>(w_in, H, lane, r[0]);
    load_row_vecs<S, NS>(w_out, H, lane, r[1]);
    put(r, lane);
  }
  // The two rows as load_row_vecs holds them (this lane's vectors), unpacked to fp32.
  __device__ void put(const uint4 (&r)[2][NS], int lane) const {
#pragma unroll
    for (int w = 0; w < 2; ++w)
#pragma unroll
      for (int q = 0; q < NS; ++q) {
        float f[Vec<S>::kN];
        unpack16<S>(r[w][q], f);
#pragma unroll
        for (int c = 0; c < C; ++c)
          base[(w * C + c) * NS * 32 + q * 32 + lane] = make_float4(f[4 * c], f[4 * c + 1], f[4 * c + 2], f[4 * c + 3]);
      }
  }
  // Vector q of row w (0: w_in, 1: w_out) of this lane.
  __device__ void load(int w, int q, int lane, float (&f)[Vec<S>::kN]) const {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float4 v = base[(w * C + c) * NS * 32 + q * 32 + lane];
      f[4 * c] = v.x;
      f[4 * c + 1] = v.y;
      f[4 * c + 2] = v.z;
      f[4 * c + 3] = v.w;
    }
  }
};

// The values kernels' dynamic shared memory: one ExpertRowsSmem per warp.
template <class S, int NS>
constexpr std::size_t values_smem_bytes() {
  return kWarps * ExpertRowsSmem<S, NS>::kBytes;
}
template <class S, int NS>
__device__ __forceinline__ ExpertRowsSmem<S, NS> warp_expert_rows() {
  extern __shared__ float4 values_smem[];
  return {values_smem + (threadIdx.x >> 5) * ExpertRowsSmem<S, NS>::kFloat4s};
}

// One task of the values loop: its h and da from the expert rows (a warp sum each), its
// a, dg and dh, and its x and dy rows added into gi / go. Every lane's vectors take part in
// the dot products, also past H: load_row_vecs left them zero, so they add +0.f to dot
// products that are never -0.f (sums from +0.f under round-to-nearest), which leaves them
// bitwise as the token kernel's, which skips them. (This assumes no flush-to-zero, which
// could make a -0.f: the project builds without -ftz or --use_fast_math, src/CMakeLists.txt;
// nvcc defines no macro for them to test here, and CudaBackwardValues would see a
// difference.)
template <class S, int NS>
__device__ __forceinline__ void value_task(i32 task, float g, int lane, const ValueArgs<S>& v, const uint4 (&xr)[NS],
                                           const uint4 (&dr)[NS], const ExpertRowsSmem<S, NS>& rows,
                                           float (&gi)[NS][Vec<S>::kN], float (&go)[NS][Vec<S>::kN]) {
  constexpr int V = Vec<S>::kN;
  float xf[NS][V], df[NS][V];  // unpacked once, for the dot products and for the sums
  float h = 0.f, da = 0.f;
#pragma unroll
  for (int q = 0; q < NS; ++q) {  // dot16's order: each vector summed from 0.f, then added
    float wi[V], wo[V], sh = 0.f, sd = 0.f;
    unpack16<S>(xr[q], xf[q]);
    unpack16<S>(dr[q], df[q]);
#pragma unroll
    for (int j = 0; j < V; ++j) {  // opaque to the compiler, which would unpack them again
      asm("" : "+f"(xf[q][j]));    // for the sums rather than hold them (64 instructions a task)
      asm("" : "+f"(df[q][j]));
    }
    rows.load(0, q, lane, wi);
    rows.load(1, q, lane, wo);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      sh = fmaf(xf[q][j], wi[j], sh);
      sd = fmaf(df[q][j], wo[j], sd);
    }
    h += sh;
    da += sd;
  }
  warp_sum2(h, da);
  float s, grad;
  activate_with_grad(v.act, h, s, grad);
  const float dh = da * g * grad, a = g * s;
  if (lane == 0) {
    v.dg[task] = da * s;
    v.dh[task] = dh;
  }
#pragma unroll
  for (int q = 0; q < NS; ++q)
#pragma unroll
    for (int j = 0; j < V; ++j) {
      gi[q][j] = fmaf(dh, xf[q][j], gi[q][j]);
      go[q][j] = fmaf(a, df[q][j], go[q][j]);
    }
}

// Software pipeline, one task deep: the next task's x and dy rows (and gate) are loaded
// before this task's chain, so their L2 latency overlaps it (session m, H200: without it
// the pass waited out both in turn, ~3000 cycles a task at one block of 8 warps per SM).
// Two register buffers in turn (the loop unrolled by two), so no row is copied between
// them. Session n's profile found the pass issue-bound (0.58 instructions a cycle per
// scheduler, few memory stalls) at ~710 instructions a task: the token's index by FastDiv
// instead of a division, the activation and its derivative from one sigmoid or erf, and
// neither row copies nor zero fills take ~140 of them (1.80 ms at paper-k512-t4096 on an
// H100, session o).
// sum_tasks_values_from: tasks[begin] = ta, its gate ga and its x and dy rows xa, da come loaded (begin < end).
template <class S, int NS>
__device__ __forceinline__ void sum_tasks_values_from(i32 begin, i32 end, i32 ta, float ga, uint4 (&xa)[NS],
                                                      uint4 (&da)[NS], const i32* __restrict__ tasks, FastDiv kdiv,
                                                      int H, int lane, const S* __restrict__ x,
                                                      const S* __restrict__ dy, const ValueArgs<S>& v,
                                                      const ExpertRowsSmem<S, NS>& rows, float (&gi)[NS][Vec<S>::kN],
                                                      float (&go)[NS][Vec<S>::kN]) {
  const auto load = [&](i32 task, uint4(&xr)[NS], uint4(&dr)[NS]) {
    const i64 t = kdiv.div(static_cast<std::uint32_t>(task));
    load_row_vecs<S, NS>(x + t * H, H, lane, xr);
    load_row_vecs<S, NS>(dy + t * H, H, lane, dr);
  };
  uint4 xb[NS], db[NS];
  for (i32 i = begin; i < end; i += 2) {
    // buffers a hold task i; b take task i + 1 while a's chain runs, then the other way round
    if (i + 1 >= end) {
      value_task<S, NS>(ta, ga, lane, v, xa, da, rows, gi, go);
      break;
    }
    const i32 tb = tasks[i + 1];
    load(tb, xb, db);
    const float gb = v.gates[tb];
    value_task<S, NS>(ta, ga, lane, v, xa, da, rows, gi, go);
    if (i + 2 < end) {
      ta = tasks[i + 2];
      load(ta, xa, da);
      ga = v.gates[ta];
    }
    value_task<S, NS>(tb, gb, lane, v, xb, db, rows, gi, go);
  }
}

template <class S, int NS>
__device__ __forceinline__ void sum_tasks_values(i32 begin, i32 end, const i32* __restrict__ tasks, FastDiv kdiv, int H,
                                                 int lane, const S* __restrict__ x, const S* __restrict__ dy,
                                                 const ValueArgs<S>& v, const ExpertRowsSmem<S, NS>& rows,
                                                 float (&gi)[NS][Vec<S>::kN], float (&go)[NS][Vec<S>::kN]) {
  if (begin >= end) return;
  uint4 xa[NS], da[NS];
  const i32 ta = tasks[begin];
  const i64 t = kdiv.div(static_cast<std::uint32_t>(ta));
  load_row_vecs<S, NS>(x + t * H, H, lane, xa);
  load_row_vecs<S, NS>(dy + t * H, H, lane, da);
  sum_tasks_values_from<S, NS>(begin, end, ta, v.gates[ta], xa, da, tasks, kdiv, H, lane, x, dy, v, rows, gi, go);
}

// Stage 1 of a long segment (more than `piece` tasks): one warp per piece of `piece`
// consecutive tasks writes its partial rows (fp32) to partial[p] = [2][H]. Pieces are
// numbered expert by expert (pstart, an exclusive scan); warps past the last piece exit.
// kValues: the tasks' values come from the expert rows (sum_tasks_values; one pass, kVec).
template <class S, bool kVec, int NS, bool kValues>
__global__ void __launch_bounds__(kWarps * 32)
    pieces_kernel(i64 N, int H, FastDiv kdiv, int piece, const S* __restrict__ x, const S* __restrict__ dy,
                  const i32* __restrict__ tasks, const i32* __restrict__ offsets, const i32* __restrict__ pstart,
                  const float* __restrict__ a, const float* __restrict__ dh, ValueArgs<S> values,
                  float* __restrict__ partial) {
  using R = RowSlice<S, kVec>;
  const int lane = threadIdx.x & 31;
  const i64 p = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (p >= pstart[N]) return;
  i64 lo = 0, hi = N;  // expert e with pstart[e] <= p < pstart[e + 1]
  while (hi - lo > 1) {
    const i64 mid = (lo + hi) / 2;
    if (pstart[mid] <= p) lo = mid;
    else hi = mid;
  }
  const i32 begin = offsets[lo] + static_cast<i32>(p - pstart[lo]) * piece;
  const i32 end = min(begin + piece, offsets[lo + 1]);
  float* out = partial + p * 2 * H;
  for (int c0 = 0; c0 < H; c0 += NS * R::kWidth) {
    float gi[NS][R::V] = {}, go[NS][R::V] = {};
    if constexpr (kValues) {
      const auto rows = warp_expert_rows<S, NS>();
      rows.stage(values.w_in + lo * H, values.w_out + lo * H, H, lane);
      sum_tasks_values<S, NS>(begin, end, tasks, kdiv, H, lane, x, dy, values, rows, gi, go);
    } else {
      sum_tasks<S, kVec, NS>(begin, end, tasks, kdiv, H, c0, lane, x, dy, a, dh, gi, go);
    }
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      R::store(out, c0 + q * R::kWidth, lane, H, gi[q]);
      R::store(out + H, c0 + q * R::kWidth, lane, H, go[q]);
    }
  }
}

// A split segment's pieces [p0, p1) added in order into gi / go (NS slices from c0).
template <class S, bool kVec, int NS>
__device__ __forceinline__ void sum_partials(i32 p0, i32 p1, const float* __restrict__ partial, int H, int c0, int lane,
                                             float (&gi)[NS][RowSlice<S, kVec>::V],
                                             float (&go)[NS][RowSlice<S, kVec>::V]) {
  using R = RowSlice<S, kVec>;
  for (i32 p = p0; p < p1; ++p) {
    const float* in = partial + static_cast<i64>(p) * 2 * H;
#pragma unroll
    for (int q = 0; q < NS; ++q)
#pragma unroll
      for (int j = 0; j < R::V; ++j) {
        const int c = R::col(c0 + q * R::kWidth, lane, j);
        if (c < H) {
          gi[q][j] += in[c];
          go[q][j] += in[H + c];
        }
      }
  }
}

// Row r of the output (rows_kernel's body): its expert's partial rows or tasks summed.
template <class S, bool kVec, int NS, bool kValues>
__device__ __forceinline__ void sum_row(i64 r, int H, FastDiv kdiv, int piece, const S* __restrict__ x,
                                        const S* __restrict__ dy, const i32* __restrict__ tasks,
                                        const i32* __restrict__ offsets, const i32* __restrict__ pstart,
                                        const float* __restrict__ partial, const float* __restrict__ a,
                                        const float* __restrict__ dh, const ValueArgs<S>& values,
                                        const i32* __restrict__ slot_ids, S* __restrict__ dw_in,
                                        S* __restrict__ dw_out) {
  using R = RowSlice<S, kVec>;
  const int lane = threadIdx.x & 31;
  const i64 e = slot_ids != nullptr ? slot_ids[r] : r;
  const i32 begin = e >= 0 ? offsets[e] : 0, end = e >= 0 ? offsets[e + 1] : 0;
  const bool split = end - begin > piece;
  for (int c0 = 0; c0 < H; c0 += NS * R::kWidth) {
    float gi[NS][R::V] = {}, go[NS][R::V] = {};
    if (split) {
      sum_partials<S, kVec, NS>(pstart[e], pstart[e + 1], partial, H, c0, lane, gi, go);
    } else if constexpr (kValues) {
      if (begin < end) {  // (a padding slot of the sparse output has e < 0 and no tasks)
        const auto rows = warp_expert_rows<S, NS>();
        rows.stage(values.w_in + e * H, values.w_out + e * H, H, lane);
        sum_tasks_values<S, NS>(begin, end, tasks, kdiv, H, lane, x, dy, values, rows, gi, go);
      }
    } else {
      sum_tasks<S, kVec, NS>(begin, end, tasks, kdiv, H, c0, lane, x, dy, a, dh, gi, go);
    }
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      R::store(dw_in + r * H, c0 + q * R::kWidth, lane, H, gi[q]);
      R::store(dw_out + r * H, c0 + q * R::kWidth, lane, H, go[q]);
    }
  }
}

// Stage 2: a warp per output row at a time. Dense output: row e of the [N, H] tables; sparse: slot
// s holds expert slot_ids[s] (-1: padding, a zero row). A segment of at most `piece` tasks is
// summed directly; a longer one sums its pieces' partial rows in order (deterministic).
// kValues: as in pieces_kernel, for the segments summed directly. Warp w of the grid's W
// takes rows w, w + W, ...: one row each when the grid covers the rows; the expert-side
// values launch only the blocks resident at once (one block of 8 warps per SM at H = 1024:
// 255 registers), so that each warp sums ~N / W experts' tasks (Poisson task counts of mean
// ~20 at paper-k512-t4096) and no new block waits for a finished block's busiest expert.
template <class S, bool kVec, int NS, bool kValues>
__global__ void __launch_bounds__(kWarps * 32)
    rows_kernel(i64 rows, int H, FastDiv kdiv, int piece, const S* __restrict__ x, const S* __restrict__ dy,
                const i32* __restrict__ tasks, const i32* __restrict__ offsets, const i32* __restrict__ pstart,
                const float* __restrict__ partial, const float* __restrict__ a, const float* __restrict__ dh,
                ValueArgs<S> values, const i32* __restrict__ slot_ids, S* __restrict__ dw_in, S* __restrict__ dw_out) {
  const i64 stride = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 r = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < rows; r += stride)
    sum_row<S, kVec, NS, kValues>(r, H, kdiv, piece, x, dy, tasks, offsets, pstart, partial, a, dh, values, slot_ids,
                                  dw_in, dw_out);
}

// ---- expert-side values, rows summed directly: one expert ahead ---------------------------
// rows_kernel's expert-side values walk ~N / W experts a warp, each expert's chain (its
// segment, its two rows from DRAM, its first task's x and dy, the tasks, the stores) waited
// out in turn at one block of 8 warps an SM (255 registers): at ~1 task an expert
// (lm-256x256-t4096) the pass took 226 µs for ~91 MB of DRAM traffic (H100, session t).
// rows_values_kernel keeps the warp's next expert in flight while this one runs: the
// segments of 32 rows at a time (a lane each: one exposed chain of up to four dependent
// loads, slot id, offsets, first task, its gate, per 32 rows), and the next
// expert's two rows and its first task's x and dy rows copied by cp.async into the warp's
// staging slots. The values and their order of adds are rows_kernel's.

// Lane j's entry of a warp's window: row `row`'s expert e (-1: none, or a padding slot), its
// segment [begin, end) of the sorted tasks, and where the segment is summed directly (at
// most `piece` tasks) its first task and that task's gate.
struct RowEntry {
  i32 e, begin, end, task;
  float gate;
};
__device__ __forceinline__ RowEntry row_entry(i64 row, i64 rows, int piece, const i32* __restrict__ slot_ids,
                                              const i32* __restrict__ offsets, const i32* __restrict__ tasks,
                                              const float* __restrict__ gates) {
  RowEntry r{-1, 0, 0, 0, 0.f};
  if (row < rows) r.e = slot_ids != nullptr ? slot_ids[row] : static_cast<i32>(row);
  if (r.e >= 0) {
    r.begin = offsets[r.e];
    r.end = offsets[r.e + 1];
  }
  if (r.begin < r.end && r.end - r.begin <= piece) {
    r.task = tasks[r.begin];
    r.gate = gates[r.task];
  }
  return r;
}
__device__ __forceinline__ RowEntry shfl_entry(const RowEntry& w, int lane) {
  constexpr unsigned all = 0xffffffffu;
  return {__shfl_sync(all, w.e, lane), __shfl_sync(all, w.begin, lane), __shfl_sync(all, w.end, lane),
          __shfl_sync(all, w.task, lane), __shfl_sync(all, w.gate, lane)};
}

// A warp's staging slots for the next expert, in the storage dtype: vector q * 32 + lane of
// w_in[e], w_out[e], x[t] and dy[t] (t: the first task's token) at slot (w * NS + q) * 32 +
// lane. A lane copies and reads back only its own vectors, so its cp.async wait is the only
// synchronisation needed.
template <class S, int NS>
struct NextExpertSmem {
  static constexpr int kUint4s = 4 * NS * 32;  // per warp
  static constexpr std::size_t kBytes = kUint4s * sizeof(uint4);
  uint4* base;
  __device__ void fetch(const S* w_in, const S* w_out, const S* x, const S* dy, int H, int lane) const {
    const S* src[4] = {w_in, w_out, x, dy};
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
      for (int q = 0; q < NS; ++q) {
        const int c = (q * 32 + lane) * Vec<S>::kN;
        if (c < H) cp_async16(base + (w * NS + q) * 32 + lane, src[w] + c);
      }
    cp_async_commit();
  }
  // Row w as load_row_vecs would give it (zeros past H); after cp_async_wait<0>().
  __device__ void take(int w, int H, int lane, uint4 (&r)[NS]) const {
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      const int c = (q * 32 + lane) * Vec<S>::kN;
      r[q] = c < H ? base[(w * NS + q) * 32 + lane] : make_uint4(0, 0, 0, 0);
    }
  }
};

// rows_values_kernel's dynamic shared memory: the warps' fp32 expert rows, then their
// staging slots.
template <class S, int NS>
constexpr std::size_t rows_values_smem_bytes() {
  return values_smem_bytes<S, NS>() + kWarps * NextExpertSmem<S, NS>::kBytes;
}

// rows_kernel<S, true, NS, true> with the next expert in flight (above): a persistent grid,
// warp w of W taking rows w, w + W, ...
template <class S, int NS>
__global__ void __launch_bounds__(kWarps * 32)
    rows_values_kernel(i64 rows, int H, FastDiv kdiv, int piece, const S* __restrict__ x, const S* __restrict__ dy,
                       const i32* __restrict__ tasks, const i32* __restrict__ offsets, const i32* __restrict__ pstart,
                       const float* __restrict__ partial, ValueArgs<S> values, const i32* __restrict__ slot_ids,
                       S* __restrict__ dw_in, S* __restrict__ dw_out) {
  using R = RowSlice<S, true>;
  extern __shared__ float4 values_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto smem_rows = warp_expert_rows<S, NS>();
  const NextExpertSmem<S, NS> next_smem{
      reinterpret_cast<uint4*>(values_smem + kWarps * ExpertRowsSmem<S, NS>::kFloat4s) +
      warp * NextExpertSmem<S, NS>::kUint4s};
  const i64 stride = static_cast<i64>(gridDim.x) * kWarps;
  const i64 first = static_cast<i64>(blockIdx.x) * kWarps + warp;
  const auto entry = [&](i64 row) { return row_entry(row, rows, piece, slot_ids, offsets, tasks, values.gates); };
  const auto direct = [&](const RowEntry& r) { return r.begin < r.end && r.end - r.begin <= piece; };
  const auto fetch = [&](const RowEntry& r) {
    const i64 t = kdiv.div(static_cast<std::uint32_t>(r.task));
    next_smem.fetch(values.w_in + static_cast<i64>(r.e) * H, values.w_out + static_cast<i64>(r.e) * H, x + t * H,
                    dy + t * H, H, lane);
  };
  RowEntry window = entry(first + lane * stride);  // rows first + (32 k + j) stride, lane j
  RowEntry cur = shfl_entry(window, 0);
  if (direct(cur)) fetch(cur);
  int j = 0;  // the current row's lane in the window
  for (i64 r = first; r < rows; r += stride) {
    if (++j == 32) {  // the next row starts the next window
      window = entry(r + stride + lane * stride);
      j = 0;
    }
    const RowEntry next = shfl_entry(window, j);
    float gi[NS][R::V] = {}, go[NS][R::V] = {};
    if (direct(cur)) {
      uint4 xa[NS], da[NS];
      {
        uint4 w[2][NS];
        cp_async_wait<0>();
        next_smem.take(0, H, lane, w[0]);
        next_smem.take(1, H, lane, w[1]);
        next_smem.take(2, H, lane, xa);
        next_smem.take(3, H, lane, da);
        smem_rows.put(w, lane);
      }
      if (direct(next)) fetch(next);  // the slots are free again: this lane has read its vectors
      sum_tasks_values_from<S, NS>(cur.begin, cur.end, cur.task, cur.gate, xa, da, tasks, kdiv, H, lane, x, dy, values,
                                   smem_rows, gi, go);
    } else {
      if (direct(next)) fetch(next);
      if (cur.begin < cur.end)  // a split segment: its pieces' partial rows, in order
        sum_partials<S, true, NS>(pstart[cur.e], pstart[cur.e + 1], partial, H, 0, lane, gi, go);
    }
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      R::store(dw_in + r * H, q * R::kWidth, lane, H, gi[q]);
      R::store(dw_out + r * H, q * R::kWidth, lane, H, go[q]);
    }
    cur = next;
  }
}

// Per expert: whether any task chose it, and how many pieces its segment splits into.
__global__ void segment_counts_kernel(i64 N, int piece, const i32* __restrict__ offsets, i32* __restrict__ active,
                                      i32* __restrict__ npieces) {
  const i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e > N) return;
  const i32 len = e < N ? offsets[e + 1] - offsets[e] : 0;  // entry N: 0, so the scans end in totals
  active[e] = len > 0;
  npieces[e] = len > piece ? (len + piece - 1) / piece : 0;
}

// One element of the SwiGLU backward: from u, v and dm to du, m and dv.
__device__ __forceinline__ void swiglu_backward_one(float& u, float& v, float& d) {
  const float s = sigmoid(u), silu = u * s;
  const float du = d * v * s * (1.f + u * (1.f - s)), m = silu * v, dv = d * silu;
  u = du;
  v = m;
  d = dv;
}

// Vec<S>::kN elements a thread with 16-byte loads and stores where the three buffers allow
// (vec: aligned, whole vectors; the tail element by element). Session t's profile had the
// element-wise form at 16.5 µs a 4096 x 1024 slice (lm-256x256-t4096), 2.9 TB/s for
// buffers the products just wrote to L2. kM: m is stored (the weight pass's down gradient
// reads it); the dx products need du and dv alone, and a third of the stores go.
template <class S, bool kVec, bool kM>
__global__ void swiglu_backward_kernel(S* __restrict__ u, S* __restrict__ v, S* __restrict__ dm, i64 n) {
  constexpr int V = kVec ? Vec<S>::kN : 1;
  const i64 i = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (kVec && i + V <= n) {
    float a[Vec<S>::kN], b[Vec<S>::kN], d[Vec<S>::kN];
    load16(u + i, a);
    load16(v + i, b);
    load16(dm + i, d);
#pragma unroll
    for (int j = 0; j < Vec<S>::kN; ++j) swiglu_backward_one(a[j], b[j], d[j]);
    store16(u + i, a);
    if (kM) store16(v + i, b);
    store16(dm + i, d);
    return;
  }
  // Element-wise (kVec false, for unaligned buffers: one element a thread; or the vector
  // form's tail).
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (i + j >= n) return;
    float a = to_f32(u[i + j]), b = to_f32(v[i + j]), d = to_f32(dm[i + j]);
    swiglu_backward_one(a, b, d);
    u[i + j] = from_f32<S>(a);
    if (kM) v[i + j] = from_f32<S>(b);
    dm[i + j] = from_f32<S>(d);
  }
}

// dst = src in the storage dtype, rows with bad[t] set to NaN. kVec: Vec<S>::kN elements a
// thread (16-byte loads and stores, one row lookup; H a multiple of kN and aligned buffers);
// the element-wise form divided every element's index by H (session t: 17.4 µs for the
// 4096 x 1024 dx of lm-256x256-t4096, ~1.4 TB/s).
template <class S, bool kVec>
__global__ void store_rows_kernel(const float* __restrict__ src, i64 T, i64 H, const int* __restrict__ bad,
                                  S* __restrict__ dst) {
  constexpr int V = kVec ? Vec<S>::kN : 1;
  const i64 i = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i >= T * H) return;
  const bool nan = bad != nullptr && bad[i / H];
  if constexpr (kVec) {
    float f[V];
    load16_f32(src + i, f);
    if (nan)
#pragma unroll
      for (int j = 0; j < V; ++j) f[j] = __int_as_float(0x7fffffff);
    store16(dst + i, f);
  } else {
    dst[i] = from_f32<S>(nan ? __int_as_float(0x7fffffff) : src[i]);
  }
}

template <class F>
Status by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f16: return f(__half{});
    case DType::f32: return f(float{});
    default: return {StatusCode::unsupported, "CUDA backward: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace

Status experts_backward_tokens(const ExpertsArgs& a, const void* dy, float* act_out, float* dgates, float* dh,
                               float* dx_acc, int* bad, cudaStream_t stream) {
  const Config& c = *a.cfg;
  return by_dtype(a.dtype, [&](auto tag) {
    using S = decltype(tag);
    const int H = static_cast<int>(c.hidden);
    const int vpl = (H / Vec<S>::kN + 31) / 32;
    const bool vec = H % Vec<S>::kN == 0 && vpl <= 8 && aligned16(a.x) && aligned16(a.w_in) &&
                     aligned16(a.w_out) && aligned16(dy) && aligned16(dx_acc);
    const auto go = [&](auto kernel, int warps_per_token) {
      kernel<<<ceil_div(a.T * warps_per_token, kWarps), kWarps * 32, 0, stream>>>(
          a.T, H, static_cast<int>(c.top_k), c.activation, static_cast<const S*>(a.x),
          static_cast<const S*>(a.w_in), static_cast<const S*>(a.w_out), a.ids, a.gates, static_cast<const S*>(dy),
          act_out, dgates, dh, dx_acc, bad);
    };
    if (!vec) go(tokens_kernel<S>, 1);
    else
      dispatch_tile<8>(vpl, token_warps(a.T, c.top_k), [&](auto p, auto w) {
        go(tokens_vec_kernel<S, decltype(p)::value, decltype(w)::value>, decltype(w)::value);
      });
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward tokens_kernel");
    return Status::Ok();
  });
}

namespace {
// The dx walk's terms and store for gather_chunks_kernel: task (t, k) adds dh[t K + k] w_in[e];
// the row is written to dx in fp32 (16-byte stores).
struct DxCoef {
  const float* dh;
  int K;
  __device__ float operator()(i64 t, int k) const { return dh[t * K + k]; }
};
struct StoreDx {
  float* dx;
  int H;
  template <int V>
  __device__ void operator()(i64 t, int v, float (&acc)[V]) const {
    store16_f32(dx + t * H + v * V, acc);
  }
};
}  // namespace

Status experts_backward_dx(const Config& c, DType dtype, i64 T, const void* w_in, const i32* ids, const float* dh,
                           float* dx, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const int H = static_cast<int>(c.hidden), K = static_cast<int>(c.top_k);
    const int vpl = (H / Vec<S>::kN + 31) / 32;
    const bool vec = H % Vec<S>::kN == 0 && vpl <= 8 && aligned16(w_in) && aligned16(dx);
    const auto w = static_cast<const S*>(w_in);
    const i64 N = c.num_experts(), Ec = gather_chunk_rows(H, sizeof(S));
    if (!vec) {
      dx_kernel<S><<<ceil_div(T, kWarps), kWarps * 32, 0, stream>>>(T, H, K, w, ids, dh, dx);
    } else if (N > Ec && T * K >= 2 * N) {
      // A table larger than one chunk whose rows serve two tasks or more each on average:
      // token by token they would come from DRAM once per task (the per-token kernel below
      // ran at the copy rate, 1.25 ms at paper-k512-t4096 on the H100); walked in expert
      // chunks, once per launch, then from L2. (At about one task per row, as in the LM
      // family's dx chunks, there is little to reuse and each chunk would rescan the ids.)
      launch_gather_chunks<S>(T, H, K, Ec, N, w, ids, DxCoef{dh, K}, StoreDx{dx, H}, stream);
    } else {
      dispatch_tile<8>(vpl, token_warps(T, K), [&](auto p, auto wt) {
        constexpr int W = decltype(wt)::value;
        dx_vec_kernel<S, decltype(p)::value, W>
            <<<ceil_div(T * W, kWarps), kWarps * 32, 0, stream>>>(T, H, K, w, ids, dh, dx);
      });
    }
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward dx_kernel");
    return Status::Ok();
  });
}

namespace {
// Sparse slots: slot_ids[rank[e]] = e for active e, -1 from count on; count = rank[N].
__global__ void compact_kernel(i64 N, i64 capacity, const i32* __restrict__ active, const i32* __restrict__ rank,
                               i32* __restrict__ slot_ids, i32* __restrict__ count) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  const i32 total = rank[N];
  if (i == 0) *count = total;
  if (i < N && active[i]) slot_ids[rank[i]] = static_cast<i32>(i);
  if (i < capacity && i >= total) slot_ids[i] = -1;
}
}  // namespace

namespace {
__global__ void mark_active_kernel(const i32* __restrict__ ids, i64 n, i32* __restrict__ active) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && ids[i] >= 0) active[ids[i]] = 1;  // every writer stores the same 1
}
}  // namespace

Status experts_active_from_ids(const i32* ids, i64 tasks, i64 N, const SegmentScratch& s, const SparseRowsOut& sparse,
                               cudaStream_t stream) {
  OMNIMOE_CUDA_TRY(cudaMemsetAsync(s.active, 0, static_cast<std::size_t>(N + 1) * sizeof(i32), stream));
  mark_active_kernel<<<ceil_div(tasks, 256), 256, 0, stream>>>(ids, tasks, s.active);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward mark_active_kernel");
  std::size_t bytes = s.scan_bytes;
  OMNIMOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(s.scan_temp, bytes, s.active, s.rank, static_cast<int>(N + 1), stream));
  compact_kernel<<<ceil_div(std::max(N, sparse.capacity), 256), 256, 0, stream>>>(N, sparse.capacity, s.active,
                                                                                  s.rank, sparse.ids, sparse.count);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward compact_kernel");
  return Status::Ok();
}

int segment_piece(i64 tasks, i64 H, std::size_t partial_bytes) {
  const double per_task = 2.0 * 2.0 * static_cast<double>(H) * sizeof(float);  // 2 rows, <= 2 pieces per L tasks
  const double budget = static_cast<double>(std::clamp(partial_bytes, kMinPartialBytes, kPartialBytes));
  return static_cast<int>(std::max<double>(32.0, std::ceil(static_cast<double>(tasks) * per_task / budget)));
}

SegmentScratch carve_segment_scratch(Arena& a, i64 N) {
  SegmentScratch s;
  const auto n1 = static_cast<std::size_t>(N + 1);
  s.active = a.take<i32>(n1);
  s.rank = a.take<i32>(n1);
  s.npieces = a.take<i32>(n1);
  s.pstart = a.take<i32>(n1);
  cub::DeviceScan::ExclusiveSum(nullptr, s.scan_bytes, static_cast<const i32*>(nullptr), static_cast<i32*>(nullptr),
                                static_cast<int>(N + 1));
  s.scan_temp = a.take<char>(s.scan_bytes);
  return s;
}

void carve_segment_partials(Arena& a, SegmentScratch& s, i64 tasks, i64 H, std::size_t budget) {
  s.piece = segment_piece(tasks, H, budget);
  s.max_pieces = std::max<i64>(1, (2 * tasks + s.piece - 1) / s.piece);
  s.partial = a.take<float>(static_cast<std::size_t>(s.max_pieces * 2 * H));
}

Status experts_active_list(i64 N, const i32* offsets, const SegmentScratch& s, const SparseRowsOut* sparse,
                           cudaStream_t stream) {
  segment_counts_kernel<<<ceil_div(N + 1, 256), 256, 0, stream>>>(N, s.piece, offsets, s.active, s.npieces);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward segment_counts_kernel");
  std::size_t bytes = s.scan_bytes;
  OMNIMOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(s.scan_temp, bytes, s.npieces, s.pstart, static_cast<int>(N + 1),
                                                 stream));
  if (sparse != nullptr) {
    bytes = s.scan_bytes;
    OMNIMOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(s.scan_temp, bytes, s.active, s.rank, static_cast<int>(N + 1),
                                                   stream));
    compact_kernel<<<ceil_div(std::max(N, sparse->capacity), 256), 256, 0, stream>>>(
        N, sparse->capacity, s.active, s.rank, sparse->ids, sparse->count);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward compact_kernel");
  }
  return Status::Ok();
}

namespace {
// Rows of whole 16-byte vectors and 16-byte aligned tensors (a caller's view into a larger
// buffer may not be): the 16-byte loads and stores of the rows kernels.
bool rows_vec(const RowsArgs& r) {
  const i64 v = 16 / static_cast<i64>(dtype_size(r.dtype));
  const void* out_in = r.sparse != nullptr ? r.sparse->dw_in : r.dw_in;
  const void* out_out = r.sparse != nullptr ? r.sparse->dw_out : r.dw_out;
  return r.cfg->hidden % v == 0 && aligned16(r.x) && aligned16(r.dy) && aligned16(out_in) && aligned16(out_out);
}

// Per token, a warp over its K tasks: an id < 0 zeroes the task's dg and dh and flags the
// token in bad[t] (the expert-side values never see such a task: it is in no segment).
__global__ void __launch_bounds__(kWarps * 32)
    flag_bad_kernel(i64 T, int K, const i32* __restrict__ ids, float* __restrict__ dg, float* __restrict__ dh,
                    int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const i64 t = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  bool any = false;
  for (int k = lane; k < K; k += 32) {
    const i64 task = t * K + k;
    if (ids[task] < 0) {
      dg[task] = dh[task] = 0.f;
      any = true;
    }
  }
  any = __any_sync(0xffffffffu, any);
  if (lane == 0) bad[t] = any;
}
}  // namespace

bool experts_rows_values_possible(const RowsArgs& r) {
  const i64 H = r.cfg->hidden, v = 16 / static_cast<i64>(dtype_size(r.dtype));
  return rows_vec(r) && H <= 4 * 32 * v && aligned16(r.w_in) && aligned16(r.w_out);
}

Status experts_flag_bad_ids(const i32* ids, i64 T, i64 K, float* dg, float* dh, int* bad, cudaStream_t stream) {
  flag_bad_kernel<<<ceil_div(T, kWarps), kWarps * 32, 0, stream>>>(T, static_cast<int>(K), ids, dg, dh, bad);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward flag_bad_kernel");
  return Status::Ok();
}

namespace {
// OMNIMOE_VALUES_ROWS=classic takes rows_kernel for the expert-side values instead of
// rows_values_kernel (read per call: a captured graph keeps the kernel of its capture). The
// classic kernel also serves a device whose blocks cannot take rows_values_kernel's shared
// memory (fits_dynamic_smem).
bool values_rows_classic() {
  const char* env = std::getenv("OMNIMOE_VALUES_ROWS");
  return env != nullptr && std::string(env) == "classic";
}
Status fits_dynamic_smem(std::size_t bytes, bool& fits) {
  int dev = 0, optin = 0;
  OMNIMOE_CUDA_TRY(cudaGetDevice(&dev));
  OMNIMOE_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  fits = bytes <= static_cast<std::size_t>(optin);
  return Status::Ok();
}
}  // namespace

Status experts_backward_rows(const RowsArgs& r, cudaStream_t stream) {
  const Config& c = *r.cfg;
  const i64 N = c.num_experts();
  const int H = static_cast<int>(c.hidden);
  const FastDiv kdiv(static_cast<std::uint32_t>(c.top_k));  // task index -> token, for the rows kernels
  const SegmentScratch& s = *r.seg;
  const i64 rows = r.sparse != nullptr ? r.sparse->capacity : N;
  if (r.values && !experts_rows_values_possible(r))
    return {StatusCode::internal,
            "experts_backward_rows: expert-side values need rows of whole 16-byte "
            "vectors, H <= 512 (fp32) or 1024 (16-bit) and aligned tensors"};
  return by_dtype(r.dtype, [&](auto tag) {
    using S = decltype(tag);
    const ValueArgs<S> values{
        static_cast<const S*>(r.w_in), static_cast<const S*>(r.w_out), r.gates, c.activation, r.dg_out, r.dh_out};
    auto launch_ns = [&](auto vec, auto ns, auto kv) -> Status {
      constexpr bool kVec = decltype(vec)::value, kValues = decltype(kv)::value;
      constexpr int NS = decltype(ns)::value;
      // The values kernels keep each warp's expert rows in shared memory (64 KB a block at
      // H = 1024 in 16-bit storage: past the 48 KB a launch may take without asking), and
      // rows_values_kernel its staging slots too (128 KB there).
      constexpr std::size_t smem = kValues ? values_smem_bytes<S, NS>() : 0;
      if constexpr (kValues)
        OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(pieces_kernel<S, kVec, NS, kValues>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      pieces_kernel<S, kVec, NS, kValues><<<ceil_div(s.max_pieces, kWarps), kWarps * 32, smem, stream>>>(
          N, H, kdiv, s.piece, static_cast<const S*>(r.x), static_cast<const S*>(r.dy), r.tasks, r.offsets, s.pstart,
          r.act_out, r.dh, values, s.partial);
      OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward pieces_kernel");
      const i32* slot_ids = r.sparse != nullptr ? r.sparse->ids : nullptr;
      auto* dw_in = static_cast<S*>(r.sparse != nullptr ? r.sparse->dw_in : r.dw_in);
      auto* dw_out = static_cast<S*>(r.sparse != nullptr ? r.sparse->dw_out : r.dw_out);
      // The expert-side values take a persistent grid (the blocks resident at once), the other
      // forms a warp a row.
      unsigned grid = ceil_div(rows, kWarps);
      if constexpr (kValues) {
        constexpr std::size_t big = rows_values_smem_bytes<S, NS>();
        bool fits = false;
        OMNIMOE_RETURN_IF_ERROR(fits_dynamic_smem(big, fits));
        unsigned resident = 0;
        if (fits && !values_rows_classic()) {
          OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(rows_values_kernel<S, NS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(big)));
          OMNIMOE_RETURN_IF_ERROR(resident_blocks(rows_values_kernel<S, NS>, kWarps * 32, resident, big));
          rows_values_kernel<S, NS><<<std::min(grid, resident), kWarps * 32, big, stream>>>(
              rows, H, kdiv, s.piece, static_cast<const S*>(r.x), static_cast<const S*>(r.dy), r.tasks, r.offsets,
              s.pstart, s.partial, values, slot_ids, dw_in, dw_out);
          OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward rows_values_kernel");
          return Status::Ok();
        }
        OMNIMOE_CUDA_TRY(cudaFuncSetAttribute(rows_kernel<S, kVec, NS, kValues>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        OMNIMOE_RETURN_IF_ERROR(resident_blocks(rows_kernel<S, kVec, NS, kValues>, kWarps * 32, resident, smem));
        grid = std::min(grid, resident);
      }
      rows_kernel<S, kVec, NS, kValues><<<grid, kWarps * 32, smem, stream>>>(
          rows, H, kdiv, s.piece, static_cast<const S*>(r.x), static_cast<const S*>(r.dy), r.tasks, r.offsets, s.pstart,
          s.partial, r.act_out, r.dh, values, slot_ids, dw_in, dw_out);
      OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward rows_kernel");
      return Status::Ok();
    };
    // Slices of a row summed together: up to 4 (H <= 1024 in 16-bit storage in one pass).
    auto launch = [&](auto vec, auto kv) {
      constexpr int kWidth = RowSlice<S, decltype(vec)::value>::kWidth;
      const int slices = (H + kWidth - 1) / kWidth;
      if (slices <= 1) return launch_ns(vec, std::integral_constant<int, 1>{}, kv);
      if (slices <= 2) return launch_ns(vec, std::integral_constant<int, 2>{}, kv);
      return launch_ns(vec, std::integral_constant<int, 4>{}, kv);
    };
    if (r.values) return launch(std::true_type{}, std::true_type{});
    if (rows_vec(r)) return launch(std::true_type{}, std::false_type{});
    return launch(std::false_type{}, std::false_type{});
  });
}

Status shared_mlp_swiglu_backward(DType dtype, void* u, void* v, void* dm, i64 n, bool keep_m, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const auto launch = [&](auto vec, auto m) {
      constexpr bool kVec = decltype(vec)::value;
      swiglu_backward_kernel<S, kVec, decltype(m)::value>
          <<<ceil_div(kVec ? ceil_div(n, Vec<S>::kN) : n, 256), 256, 0, stream>>>(
              static_cast<S*>(u), static_cast<S*>(v), static_cast<S*>(dm), n);
    };
    const auto with_m = [&](auto vec) { keep_m ? launch(vec, std::true_type{}) : launch(vec, std::false_type{}); };
    if (aligned16(u) && aligned16(v) && aligned16(dm))
      with_m(std::true_type{});
    else
      with_m(std::false_type{});
    OMNIMOE_CUDA_LAUNCH_CHECK("shared_mlp swiglu_backward_kernel");
    return Status::Ok();
  });
}

Status store_rows(DType dtype, const float* src, i64 T, i64 H, const int* bad, void* dst, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    if (H % Vec<S>::kN == 0 && aligned16(src) && aligned16(dst))
      store_rows_kernel<S, true>
          <<<ceil_div(T * H / Vec<S>::kN, 256), 256, 0, stream>>>(src, T, H, bad, static_cast<S*>(dst));
    else
      store_rows_kernel<S, false><<<ceil_div(T * H, 256), 256, 0, stream>>>(src, T, H, bad, static_cast<S*>(dst));
    OMNIMOE_CUDA_LAUNCH_CHECK("store_rows_kernel");
    return Status::Ok();
  });
}

}  // namespace omnimoe::cuda
