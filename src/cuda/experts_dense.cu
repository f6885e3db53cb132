// CUDA experts stage, dense regime (many tokens per expert), per token chunk. Two output
// forms (dense_output_sparse decides from sizes, or the OMNIMOE_DENSE_OUTPUT test switch):
//   sparse:  the scores at the chunk's tasks only, s[t K + k] = x[t] . w_in[e] in the storage
//            dtype (experts_dense_scores.cu: the tasks sorted by 64-expert tile, a gathered
//            tile product per 64 (tile, token) slots, each task's cell picked out of the
//            tile; no [tokens, experts] scores), then one launch in which warps per token
//            add g * act(s) * w_out[e] over the token's tasks, expert chunk by expert chunk
//            and in task order within each (a fixed order), in registers, and store y.
//            No P buffer.
//   product: per expert chunk, S = x w_inᵀ (cuBLASLt, storage dtype [rows, Ec]), the tasks
//            sorted by expert chunk (CUB), P = g * act(S) at the tasks (0 elsewhere),
//            yacc (+)= P w_out (cuBLASLt, fp32), and y (+)= yacc at the end.
// Only chunk-sized buffers exist (never T x N, and the schedules cover one token chunk), no
// atomics on the outputs or the scores, sums in a fixed chunk and task order: deterministic.
// (P's cells are added to, which only matters when a caller's routing names one expert twice
// for a token.)
#include <algorithm>
#include <cstdlib>
#include <string>

#include "core/math.hpp"
#include "cuda/cuda.cuh"
#include "cuda/gather_chunks.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kScatterBlocks = 528, kScatterThreads = 256;  // grid-stride over a group's tasks (all sub-chunks)

// Expert chunk `group`'s tasks of the token chunk: sub-chunk blockIdx.y's range of the
// schedule (groups of sub-chunk y are offsets[y stride ..]).
template <class S, bool kClear>
__global__ void scatter_kernel(const i32* __restrict__ tasks, const i32* __restrict__ offsets, i64 group,
                               i64 stride, const i32* __restrict__ ids, const float* __restrict__ gates,
                               const S* __restrict__ scores, S* __restrict__ p, i64 t0, i64 e0, i64 ec, int K,
                               Activation act) {
  const i64 g = static_cast<i64>(blockIdx.y) * stride + group;
  const i32 begin = offsets[g], end = offsets[g + 1];
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

// The sparse output's terms and store for gather_chunks_kernel (gather_chunks.cuh): task
// (t, k) adds g * act(s) * w_out[e] (t counts from the token chunk's first token; gates and
// scores are the token chunk's, scores[t K + k] the score of task (t, k): TaskScores); the
// row (plus y's own when `add`: y already holds the shared branch) is stored in y.
template <class S>
struct OutputCoef {
  const float* gates;
  const S* scores;
  int K;
  Activation act;
  __device__ float operator()(i64 t, int k) const {
    return gates[t * K + k] * activate(act, to_f32(scores[t * K + k]));
  }
};
template <class S>
struct StoreOutput {
  S* y;
  int H;
  bool add;
  __device__ void operator()(i64 t, int v, float (&acc)[Vec<S>::kN]) const {
    S* row = y + t * H + v * Vec<S>::kN;
    if (add) {
      float yr[Vec<S>::kN];
      load16(row, yr);
#pragma unroll
      for (int i = 0; i < Vec<S>::kN; ++i) acc[i] += yr[i];
    }
    store16(row, acc);
  }
};

// The same for any H (rows not whole 16-byte vectors, wider than the register tile, or not
// 16-byte aligned): a block per token, each thread a column, the token's tasks walked in
// order (ids, gates and the activation re-read per column: a fallback, not a fast path).
template <class S>
__global__ void out_sparse_generic_kernel(int H, int K, Activation act, const S* __restrict__ scores, i64 Ec, i64 N,
                                          const S* __restrict__ w_out, const i32* __restrict__ ids,
                                          const float* __restrict__ gates, S* __restrict__ y, bool add) {
  const i64 t = blockIdx.x;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.f;
    for (i64 e0 = 0; e0 < N; e0 += Ec)  // chunk by chunk, as the vector kernel adds them
      for (int k = 0; k < K; ++k) {
        const i64 e = ids[t * K + k];
        if (e < e0 || e >= e0 + Ec || e >= N) continue;  // ids out of [0, N): in no chunk (poisoned later)
        const float g = gates[t * K + k] * activate(act, to_f32(scores[t * K + k]));
        acc = fmaf(g, to_f32(w_out[e * H + h]), acc);
      }
    y[t * H + h] = from_f32<S>(add ? acc + to_f32(y[t * H + h]) : acc);
  }
}

