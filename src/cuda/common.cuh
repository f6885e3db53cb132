// Shared pieces of the CUDA backend: error checks that turn into Status, storage types,
// and vectorised loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::cuda {

using i64 = std::int64_t;
using i32 = std::int32_t;

inline Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return {StatusCode::cuda_error, std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")"};
}

}  // namespace omnimoe::cuda

// Check a CUDA runtime call; return a Status naming the call on failure.
#define OMNIMOE_CUDA_TRY(call) OMNIMOE_RETURN_IF_ERROR(::omnimoe::cuda::cuda_status((call), #call))
// Check the launch just made (configuration errors surface here; faults surface later).
#define OMNIMOE_CUDA_LAUNCH_CHECK(name) OMNIMOE_RETURN_IF_ERROR(::omnimoe::cuda::cuda_status(cudaGetLastError(), name))

namespace omnimoe::cuda {

// Storage element types by DType.
template <DType D> struct Storage;
template <> struct Storage<DType::f32> { using type = float; };
template <> struct Storage<DType::bf16> { using type = __nv_bfloat16; };
template <> struct Storage<DType::f16> { using type = __half; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <class S> __device__ __forceinline__ S from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// cp.async of 16 bytes from global to shared memory (L2 only, past L1); valid = false reads
// nothing and writes 16 zero bytes. The copies a thread issued are visible to that thread
// after cp_async_wait<N>() leaves at most N of its committed groups in flight (to other
// threads only after a barrier as well).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid = true) {
  const auto s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 16 bytes of S as float: 4 floats or 8 halves.
template <class S> struct Vec { static constexpr int kN = 16 / sizeof(S); };

template <class S>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[Vec<S>::kN]);

template <class S>
__device__ __forceinline__ void load16(const S* p, float (&out)[Vec<S>::kN]) {
  unpack16<S>(*reinterpret_cast<const uint4*>(p), out);
}

template <class S>
__device__ __forceinline__ void store16(S* p, const float (&in)[Vec<S>::kN]) {
  uint4 raw;
  S* v = reinterpret_cast<S*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<S>::kN; ++i) v[i] = from_f32<S>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// 16 bytes as loaded (one uint4) to V floats, and its dot product with another such vector.
template <class S>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[Vec<S>::kN]) {
  if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    // A bf16 is the top half of the fp32 of the same value: one instruction an element
    // (shift or mask) where __bfloat162float on each half took two for the high one
    // (extract, then shift). Bitwise the same floats, NaNs included.
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
    const S* v = reinterpret_cast<const S*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec<S>::kN; ++i) out[i] = to_f32(v[i]);
  }
}
template <class S>
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b) {
  float fa[Vec<S>::kN], fb[Vec<S>::kN], s = 0.f;
  unpack16<S>(a, fa);
  unpack16<S>(b, fb);
#pragma unroll
  for (int i = 0; i < Vec<S>::kN; ++i) s = fmaf(fa[i], fb[i], s);
  return s;
}

// V floats (a multiple of 4) loaded with 16-byte loads from p (16-byte aligned).
template <int V>
__device__ __forceinline__ void load16_f32(const float* p, float (&v)[V]) {
  const float4* in = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < V / 4; ++i) {
    const float4 q = in[i];
    v[4 * i] = q.x;
    v[4 * i + 1] = q.y;
    v[4 * i + 2] = q.z;
    v[4 * i + 3] = q.w;
  }
}
// V floats (a multiple of 4) stored with 16-byte stores at p (16-byte aligned).
template <int V>
__device__ __forceinline__ void store16_f32(float* p, const float (&v)[V]) {
  float4* out = reinterpret_cast<float4*>(p);
#pragma unroll
  for (int i = 0; i < V / 4; ++i) out[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}
// A row held as acc[VPL][V] (lane owns vectors lane + 32 j, nvec vectors in all) stored as
// fp32 with 16-byte stores.
template <int VPL, int V>
__device__ __forceinline__ void store_row_f32(const float (&acc)[VPL][V], float* row, int nvec, int lane) {
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int v = j * 32 + lane;
    if (v < nvec) store16_f32(row + v * V, acc[j]);
  }
}

// Several warps per token (W of a block's warps, consecutive): each sums a share of the
// token's tasks into acc[VPL][V] (lane owns vectors lane + 32 j of the row), then the
// partial rows meet in shared memory and the token's first warp (sub = 0) adds the others'
// in warp order: deterministic. Every warp of the block must call it (block barrier); red
// holds blockDim.x / 32 rows of 32 * VPL * V floats.
template <int W, int VPL, int V>
__device__ __forceinline__ void reduce_token_warps(float (&acc)[VPL][V], float* red, int sub) {
  if constexpr (W > 1) {
    constexpr int kRow = 32 * VPL * V;
    const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
    if (sub != 0) {
      float4* mine = reinterpret_cast<float4*>(red + wi * kRow);
#pragma unroll
      for (int j = 0; j < VPL; ++j)
#pragma unroll
        for (int i = 0; i < V / 4; ++i)
          mine[((j * 32 + lane) * V) / 4 + i] =
              make_float4(acc[j][4 * i], acc[j][4 * i + 1], acc[j][4 * i + 2], acc[j][4 * i + 3]);
    }
    __syncthreads();
    if (sub == 0)
#pragma unroll
      for (int w = 1; w < W; ++w) {
        const float4* other = reinterpret_cast<const float4*>(red + (wi + w) * kRow);
#pragma unroll
        for (int j = 0; j < VPL; ++j)
#pragma unroll
          for (int i = 0; i < V / 4; ++i) {
            const float4 o = other[((j * 32 + lane) * V) / 4 + i];
            acc[j][4 * i] += o.x;
            acc[j][4 * i + 1] += o.y;
            acc[j][4 * i + 2] += o.z;
            acc[j][4 * i + 3] += o.w;
          }
      }
  }
}

