// CUDA experts stage, dense regime (many tokens per expert): tensor-core products over
// chunks of experts. Per token chunk, its tasks are sorted by expert chunk (CUB), then per
// expert chunk:
//   S = x w_inᵀ                 cuBLASLt, storage dtype [rows, Ec]
//   P = g * act(S) at the chunk's tasks (0 elsewhere)
//   yacc (+)= P w_out           cuBLASLt, fp32 accumulation in a fixed chunk order
// and y (+)= yacc. Only chunk-sized buffers exist (never T x N, and the schedule covers one
// token chunk), no atomics on the outputs: deterministic. (P's cells are added to, which
// only matters when a caller's routing names one expert twice for a token.)
#include "core/math.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kScatterBlocks = 528, kScatterThreads = 256;  // grid-stride over a group's tasks

template <class S, bool kClear>
__global__ void scatter_kernel(const i32* __restrict__ tasks, const i32* __restrict__ offsets, i64 group,
                               const i32* __restrict__ ids, const float* __restrict__ gates,
                               const S* __restrict__ scores, S* __restrict__ p, i64 t0, i64 e0, i64 ec, int K,
                               Activation act) {
  const i32 begin = offsets[group], end = offsets[group + 1];
  for (i64 i = begin + static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i32 task = tasks[i];
    const i64 idx = (task / K - t0) * ec + (ids[task] - e0);
    if constexpr (kClear) {
      p[idx] = from_f32<S>(0.f);
    } else {
      // An add, not a store: a caller routing may name one expert twice for a token, and
      // the terms sum as in the gather and on the CPU (two copies sum the same either way).
      atomicAdd(p + idx, from_f32<S>(gates[task] * activate(act, to_f32(scores[idx]))));
    }
  }
}

template <class S>
__global__ void store_kernel(const float* __restrict__ yacc, i64 n, S* __restrict__ y, bool add) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = from_f32<S>(add ? yacc[i] + to_f32(y[i]) : yacc[i]);
}

// Tokens of the caller's routing with an id out of range: their rows become NaN.
template <class S>
__global__ void poison_kernel(const i32* __restrict__ ids, i64 n, int K, int H, S* __restrict__ y) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || ids[i] >= 0) return;
  const i64 t = i / K;
  for (int h = 0; h < H; ++h) y[t * H + h] = from_f32<S>(__int_as_float(0x7fffffff));
}


template <class S>
Status run(const ExpertsArgs& a, const DenseBuffers& b, cudaStream_t stream) {
  const Config& c = *a.cfg;
  GroupSchedule sc = b.schedule;  // one token chunk: groups are the expert chunks
  const i64 T = a.T, H = c.hidden, K = c.top_k, N = c.num_experts(), Ec = sc.expert_chunk, Tc = sc.token_chunk;
  const DType dt = a.dtype;
  OMNIMOE_CUDA_TRY(cudaMemsetAsync(b.p, 0, static_cast<std::size_t>(Tc * Ec) * sizeof(S), stream));
  for (i64 t0 = 0; t0 < T; t0 += Tc) {
    const i64 rows = std::min(Tc, T - t0);
    const i32* ids = a.ids + t0 * K;  // this chunk's tasks, numbered from its first token
    const float* gates = a.gates + t0 * K;
    OMNIMOE_RETURN_IF_ERROR(schedule_groups(ids, rows, K, sc, stream));
    for (i64 ec = 0; ec < sc.n_ec; ++ec) {
      const i64 e0 = ec * Ec, cols = std::min(Ec, N - e0);
      GemmArgs s;  // S = x w_inᵀ
      s.tb = true;
      s.M = rows;
      s.N = cols;
      s.K = H;
      s.A = at(a.x, t0 * H, dt);
      s.lda = H;
      s.B = at(a.w_in, e0 * H, dt);
      s.ldb = H;
      s.C = b.s;
      s.ldc = Ec;
      s.ab = dt;
      s.c = dt;  // scores in the storage dtype, as a framework's bf16 product would give
      OMNIMOE_RETURN_IF_ERROR(gemm(s, b.gemm, stream));
      scatter_kernel<S, false><<<kScatterBlocks, kScatterThreads, 0, stream>>>(
          sc.tasks, sc.offsets, ec, ids, gates, static_cast<const S*>(b.s), static_cast<S*>(b.p), 0, e0, Ec,
          static_cast<int>(K), c.activation);
      OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense scatter_kernel");
      GemmArgs o;  // yacc (+)= P w_out
      o.M = rows;
      o.N = H;
      o.K = cols;
      o.A = b.p;
      o.lda = Ec;
      o.B = at(a.w_out, e0 * H, dt);
      o.ldb = H;
      o.C = b.yacc;
      o.ldc = H;
      o.ab = dt;
      o.c = DType::f32;
      o.beta = ec > 0 ? 1.f : 0.f;
      OMNIMOE_RETURN_IF_ERROR(gemm(o, b.gemm, stream));
      scatter_kernel<S, true><<<kScatterBlocks, kScatterThreads, 0, stream>>>(
          sc.tasks, sc.offsets, ec, ids, gates, static_cast<const S*>(b.s), static_cast<S*>(b.p), 0, e0, Ec,
          static_cast<int>(K), c.activation);
      OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense clear_kernel");
    }
    store_kernel<S><<<ceil_div(rows * H, 256), 256, 0, stream>>>(b.yacc, rows * H,
                                                                   static_cast<S*>(a.y) + t0 * H, a.add);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense store_kernel");
  }
  poison_kernel<S><<<ceil_div(T * K, 256), 256, 0, stream>>>(a.ids, T * K, static_cast<int>(K), static_cast<int>(H),
                                                             static_cast<S*>(a.y));
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense poison_kernel");
  return Status::Ok();
}

}  // namespace

Status experts_dense(const ExpertsArgs& a, const DenseBuffers& b, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::bf16: return run<__nv_bfloat16>(a, b, stream);
    case DType::f16: return run<__half>(a, b, stream);
    case DType::f32: return run<float>(a, b, stream);
    default: return {StatusCode::unsupported, "CUDA experts: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace omnimoe::cuda