// The sparse output of one token chunk, every expert chunk in one launch.
template <class S>
Status launch_out_sparse(const ExpertsArgs& a, const DenseBuffers& b, i64 t0, i64 rows, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const i64 Ec = b.schedule.expert_chunk, N = c.num_experts();
  const int H = static_cast<int>(c.hidden), K = static_cast<int>(c.top_k);
  const auto* scores = static_cast<const S*>(b.scores.s);  // the chunk's, at its tasks
  const auto* w_out = static_cast<const S*>(a.w_out);
  const i32* ids = a.ids + t0 * K;
  const float* gates = a.gates + t0 * K;
  S* y = static_cast<S*>(a.y) + t0 * H;
  if (!vector_rows(a)) {
    out_sparse_generic_kernel<S><<<static_cast<unsigned>(rows), 256, 0, stream>>>(
        H, K, c.activation, scores, Ec, N, w_out, ids, gates, y, a.add);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense out_sparse_generic_kernel");
    return Status::Ok();
  }
  // The token chunk's rows walked in expert chunks of Ec (session g: one launch per token
  // chunk against one per expert chunk with the row through an fp32 buffer, -0.5 ms at
  // paper-k512-t4096).
  launch_gather_chunks<S>(rows, H, K, Ec, N, w_out, ids, OutputCoef<S>{gates, scores, K, c.activation},
                          StoreOutput<S>{y, H, a.add}, stream);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense gather_chunks_kernel (sparse output)");
  return Status::Ok();
}

// Product form: S = x w_inᵀ for tokens [t0, t0 + rows) and experts [e0, e0 + cols), into
// b.s, in the storage dtype (as a framework's bf16 product would give).
Status scores_product(const ExpertsArgs& a, const DenseBuffers& b, i64 t0, i64 rows, i64 e0, i64 cols,
                      cudaStream_t stream) {
  const i64 H = a.cfg->hidden;
  const DType dt = a.dtype;
  return gemm(gemm_args(false, true, rows, cols, H, at(a.x, t0 * H, dt), H, at(a.w_in, e0 * H, dt), H, b.s,
                        b.schedule.expert_chunk, dt, dt, 0.f),
              b.gemm, stream);
}

// Sparse form, one token chunk: the scores at its tasks, then its outputs in one launch
// (gather_chunks_kernel walks the expert chunks itself).
template <class S>
Status run_sparse_chunk(const ExpertsArgs& a, const DenseBuffers& b, i64 t0, i64 rows, cudaStream_t stream) {
  TaskScores ts = b.scores;  // its sort's outputs are per call
  OMNIMOE_RETURN_IF_ERROR(dense_task_scores(a, ts, t0, rows, stream));
  return launch_out_sparse<S>(a, b, t0, rows, stream);
}