// A task's expert rows as the gather kernels' bodies see them: r(q, j) = 16-byte vector
// lane + 32 j of row q (zeros past nvec and for an id < 0). Loaded up front (kPre: tiles of
// up to 4 vectors per lane, every benchmark point) so that all NR VPL loads are in flight
// together; wider tiles load each vector where the body uses it, since holding NR VPL more
// vectors through the body spilled (ptxas, sm_90a: the forward's 16-vector tile 2.5 KB,
// the backward's 8-vector tile 80 bytes).
template <class S, int NR, int VPL, class Rows>
struct TaskRows {
  static constexpr bool kPre = VPL <= 4;
  i64 e;
  int lane, nvec;
  Rows rows;
  uint4 v[kPre ? NR : 1][kPre ? VPL : 1];
  __device__ __forceinline__ uint4 fetch(int q, int j) const {
    const int c = j * 32 + lane;
    return e >= 0 && c < nvec ? *reinterpret_cast<const uint4*>(rows(q, e) + c * Vec<S>::kN) : make_uint4(0, 0, 0, 0);
  }
  __device__ __forceinline__ TaskRows(i64 e_, int lane_, int nvec_, Rows rows_)
      : e(e_), lane(lane_), nvec(nvec_), rows(rows_) {
    if constexpr (kPre) {
#pragma unroll
      for (int q = 0; q < NR; ++q)
#pragma unroll
        for (int j = 0; j < VPL; ++j) v[q][j] = fetch(q, j);
    }
  }
  __device__ __forceinline__ uint4 operator()(int q, int j) const {
    if constexpr (kPre)
      return v[q][j];
    else
      return fetch(q, j);
  }
};

// The tasks of one warp of a token in the register-tile gather kernels (forward, backward,
// the backward's dx pass): k = sub, sub + W, .. < K, in that order. For each, body(k, e, f,
// r) runs with e = tid[k], f = per_task[k] (a gate, or dh) and r the NR rows rows(q, e) of
// expert e (TaskRows: loaded before the body where the tile allows, so a task's loads are
// in flight together; the kernels this replaced interleaved each load with its
// arithmetic). e is warp-uniform, so the body may reduce across the warp.
// Measured (H100, session l, docs/perf_log.md): prefetching the next task's rows as well
// (two or three tasks in flight per warp, ids and gates read 32 at a time) was no faster
// than this at any benchmark point, and up to 13% slower in the forward, so it was dropped.
template <int W, int NR, int VPL, class S, class Rows, class Body>
__device__ __forceinline__ void token_tasks(const i32* __restrict__ tid, const float* __restrict__ per_task, int K,
                                            int sub, bool live, int nvec, Rows rows, Body body) {
  const int lane = threadIdx.x & 31;
  for (int k = sub; live && k < K; k += W) {
    const i64 e = tid[k];
    const TaskRows<S, NR, VPL, Rows> r(e, lane, nvec, rows);
    body(k, e, per_task[k], r);
  }
}

// Host side: calls f(integral_constant<int, P>{}, integral_constant<int, W>{}) for the
// register-tile kernels, P = 16-byte vectors per lane (vpl rounded up to a power of two, at
// most MaxP) and W = warps per token (w where P <= 4, whose partial rows fit 32 KB of shared
// memory per block, else 1).
template <int P, int MaxP, class F>
void dispatch_tile_from(int vpl, int w, F& f) {
  if constexpr (P < MaxP) {
    if (vpl > P) return dispatch_tile_from<2 * P, MaxP>(vpl, w, f);
  }
  using Pc = std::integral_constant<int, P>;
  if constexpr (P <= 4) {
    if (w == 8) return f(Pc{}, std::integral_constant<int, 8>{});
    if (w == 4) return f(Pc{}, std::integral_constant<int, 4>{});
    if (w == 2) return f(Pc{}, std::integral_constant<int, 2>{});
  }
  f(Pc{}, std::integral_constant<int, 1>{});
}
template <int MaxP, class F>
void dispatch_tile(int vpl, int w, F&& f) {
  dispatch_tile_from<1, MaxP>(vpl, w, f);
}

// Two warp sums in one shuffle tree (their latencies overlap).
__device__ __forceinline__ void warp_sum2(float& a, float& b) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Whether 16-byte loads and stores may start at p (a caller's view into a larger buffer may
// not be aligned).
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline unsigned ceil_div(i64 a, i64 b) { return static_cast<unsigned>((a + b - 1) / b); }

// Blocks of `threads` threads of `kernel` resident at once on the current device (a
// persistent grid's size): host queries only, no synchronisation, allowed in stream capture.
template <class Kernel>
Status resident_blocks(Kernel kernel, int threads, unsigned& blocks, std::size_t dynamic_smem = 0) {
  int dev = 0, sms = 0, per_sm = 0;
  OMNIMOE_CUDA_TRY(cudaGetDevice(&dev));
  OMNIMOE_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  OMNIMOE_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem));
  blocks = static_cast<unsigned>(sms * (per_sm > 0 ? per_sm : 1));
  return Status::Ok();
}

// Address of element `elems` of a tensor of dtype dt starting at base.
inline const char* at(const void* base, i64 elems, DType dt) {
  return static_cast<const char*>(base) + elems * static_cast<i64>(dtype_size(dt));
}

}  // namespace omnimoe::cuda