// Product form, one token chunk: per expert chunk S, P at its tasks, yacc (+)= P w_out; then y.
template <class S>
Status run_product_chunk(const ExpertsArgs& a, const DenseBuffers& b, i64 t0, i64 rows, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const GroupSchedule& sc = b.schedule;  // extents: groups are the expert chunks
  const i64 H = c.hidden, K = c.top_k, N = c.num_experts(), Ec = sc.expert_chunk;
  const DType dt = a.dtype;
  const i32* ids = a.ids + t0 * K;  // this chunk's tasks, numbered from its first token
  const float* gates = a.gates + t0 * K;
  TokenChunkSchedule sort = b.sort;  // carved for a whole chunk: only its sub-chunks that hold tokens
  sort.n_tc = ceil_div(rows, sort.token_chunk);
  OMNIMOE_RETURN_IF_ERROR(schedule_token_chunks(ids, rows, K, sort, stream));
  const dim3 grid(static_cast<unsigned>(std::max<i64>(kScatterBlocks / sort.n_tc, 1)), static_cast<unsigned>(sort.n_tc));
  for (i64 ec = 0; ec < sc.n_ec; ++ec) {
    const i64 e0 = ec * Ec, cols = std::min(Ec, N - e0);
    OMNIMOE_RETURN_IF_ERROR(scores_product(a, b, t0, rows, e0, cols, stream));
    scatter_kernel<S, false><<<grid, kScatterThreads, 0, stream>>>(
        sort.tasks, sort.offsets, ec, sort.n_ec + 1, ids, gates, static_cast<const S*>(b.s), static_cast<S*>(b.p), 0, e0, Ec,
        static_cast<int>(K), c.activation);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense scatter_kernel");
    OMNIMOE_RETURN_IF_ERROR(gemm(gemm_args(false, false, rows, H, cols, b.p, Ec, at(a.w_out, e0 * H, dt), H, b.yacc,
                                           H, dt, DType::f32, ec > 0 ? 1.f : 0.f),
                                 b.gemm, stream));  // yacc (+)= P w_out
    scatter_kernel<S, true><<<grid, kScatterThreads, 0, stream>>>(
        sort.tasks, sort.offsets, ec, sort.n_ec + 1, ids, gates, static_cast<const S*>(b.s), static_cast<S*>(b.p), 0, e0, Ec,
        static_cast<int>(K), c.activation);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense clear_kernel");
  }
  store_kernel<S><<<ceil_div(rows * H, 256), 256, 0, stream>>>(b.yacc, rows * H, static_cast<S*>(a.y) + t0 * H,
                                                                 a.add);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense store_kernel");
  return Status::Ok();
}

template <class S>
Status run(const ExpertsArgs& a, const DenseBuffers& b, cudaStream_t stream) {
  const i64 T = a.T, H = a.cfg->hidden, K = a.cfg->top_k, Tc = b.schedule.token_chunk;
  const bool sparse = b.p == nullptr;  // the sparse output (carve_forward decided)
  if (!sparse)
    OMNIMOE_CUDA_TRY(
        cudaMemsetAsync(b.p, 0, static_cast<std::size_t>(Tc * b.schedule.expert_chunk) * sizeof(S), stream));
  for (i64 t0 = 0; t0 < T; t0 += Tc) {
    const i64 rows = std::min(Tc, T - t0);
    OMNIMOE_RETURN_IF_ERROR(sparse ? run_sparse_chunk<S>(a, b, t0, rows, stream)
                                   : run_product_chunk<S>(a, b, t0, rows, stream));
  }
  poison_kernel<S><<<ceil_div(T * K, 256), 256, 0, stream>>>(a.ids, T * K, static_cast<int>(K), static_cast<int>(H),
                                                             static_cast<S*>(a.y));
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_dense poison_kernel");
  return Status::Ok();
}

}  // namespace

bool dense_output_sparse(const Config& cfg, DType dtype) {
  if (const char* env = std::getenv("OMNIMOE_DENSE_OUTPUT")) {  // test switch, as OMNIMOE_EXPERTS_PATH
    if (std::string(env) == "sparse") return true;
    if (std::string(env) == "product") return false;
  }
  // Per (token, expert), at round H100 rates: the product costs 2 H flops on tensor cores
  // (CUDA cores in f32); the sparse output reads K / N of a w_out row from L2 (~6 TB/s) plus
  // the token's fp32 row in and out once per chunk, counted per 4096 experts (the 16-bit
  // sparse output passes once per 8192: the estimate leans towards the product). Only the
  // output side is weighed: the sparse form's score side (a tile product over the tiles a
  // token touches, not the dense S) is left out, which also leans towards the product. On
  // the H200 (session d, before the block-sparse scores and the current kernel) the sparse
  // form won at K = 512 and tied at K = 1024: worth re-measuring with both (dense_outputs).
  const double N = static_cast<double>(cfg.num_experts()), H = static_cast<double>(cfg.hidden);
  const double cols = std::min(N, 4096.0), es = static_cast<double>(dtype_size(dtype));
  const double product = 2.0 * H / (dtype == DType::f32 ? 40e12 : 550e12);
  const double sparse = (static_cast<double>(cfg.top_k) / N * H * es + 8.0 * H / cols) / 6e12;
  return sparse <= product;
}

Status experts_dense(const ExpertsArgs& a, const DenseBuffers& b, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::bf16: return run<__nv_bfloat16>(a, b, stream);
    case DType::f16: return run<__half>(a, b, stream);
    case DType::f32: return run<float>(a, b, stream);
    default: return {StatusCode::unsupported, "CUDA experts: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace omnimoe::cuda
